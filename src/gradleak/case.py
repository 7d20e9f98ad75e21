"""The case model: everything an attacker knows about one client update, and nothing more.

A :class:`Case` holds a private copy of the model (its parameters at the time of the update), the loss,
the observation (:class:`FedSGD` gradient or :class:`FedAvg` parameter delta), the :class:`DataSpec`,
the batch size, the labels when they are known, and the BatchNorm mode the client ran in. The ground
truth is never part of a Case: :func:`gradleak.simulate` returns it separately as a :class:`Truth`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn

from . import functional as Fn
from .errors import DataError, ValidationError
from .losses import default_loss_for, losses

BN_MODES = ("eval", "train")


@dataclass(frozen=True)
class DataSpec:
    """What the attacker knows about the data.

    shape: per-sample shape, (C, H, W) for images or (D,) for vectors.
    num_classes: number of classes (2 for a model with one output score).
    mean, std: per-channel normalisation; the model sees (x - mean) / std for x in ``value_range``.
    """

    shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    value_range: tuple[float, float] = (0.0, 1.0)
    name: str = "custom"

    def __post_init__(self):
        problems = []
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.shape or any(s <= 0 for s in self.shape):
            problems.append(f"shape must be positive sizes like (3, 32, 32), got {self.shape}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        c = self.channels
        for nm, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, c):
                problems.append(f"{nm} needs 1 or {c} values (one per channel), got {len(v)}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive, got {self.std}")
        if self.value_range[0] >= self.value_range[1]:
            problems.append(f"value_range must be (low, high) with low < high, got {self.value_range}")
        if problems:
            raise ValidationError("DataSpec", problems)

    @property
    def channels(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (-1,) + (1,) * (len(self.shape) - 1) if self.is_image else (-1,) if len(self.mean) > 1 else (1,)
        m = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(view)
        s = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(view)
        return m, s

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Image space -> model input space: (x - mean) / std per channel."""
        m, s = self._stats(x)
        return (x - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space -> image space."""
        m, s = self._stats(x)
        return x * s + m

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel box of the value range in normalised space (broadcastable against a sample)."""
        lo = torch.full((1,) * len(self.shape), self.value_range[0], dtype=like.dtype, device=like.device)
        hi = torch.full_like(lo, self.value_range[1])
        return self.normalize(lo), self.normalize(hi)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "num_classes": self.num_classes, "mean": list(self.mean),
                "std": list(self.std), "value_range": list(self.value_range), "name": self.name}


@dataclass(frozen=True, eq=False)
class FedSGD:
    """A FedSGD observation: the gradient of the batch-mean loss per named parameter."""

    gradients: Mapping[str, torch.Tensor]
    protocol = "fedsgd"

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.gradients

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> "FedSGD":
        return FedSGD(dict(tensors))

    def as_gradient(self) -> Mapping[str, torch.Tensor]:
        """The observation in gradient units: the gradient itself."""
        return self.gradients

    def gradient_is_exact(self, batch_size: int) -> bool:
        """Whether :meth:`as_gradient` is the batch-mean gradient at the sent parameters (always, for FedSGD)."""
        return True

    def describe(self) -> dict:
        return {"protocol": "fedsgd"}


@dataclass(frozen=True, eq=False)
class FedAvg:
    """A FedAvg observation: ``theta_K - theta_0`` after ``local_steps`` local SGD steps of rate ``local_lr``
    on mini-batches of ``local_batch_size`` (taken in a fixed order, chunk ``k mod floor(n / b)``)."""

    delta: Mapping[str, torch.Tensor]
    local_steps: int
    local_lr: float
    local_batch_size: int
    protocol = "fedavg"

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.delta

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> "FedAvg":
        return replace(self, delta=dict(tensors))

    def as_gradient(self) -> Mapping[str, torch.Tensor]:
        """The observation in gradient units: ``-delta / (local_lr * local_steps)``, the mean of the local
        gradients (the batch-mean gradient at the sent parameters for one full-batch step, see
        :meth:`gradient_is_exact`)."""
        scale = -1.0 / (self.local_lr * self.local_steps)
        return {k: v * scale for k, v in self.delta.items()}

    def gradient_is_exact(self, batch_size: int) -> bool:
        """One local step on the whole batch: the update is exactly ``-local_lr`` times the gradient."""
        return self.local_steps == 1 and self.local_batch_size >= batch_size

    def describe(self) -> dict:
        return {"protocol": "fedavg", "local_steps": self.local_steps, "local_lr": self.local_lr,
                "local_batch_size": self.local_batch_size}


Observation = Union[FedSGD, FedAvg]


@dataclass(frozen=True)
class Truth:
    """The private batch, in image space (``value_range``, normally [0, 1]); kept apart from the Case."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        problems = []
        if not isinstance(self.inputs, torch.Tensor):
            problems.append(f"inputs must be a tensor (B, *shape), got {type(self.inputs).__name__}")
        elif self.inputs.is_floating_point() and not torch.isfinite(self.inputs).all():
            problems.append(f"inputs hold {int((~torch.isfinite(self.inputs)).sum())} NaN/inf value(s); expected "
                            "finite images in the value range")
        if self.labels is not None:
            from .validate import labels_problems

            n = self.inputs.shape[0] if isinstance(self.inputs, torch.Tensor) and self.inputs.ndim else None
            problems += labels_problems(self.labels, batch_size=n)
        if problems:
            raise ValidationError("Truth", problems)


def _check_tensor_dict(d: Mapping[str, Any], expected: Mapping[str, torch.Tensor], what: str) -> list[str]:
    problems = []
    if not isinstance(d, Mapping):
        return [f"{what} must be a dict of parameter name -> tensor, got {type(d).__name__}"]
    missing = [k for k in expected if k not in d]
    extra = [k for k in d if k not in expected]
    if missing:
        problems.append(f"{what} is missing parameter(s) {missing}")
    if extra:
        problems.append(f"{what} has unexpected key(s) {extra} (expected the model's parameter names "
                        f"{list(expected)[:6]}{'...' if len(expected) > 6 else ''})")
    for k, ref in expected.items():
        v = d.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{what}[{k!r}] must be a tensor, got {type(v).__name__}")
            continue
        if tuple(v.shape) != tuple(ref.shape):
            problems.append(f"{what}[{k!r}] has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        elif not v.is_floating_point():
            problems.append(f"{what}[{k!r}] must be floating point, got {v.dtype}")
        elif not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            problems.append(f"{what}[{k!r}] has {bad} non-finite value(s) (NaN or inf)")
    return problems


@dataclass(frozen=True, eq=False)
class Case:
    """One observed client update, as the attacker sees it.

    model: the model; the Case keeps a private deep copy (parameters at the time of the update).
    observation: :class:`FedSGD` or :class:`FedAvg`; keys are the model's parameter names.
    spec: the :class:`DataSpec`.
    batch_size: number of samples behind the update.
    loss: a name from ``gradleak.losses`` (default: follows the model's head).
    labels: the labels if known to the attacker, int64 (B,), else None.
    bn_mode: 'eval' (running statistics) or 'train' (batch statistics) as the client ran BatchNorm.
    meta: free-form facts (defenses applied, source of the data, ...).
    observed_buffers: the buffers the server received with the update (a framework that sends the whole
        state_dict, as Flower does, returns them): buffer name -> tensor AFTER the client's computation, e.g.
        ``bn1.running_mean`` / ``bn1.running_var`` / ``bn1.num_batches_tracked`` (a subset of the model's buffers;
        the model's own buffers are the server's copy before the update). In train mode they reveal the batch's
        feature statistics: :func:`gradleak.batchnorm.revealed_statistics`. None: not observed.
    """

    model: nn.Module
    observation: Observation
    spec: DataSpec
    batch_size: int
    loss: str | None = None
    labels: torch.Tensor | None = None
    bn_mode: str = "eval"
    meta: Mapping[str, Any] = field(default_factory=dict)
    observed_buffers: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self):
        problems: list[str] = []
        if not isinstance(self.model, nn.Module):
            raise ValidationError("Case", [f"model must be a torch.nn.Module, got {type(self.model).__name__}"])
        model = copy.deepcopy(self.model)
        for p in model.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "model", model)
        if not isinstance(self.spec, DataSpec):
            problems.append(f"spec must be a DataSpec, got {type(self.spec).__name__}")
        if not isinstance(self.observation, (FedSGD, FedAvg)):
            problems.append(f"observation must be FedSGD or FedAvg, got {type(self.observation).__name__}")
        else:
            problems += _check_tensor_dict(self.observation.tensors, self.parameters, self.observation.protocol)
            if isinstance(self.observation, FedAvg):
                o = self.observation
                if not (isinstance(o.local_steps, int) and o.local_steps >= 1):
                    problems.append(f"local_steps must be an int >= 1, got {o.local_steps!r}")
                if not (isinstance(o.local_batch_size, int) and o.local_batch_size >= 1):
                    problems.append(f"local_batch_size must be an int >= 1, got {o.local_batch_size!r}")
                elif isinstance(self.batch_size, int) and o.local_batch_size > self.batch_size:
                    problems.append(f"local_batch_size ({o.local_batch_size}) must not exceed batch_size "
                                    f"({self.batch_size})")
                if not (isinstance(o.local_lr, (int, float)) and math.isfinite(o.local_lr) and o.local_lr > 0):
                    problems.append(f"local_lr must be a positive number, got {o.local_lr!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.bn_mode not in BN_MODES:
            problems.append(f"bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        if self.observed_buffers is not None:
            from .batchnorm import buffers_problems

            own = dict(model.named_buffers())
            bad = buffers_problems(self.observed_buffers, own)
            problems += bad
            if not bad:
                object.__setattr__(self, "observed_buffers", {
                    k: v.detach().to(device=own[k].device, dtype=own[k].dtype).clone()
                    for k, v in self.observed_buffers.items()})
        loss = self.loss
        if loss is None:
            loss = default_loss_for(self.num_outputs)
        if loss not in losses:
            problems.append(f"unknown loss {loss!r}: expected one of {losses.names()}")
        else:
            object.__setattr__(self, "loss", losses.canonical(loss))
        if self.labels is not None:
            lab = torch.as_tensor(self.labels)
            if lab.is_floating_point() or lab.ndim != 1:
                problems.append(f"labels must be int class indices of shape (B,), got {lab.dtype} {tuple(lab.shape)}")
            else:
                if isinstance(self.batch_size, int) and lab.shape[0] != self.batch_size:
                    problems.append(f"labels has {lab.shape[0]} entries but batch_size is {self.batch_size}")
                if isinstance(self.spec, DataSpec) and lab.numel() and (lab.min() < 0 or lab.max() >= self.spec.num_classes):
                    problems.append(f"labels must lie in [0, {self.spec.num_classes - 1}], got {lab.tolist()}")
                object.__setattr__(self, "labels", lab.to(torch.long).to(self.device))
        if isinstance(self.spec, DataSpec) and not problems:
            out = self.num_outputs
            bad = self.loss_fn.output_problem(out, self.spec.num_classes)
            if bad:
                problems.append(bad)
        if problems:
            raise ValidationError("Case", problems)
        Fn.set_bn_mode(model, self.bn_mode)
        object.__setattr__(self, "meta", dict(self.meta))

    # ---- what the attacker can read -------------------------------------------------------------
    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        """Model parameters at the time of the update, name -> tensor (no grad)."""
        return {k: v.detach() for k, v in self.model.named_parameters()}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_buffers()}

    @property
    def observed(self) -> Mapping[str, torch.Tensor]:
        """The observed update (gradient or parameter delta), name -> tensor."""
        return self.observation.tensors

    @property
    def protocol(self) -> str:
        return self.observation.protocol

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.observed.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.observed.values())).device

    @property
    def num_outputs(self) -> int:
        return _num_outputs(self.model)

    @property
    def loss_fn(self):
        return losses.get(self.loss)

    @property
    def labels_known(self) -> bool:
        return self.labels is not None

    # ---- simulation of the client on candidate inputs ---------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised inputs ``x`` at the case's parameters."""
        return Fn.forward(self.model, self.parameters, self.buffers, x)

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """The update the client would have sent for normalised inputs ``x`` (B, *shape) and ``labels``
        (int (B,) or soft (B, C)), computed exactly as the client did (same protocol, mini-batch order,
        BatchNorm mode). With ``create_graph`` it is differentiable w.r.t. ``x`` (and soft labels)."""
        o = self.observation
        if isinstance(o, FedAvg):
            return Fn.fedavg_update(self.model, self.parameters, self.buffers, x, labels, self.loss_fn,
                                    local_steps=o.local_steps, local_lr=o.local_lr,
                                    local_batch_size=o.local_batch_size, create_graph=create_graph)
        return Fn.gradient(self.model, self.parameters, self.buffers, x, labels, self.loss_fn,
                           create_graph=create_graph)

    def residual(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """1 - cosine between the update that ``inputs`` (IMAGE space, (B, *shape)) produce and the observed
        one, over the concatenation of every observed tensor. The same definition for every attack."""
        labels = self.labels if labels is None else labels
        if labels is None:
            return float("nan")
        x = self.spec.normalize(inputs.to(self.dtype).to(self.device))
        upd = self.update(x, labels.to(self.device))
        return float(Fn.cosine_distance(upd, self.observed).detach())

    # ---- derived cases ----------------------------------------------------------------------------
    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Case":
        """A copy of the case with model, observation and labels in ``dtype`` / on ``device`` ('cpu', 'cuda',
        'cuda:N', 'mps'; a device this machine lacks is a :class:`~gradleak.errors.ResourceError`)."""
        if device is not None:
            from .validate import raise_if, require_device, device_problems

            raise_if(device_problems(device, "Case.to device", dtype=dtype or self.dtype), "Case.to")
            device = require_device(device, "Case.to device")
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        obs = self.observation.with_tensors({k: v.to(device=device, dtype=dtype) for k, v in self.observed.items()})
        labels = None if self.labels is None else self.labels.to(device)
        return replace(self, model=model, observation=obs, labels=labels)  # buffers follow the model's

    def with_observation(self, observed: Mapping[str, torch.Tensor], **meta) -> "Case":
        """A copy with another observed update (e.g. after a defense), same protocol settings."""
        return replace(self, observation=self.observation.with_tensors(observed), meta={**self.meta, **meta})

    def describe(self) -> dict:
        """A JSON-able summary (no tensors)."""
        return {"model": getattr(self.model, "zoo_name", type(self.model).__name__), **self.observation.describe(), "spec": self.spec.to_dict(),
                "batch_size": self.batch_size, "loss": self.loss, "labels_known": self.labels_known,
                "bn_mode": self.bn_mode, "dtype": str(self.dtype).replace("torch.", ""),
                "observed_buffers": None if self.observed_buffers is None else len(self.observed_buffers),
                "meta": {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}}

    # ---- building a case from a real observed update ------------------------------------------------
    @classmethod
    def from_observed(
        cls,
        model: nn.Module,
        observed: Mapping[str, torch.Tensor] | str | Path,
        *,
        spec: DataSpec,
        batch_size: int,
        protocol: str = "fedsgd",
        local_steps: int = 1,
        local_lr: float = 1e-4,
        local_batch_size: int | None = None,
        labels: torch.Tensor | None = None,
        loss: str | None = None,
        bn_mode: str = "eval",
        sign: str = "gradient",
        buffers: Mapping[str, torch.Tensor] | str | Path | None = None,
    ) -> "Case":
        """Build a Case from an update observed in a real FL run (no truth involved).

        observed: a dict of parameter name (as in ``model.state_dict()``) -> tensor, or the path of a
        ``.safetensors`` / ``.pt`` file holding one. For FedAvg, the update is ``theta_K - theta_0``;
        pass ``sign='server'`` if your framework reports ``theta_0 - theta_K`` instead.
        Buffer entries in ``observed`` (``bn1.running_mean``, ...: a whole state_dict was saved) become
        ``observed_buffers``: for FedSGD they are read as the values the client returned; for FedAvg as the
        same difference as the parameters (``after - before``, or ``before - after`` with ``sign='server'``),
        added to the model's buffers. buffers: the returned buffer VALUES (dict or file), instead.
        """
        where = "Case.from_observed"
        if isinstance(observed, (str, Path)):
            observed = load_tensor_dict(observed)
        elif not isinstance(observed, Mapping):
            raise ValidationError(where, [f"observed must be a dict of parameter name -> tensor or the "
                                          f"path of a .safetensors / .pt file, got {type(observed).__name__}"])
        if isinstance(buffers, (str, Path)):
            buffers = load_tensor_dict(buffers)
        if sign not in ("gradient", "server"):
            raise ValidationError(where, [f"sign must be 'gradient' or 'server', got {sign!r}"])
        own = dict(model.named_buffers()) if isinstance(model, nn.Module) else {}
        in_update = {k: v for k, v in observed.items() if k in own}
        observed = {k: v for k, v in observed.items() if k not in own}
        if in_update and buffers is not None:
            raise ValidationError(where, [f"buffers are given twice: in observed ({list(in_update)[:3]}) and as "
                                          "buffers=; give them once"])
        if in_update and protocol == "fedavg":
            s = -1 if sign == "server" else 1
            buffers = {k: (own[k] + s * v.to(device=own[k].device, dtype=own[k].dtype)) for k, v in in_update.items()
                       if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(own[k].shape)}
            buffers.update({k: v for k, v in in_update.items() if k not in buffers})  # let the Case say what is wrong
        elif in_update:
            buffers = in_update
        if sign == "server":
            observed = {k: -v for k, v in observed.items()}
        if protocol == "fedsgd":
            obs: Observation = FedSGD(dict(observed))
        elif protocol == "fedavg":
            obs = FedAvg(dict(observed), local_steps=local_steps, local_lr=local_lr,
                         local_batch_size=local_batch_size or batch_size)
        else:
            raise ValidationError(where, [f"protocol must be 'fedsgd' or 'fedavg', got {protocol!r}"])
        return cls(model=model, observation=obs, spec=spec, batch_size=batch_size, loss=loss,
                   labels=labels, bn_mode=bn_mode, meta={"source": "observed"},
                   observed_buffers=None if buffers is None else dict(buffers))


def _num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_outputs", None)
    if isinstance(n, int):
        return n
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LazyLinear))]
    if last:
        return last[-1].out_features
    raise ValidationError("Case", ["cannot tell the model's number of outputs: give it an int attribute "
                                   "`num_outputs` or end it with nn.Linear"])


def load_tensor_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a name -> tensor dict from a ``.safetensors`` file or a ``torch.save``d dict (weights_only)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {p} (expected a .safetensors or .pt file of name -> tensor)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(p))
        else:
            d = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        from .validate import file_format_hint

        hint = file_format_hint(p)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise DataError(f"cannot read {p} as a tensor dict ({hint or f'{type(e).__name__}: {first}'}); expected a "
                        ".safetensors file or a torch.save()d dict of name -> tensor") from None
    if isinstance(d, Mapping) and "state_dict" in d and isinstance(d["state_dict"], Mapping):
        d = d["state_dict"]
    if not isinstance(d, Mapping) or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise DataError(f"{p} does not hold a dict of name -> tensor (found {type(d).__name__})")
    return dict(d)
