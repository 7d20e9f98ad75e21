"""Losses a client may train with, as objects carrying what every method asks of them.

Labels are always class indices (int64, shape (B,)); soft labels (float, shape (B, C), rows summing to one) are
accepted by cross-entropy and mse for attacks that optimise them.

- ``cross-entropy``: softmax cross-entropy over C >= 2 logits, batch mean. dL/df = softmax(f) - onehot(y): the
  label is the one negative entry of the head's bias gradient (iDLG's rule), certainly so for one sample.
- ``logistic``: one output score f, label y in {0, 1} read as s = 2y - 1 in {-1, +1};
  loss log(1 + exp(-s f)), batch mean (R-GAP's setting). dL/df = -s sigmoid(-s f) < 0 iff y = 1.
- ``mse``: squared loss 0.5 (f - t)^2 against the one-hot label (or s = 2y - 1 for one output), batch mean.

Adding a loss is ONE call: ``gradleak.losses.add(Loss(...))``. A loss may also carry its per-trial form
(``stacked``: many independent trials' batches at once, (N, B, K) logits -> (N,) losses, bit for bit
``torch.vmap(fn)``; the batched trials' objective calls :meth:`Loss.per_trial`, which falls back to that vmap
for a loss without one). The three registered losses have one (two vmap dispatches per batched round fewer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: (logits (N, B, K), labels (N, B) or soft (N, B, C)) -> (N,): each trial's ``fn`` of its own batch
StackedLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: (bias gradient k (C,), batch size) -> (label, certain) or None if the rule says nothing
LabelRule = Callable[[torch.Tensor, int], Optional[tuple[int, bool]]]


@dataclass(frozen=True)
class Loss:
    """fn(logits (B, K), labels) -> the batch-mean loss (0-d).

    single_output: the model has ONE output score and labels are signs s = 2y - 1 (logistic); otherwise the
        model has one output per class.
    any_outputs: the loss is defined for any number of outputs (mse: one score or one per class).
    label_from_bias: the rule reading a sample's label off the head's bias gradient k = dL/db (one sample),
        returning (label, certain); None where the loss has no such rule.
    counts_from_bias: a batch's bias gradient is mean(p) - counts / B with p in the simplex (softmax), so
        every class present in the batch has a negative entry (the label-count rule of batch label recovery).
    stacked: the per-trial form (see :meth:`per_trial`), or None (vmap of ``fn``).
    """

    name: str
    fn: LossFn
    single_output: bool = False
    any_outputs: bool = False
    label_from_bias: Optional[LabelRule] = None
    counts_from_bias: bool = False
    stacked: Optional[StackedLossFn] = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, labels)

    def per_trial(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each trial's loss of its own batch: logits (N, B, K), labels (N, B) (or soft (N, B, C)) -> (N,),
        what ``torch.vmap(self.fn)`` gives (the ``stacked`` form where the loss has one: the same values and
        gradients bit for bit, tests/test_losses_stacked.py, without vmap's per-call dispatch)."""
        if self.stacked is not None:
            return self.stacked(logits, labels)
        return torch.vmap(self.fn)(logits, labels)

    # ---- what a model's head must be -----------------------------------------------------------------
    def num_outputs(self, num_classes: int) -> int:
        """The model outputs this loss expects with ``num_classes`` classes."""
        return 1 if self.single_output else num_classes

    def output_problem(self, outputs: int, num_classes: int) -> str | None:
        """Why a head of ``outputs`` scores does not fit this loss with ``num_classes`` classes (None: it fits)."""
        if self.any_outputs and outputs in (1, num_classes):
            return None
        need = self.num_outputs(num_classes)
        if outputs == need:
            return None
        return f"the model has {outputs} output(s) but the {self.name} loss with {num_classes} classes needs {need}"

    def label_problem(self, max_label: int, outputs: int) -> str | None:
        """Why labels up to ``max_label`` do not fit a head of ``outputs`` scores (None: they fit)."""
        if self.single_output or outputs == 1:
            return None if max_label <= 1 else (
                "the model has one output score: labels must be 0/1, got up to "
                f"{max_label} (map them, e.g. labels % 2)")
        if max_label >= outputs:
            return f"labels go up to {max_label} but the model has {outputs} outputs"
        return None

    # ---- labels as optimisation variables ---------------------------------------------------------------
    def label_logits_shape(self, batch_size: int, num_classes: int) -> tuple[int, ...]:
        """Shape of the free variables that parameterise jointly optimised labels."""
        return (batch_size,) if self.single_output else (batch_size, num_classes)

    def soft_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft labels from free variables: sigmoid (B,) for one score (a label in [0, 1], read as 2y - 1),
        softmax (B, C) otherwise."""
        return torch.sigmoid(logits) if self.single_output else torch.softmax(logits, dim=-1)

    def hard_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """int64 (B,) labels from the free variables."""
        if self.single_output:
            return (logits > 0).to(torch.long)
        return logits.argmax(dim=-1).to(torch.long)


losses: Registry[Loss] = Registry("loss")


def add(loss: Loss, aliases: tuple[str, ...] = (), overwrite: bool = False) -> Loss:
    """Register a :class:`Loss` (usable as ``loss=`` in simulate / Case / train and by every attack)."""
    return losses.register(loss.name, aliases=aliases, overwrite=overwrite)(loss)


def _check_single(logits: torch.Tensor, who: str) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise ValueError(f"the {who} loss expects one output score per sample (shape (B, 1)), got {tuple(logits.shape)}")
    return logits[:, 0]


def _soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample (any leading dims): -sum_c labels_c log softmax(logits)_c."""
    return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point():  # soft labels, (B, C)
        return _soft_cross_entropy(logits, labels).mean()
    return F.cross_entropy(logits, labels)


def _cross_entropy_stacked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point():  # soft labels, (N, B, C)
        return _soft_cross_entropy(logits, labels).mean(-1)
    n, b = labels.shape
    return F.cross_entropy(logits.reshape(n * b, -1), labels.reshape(-1), reduction="none").reshape(n, b).mean(1)


def _softmax_label(k: torch.Tensor, batch_size: int) -> tuple[int, bool]:
    """k = softmax - onehot (one sample): the label is the one negative entry."""
    k = k.reshape(-1)
    y = int(torch.argmin(k))
    return y, batch_size == 1 and bool(k[y] < 0) and int((k < 0).sum()) == 1


def _margin_loss(f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample (any leading dims): log(1 + exp(-s f)), s = 2y - 1."""
    s = 2.0 * labels.to(f.dtype) - 1.0
    return F.softplus(-s * f)


def _logistic(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _margin_loss(_check_single(logits, "logistic"), labels).mean()


def _logistic_stacked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 3 or logits.shape[2] != 1:
        raise ValueError(f"the logistic loss expects one output score per sample (shape (N, B, 1) for N "
                         f"trials), got {tuple(logits.shape)}")
    return _margin_loss(logits[..., 0], labels).mean(-1)


def _sign_label(k: torch.Tensor, batch_size: int) -> tuple[int, bool]:
    """k = -s sigmoid(-s f): negative iff s = +1 (label 1); certain for one sample, or a batch of one label."""
    return int(float(k.reshape(-1)[0]) < 0), batch_size == 1


def _squared_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample (any leading dims, outputs last): 0.5 |f - t|^2, t the one-hot label (s = 2y - 1 for one
    output) or the soft label."""
    if logits.shape[-1] == 1:
        target = (2.0 * labels.to(logits.dtype) - 1.0)[..., None]
    elif labels.is_floating_point():
        target = labels
    else:
        target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return 0.5 * ((logits - target) ** 2).sum(dim=-1)


def _mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _squared_error(logits, labels).mean()


def _mse_stacked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _squared_error(logits, labels).mean(-1)


def _mse_label(k: torch.Tensor, batch_size: int) -> tuple[int, bool]:
    """k = f - onehot(y): the label's entry is lowered by one, usually the most negative; never certain."""
    k = k.reshape(-1)
    if k.numel() == 1:
        return int(float(k[0]) < 0), False
    return int(torch.argmin(k)), False


cross_entropy = add(Loss("cross-entropy", _cross_entropy, label_from_bias=_softmax_label, counts_from_bias=True,
                         stacked=_cross_entropy_stacked), aliases=("ce",))
logistic = add(Loss("logistic", _logistic, single_output=True, label_from_bias=_sign_label,
                    stacked=_logistic_stacked), aliases=("bce",))
mse = add(Loss("mse", _mse, any_outputs=True, label_from_bias=_mse_label, stacked=_mse_stacked),
          aliases=("squared",))


def default_loss_for(num_outputs: int) -> str:
    """The loss that follows a model's head: one output score -> logistic, otherwise cross-entropy."""
    return "logistic" if num_outputs == 1 else "cross-entropy"
