"""Defenses: transforms of the observed update (``update -> update``), composable, applied by
``simulate(..., defense=...)``. Noise takes a ``torch.Generator``; nothing else is random.

- ``noise``: add Gaussian (or Laplace) noise of scale ``sigma`` to every tensor.
- ``clip``: scale the whole update down to global L2 norm ``max_norm`` (DP-SGD style clipping of the batch).
- ``dp``: clip to ``max_norm`` then add Gaussian noise ``noise_multiplier * max_norm``.
- ``prune``: zero the ``ratio`` fraction of entries with the smallest magnitude (per tensor or global).
- ``quantize``: uniform quantisation to ``bits`` bits per tensor (bits=1: sign times the mean magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import ValidationError
from ..registry import Registry
from ..validate import int_problems, number_problems

Update = Mapping[str, torch.Tensor]
defenses: Registry[type] = Registry("defense")


class Defense:
    """Base: a callable ``(update, generator=None) -> update``; never modifies its input."""

    def __call__(self, update: Update, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def description(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({fields})"

    def __add__(self, other: "Defense") -> "Compose":
        return Compose((self, other))


def _noise_like(t: torch.Tensor, generator, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
    u = torch.rand(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@defenses.register("noise")
@dataclass
class Noise(Defense):
    sigma: float = 0.01
    kind: str = "gaussian"
    name = "noise"

    def __post_init__(self):
        p = number_problems(self.sigma, "sigma", minimum=0)
        if self.kind not in ("gaussian", "laplace"):
            p.append(f"kind must be 'gaussian' or 'laplace', got {self.kind!r}")
        if p:
            raise ValidationError("noise defense", p)

    def __call__(self, update, generator=None):
        return {k: v + self.sigma * _noise_like(v, generator, self.kind) for k, v in update.items()}


def _global_norm(update: Update) -> torch.Tensor:
    return torch.sqrt(sum(v.double().pow(2).sum() for v in update.values()))


@defenses.register("clip")
@dataclass
class Clip(Defense):
    max_norm: float = 1.0
    name = "clip"

    def __post_init__(self):
        p = number_problems(self.max_norm, "max_norm", positive=True)
        if p:
            raise ValidationError("clip defense", p)

    def __call__(self, update, generator=None):
        scale = min(1.0, self.max_norm / max(float(_global_norm(update)), 1e-300))
        return {k: v * scale for k, v in update.items()}


@defenses.register("dp")
@dataclass
class DP(Defense):
    max_norm: float = 1.0
    noise_multiplier: float = 1.0
    name = "dp"

    def __post_init__(self):
        p = number_problems(self.max_norm, "max_norm", positive=True)
        p += number_problems(self.noise_multiplier, "noise_multiplier", minimum=0)
        if p:
            raise ValidationError("dp defense", p)

    def __call__(self, update, generator=None):
        clipped = Clip(self.max_norm)(update)
        return Noise(self.noise_multiplier * self.max_norm)(clipped, generator)


@defenses.register("prune")
@dataclass
class Prune(Defense):
    ratio: float = 0.9
    scope: str = "layer"
    name = "prune"

    def __post_init__(self):
        p = number_problems(self.ratio, "ratio", minimum=0)
        if not p and not self.ratio < 1:
            p.append(f"ratio must be in [0, 1), got {self.ratio}")
        if self.scope not in ("layer", "global"):
            p.append(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if p:
            raise ValidationError("prune defense", p)

    def __call__(self, update, generator=None):
        if self.ratio == 0:
            return {k: v.clone() for k, v in update.items()}
        if self.scope == "global":
            allv = torch.cat([v.abs().reshape(-1).double() for v in update.values()])
            k = int(self.ratio * allv.numel())
            thr = allv.kthvalue(k).values if k > 0 else allv.min() - 1
            return {n: torch.where(v.abs().double() > thr, v, torch.zeros_like(v)) for n, v in update.items()}
        out = {}
        for n, v in update.items():
            k = int(self.ratio * v.numel())
            if k == 0:
                out[n] = v.clone()
                continue
            thr = v.abs().reshape(-1).kthvalue(k).values
            out[n] = torch.where(v.abs() > thr, v, torch.zeros_like(v))
        return out


@defenses.register("quantize", )
@dataclass
class Quantize(Defense):
    bits: int = 8
    name = "quantize"

    def __post_init__(self):
        p = int_problems(self.bits, "bits", minimum=1, maximum=32)
        if p:
            raise ValidationError("quantize defense", p)

    def __call__(self, update, generator=None):
        out = {}
        for n, v in update.items():
            if self.bits == 1:
                out[n] = torch.sign(v) * v.abs().mean()
                continue
            m = v.abs().max()
            if m == 0:
                out[n] = v.clone()
                continue
            levels = 2 ** (self.bits - 1) - 1
            out[n] = torch.round(v / m * levels) / levels * m
        return out


@dataclass
class Compose(Defense):
    parts: tuple
    name = "compose"

    def __call__(self, update, generator=None):
        for p in self.parts:
            update = p(update, generator)
        return dict(update)

    @property
    def description(self) -> str:
        return " + ".join(p.description for p in self.parts)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(name: str, key: str, value, default):
    """A CLI string to the type of the option's default; a bool is parsed, never ``bool("False")``."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    v = value.strip()
    if isinstance(default, bool):
        if v.lower() in _TRUE + _FALSE:
            return v.lower() in _TRUE
        raise ValidationError(f"{name} defense", [f"option {key}={value!r} must be true or false"])
    try:
        return type(default)(v)
    except ValueError:
        raise ValidationError(f"{name} defense", [f"option {key}={value!r} is not a {type(default).__name__}"]) \
            from None


def create(name: str, **options) -> Defense:
    """Build a defense by name: ``create("noise", sigma=0.01)``; unknown options are an error, and so is a
    value of the wrong type (every error names the defense)."""
    cls = defenses.get(name)
    import dataclasses

    valid = {f.name: f for f in dataclasses.fields(cls)}
    bad = [k for k in options if k not in valid]
    if bad:
        raise ValidationError(f"{cls.name} defense", [f"unknown option(s) {bad}; valid: {sorted(valid)}"])
    conv = {k: _convert(cls.name, k, v, valid[k].default) for k, v in options.items()}
    return cls(**conv)


def parse(spec: str) -> Defense:
    """Parse a CLI defense spec like ``"prune:ratio=0.9"`` or ``"dp:max_norm=1,noise_multiplier=0.5"``."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValidationError("defense spec", [f"expected name:key=value,... like 'noise:sigma=0.01', got {spec!r}"])
        opts[k.strip()] = v.strip()
    return create(name.strip(), **opts)


def compose(*parts: Defense) -> Defense:
    """Apply defenses in order."""
    return parts[0] if len(parts) == 1 else Compose(tuple(parts))


__all__ = ["Defense", "Noise", "Clip", "DP", "Prune", "Quantize", "Compose", "create", "parse", "compose", "defenses"]
