"""Label recovery from the last linear layer of an observed update, usable by every attack.

- One sample (Zhao, Mopuri, Bilen 2020, "iDLG"): with softmax cross-entropy, dL/dz_c = p_c - 1[c = y] is
  negative only for the true class, so the label is the only negative entry of the last layer's bias gradient,
  or (no bias, non-negative features) the row of the last weight gradient with the smallest (negative) sum.
- A batch (count-based, in the spirit of Wainakh et al. 2022 "LLG" and Geng et al. 2021): with a batch-mean
  loss, the bias gradient is ``db_c = pbar_c - n_c / B`` (pbar: mean softmax over the batch, n_c: how often
  class c occurs). Classes with a negative entry are certainly present, and each count is at least
  ``ceil(-B * db_c)`` (as ``pbar_c >= 0``); the remaining slots go to the classes with the largest estimated
  count ``B * (pbar_c - db_c) - assigned_c``, where ``pbar`` is the model's mean softmax on smooth random images
  at the case's parameters. This handles repeated labels. Without a bias, the row sums of the last weight
  gradient divided by the mean feature sum (same probes) stand in for ``db``.
- FedAvg: the update is ``delta = -lr * (sum of the K local gradients)``, so ``-delta / (lr * K)`` is used as
  the gradient (exact for K = 1; for K > 1 the signs stay right, the counts are approximate).

``recover_labels(case) -> LabelEstimate`` is the entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..case import Case
from ..errors import RequirementError

__all__ = ["LabelEstimate", "recover_labels", "last_linear", "label_signal", "label_recovery_problems"]


@dataclass(frozen=True)
class LabelEstimate:
    """labels: int64 (B,) recovered labels (sorted by class for a batch: the order within a batch is not
    identifiable). method: how they were obtained ('idlg-bias', 'idlg-weight', 'logistic-bias',
    'logistic-weight', 'count-bias', 'count-weight'). confident: True when the theory makes the answer certain
    (one sample with a bias and exactly one negative entry; a batch whose negative bias entries are exactly B
    distinct classes). counts: the continuous per-class count estimate for batches (else None)."""

    labels: torch.Tensor
    method: str
    confident: bool
    counts: list[float] | None = field(default=None)

    def to_info(self) -> dict:
        """JSON-able summary."""
        out = {"labels": self.labels.tolist(), "method": self.method, "confident": self.confident}
        if self.counts is not None:
            out["counts"] = [round(c, 4) for c in self.counts]
        return out


def last_linear(case: Case) -> tuple[str, nn.Linear] | None:
    """The module name and module of the classifier layer: the last ``nn.Linear`` (in registration order) whose
    output size is the model's number of outputs and whose weight is part of the observed update."""
    found = None
    for name, mod in case.model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        return None
    name, mod = found
    if mod.out_features != case.num_outputs or _pname(name, "weight") not in case.observed:
        return None
    return found


def _pname(module: str, p: str) -> str:
    return f"{module}.{p}" if module else p


def label_recovery_problems(case: Case) -> list[str]:
    """Why labels cannot be recovered from this case ([] if they can)."""
    if last_linear(case) is None:
        return ["label recovery needs a final nn.Linear classifier layer whose weight is in the observed update "
                f"(found none with {case.num_outputs} outputs)"]
    return []


def label_signal(case: Case) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The last layer's (bias gradient (C,) or None, weight gradient (C, K)) in gradient units: the observed
    gradient for FedSGD, ``-delta / (local_lr * local_steps)`` for FedAvg."""
    hit = last_linear(case)
    if hit is None:
        raise RequirementError("label recovery", label_recovery_problems(case))
    name, mod = hit
    obs = case.observation.as_gradient()
    w = obs[_pname(name, "weight")]
    bname = _pname(name, "bias")
    b = obs[bname] if (mod.bias is not None and bname in obs) else None
    return b, w


@torch.no_grad()
def _probe(case: Case, name: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax (C,) and mean feature sum (scalar) of the model on ``n`` smooth random images."""
    shape = case.spec.shape
    if case.spec.is_image:
        c, h, w = shape
        lo = torch.rand((n, c, max(h // 8, 2), max(w // 8, 2)), generator=generator, dtype=torch.float64)
        x = F.interpolate(lo, size=(h, w), mode="bilinear", align_corners=False)
        x = (x + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    else:
        x = torch.rand((n, *shape), generator=generator, dtype=torch.float64)
    lo_v, hi_v = case.spec.value_range
    x = (lo_v + (hi_v - lo_v) * x).to(device=case.device, dtype=case.dtype)
    xn = case.spec.normalize(x)
    feats: list[torch.Tensor] = []
    mod = dict(case.model.named_modules())[name]
    hook = mod.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    try:
        logits = case.forward(xn)
    finally:
        hook.remove()
    p = torch.softmax(logits, dim=-1).mean(0)
    h = feats[0].reshape(n, -1).sum(1).mean() if feats else torch.tensor(1.0, device=logits.device)
    return p, h


def recover_labels(case: Case, *, generator: torch.Generator | None = None, probes: int = 16) -> LabelEstimate:
    """Recover the labels behind ``case`` from its last linear layer.

    Returns a :class:`LabelEstimate` with int64 labels of shape (B,) on the case's device. Raises
    :class:`RequirementError` if the model has no final linear layer in the observed update. ``generator`` (and
    ``probes``) drive the random probe images used to estimate the mean softmax for batches (default: seed 0).
    """
    b, w = label_signal(case)
    B = case.batch_size
    dev = case.device
    rule = case.loss_fn.label_from_bias
    if case.loss_fn.single_output or w.shape[0] == 1:
        # one score f, label y in {0,1} read as s = 2y - 1: dL/df = -s * sigmoid(-s f) < 0 iff y = 1.
        if b is not None:
            sig, method, conf = b.reshape(-1)[0], "logistic-bias", B == 1
        else:
            sig, method, conf = w.sum(), "logistic-weight", False  # assumes non-negative features
        lab = 1 if sig < 0 else 0
        return LabelEstimate(torch.full((B,), lab, dtype=torch.long, device=dev), method, conf)

    if B == 1:
        if b is not None:
            y, conf = rule(b, 1) if rule is not None else (int(torch.argmin(b)), False)
            method = "idlg-bias"
        else:
            rows = w.sum(1)
            y = int(torch.argmin(rows))
            conf = False  # needs non-negative features before the last layer, which we cannot check here
            method = "idlg-weight"
        return LabelEstimate(torch.tensor([y], dtype=torch.long, device=dev), method, conf)

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    name, _ = last_linear(case)
    pbar, hsum = _probe(case, name, probes, generator)
    if b is not None:
        sig, method = b.to(pbar.dtype), "count-bias"
    else:
        scale = hsum if (torch.isfinite(hsum) and abs(float(hsum)) > 1e-12) else torch.tensor(1.0)
        sig, method = (w.sum(1) / scale).to(pbar.dtype), "count-weight"
    est = B * (pbar - sig)
    # every class with a negative entry is present; sig_c >= -n_c / B (pbar_c >= 0) bounds its count below.
    lower = torch.ceil(-B * sig - 1e-6).clamp_min(0.0)
    counts = torch.zeros_like(est)
    if b is not None and 0 < float(lower.sum()) <= B:
        counts = lower
    else:  # inconsistent signal (noise, defenses): one slot per most negative class
        neg = torch.nonzero(sig < 0).flatten()
        counts[neg[torch.argsort(sig[neg])][:B]] = 1.0
    for _ in range(B - int(counts.sum())):
        c = int(torch.argmax(est - counts))
        counts[c] += 1.0
    labels = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts.long())
    confident = b is not None and int((sig < 0).sum()) == B and case.loss_fn.counts_from_bias
    return LabelEstimate(labels.to(device=dev, dtype=torch.long), method, confident,
                         [float(v) for v in est.detach().tolist()] if math.isfinite(float(est.sum())) else None)
