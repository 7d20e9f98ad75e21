"""The client computations, written once and used by ``simulate`` and by every attack.

All functions are functional (``torch.func.functional_call``): the model object is never modified,
parameters are passed in as a name -> tensor dict, and with ``create_graph=True`` the result can be
differentiated with respect to the inputs (what gradient-matching attacks need).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

from .losses import LossFn

Params = Mapping[str, torch.Tensor]


def set_bn_mode(model: nn.Module, bn_mode: str) -> nn.Module:
    """Put every module in eval mode except BatchNorm layers, which follow ``bn_mode`` ('train' uses batch
    statistics, 'eval' the running statistics). Modifies and returns ``model`` (call it on a private copy)."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    return model


def forward(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` at ``params`` for normalised inputs ``x`` (B, ...). Buffers are cloned so that
    train-mode BatchNorm cannot update the caller's running statistics."""
    state = dict(params)
    state.update({k: v.clone() for k, v in buffers.items()})
    return functional_call(model, state, (x,))


def gradient(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    *,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """FedSGD observation: the gradient of the batch-mean loss w.r.t. every parameter in ``params``."""
    names = list(params)
    if create_graph:
        p = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    else:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        loss = loss_fn(forward(model, p, buffers, x), labels)
        grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=create_graph)
    return dict(zip(names, grads))


def minibatch_indices(n: int, batch_size: int, step: int) -> slice:
    """The mini-batch a FedAvg client uses at local step ``step``: chunk ``step mod floor(n / b)``."""
    b = min(batch_size, n)
    chunks = max(n // b, 1)
    c = step % chunks
    return slice(c * b, (c + 1) * b)


def fedavg_update(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    *,
    local_steps: int,
    local_lr: float,
    local_batch_size: int,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """FedAvg observation: ``theta_K - theta_0`` after ``local_steps`` SGD steps of rate ``local_lr`` on
    mini-batches of ``local_batch_size`` taken in the fixed order of :func:`minibatch_indices`.
    With ``create_graph`` the unrolled steps stay differentiable w.r.t. ``x``."""
    names = list(params)
    start = {k: v.detach() for k, v in params.items()}
    cur = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    n = x.shape[0]
    with torch.enable_grad():
        for step in range(local_steps):
            sl = minibatch_indices(n, local_batch_size, step)
            loss = loss_fn(forward(model, cur, buffers, x[sl]), labels[sl])
            grads = torch.autograd.grad(loss, [cur[k] for k in names], create_graph=create_graph)
            cur = {k: cur[k] - local_lr * g for k, g in zip(names, grads)}
            if not create_graph:
                cur = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
    return {k: cur[k] - start[k] if create_graph else (cur[k] - start[k]).detach() for k in names}


def flat(tensors: Mapping[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    """Concatenate tensors (in ``names`` order) into one vector."""
    names = list(tensors) if names is None else names
    return torch.cat([tensors[k].reshape(-1) for k in names])


def cosine_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names=None, weights=None):
    """1 - cosine between two update dicts over their concatenation (sums over layers first, then divide),
    optionally with per-layer weights. Returns a 0-d tensor (differentiable)."""
    names = list(b) if names is None else list(names)
    dot = 0.0
    na = 0.0
    nb = 0.0
    for i, k in enumerate(names):
        w = 1.0 if weights is None else weights[i]
        dot = dot + w * (a[k] * b[k]).sum()
        na = na + w * a[k].pow(2).sum()
        nb = nb + w * b[k].pow(2).sum()
    denom = (na.sqrt() * nb.sqrt()).clamp_min(torch.finfo(b[names[0]].dtype).tiny)
    return 1.0 - dot / denom
