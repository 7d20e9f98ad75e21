"""Protocols that turn a model and a private batch into what the server observes: a :class:`Case`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
from torch import nn

from . import functional as Fn
from .batchnorm import side_channel
from .case import Case, DataSpec, FedAvg, FedSGD, Truth, _num_outputs
from .errors import ValidationError
from .losses import default_loss_for, losses
from .validate import int_problems, labels_problems, module_problems, require_device

Defense = Callable[..., Mapping[str, torch.Tensor]]


@dataclass
class Client:
    """One client's computation: its model (a private copy, BatchNorm mode already set), parameters, buffers,
    normalised inputs, labels and protocol. ``simulate`` and ``gl.defenses.utility`` both build one and call
    :meth:`send`, so the update an attack sees and the update a training run averages come from one code path.

    protocol: 'fedsgd' (one gradient of the batch-mean loss) or 'fedavg' (``local_steps`` SGD steps of rate
    ``local_lr`` on mini-batches of ``local_batch_size`` in :func:`gradleak.functional.minibatch_indices` order).
    """

    model: nn.Module
    params: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    x: torch.Tensor
    labels: torch.Tensor
    loss_fn: Callable
    protocol: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 1e-4
    local_batch_size: int | None = None

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    @property
    def steps(self) -> int:
        """Gradient steps this client takes per update (1 for FedSGD)."""
        return 1 if self.protocol == "fedsgd" else int(self.local_steps)

    @property
    def step_batch_size(self) -> int:
        """Examples per gradient step."""
        return self.batch_size if self.protocol == "fedsgd" else min(int(self.local_batch_size or self.batch_size),
                                                                     self.batch_size)

    def update(self) -> dict[str, torch.Tensor]:
        """The undefended update (exactly what :meth:`gradleak.Case.update` computes for these inputs)."""
        if self.protocol == "fedsgd":
            return Fn.gradient(self.model, self.params, self.buffers, self.x, self.labels, self.loss_fn)
        return Fn.fedavg_update(self.model, self.params, self.buffers, self.x, self.labels, self.loss_fn,
                                local_steps=self.local_steps, local_lr=self.local_lr,
                                local_batch_size=self.step_batch_size)

    def returned_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers the client holds after its computation (what a client that sends its whole state_dict
        returns): train-mode BatchNorm updated its running statistics at each forward pass (one for FedSGD, one
        per local step for FedAvg, each at that step's parameters of the plain update); unchanged in eval mode."""
        if self.protocol == "fedsgd":
            return Fn.returned_buffers(self.model, self.params, self.buffers, self.x)
        return Fn.returned_buffers(self.model, self.params, self.buffers, self.x, local_steps=self.local_steps,
                                   local_lr=self.local_lr, local_batch_size=self.step_batch_size,
                                   labels=self.labels, loss_fn=self.loss_fn)

    def train(self, step_gradient: Callable) -> dict[str, torch.Tensor]:
        """The update when every gradient step is replaced by ``step_gradient(params, x, labels) -> grads``
        (what an in-client defense such as DP-SGD does): FedSGD sends that one gradient, FedAvg takes
        ``local_steps`` steps ``theta <- theta - local_lr * step_gradient(theta, batch)`` on the same
        mini-batches as :meth:`update` and sends ``theta_K - theta_0``."""
        params = {k: v.detach() for k, v in self.params.items()}
        if self.protocol == "fedsgd":
            return {k: v.detach() for k, v in step_gradient(params, self.x, self.labels).items()}
        cur = dict(params)
        for step in range(self.local_steps):
            sl = Fn.minibatch_indices(self.batch_size, self.step_batch_size, step)
            g = step_gradient(cur, self.x[sl], self.labels[sl])
            cur = {k: (cur[k] - self.local_lr * g[k]).detach() for k in cur}
        return {k: cur[k] - params[k] for k in params}

    def send(self, defense=None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """What the client sends with ``defense`` (None: the plain update)."""
        if defense is None:
            return self.update()
        if getattr(defense, "acts_in_client", False):
            return dict(defense.client_update(self, generator))
        return dict(defense(self.update(), generator=generator))


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
    other_clients: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
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
    defense: optional :class:`gradleak.defenses.Defense`. An update transform is called as
        ``defense(update, generator=generator)``; an in-client one (``acts_in_client``, e.g. DP-SGD) computes the
        client's update itself (:meth:`Client.send`). ``case.meta['defense']`` describes it and, for DP-SGD,
        ``case.meta['privacy']`` holds the accountant's (epsilon, delta).
    The case's ``observed_buffers`` are the buffers the client returns with the update (as a framework that sends
    the whole state_dict does): after its computation, so in train mode they carry the batch's BatchNorm
    statistics (:mod:`gradleak.batchnorm`); defenses act on the parameters' update only. None for a model
    without buffers. ``case.meta['side_channels']`` says what they leak (:func:`gradleak.batchnorm.side_channel`).
    other_clients: for secure aggregation (``gl.defenses.create('secure-aggregation', clients=K)``, last in the
        defense): (x, y) with (K-1)*B more images, the other clients' batches. The case then observes the
        mean of the K clients' (each defended) updates, and the truth is all K*B images, the target's first.
    device: where the client computes and the case lives ('cpu', 'cuda', 'cuda:N', 'mps'; default: the model's
        device); the model and data are copied there. A device this machine lacks is a ResourceError. Random
        draws (defense noise) come from ``generator`` on the CPU and are moved, so a seed gives the same draws on
        every device.
    The caller's model and tensors are never modified.
    """
    problems = module_problems(model)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        problems.append(f"inputs must be a floating-point tensor (B, C, H, W) or (B, D), got {type(inputs).__name__}")
    if problems:
        raise ValidationError("simulate", problems)
    # every problem at once: these join the shape, range and protocol checks below
    label_problems = labels_problems(labels, num_classes=spec.num_classes if spec is not None else None)
    problems += label_problems + int_problems(local_batch_size, "local_batch_size", minimum=1,
                                              maximum=int(inputs.shape[0]), optional=True)
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValidationError("simulate", problems) from None
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
    if device is not None:
        device = require_device(device, "simulate device")
        if next(model.parameters()).device != device:
            model = copy.deepcopy(model).to(device)
        inputs = inputs.to(device)

    aggregated = defense is not None and getattr(defense, "aggregates", False)
    if aggregated:
        others = _other_clients(other_clients, defense, inputs, spec, protocol)
    elif other_clients is not None:
        raise ValidationError("simulate", ["other_clients is only used with secure aggregation "
                                           "(defense=gl.defenses.create('secure-aggregation', clients=K))"])

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters()}
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    if protocol == "fedsgd":
        obs = FedSGD(zero)
    else:
        obs = FedAvg(zero, local_steps=int(local_steps), local_lr=float(local_lr),
                     local_batch_size=int(local_batch_size or inputs.shape[0]))
    all_x, all_y = inputs.detach(), labels.detach().to(torch.long)
    if aggregated:
        all_x = torch.cat([all_x] + [o[0].detach().to(device=all_x.device, dtype=all_x.dtype) for o in others])
        all_y = torch.cat([all_y] + [o[1].detach().to(device=all_y.device, dtype=torch.long) for o in others])
    case = Case(model=model, observation=obs, spec=spec, batch_size=int(all_x.shape[0]), loss=loss,
                labels=all_y.to(device) if labels_known else None, bn_mode=bn_mode, meta={"source": "simulated"})

    def client(xi, yi):
        return Client(case.model, case.parameters, case.buffers,
                      spec.normalize(xi.detach().to(dtype=dtype, device=device)), yi.to(device=device, dtype=torch.long),
                      case.loss_fn, protocol, int(local_steps), float(local_lr),
                      int(local_batch_size or inputs.shape[0]))

    meta: dict = {"source": "simulated"}
    target = client(inputs, labels)
    if aggregated:
        per_client = getattr(defense, "per_client", None)  # what each client applies before aggregation
        aggregator = defense.parts[-1] if hasattr(defense, "parts") else defense
        clients = [target] + [client(ox, oy) for ox, oy in others]
        updates = [c.send(per_client, generator) for c in clients]
        update, info = aggregator.aggregate(updates, generator)
        buffers = _mean_buffers([c.returned_buffers() for c in clients])
        meta["secure_aggregation"] = {**info, "target_rows": [0, int(inputs.shape[0])],
                                      "note": "the observation is the mean of the clients' updates; the truth "
                                              "is every client's batch, the target's first"}
    else:
        update = target.send(defense, generator)
        buffers = target.returned_buffers()
    if defense is not None:
        meta["defense"] = getattr(defense, "description", repr(defense))
        privacy = defense.privacy(target.steps) if hasattr(defense, "privacy") else None
        if privacy is not None:
            meta["privacy"] = privacy
    case = replace(case.with_observation(update, **meta), observed_buffers=buffers or None)
    channel = side_channel(case)
    if channel is not None:
        case.meta["side_channels"] = [channel]
    return case, Truth(inputs=all_x.clone(), labels=all_y.clone())


def _mean_buffers(per_client: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What the server sees of K clients' buffers through secure aggregation: the mean of the floating-point
    ones (running statistics), the integer ones (batch counters, equal for equal protocols) from the first."""
    first = per_client[0]
    return {k: torch.stack([b[k] for b in per_client]).mean(0) if v.is_floating_point() else v
            for k, v in first.items()}


def _other_clients(other_clients, defense, inputs, spec, protocol):
    """The other clients' batches (a list of (x, y), one per client) for secure aggregation, checked."""
    agg = defense.parts[-1] if hasattr(defense, "parts") else defense
    k, b = int(agg.clients), int(inputs.shape[0])
    problems = []
    if protocol != "fedsgd":
        problems.append("secure aggregation is simulated for protocol='fedsgd' only: the mean of K FedAvg "
                        "updates is not one client's update on the union of their batches, which is the case "
                        "an attack is given")
    if other_clients is None:
        problems.append(f"secure aggregation over {k} clients needs other_clients=(x, y) with {k - 1} x {b} "
                        f"more images (the other clients' batches, same batch size)")
    else:
        try:
            ox, oy = other_clients
        except (TypeError, ValueError):
            raise ValidationError("simulate", ["other_clients must be a pair (x, y) of tensors"]) from None
        oy = torch.as_tensor(oy)
        if not isinstance(ox, torch.Tensor) or tuple(ox.shape) != ((k - 1) * b, *spec.shape):
            problems.append(f"other_clients x must have shape {((k - 1) * b, *spec.shape)} ({k - 1} clients x "
                            f"batch {b}), got {tuple(getattr(ox, 'shape', ()))}")
        elif oy.shape != (ox.shape[0],):
            problems.append(f"other_clients y must have shape ({ox.shape[0]},), got {tuple(oy.shape)}")
        elif not torch.isfinite(ox).all() or ox.min() < spec.value_range[0] - 1e-6 or \
                ox.max() > spec.value_range[1] + 1e-6:
            problems.append(f"other_clients x must be finite and lie in the image range {spec.value_range}")
    if problems:
        raise ValidationError("simulate", problems)
    return [(ox[j * b:(j + 1) * b], oy[j * b:(j + 1) * b]) for j in range(k - 1)]
