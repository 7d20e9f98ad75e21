"""Typed errors. Every message says what was expected and what was found."""

from __future__ import annotations

from typing import Iterable


class GradleakError(Exception):
    """Base class of every error gradleak raises on purpose (the CLI turns these into one line, exit 2)."""


class ValidationError(GradleakError, ValueError):
    """An input failed validation. ``problems`` lists every problem found, not only the first."""

    def __init__(self, what: str, problems: Iterable[str]):
        self.what = what
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = f"{what}: {self.problems[0]}"
        else:
            msg = f"{what}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(msg)


class UnknownNameError(GradleakError, LookupError):
    """A name is not in a registry (with suggestions)."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError; keep it readable
        return str(self.args[0]) if self.args else ""


class RequirementError(GradleakError):
    """An attack or analysis cannot handle this case; ``problems`` lists every unmet requirement."""

    def __init__(self, who: str, problems: Iterable[str]):
        self.who = who
        self.problems = list(problems)
        super().__init__(f"{who} cannot run on this case: " + "; ".join(self.problems))


class DataError(GradleakError):
    """Data could not be found or read (missing file, empty folder, corrupt tensor file)."""


class WeightsError(GradleakError):
    """A checkpoint does not fit a model (missing, unexpected or mis-shaped keys)."""


class NumericalError(GradleakError):
    """A computation produced no finite result."""


class OutputError(GradleakError):
    """An output (run directory, checkpoint file) cannot be written: it is a file, not writable, holds a
    previous run, or another run is writing it. Raised before any work."""


class ResourceError(GradleakError):
    """A job would need more memory (or another resource) than the machine has; raised before the work."""


def raise_if(problems: list[str], what: str) -> None:
    """Raise a ValidationError listing ``problems`` when there are any."""
    if problems:
        raise ValidationError(what, problems)
