"""Update transforms: what the client sends is computed as usual, then transformed (``update -> update``).
None of these carries a privacy guarantee; only :mod:`gradleak.defenses.dpsgd` does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import Defense, defenses, option


def _noise_like(t: torch.Tensor, generator, kind: str) -> torch.Tensor:
    """Standard Gaussian, or Laplace of scale 1, drawn on the CPU from ``generator`` (device-independent)."""
    if kind == "gaussian":
        return torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
    u = torch.rand(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def global_norm(update) -> torch.Tensor:
    """The L2 norm of the whole update (float64)."""
    return torch.sqrt(sum(v.double().pow(2).sum() for v in update.values()))


@defenses.register("noise")
@dataclass
class Noise(Defense):
    """Add i.i.d. noise to every entry: Gaussian of std ``sigma``, or Laplace of scale ``scale`` (b; std b*sqrt 2).

    No default level: ``noise:sigma=0.01`` or ``noise:kind=laplace,scale=0.01``."""

    sigma: float | None = option(None, float, low=0, optional=True, doc="Gaussian std")
    kind: str = option("gaussian", str, choices=("gaussian", "laplace"))
    scale: float | None = option(None, float, low=0, optional=True, doc="Laplace scale b")
    name: ClassVar[str] = "noise"

    def check(self):
        if self.kind == "gaussian":
            if self.sigma is None:
                return ["Gaussian noise needs sigma (a number >= 0)"]
            if self.scale is not None:
                return ["scale is the Laplace scale; Gaussian noise takes sigma"]
        else:
            if self.scale is None:
                return ["Laplace noise needs scale (a number >= 0), e.g. noise:kind=laplace,scale=0.01"]
            if self.sigma is not None:
                return ["sigma is the Gaussian std; Laplace noise takes scale"]
        return []

    @property
    def amplitude(self) -> float:
        return float(self.sigma if self.kind == "gaussian" else self.scale)

    def __call__(self, update, generator=None):
        a = self.amplitude
        return {k: v + a * _noise_like(v, generator, self.kind) for k, v in update.items()}


@defenses.register("clip-update")
@dataclass
class ClipUpdate(Defense):
    """Scale the whole update down to L2 norm ``max_norm`` (a bound on what one client sends, not DP-SGD)."""

    max_norm: float = option(1.0, float, low=0, low_open=True)
    name: ClassVar[str] = "clip-update"

    def __call__(self, update, generator=None):
        scale = min(1.0, self.max_norm / max(float(global_norm(update)), 1e-300))
        return {k: v * scale for k, v in update.items()}


@defenses.register("clip-noise-update")
@dataclass
class ClipNoiseUpdate(Defense):
    """Clip the whole update to ``max_norm``, add N(0, (noise_multiplier*max_norm)^2): NOT DP-SGD, no epsilon.

    The batch's update is clipped as one vector, so one example's influence is not bounded by max_norm / B
    and no per-example privacy accounting applies. For DP-SGD (per-example clipping, noise on the sum, an
    accountant's epsilon) use ``dp-sgd``."""

    max_norm: float = option(1.0, float, low=0, low_open=True)
    noise_multiplier: float = option(1.0, float, low=0)
    name: ClassVar[str] = "clip-noise-update"

    def __call__(self, update, generator=None):
        clipped = ClipUpdate(self.max_norm)(update)
        return Noise(sigma=self.noise_multiplier * self.max_norm)(clipped, generator)


@defenses.register("prune")
@dataclass
class Prune(Defense):
    """Zero the ``ratio`` fraction of entries of smallest magnitude, per tensor ('layer') or over all ('global')."""

    ratio: float = option(0.9, float, low=0, high=1, high_open=True)
    scope: str = option("layer", str, choices=("layer", "global"))
    name: ClassVar[str] = "prune"

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


@defenses.register("quantize")
@dataclass
class Quantize(Defense):
    """Uniform quantisation to ``bits`` bits per tensor (bits=1: sign times the tensor's mean magnitude).

    Symmetric: 2^(bits-1)-1 levels per sign, scaled by the tensor's largest magnitude."""

    bits: int = option(8, int, low=1, high=32)
    name: ClassVar[str] = "quantize"

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


@defenses.register("topk")
@dataclass
class TopK(Defense):
    """Top-k sparsification: send the ``ratio`` fraction of largest-magnitude entries, with optional error feedback.

    Over the whole update. With error feedback, what was not sent is added to the next update.

    Error feedback is client state: the defense object keeps the residual (what it withheld) and adds it to
    the next update it is given. For ONE update (``simulate``) the residual starts at zero, so the first update
    equals plain top-k; ``gl.defenses.utility`` gives every client its own copy, carried across rounds.
    ``reset()`` forgets the residual."""

    ratio: float = option(0.1, float, low=0, high=1, low_open=True, doc="fraction of entries sent")
    error_feedback: bool = option(False, bool)
    name: ClassVar[str] = "topk"
    _residual: dict | None = field(default=None, init=False, repr=False, compare=False)

    def reset(self):
        self._residual = None

    def __call__(self, update, generator=None):
        if self.error_feedback and self._residual is not None:
            if set(self._residual) != set(update) or any(self._residual[k].shape != v.shape for k, v in update.items()):
                self._residual = None  # another model: the carried residual does not apply
        acc = {k: v + self._residual[k] if self.error_feedback and self._residual is not None else v
               for k, v in update.items()}
        allv = torch.cat([v.abs().reshape(-1).double() for v in acc.values()])
        k = max(1, int(round(self.ratio * allv.numel())))
        thr = allv.topk(k).values[-1]
        # ties at the threshold are kept, so at least k entries are sent
        out = {n: torch.where(v.abs().double() >= thr, v, torch.zeros_like(v)) for n, v in acc.items()}
        if self.error_feedback:
            self._residual = {n: (acc[n] - out[n]).detach() for n in acc}
        return out
