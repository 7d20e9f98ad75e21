"""What every malicious-server attack shares: the mark a crafted model carries, the check that a case's model
is one the server crafted, and the per-row fit that tells one sample from a mixture.

Threat model. An honest-but-curious server sends the model it trains and only looks at the updates. A
malicious server may change what it sends (insert modules, set parameters) before the client computes its
update. The attacks here model the second one: ``attack.craft(model, spec, generator=...)`` returns the model
the server SENDS, the client's update is computed on it (``gradleak.simulate(crafted, ...)``), and the Case's
model is the crafted one. ``requirements(case)`` refuses a case whose model the attack did not craft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ... import functional as Fn
from ...case import Case, FedAvg

__all__ = ["CraftRecord", "MARK", "crafted_record", "in_value_range", "not_crafted_problem", "pair_labels",
           "participation_scales", "per_sample_independent", "pixel_stats", "row_fit"]

#: the attribute a crafted model carries (a :class:`CraftRecord`); it survives the Case's deep copy
MARK = "gradleak_crafted"


@dataclass
class CraftRecord:
    """What the server did to the model: the attack that crafted it, the module it set, and facts the read-out
    needs (thresholds, the layer whose input is the image, ...)."""

    attack: str
    layer: str
    facts: dict[str, Any] = field(default_factory=dict)


def crafted_record(model: nn.Module, attack: str) -> CraftRecord | None:
    """The :class:`CraftRecord` of ``model`` if ``attack`` crafted it, else None."""
    rec = getattr(model, MARK, None)
    return rec if isinstance(rec, CraftRecord) and rec.attack == attack else None


def not_crafted_problem(attack: str, model: nn.Module) -> str:
    """The sentence a malicious-server attack raises on a model it did not craft."""
    other = getattr(model, MARK, None)
    extra = f" (this model was crafted by {other.attack!r})" if isinstance(other, CraftRecord) else ""
    return (f"{attack} needs a model crafted by the server ({attack}.craft(model, spec) returns the model the server "
            f"sends; simulate the client on it): the honest-but-curious threat model does not allow this attack, "
            f"and this case's model was not crafted by it{extra}")


def per_sample_independent(case: Case) -> bool:
    """Whether one sample's output depends on that sample alone (no train-mode BatchNorm)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in case.model.modules())
    return not (has_bn and case.bn_mode == "train")


def participation_scales(case: Case) -> torch.Tensor:
    """The distinct factors c_n with which sample n's own gradient enters ``case.observation.as_gradient()``:
    1/B for FedSGD; for FedAvg (1/K) * sum over the local steps that used sample n of 1/(mini-batch size)
    (to first order in the local learning rate: parameters drift between local steps)."""
    B = case.batch_size
    o = case.observation
    if not isinstance(o, FedAvg):
        return torch.tensor([1.0 / B], dtype=torch.float64)
    c = torch.zeros(B, dtype=torch.float64)
    for step in range(o.local_steps):
        sl = Fn.minibatch_indices(B, o.local_batch_size, step)
        n = len(range(B)[sl])
        c[sl] += 1.0 / (n * o.local_steps)
    return torch.unique(c[c > 0])


def row_fit(case: Case, layer: str, x: torch.Tensor, units: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How well a single sample explains each row's bias gradient, per candidate label.

    x: (R, *shape) candidate inputs (NORMALISED, as the model reads them); units: (R,) the output unit of the
    biased linear module ``layer`` each row was read from; target: (R,) the observed bias gradient of that unit
    (in gradient units, ``as_gradient()``) that the row's sample alone should explain.
    Returns cost (R, C): min over the participation factors c of |c * g(x_r, y) - target_r| / |target_r|, where
    g(x, y) = dloss(x, y)/db[unit] is the candidate's own bias gradient with label y (one forward-mode pass for all
    rows). A row that is one sample's exact input has cost ~0 for its label (FedSGD); a mixture has none near 0.
    Needs :func:`per_sample_independent`.
    """
    model = case.model
    mod = dict(model.named_modules())[layer]
    params, buffers = case.parameters, case.buffers
    R = x.shape[0]
    dtype, device = case.dtype, case.device
    E = torch.zeros(R, mod.out_features, dtype=dtype, device=device)
    E[torch.arange(R, device=device), units.to(device)] = 1.0
    holder: dict[str, torch.Tensor] = {}

    def hook(m, inp, out):
        return out + holder["delta"]

    def f(delta):
        holder["delta"] = delta
        h = mod.register_forward_hook(hook)
        try:
            return Fn.forward(model, params, buffers, x)
        finally:
            h.remove()

    with torch.no_grad():
        z, u = torch.func.jvp(f, (torch.zeros_like(E),), (E,))
    loss = case.loss_fn
    C = case.spec.num_classes
    pred = torch.empty(R, C, dtype=dtype, device=device)
    for c in range(C):
        zz = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            L = loss(zz, torch.full((R,), c, dtype=torch.long, device=device))
            (g,) = torch.autograd.grad(L, zz)
        pred[:, c] = (g * R * u).sum(1)
    scales = participation_scales(case).to(dtype=dtype, device=device)
    t = target.to(dtype=dtype, device=device)
    err = (scales[None, None, :] * pred[:, :, None] - t[:, None, None]).abs().amin(-1)
    return err / t.abs().clamp_min(torch.finfo(dtype).tiny)[:, None]


def pixel_stats(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (std, mean), each (*spec.shape) float64, of the spec's normalisation: x = std * xn + mean."""
    ones = torch.ones((1, *spec.shape), dtype=torch.float64)
    zero = torch.zeros_like(ones)
    mean = spec.denormalize(zero)[0]
    return spec.denormalize(ones)[0] - mean, mean


def in_value_range(spec, images: torch.Tensor) -> torch.Tensor:
    """(R,) whether each image-space row lies in ``spec.value_range`` up to 10 sqrt(eps) of the range."""
    lo, hi = spec.value_range
    tol = math.sqrt(torch.finfo(images.dtype).eps) * 10 * (hi - lo)
    flat = images.flatten(1)
    return ((flat.amin(1) >= lo - tol) & (flat.amax(1) <= hi + tol)).cpu()


def pair_labels(cost: torch.Tensor, known: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Labels for the rows of a :func:`row_fit` cost (R, C): the known labels paired with the rows by a minimum-cost
    assignment (R <= B), or, when unknown, the label whose gradient best explains each row."""
    if known is not None:
        lab = known.cpu()
        rr, cc = linear_sum_assignment(cost[:, lab].numpy())
        out = torch.empty(cost.shape[0], dtype=torch.long)
        out[torch.as_tensor(rr)] = lab[torch.as_tensor(cc)]
        return out, {"source": "known labels, paired with rows by their bias-gradient fit"}
    return cost.argmin(1), {"source": "recovered: the label whose gradient best explains each row"}
