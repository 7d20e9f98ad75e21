"""Losses a client may train with. Labels are always class indices (int64, shape (B,)); soft labels
(float, shape (B, C), rows summing to one) are accepted by cross-entropy for attacks that optimise them.

- ``cross-entropy``: softmax cross-entropy over C >= 2 logits, batch mean.
- ``logistic``: one output score f, label y in {0, 1} read as s = 2y - 1 in {-1, +1};
  loss log(1 + exp(-s f)), batch mean (R-GAP's setting).
- ``mse``: squared loss 0.5 (f - t)^2 against the one-hot label (or s = 2y - 1 for one output), batch mean.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
losses: Registry[LossFn] = Registry("loss")


def _check_single(logits: torch.Tensor, who: str) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise ValueError(f"the {who} loss expects one output score per sample (shape (B, 1)), got {tuple(logits.shape)}")
    return logits[:, 0]


@losses.register("cross-entropy", aliases=("ce",))
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point():  # soft labels, (B, C)
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels)


@losses.register("logistic", aliases=("bce",))
def logistic(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    f = _check_single(logits, "logistic")
    s = 2.0 * labels.to(f.dtype) - 1.0
    return F.softplus(-s * f).mean()


@losses.register("mse", aliases=("squared",))
def mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        target = (2.0 * labels.to(logits.dtype) - 1.0)[:, None]
    elif labels.is_floating_point():
        target = labels
    else:
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return 0.5 * ((logits - target) ** 2).sum(dim=1).mean()


def default_loss_for(num_outputs: int) -> str:
    """The loss that follows a model's head: one output score -> logistic, otherwise cross-entropy."""
    return "logistic" if num_outputs == 1 else "cross-entropy"
