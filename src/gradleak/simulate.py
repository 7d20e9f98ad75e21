"""Protocols that turn a model and a private batch into what the server observes: a :class:`Case`."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .case import Case, DataSpec, FedAvg, FedSGD, Truth, _num_outputs
from .errors import ValidationError
from .losses import default_loss_for, losses

Defense = Callable[..., Mapping[str, torch.Tensor]]


def simulate(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    protocol: str = "fedsgd",
    spec: DataSpec | None = None,
    loss: str | None = None,
    labels_known: bool = True,
    bn_mode: str = "eval",
    local_steps: int = 5,
    local_lr: float = 1e-4,
    local_batch_size: int | None = None,
    defense: Defense | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Case, Truth]:
    """Simulate one client update and return ``(case, truth)``.

    inputs: (B, *spec.shape) private batch in IMAGE space (spec.value_range, normally [0, 1]).
    labels: int64 (B,) class indices (for a one-output model: 0/1, read as -1/+1 by the logistic loss).
    protocol: 'fedsgd' (one gradient of the batch-mean loss) or 'fedavg' (``local_steps`` SGD steps of rate
        ``local_lr`` on mini-batches of ``local_batch_size`` (default: the whole batch), update theta_K - theta_0).
    spec: data spec (normalisation, classes); default: no normalisation, classes from the model's head.
    loss: default follows the model's head (one output -> 'logistic', else 'cross-entropy').
    labels_known: whether the attacker is told the labels.
    bn_mode: how the client ran BatchNorm ('eval': running statistics; 'train': batch statistics).
    defense: optional ``update -> update`` transform (see ``gradleak.defenses``), called as
        ``defense(update, generator=generator)``.
    The caller's model and tensors are never modified.
    """
    problems = []
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValidationError("simulate", [f"inputs must be a floating-point tensor (B, C, H, W) or (B, D), "
                                           f"got {type(inputs).__name__}"])
    labels = torch.as_tensor(labels)
    if spec is None:
        outs = _num_outputs(model)
        spec = DataSpec(shape=tuple(inputs.shape[1:]), num_classes=2 if outs == 1 else outs)
    if tuple(inputs.shape[1:]) != tuple(spec.shape):
        problems.append(f"inputs have sample shape {tuple(inputs.shape[1:])}, the spec expects {tuple(spec.shape)}")
    if labels.ndim != 1 or labels.shape[0] != inputs.shape[0]:
        problems.append(f"labels must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}")
    if not torch.isfinite(inputs).all():
        problems.append("inputs contain NaN or inf")
    elif inputs.numel() and (inputs.min() < spec.value_range[0] - 1e-6 or inputs.max() > spec.value_range[1] + 1e-6):
        problems.append(f"inputs must lie in the image range {spec.value_range} (normalisation is applied by the "
                        f"spec), got [{float(inputs.min()):.3g}, {float(inputs.max()):.3g}]")
    if protocol not in ("fedsgd", "fedavg"):
        problems.append(f"protocol must be 'fedsgd' or 'fedavg', got {protocol!r}")
    loss = loss or default_loss_for(_num_outputs(model))
    if loss not in losses:
        problems.append(f"unknown loss {loss!r}: expected one of {losses.names()}")
    if problems:
        raise ValidationError("simulate", problems)

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = spec.normalize(inputs.detach().to(dtype=dtype, device=device))
    y = labels.to(device=device, dtype=torch.long)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    if protocol == "fedsgd":
        obs = FedSGD(zero)
    else:
        obs = FedAvg(zero, local_steps=int(local_steps), local_lr=float(local_lr),
                     local_batch_size=int(local_batch_size or inputs.shape[0]))
    case = Case(model=model, observation=obs, spec=spec, batch_size=int(inputs.shape[0]), loss=loss,
                labels=y if labels_known else None, bn_mode=bn_mode, meta={"source": "simulated"})
    update = case.update(x, y)
    meta = {"source": "simulated"}
    if defense is not None:
        update = dict(defense(update, generator=generator))
        meta["defense"] = getattr(defense, "description", repr(defense))
    case = case.with_observation(update, **meta)
    return case, Truth(inputs=inputs.detach().clone(), labels=labels.detach().clone().to(torch.long))
