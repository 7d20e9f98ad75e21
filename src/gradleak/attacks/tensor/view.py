"""Where the random two-layer part of a model lives, and the observation the attack reads from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...activations import Activation
from ...activations import resolve as resolve_activation
from ...case import Case, FedAvg


@dataclass
class TwoLayerView:
    """Where the random two-layer part of a model lives.

    hidden / out: module names of the first Linear (d_in -> m) and the output Linear (m -> K);
    activation: the registry Activation between them; body: names of the leaf modules before the head (empty
    for a plain two-layer network); has_bias: the first layer has a (non-zero) bias."""

    hidden: str
    out: str
    activation: Activation
    d_in: int
    width: int
    num_outputs: int
    has_bias: bool
    body: list[str] = field(default_factory=list)

    @property
    def weight_key(self) -> str:
        return f"{self.hidden}.weight"

    @property
    def bias_key(self) -> str | None:
        return f"{self.hidden}.bias" if self.has_bias else None

    @property
    def out_key(self) -> str:
        return f"{self.out}.weight"

    @property
    def d_aug(self) -> int:
        return self.d_in + (1 if self.has_bias else 0)


_TRIVIAL = (nn.Flatten, nn.Identity, nn.Dropout)


def find_two_layer(model: nn.Module) -> TwoLayerView | list[str]:
    """Locate the final Linear -> activation -> Linear block of ``model`` (leaf modules in registration order,
    skipping Flatten / Identity / Dropout). Returns a :class:`TwoLayerView` or the list of problems found."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) and not isinstance(m, _TRIVIAL)]
    if len(leaves) < 3:
        return [f"expected a Linear -> activation -> Linear head, found only {len(leaves)} layer(s)"]
    (hn, h), (an, a), (on, o) = leaves[-3:]
    problems = []
    if not isinstance(h, nn.Linear):
        problems.append(f"the third-last layer {hn!r} must be nn.Linear (the random first layer), got {type(h).__name__}")
    act = resolve_activation(a)
    if act is None:
        problems.append(f"the second-last layer {an!r} must be an activation gradleak knows (gradleak Act, nn.ReLU, "
                        f"nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.LeakyReLU(0.2)), got {type(a).__name__}")
    if not isinstance(o, nn.Linear):
        problems.append(f"the last layer {on!r} must be nn.Linear (the output weights), got {type(o).__name__}")
    if problems:
        return problems
    if o.in_features != h.out_features:
        return [f"{on!r} takes {o.in_features} inputs but {hn!r} has {h.out_features} outputs"]
    has_bias = h.bias is not None and bool(torch.any(h.bias.detach() != 0))
    return TwoLayerView(hidden=hn, out=on, activation=act, d_in=h.in_features, width=h.out_features,
                        num_outputs=o.out_features, has_bias=has_bias, body=[n for n, _ in leaves[:-3]])


def observed_gradient(case: Case, keys: list[str]) -> dict[str, torch.Tensor]:
    obs = case.observation.as_gradient()
    return {k: obs[k] for k in keys}


def protocol_problems(case: Case) -> list[str]:
    o = case.observation
    if isinstance(o, FedAvg) and (o.local_steps != 1 or o.local_batch_size < case.batch_size):
        return [f"needs one gradient: FedSGD, or FedAvg with one full-batch local step (got local_steps="
                f"{o.local_steps}, local_batch_size={o.local_batch_size} for batch {case.batch_size})"]
    return []
