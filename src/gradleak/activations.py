"""Activation functions with what the closed-form attacks need: the derivative and, where it exists,
the inverse. A registry: ``activations.register("name")`` adds a user's own (see :class:`Activation`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """fn: sigma(z). grad: sigma'(z). inverse: z from y = sigma(z), or None if not invertible.
    positively_homogeneous: sigma(c z) = c sigma(z) for c > 0 (ReLU family)."""

    name: str
    fn: TensorFn
    grad: TensorFn
    inverse: Optional[TensorFn] = None
    positively_homogeneous: bool = False

    @property
    def invertible(self) -> bool:
        return self.inverse is not None


activations: Registry[Activation] = Registry("activation")


def add(act: Activation, aliases: tuple[str, ...] = (), overwrite: bool = False) -> Activation:
    """Register an :class:`Activation` (usable in every model option ``activation=`` and by the attacks)."""
    return activations.register(act.name, aliases=aliases, overwrite=overwrite)(act)


LEAKY_SLOPE = 0.2


def _atanh(y: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(y.dtype).eps
    return torch.atanh(y.clamp(-1 + eps, 1 - eps))


def _logit(y: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(y.dtype).eps
    return torch.logit(y.clamp(eps, 1 - eps))


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp_min(torch.finfo(y.dtype).tiny)
    return y + torch.log(-torch.expm1(-y))


add(Activation("identity", lambda z: z, torch.ones_like, lambda y: y, True), aliases=("linear",))
add(Activation("relu", F.relu, lambda z: (z > 0).to(z.dtype), None, True))
add(Activation("leaky-relu", lambda z: F.leaky_relu(z, LEAKY_SLOPE),
               lambda z: torch.where(z >= 0, torch.ones_like(z), torch.full_like(z, LEAKY_SLOPE)),
               lambda y: torch.where(y >= 0, y, y / LEAKY_SLOPE), True), aliases=("lrelu",))
add(Activation("sigmoid", torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), _logit))
add(Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, _atanh))
add(Activation("softplus", F.softplus, torch.sigmoid, _softplus_inv))
add(Activation("gelu", F.gelu, lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)))
add(Activation("silu", F.silu, lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))), aliases=("swish",))


class Act(nn.Module):
    """An activation layer that carries its registry name (``self.activation``), so analyses can read it."""

    def __init__(self, name: str):
        super().__init__()
        self.activation = activations.get(name)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation.fn(z)

    def extra_repr(self) -> str:
        return self.activation.name
