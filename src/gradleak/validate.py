"""Checks of common arguments, one home each. Every check returns the problems it found as sentences (empty
when the value is fine), so a caller can gather them into one :class:`~gradleak.errors.ValidationError`;
``require_*`` variants raise it directly (see also :func:`gradleak.errors.raise_if`).

Used by the CLI, :mod:`gradleak.experiment`, :mod:`gradleak.training` and the attack base class.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import raise_if

# torch.Generator.manual_seed accepts [-2**63, 2**64); a negative seed is mapped onto that range, so only
# non-negative seeds are offered (they name every generator state the range names)
SEED_MAX = 2 ** 64 - 1


def is_int(v: Any) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def seed_problems(seed: Any, name: str = "seed") -> list[str]:
    """``seed`` must be an int in [0, 2**64 - 1] (what torch.Generator.manual_seed takes)."""
    if not is_int(seed):
        return [f"{name} must be an int in [0, 2**64 - 1], got {type(seed).__name__} {seed!r}"]
    if not 0 <= int(seed) <= SEED_MAX:
        return [f"{name} must lie in [0, 2**64 - 1], got {seed}"]
    return []


def int_problems(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
                 optional: bool = False) -> list[str]:
    """``value`` must be an int (not a bool, not a float) within [minimum, maximum]; None passes if ``optional``."""
    if value is None and optional:
        return []
    rng = (f" >= {minimum}" if maximum is None else f" in [{minimum}, {maximum}]") if minimum is not None else (
        f" <= {maximum}" if maximum is not None else "")
    if not is_int(value):
        return [f"{name} must be an int{rng}{' (or None)' if optional else ''}, got {type(value).__name__} {value!r}"]
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        return [f"{name} must be an int{rng}, got {value}"]
    return []


def number_problems(value: Any, name: str, *, minimum: float | None = None, positive: bool = False,
                    optional: bool = False) -> list[str]:
    """``value`` must be a finite real number (not a bool), > 0 if ``positive``, >= ``minimum`` if given."""
    if value is None and optional:
        return []
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return [f"{name} must be a number, got {type(value).__name__} {value!r}"]
    if not math.isfinite(float(value)):
        return [f"{name} must be finite, got {value}"]
    if positive and not value > 0:
        return [f"{name} must be > 0, got {value}"]
    if minimum is not None and value < minimum:
        return [f"{name} must be >= {minimum}, got {value}"]
    return []


def labels_problems(labels: Any, *, num_classes: int | None = None, batch_size: int | None = None,
                    name: str = "labels") -> list[str]:
    """Integer class indices of shape (B,) in [0, num_classes): floats are never truncated."""
    import torch

    try:
        lab = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return [f"{name} must be int class indices (a tensor or list of ints), got {type(labels).__name__}"]
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        return [f"{name} must be int class indices, got {lab.dtype} values {lab.flatten()[:8].tolist()} "
                "(floats are not truncated)"]
    if lab.ndim != 1:
        return [f"{name} must have shape (B,), got {tuple(lab.shape)}"]
    problems = []
    if batch_size is not None and lab.shape[0] != batch_size:
        problems.append(f"{name} has {lab.shape[0]} entries, expected one per image ({batch_size})")
    if lab.numel() and int(lab.min()) < 0:
        problems.append(f"{name} must be >= 0, got {int(lab.min())}")
    if num_classes is not None and lab.numel() and int(lab.max()) >= num_classes:
        problems.append(f"{name} must lie in [0, {num_classes - 1}] ({num_classes} classes), got up to {int(lab.max())}")
    return problems


def module_problems(model: Any, name: str = "model") -> list[str]:
    """``model`` must be a torch.nn.Module (a zoo name must first go through ``gradleak.models.build``)."""
    from torch import nn

    if isinstance(model, nn.Module):
        return []
    hint = (f" (build it first: gradleak.models.build({model!r}, input_shape=..., num_classes=...))"
            if isinstance(model, str) else "")
    return [f"{name} must be a torch.nn.Module, got {type(model).__name__}{hint}"]


def require_seed(seed: Any, what: str = "seed") -> int:
    """The seed as an int, or a :class:`ValidationError`."""
    raise_if(seed_problems(seed), what)
    return int(seed)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problems(device: Any, name: str = "device", dtype: Any = None) -> list[str]:
    """Whether ``device`` names a device kind gradleak runs on ('cpu', 'cuda', 'cuda:N', 'mps', a
    ``torch.device``; None means the CPU), and, given ``dtype`` (a torch dtype or its name), whether that
    device computes in it (Apple's MPS has no float64). Whether this machine has the device is
    :func:`require_device`'s check."""
    import torch

    if device is None:
        return []
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        return [f"{name} must be one of {', '.join(DEVICE_TYPES)} (or cuda:N), got {device!r}"]
    if dev.type == "mps" and str(dtype).replace("torch.", "") in ("float64", "double"):
        return [f"{name} {device!r} has no float64 (Apple's MPS computes in float32 at most): use dtype float32"]
    return []


def require_device(device: Any, what: str = "device"):
    """``device`` ('cpu', 'cuda', 'cuda:N', 'mps', a ``torch.device``; None: CPU) as a ``torch.device`` that
    exists on this machine. A malformed name is a :class:`ValidationError`; a device this machine lacks is a
    :class:`~gradleak.errors.ResourceError` with one line, e.g. "cuda requested but torch.cuda.is_available()
    is False"."""
    import torch

    from .errors import ResourceError

    raise_if(device_problems(device), what)
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(f"{dev} requested but torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ResourceError(f"{dev} requested but torch.cuda.device_count() is {torch.cuda.device_count()}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ResourceError(f"{dev} requested but torch.backends.mps.is_available() is False")
    return dev


def file_format_hint(path) -> str:
    """A short phrase on what a file that failed to load as tensors looks like (empty, text, not a zip/pickle
    torch.save file, not safetensors), for the error message; '' when nothing can be told."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return ""
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive but not a complete torch.save() file"
    if head[:1] == b"\x80":
        return "it is a pickle but not a dict of tensors torch.load(weights_only=True) accepts"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "it is neither a torch.save() file (zip or pickle) nor a safetensors file"
    if text.isprintable() or all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file (starts with {text[:24]!r}), not a tensor file"
    return ""


__all__ = ["file_format_hint", "SEED_MAX", "is_int", "seed_problems", "int_problems", "number_problems", "labels_problems",
           "module_problems", "require_seed", "require_device", "device_problems", "DEVICE_TYPES"]
