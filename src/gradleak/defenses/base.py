"""The defense contract, typed options, composition and the name registry.

A :class:`Defense` is one of two kinds:

- an UPDATE TRANSFORM (``acts_in_client = False``): ``defense(update, generator) -> update``, applied to what
  the client would otherwise send (noise, clip-update, prune, quantize, topk);
- an IN-CLIENT defense (``acts_in_client = True``): it changes the client's computation itself (DP-SGD clips
  each example's gradient before they are summed; Soteria needs the inputs). It implements
  ``client_update(client, generator) -> update`` where ``client`` is a :class:`gradleak.simulate.Client`;
  ``simulate`` and ``gl.defenses.utility`` call it instead of the plain client computation.

Options are dataclass fields declared with :func:`option` (type, range, choices). They are checked when the
defense is built (from Python or from a CLI spec string) and every bad value is reported in one
:class:`~gradleak.errors.ValidationError` naming the defense.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ValidationError
from ..registry import Registry

Update = Mapping[str, torch.Tensor]
defenses: Registry[type] = Registry("defense")

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option(default: Any, kind: type, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           optional: bool = False, doc: str = ""):
    """A typed defense option: ``kind`` is float, int, bool or str; a number must be finite and lie in
    [low, high] (an open end with ``low_open`` / ``high_open``); a str must be one of ``choices``;
    None is allowed only when ``optional``."""
    meta = dict(kind=kind, low=low, high=high, low_open=low_open, high_open=high_open, choices=choices,
                optional=optional, doc=doc)
    return field(default=default, metadata={"option": meta})


def _range_text(m: dict) -> str:
    lo, hi = m["low"], m["high"]
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if m['low_open'] else '>='} {lo}"
    if lo is None:
        return f" {'<' if m['high_open'] else '<='} {hi}"
    return f" in {'(' if m['low_open'] else '['}{lo}, {hi}{')' if m['high_open'] else ']'}"


def option_problems(name: str, value: Any, m: dict) -> list[str]:
    """What is wrong with ``value`` for option ``name`` (declared with :func:`option`): [] when it is fine."""
    kind = m["kind"]
    if value is None:
        return [] if m["optional"] else [f"{name} must be a {kind.__name__}{_range_text(m)}, got None"]
    if kind is bool:
        return [] if isinstance(value, bool) else [f"{name} must be true or false, got {type(value).__name__} {value!r}"]
    if kind is str:
        if not isinstance(value, str):
            return [f"{name} must be a str, got {type(value).__name__} {value!r}"]
        if m["choices"] and value not in m["choices"]:
            return [f"{name} must be one of {', '.join(repr(c) for c in m['choices'])}, got {value!r}"]
        return []
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        want = "an int"
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        want = "a number"
    if not ok:
        return [f"{name} must be {want}{_range_text(m)}, got {type(value).__name__} {value!r}"]
    if not math.isfinite(float(value)):
        return [f"{name} must be finite{_range_text(m)}, got {value}"]
    lo, hi = m["low"], m["high"]
    if (lo is not None and (value <= lo if m["low_open"] else value < lo)) or \
            (hi is not None and (value >= hi if m["high_open"] else value > hi)):
        return [f"{name} must be{_range_text(m)}, got {value}"]
    return []


def _options(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "option" in f.metadata}


def _meta(cls, key: str) -> dict | None:
    """The option declaration of field ``key``; a plain dataclass field (no :func:`option`) is typed by its
    default (so a subclass written without ``option`` still converts CLI strings)."""
    for f in dataclasses.fields(cls):
        if f.name == key and f.init and not f.name.startswith("_") and f.name != "parts":
            if "option" in f.metadata:
                return f.metadata["option"]
            d = f.default
            kind = type(d) if isinstance(d, (bool, int, float, str)) else str
            return dict(kind=kind, low=None, high=None, low_open=False, high_open=False, choices=None,
                        optional=d is None, doc="")
    return None


class Defense:
    """Base class. Subclasses are dataclasses whose fields are declared with :func:`option`; they set
    ``name`` (the registry name), and implement ``__call__`` (an update transform) or, with
    ``acts_in_client = True``, ``client_update``. A defense never modifies its input."""

    name: ClassVar[str] = "defense"
    acts_in_client: ClassVar[bool] = False
    aggregates: ClassVar[bool] = False  # secure aggregation: needs the other clients (see simulate)

    def __post_init__(self):
        problems = []
        for n, f in _options(type(self)).items():
            problems += option_problems(n, getattr(self, n), f.metadata["option"])
        if not problems:
            problems = self.check()
        if problems:
            raise ValidationError(f"{self.name} defense", problems)

    def check(self) -> list[str]:
        """Problems that involve more than one option (each option's own type and range are checked first)."""
        return []

    def __call__(self, update: Update, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} acts inside the client's computation: use client_update")

    def client_update(self, client, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The update ``client`` (a :class:`gradleak.simulate.Client`) sends. Default: the plain client
        computation followed by this transform."""
        return self(client.update(), generator)

    def privacy(self, steps_per_round: int = 1) -> dict | None:
        """The (epsilon, delta) accounting of this defense, or None when it has none (only DP-SGD has one).
        ``steps_per_round``: noisy gradient steps in one update (FedAvg: the local steps)."""
        return None

    def for_run(self, steps: int, sample_rate: float) -> "Defense":
        """This defense as used in a training run of ``steps`` gradient steps per client at ``sample_rate``
        (DP-SGD accounts, and calibrates a target epsilon, for them); itself when that changes nothing."""
        return self

    def reset(self) -> None:
        """Forget state carried from update to update (topk's error-feedback residual); a no-op otherwise."""

    @property
    def description(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)}" for k in _options(type(self)) if getattr(self, k) is not None)
        return f"{self.name}({fields})"

    def __add__(self, other: "Defense") -> "Compose":
        return compose(self, other)


@dataclass
class Compose(Defense):
    """Apply defenses in order: at most one in-client defense, and it comes first (an update transform of
    what the client sends cannot run before the client has computed it)."""

    parts: tuple = ()
    name: ClassVar[str] = "compose"

    def check(self):
        inside = [i for i, p in enumerate(self.parts) if p.acts_in_client]
        agg = [i for i, p in enumerate(self.parts) if p.aggregates]
        problems = []
        if len(inside) > 1 or (inside and inside[0] != 0):
            problems.append(f"at most one in-client defense, listed first; got {self.description}")
        if len(agg) > 1 or (agg and agg[0] != len(self.parts) - 1):
            problems.append(f"secure aggregation must be the last part, once; got {self.description}")
        return problems

    @property
    def acts_in_client(self) -> bool:  # type: ignore[override]
        return bool(self.parts) and self.parts[0].acts_in_client

    @property
    def aggregates(self) -> bool:  # type: ignore[override]
        return bool(self.parts) and self.parts[-1].aggregates

    @property
    def per_client(self) -> Defense | None:
        """What each client applies before secure aggregation (None: nothing)."""
        rest = self.parts[:-1] if self.aggregates else self.parts
        return compose(*rest) if rest else None

    def __call__(self, update, generator=None):
        for p in self.parts:
            update = p(update, generator)
        return dict(update)

    def client_update(self, client, generator=None):
        first, *rest = self.parts
        update = first.client_update(client, generator)
        for p in rest:
            update = p(update, generator)
        return dict(update)

    def for_run(self, steps, sample_rate):
        return Compose(tuple(p.for_run(steps, sample_rate) for p in self.parts))

    def privacy(self, steps_per_round=1):
        found = [p.privacy(steps_per_round) for p in self.parts]
        found = [f for f in found if f is not None]
        return found[0] if found else None  # post-processing keeps DP-SGD's guarantee

    def reset(self):
        for p in self.parts:
            p.reset()

    @property
    def description(self) -> str:
        return " + ".join(p.description for p in self.parts)


def _convert(defense: str, key: str, value: Any, m: dict) -> Any:
    """A CLI string to the option's type (``"False"`` is False, ``"none"`` is None for an optional option);
    anything else is passed through to the option check."""
    if not isinstance(value, str) or m["kind"] is str:
        return value
    v = value.strip()
    if m["kind"] is bool:
        if v.lower() in _TRUE + _FALSE:
            return v.lower() in _TRUE
        raise ValidationError(f"{defense} defense", [f"option {key}={value!r} must be true or false"])
    try:
        return int(v) if m["kind"] is int else float(v)
    except ValueError:
        raise ValidationError(f"{defense} defense", [f"option {key}={value!r} is not a{'n' if m['kind'] is int else ''} "
                                                     f"{m['kind'].__name__}"]) from None


def create(name: str, **options) -> Defense:
    """Build a defense by registry name: ``create("noise", sigma=0.01)``. Strings (from a CLI spec) are
    converted to the option's type; unknown options and bad values are one error naming the defense."""
    cls = defenses.get(name)
    metas = {k: _meta(cls, k) for k in options}
    bad = [k for k, m in metas.items() if m is None]
    if bad:
        valid = sorted(f.name for f in dataclasses.fields(cls) if _meta(cls, f.name) is not None)
        raise ValidationError(f"{cls.name} defense", [f"unknown option(s) {bad}; valid: {valid}"])
    return cls(**{k: _convert(cls.name, k, v, metas[k]) for k, v in options.items()})


def parse(spec: str) -> Defense:
    """Parse a CLI defense spec like ``"prune:ratio=0.9"`` or ``"dp-sgd:max_grad_norm=1,noise_multiplier=1.1"``."""
    if not isinstance(spec, str):
        raise ValidationError("defense spec", [f"expected a string like 'noise:sigma=0.01', got {type(spec).__name__}"])
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValidationError("defense spec", [f"expected name:key=value,... like 'noise:sigma=0.01', got {spec!r}"])
        opts[k.strip()] = v.strip()
    return create(name.strip(), **opts)


def compose(*parts: Defense) -> Defense:
    """Apply defenses in order (nested compositions are flattened)."""
    flat: list[Defense] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Compose) else (p,))
    if not flat:
        raise ValidationError("compose", ["expected at least one defense"])
    return flat[0] if len(flat) == 1 else Compose(tuple(flat))


def as_defense(d: Defense | str) -> Defense:
    """A Defense from a Defense or a CLI spec string."""
    if isinstance(d, Defense):
        return d
    return parse(d)
