"""The client computations, written once and used by ``simulate`` and by every attack.

All functions are functional (``torch.func.functional_call``): the model object is never modified,
parameters are passed in as a name -> tensor dict, and with ``create_graph=True`` the result can be
differentiated with respect to the inputs (what gradient-matching attacks need).
"""

from __future__ import annotations

import math
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


def forward(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, *,
            running: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of ``model`` at ``params`` for normalised inputs ``x`` (B, ...). Buffers are cloned so that
    train-mode BatchNorm cannot update the caller's running statistics; ``running`` (a dict of buffer tensors
    the caller owns) is used in their place and updated in place, as the client's own buffers are."""
    state = dict(params)
    state.update(running if running is not None else {k: v.clone() for k, v in buffers.items()})
    return functional_call(model, state, (x,))


def returned_buffers(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, *,
                     local_steps: int = 0, local_lr: float = 0.0, local_batch_size: int | None = None,
                     labels: torch.Tensor | None = None, loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """The buffers a client holds after its computation: one forward pass of ``x`` at ``params`` (FedSGD,
    ``local_steps=0``) or the ``local_steps`` passes of :func:`fedavg_update` (each at that step's parameters).
    Train-mode BatchNorm updates its running statistics at every pass; in eval mode they come back unchanged."""
    running = {k: v.detach().clone() for k, v in buffers.items()}
    if local_steps:
        fedavg_update(model, params, buffers, x, labels, loss_fn, local_steps=local_steps, local_lr=local_lr,
                      local_batch_size=local_batch_size or x.shape[0], running=running)
    else:
        with torch.no_grad():
            forward(model, params, buffers, x, running=running)
    return running


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
    running: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """FedAvg observation: ``theta_K - theta_0`` after ``local_steps`` SGD steps of rate ``local_lr`` on
    mini-batches of ``local_batch_size`` taken in the fixed order of :func:`minibatch_indices`.
    With ``create_graph`` the unrolled steps stay differentiable w.r.t. ``x``. ``running``: buffers updated in
    place by every step's forward pass (see :func:`forward`)."""
    names = list(params)
    start = {k: v.detach() for k, v in params.items()}
    cur = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    n = x.shape[0]
    with torch.enable_grad():
        for step in range(local_steps):
            sl = minibatch_indices(n, local_batch_size, step)
            loss = loss_fn(forward(model, cur, buffers, x[sl], running=running), labels[sl])
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
    """1 - cosine between two update dicts over their concatenation, optionally with per-layer weights w_k
    (the inner product sum_k w_k <a_k, b_k>). Returns a 0-d float64 tensor (differentiable), in [0, 2].

    Computed as 0.5 * ||a/|a| - b/|b|||^2, which equals 1 - cos without its cancellation near 0 (an exact
    match gives 0, not a rounding error of the size of eps), after dividing each side by its largest entry
    (the same value for updates scaled by 1e-30 or 1e30) and in float64. A side that is all zero has no
    direction: the result is then 1 (orthogonal), as for a zero cosine."""
    names = list(b) if names is None else list(names)
    w = [1.0] * len(names) if weights is None else [float(v) for v in weights]

    def unit(d):
        parts = [d[k].to(torch.float64).reshape(-1) for k in names]
        scale = max(float(p.detach().abs().max()) if p.numel() else 0.0 for p in parts)
        if not math.isfinite(scale):
            return None
        if scale == 0.0:
            return [torch.zeros_like(p) for p in parts]
        parts = [p / scale for p in parts]
        norm = sum(wk * p.pow(2).sum() for wk, p in zip(w, parts)).sqrt()
        return [p / norm for p in parts]

    ua, ub = unit(a), unit(b)
    if ua is None or ub is None:
        return torch.tensor(float("nan"), dtype=torch.float64)
    if not any(bool(p.any()) for p in ua) or not any(bool(p.any()) for p in ub):
        return torch.ones((), dtype=torch.float64)
    return 0.5 * sum(wk * (pa - pb).pow(2).sum() for wk, pa, pb in zip(w, ua, ub))


def per_example_gradients(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """The gradient of each example's own loss: ``{name: (B, *param.shape)}``, row i equal to
    :func:`gradient` on ``x[i:i+1]`` (``torch.func.vmap`` of ``torch.func.grad``). The model must treat
    examples independently (no train-mode BatchNorm: batch statistics couple the examples)."""
    names = list(params)
    p = {k: params[k].detach() for k in names}

    def one(pp, xi, yi):
        return loss_fn(forward(model, pp, buffers, xi.unsqueeze(0)), yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), randomness="error")(p, x, labels)
    return {k: grads[k].detach() for k in names}
