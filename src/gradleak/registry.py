"""One generic name registry: kebab-case names, aliases, "did you mean", and an overwrite guard."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")

_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class Registry(Generic[T]):
    """Maps kebab-case names (and aliases) to objects.

    >>> reg = Registry("attack")
    >>> @reg.register("my-attack", aliases=("ma",))
    ... class MyAttack: ...
    >>> reg.get("ma") is MyAttack
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), overwrite: bool = False) -> Callable[[T], T]:
        for n in (name, *aliases):
            if not _KEBAB.match(n):
                raise ValueError(f"{self.kind} name {n!r} must be kebab-case (lowercase words joined by '-')")

        def deco(obj: T) -> T:
            taken = [n for n in (name, *aliases) if n in self._items or n in self._aliases]
            if taken and not overwrite:
                raise ValueError(
                    f"{self.kind} name(s) {taken} already registered; pass overwrite=True to replace them"
                )
            self._items[name] = obj
            for a in aliases:
                self._aliases[a] = name
            return obj

        return deco

    def canonical(self, name: str) -> str:
        key = name.strip().lower().replace("_", "-")
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        known = sorted(self._items) + sorted(self._aliases)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}: expected one of {', '.join(sorted(self._items))}{hint}")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def aliases_of(self, name: str) -> list[str]:
        c = self.canonical(name)
        return sorted(a for a, n in self._aliases.items() if n == c)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
