"""Image parametrisations of the optimisation attacks: what the optimiser moves, as a function giving the image.

The attacks minimise their objective over the normalised candidate batch x. A parametrisation writes
x = image(z) for variables z and lets the optimiser move z instead: the objective (gradient matching plus the
priors) is still a function of x, but the steps the optimiser takes, and so where a fixed budget ends, change.
Under a small budget this acts as an image prior (Mordvintsev, Pezzotti, Schubert, Olah 2018, "Differentiable
Image Parameterizations", Distill; Olah, Mordvintsev, Schubert 2017, "Feature Visualization", Distill, on
Laplacian-pyramid and spectral parametrisations).

- ``pixel``: x = z (the attacks' usual form).
- ``laplacian-K``: a Laplacian pyramid of K levels (Burt and Adelson 1983): z_0 at the image's size and z_k at
  1/2^k of it (sizes rounded up, at least 1), x = z_0 + sum_{k>0} up(z_k) with bilinear upsampling. Each level
  gets its own step (signed Adam: a step of the same size at every level), so coarse structure moves K-fold
  faster than pixel noise. The start is z_0 = the start image, the coarser levels 0: the first image is the
  pixel form's. The box constraint is kept on x: after every step the finest level absorbs
  ``clamp(x) - x``, so x lies in the box again and the coarse levels are untouched. :meth:`Laplacian.image`
  and :meth:`Laplacian.project` take one trial's levels (B, C, h, w) or stacked trials' (T, B, C, h, w) alike
  (the upsampling acts per sample), which is how batched trials (:mod:`.batched`) run pyramids.

Measured (docs/batchnorm.md, "Image parametrisations"): Inverting Gradients, untrained zoo ResNets at 32 px,
eval BatchNorm, batch 1, FedSGD, 500 iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ValidationError
from .common import numbered

NAMES = ("pixel", "laplacian-K")


def problems(name: str) -> list[str]:
    """What is wrong with a parametrisation name ([] if fine)."""
    if name == "pixel" or (numbered(name, "laplacian-") or 0) >= 2:
        return []
    return [f"parametrize must be 'pixel' or 'laplacian-K' (a pyramid of K >= 2 levels), got {name!r}"]


def case_problems(name: str, shape: tuple[int, ...]) -> list[str]:
    """Why ``name`` cannot parametrise samples of ``shape`` ([] if it can)."""
    p = problems(name)
    if p or name == "pixel":
        return p
    if len(shape) != 3:
        return [f"parametrize={name!r} needs image samples (C, H, W), got sample shape {tuple(shape)}"]
    return []


@dataclass(frozen=True)
class Pixel:
    """x = z."""

    name: str = "pixel"
    count: int = 1

    def variables(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def image(self, zs) -> torch.Tensor:
        return zs[0]

    def project(self, zs, lo: torch.Tensor, hi: torch.Tensor) -> None:
        zs[0].clamp_(lo, hi)

    @property
    def scale(self) -> float:
        """Variables per image element: 1."""
        return 1.0


@dataclass(frozen=True)
class Laplacian:
    """A Laplacian pyramid of ``levels`` levels over images of ``size`` (H, W); see the module docstring."""

    levels: int
    size: tuple[int, int]
    name: str = "laplacian"

    @property
    def count(self) -> int:
        return self.levels

    @property
    def sizes(self) -> list[tuple[int, int]]:
        h, w = self.size
        return [(max(1, math.ceil(h / 2 ** k)), max(1, math.ceil(w / 2 ** k))) for k in range(self.levels)]

    @property
    def scale(self) -> float:
        """Variables per image element: the levels' sizes over the image's (at most 4/3)."""
        h, w = self.size
        return sum(a * b for a, b in self.sizes) / (h * w)

    def variables(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid whose image is ``x`` (B, C, H, W): x itself at the finest level, zeros above."""
        b, c = x.shape[:2]
        return [x.clone()] + [x.new_zeros((b, c, *s)) for s in self.sizes[1:]]

    def image(self, zs) -> torch.Tensor:
        """The image of the levels ``zs``: (B, C, h_k, w_k) each, or stacked trials (T, B, C, h_k, w_k), whose
        image is the stacked images (the upsampling acts per sample)."""
        x = zs[0]
        for z in zs[1:self.levels]:
            up = F.interpolate(z.reshape(-1, *z.shape[-3:]), size=self.size, mode="bilinear", align_corners=False)
            x = x + up.view(*z.shape[:-2], *self.size)
        return x

    def project(self, zs, lo, hi) -> None:
        """Put the image back into the box [lo, hi] by changing the finest level only (in place; one trial's
        levels or stacked trials', as :meth:`image` takes them)."""
        with torch.no_grad():
            x = self.image(zs)
            zs[0].add_(x.clamp(lo, hi) - x)  # lo, hi: tensors broadcastable against x, or floats


def full_levels(shape: tuple[int, ...]) -> int:
    """Levels of a Laplacian pyramid down to 1 x 1 over samples of ``shape`` (C, H, W):
    floor(log2(min(H, W))) + 1 (6 at 32 px)."""
    return int(math.floor(math.log2(min(shape[-2:])))) + 1


def build(name: str, shape: tuple[int, ...]):
    """The parametrisation ``name`` for samples of ``shape``; raises :class:`ValidationError` when it cannot
    apply (an unknown name, a non-image sample)."""
    p = case_problems(name, tuple(shape))
    if p:
        raise ValidationError("parametrize", p)
    if name == "pixel":
        return Pixel()
    levels = numbered(name, "laplacian-")
    return Laplacian(levels, (int(shape[-2]), int(shape[-1])), name=name)
