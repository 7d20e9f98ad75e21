"""Analytic recovery of a fully connected layer's input (Geiping et al., NeurIPS 2020, a proposition; the
observation goes back to Phong et al. 2018).

For z = W h + b: dL/dW[i, :] = (dL/dz_i) h^T and dL/db_i = dL/dz_i, so every row with dL/db_i != 0 gives
h^T = dL/dW[i, :] / dL/db_i, exactly for one sample and whatever comes after the layer. If the layer reads the
(flattened) input, h is the input itself. With a batch, row i gives the mixture
sum_n delta_{n,i} h_n / sum_n delta_{n,i}:
- at the classifier, the row of sample n's label is dominated by sample n (exact if no other sample puts
  weight on that class); one candidate per label is returned;
- at a hidden layer followed by ReLU, a row that is active for one sample only is that sample's exact input;
  such rows agree with each other, so candidates are grouped and the best-supported groups are returned.
Both are reported as ``kind='mixture'``. FedAvg: the update of a layer reading the input is
``-lr * sum_k delta_k h^T`` (the input does not change between local steps), so the ratio stays exact for one
sample.

:func:`recover_linear_input` gives the candidates of any biased linear layer (also one reading intermediate
features, e.g. a classifier's input features); the ``fc-analytic`` attack needs a layer that reads the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..case import Case
from ..errors import RequirementError
from ..layers.linalg import head_solve
from .base import Attack, Reconstruction, RunContext, register
from .labels import label_recovery_problems, recover_labels

__all__ = ["FCAnalytic", "LinearInput", "biased_linear_layers", "reads_input", "recover_linear_input"]


def _pname(module: str, p: str) -> str:
    return f"{module}.{p}" if module else p


def biased_linear_layers(case: Case) -> list[str]:
    """Module names of every ``nn.Linear`` with a bias whose weight and bias are in the observed update,
    in registration order."""
    out = []
    for name, mod in case.model.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            if _pname(name, "weight") in case.observed and _pname(name, "bias") in case.observed:
                out.append(name)
    return out


@torch.no_grad()
def reads_input(case: Case, layer: str) -> bool:
    """Whether module ``layer`` receives the model's (flattened) normalised input unchanged."""
    mod = dict(case.model.named_modules()).get(layer)
    if mod is None:
        return False
    g = torch.Generator().manual_seed(1234)
    x = torch.randn((2, *case.spec.shape), generator=g, dtype=torch.float64).to(case.device, case.dtype)
    seen: list[torch.Tensor] = []
    hook = mod.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    try:
        case.forward(x)
    except Exception:
        return False
    finally:
        hook.remove()
    return bool(seen) and seen[0].numel() == x.numel() and torch.equal(seen[0].reshape(2, -1), x.reshape(2, -1))


def _layer_problems(case: Case, layer: str) -> list[str]:
    mods = dict(case.model.named_modules())
    if layer not in mods:
        linears = [n for n, m in case.model.named_modules() if isinstance(m, nn.Linear)]
        return [f"layer {layer!r} is not a module of the model (its nn.Linear layers: {linears or 'none'})"]
    mod = mods[layer]
    if not isinstance(mod, nn.Linear):
        return [f"layer {layer!r} is a {type(mod).__name__}, expected an nn.Linear with a bias"]
    if mod.bias is None:
        return [f"layer {layer!r} has no bias: the analytic recovery divides the weight gradient by the bias "
                "gradient"]
    missing = [p for p in (_pname(layer, "weight"), _pname(layer, "bias")) if p not in case.observed]
    if missing:
        return [f"the observed update lacks {missing}"]
    return []


@dataclass(frozen=True)
class LinearInput:
    """Candidates for the input of a biased linear layer.

    layer: module name. rows: (R,) row indices i used. candidates: (R, D) the ratios dW[i, :] / db[i] (the
    layer's input space: normalised and flattened if the layer reads the input). weight: (R,) |db[i]|.
    least_squares: (D,) the |db|-weighted least-squares combination of all rows (exact for one sample).
    """

    layer: str
    rows: torch.Tensor
    candidates: torch.Tensor
    weight: torch.Tensor
    least_squares: torch.Tensor


def recover_linear_input(case: Case, layer: str | None = None, *, rel_threshold: float = 1e-8) -> LinearInput:
    """Row-wise input recovery for the biased linear ``layer`` (default: the first one in the observed update).

    Rows whose |db[i]| is below ``rel_threshold`` x max |db| are skipped. Raises :class:`RequirementError` if
    the layer does not exist, is not a biased ``nn.Linear``, or its bias gradient is zero.
    """
    if layer is None or layer == "":
        layers = biased_linear_layers(case)
        if not layers:
            raise RequirementError("fc-analytic", ["the model has no fully connected (nn.Linear) layer with a bias "
                                                   "in the observed update"])
        layer = layers[0]
    problems = _layer_problems(case, layer)
    if problems:
        raise RequirementError("fc-analytic", problems)
    dW = case.observed[_pname(layer, "weight")]
    db = case.observed[_pname(layer, "bias")]
    mag = db.abs()
    top = float(mag.max())
    if not (top > 0 and math.isfinite(top)):
        raise RequirementError("fc-analytic", [f"the observed bias gradient of layer {layer!r} is zero: there is "
                                               "no row to divide by"])
    rows = torch.nonzero(mag > rel_threshold * top).flatten()
    rows = rows[torch.argsort(mag[rows], descending=True)]
    cand = dW[rows] / db[rows, None]
    ls = head_solve(dW[rows], db[rows])  # dW^T db / ||db||^2 over the kept rows
    return LinearInput(layer, rows, cand, mag[rows], ls)


def _group(cand: torch.Tensor, tol: float, max_rows: int) -> list[tuple[int, list[int]]]:
    """Group near-identical candidates (relative distance < tol). Returns (representative, members) sorted by
    support, largest first; candidates are assumed sorted by |db| (most reliable first). A Gram-matrix filter
    finds the neighbours; each is then confirmed with a direct distance (the Gram form cancels badly)."""
    c = cand[:max_rows].to(torch.float64)
    norms = c.norm(dim=1).clamp_min(1e-300)
    gram = c @ c.T
    rel2 = (norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * gram).clamp_min(0) / torch.maximum(norms[:, None], norms[None, :]) ** 2
    coarse = rel2 < max(10 * tol, 1e-6) ** 2
    free = torch.ones(len(c), dtype=torch.bool, device=c.device)
    groups = []
    for i in range(len(c)):
        if not free[i]:
            continue
        near = torch.nonzero(coarse[i] & free).flatten()
        d = (c[near] - c[i]).norm(dim=1) / torch.maximum(norms[near], norms[i])
        members = near[d < tol].tolist()
        if i not in members:
            members = [i] + members
        free[members] = False
        groups.append((i, members))
    groups.sort(key=lambda g: -len(g[1]))
    return groups


@dataclass
class FCAnalyticOptions:
    """layer: module name of the biased nn.Linear to invert ('' = the first one; it must read the input).
    rel_threshold: skip rows with |db| below this fraction of the largest. max_rows: rows grouped for a batch
    at a hidden layer (the most reliable ones). group_tol: relative distance under which two row candidates
    count as the same sample (0 = automatic from the dtype)."""

    layer: str = ""
    rel_threshold: float = 1e-8
    max_rows: int = 2048
    group_tol: float = 0.0


@register("fc-analytic")
class FCAnalytic(Attack):
    """Closed-form recovery of the input of a biased fully connected layer (Geiping et al. 2020, Prop. in
    Sec. 4; Phong et al. 2018): exact for one sample, a mixture for a batch."""

    paper = ("Geiping, Bauermeister, Droege, Moeller. Inverting Gradients. NeurIPS 2020 (analytic recovery of a "
             "fully connected layer's input); Phong et al. 2018")
    Options = FCAnalyticOptions

    def check_options(self, o: FCAnalyticOptions) -> list[str]:
        p = []
        if not (0 <= o.rel_threshold < 1):
            p.append(f"rel_threshold must be in [0, 1), got {o.rel_threshold}")
        if o.max_rows < 1:
            p.append(f"max_rows must be >= 1, got {o.max_rows}")
        if o.group_tol < 0:
            p.append(f"group_tol must be >= 0, got {o.group_tol}")
        return p

    def _layer(self, case: Case) -> str | None:
        if self.options.layer:
            return self.options.layer
        layers = biased_linear_layers(case)
        return layers[0] if layers else None

    def requirements(self, case: Case) -> list[str]:
        layer = self._layer(case)
        if layer is None:
            return ["fc-analytic needs a fully connected (nn.Linear) layer with a bias in the observed update; "
                    "the model has none (bias-free or convolutional models: try rgap or inverting-gradients)"]
        problems = _layer_problems(case, layer)
        if problems:
            return problems
        if not reads_input(case, layer):
            problems.append(f"layer {layer!r} reads intermediate features, not the (flattened) input, so its row "
                            "ratios are features rather than an image; fc-analytic needs a biased linear layer fed "
                            "by the input (e.g. an MLP). For the features, call "
                            f"gradleak.attacks.analytic.recover_linear_input(case, layer={layer!r})")
        if float(case.observed[_pname(layer, "bias")].abs().max()) == 0:
            problems.append(f"the observed bias gradient of layer {layer!r} is zero: there is no row to divide by")
        return problems

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        layer = self._layer(case)
        rec = recover_linear_input(case, layer, rel_threshold=o.rel_threshold)
        spec = case.spec
        B = case.batch_size
        shape = (-1, *spec.shape)
        info: dict[str, Any] = {"layer": layer, "rows_used": int(rec.rows.numel()), "protocol": case.protocol}
        labels = case.labels
        label_info: dict[str, Any] = {"source": "known"} if labels is not None else {}
        if labels is None and not label_recovery_problems(case):
            est = recover_labels(case)
            labels, label_info = est.labels, {"source": "recovered", **est.to_info()}
        info["labels"] = label_info
        if B == 1:
            x = rec.least_squares.reshape(shape)
            # agreement of the rows: 0 for an exact single-sample update
            spread = (rec.candidates - rec.least_squares).norm(dim=1).max() / rec.least_squares.norm().clamp_min(1e-300)
            info.update(row_spread=float(spread),
                        note="one sample: every row ratio dW[i]/db[i] equals the layer input")
            return Reconstruction(inputs=spec.denormalize(x), labels=labels, info=info, claim="exact")

        mod = dict(case.model.named_modules())[layer]
        if mod.out_features == case.num_outputs and labels is not None and mod.out_features > 1:
            # classifier read straight from the input: one row per label
            out, support = [], []
            pos = {int(r): i for i, r in enumerate(rec.rows.tolist())}
            for y in labels.tolist():
                i = pos.get(int(y))
                out.append(rec.candidates[i] if i is not None else rec.least_squares)
                support.append(1 if i is not None else 0)
            x = torch.stack(out).reshape(shape)
            info.update(method="label rows",
                        note="batch: row y is sum_n delta_{n,y} h_n / sum_n delta_{n,y}, dominated by the samples of "
                             "label y; a mixture, not exact")
        else:
            eps = torch.finfo(case.observed[_pname(layer, 'weight')].dtype).eps
            tol = o.group_tol or float(1e3 * eps)
            groups = _group(rec.candidates, tol, o.max_rows)
            chosen = groups[:B]
            while len(chosen) < B:  # fewer groups than samples: repeat the best
                chosen.append(groups[len(chosen) % len(groups)])
            x = torch.stack([rec.candidates[g[1]].mean(0) for g in chosen]).to(case.dtype).reshape(shape)
            support = [len(g[1]) for g in chosen]
            info.update(method="grouped rows", group_tol=tol,
                        note="batch: each row is a mixture of the samples active at that unit; rows that agree "
                             "(support >= 2) are most likely one sample's exact input")
        info["support"] = support
        info["likely_pure"] = [s >= 2 for s in support]
        return Reconstruction(inputs=spec.denormalize(x), labels=labels, info=info, claim="mixture")
