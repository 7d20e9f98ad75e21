"""Trap weights: Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot, "When the Curious Abandon
Honesty: Federated Learning Is Not Private" (EuroS&P 2023).

The server sets the first fully connected layer (followed by a ReLU) so that few inputs activate each of its
neurons. Our statement of the construction: for image-space inputs x >= 0, row r is
u_r = |z| on a random half of the pixels and -s_r |z| on the other half (z ~ N(0, I)), with s_r the ratio of the
two halves' weight sums times (1 + margin), so a flat image gives u_r.x = -margin * (negative part) < 0 and only
images whose structure happens to favour the positive half activate the neuron. A neuron that exactly one sample
activates has weight-gradient row delta x^T and bias gradient delta: the ratio is that sample's input exactly
(the analytic read-out of ``fc-analytic``, :func:`gradleak.attacks.analytic.recover_linear_input`). Rows that
several samples activate give mixtures, reported as such.

Where the layer reads: an MLP's first layer reads the normalised input, and the server folds the normalisation
into the weights (W = u * std, b = u . mean, so W xn + b = u . x). In a CNN the convolutions before the first
linear layer are set to pass the image through unchanged (the paper's construction for convolutional models):
the first convolution's centre taps copy channel c scaled back to image space, later ones copy channels,
BatchNorm is set to the identity and the ReLUs pass the non-negative image; the layers must keep the spatial
size (stride 1, 'same' padding, no pooling), which :meth:`TrapWeights.craft` checks by a probe.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...case import Case, DataSpec
from ...errors import ValidationError
from ..analytic import _group, recover_linear_input
from ..base import Attack, Reconstruction, RunContext, register
from .crafted import (MARK, CraftRecord, crafted_record, in_value_range, not_crafted_problem, pair_labels,
                      per_sample_independent, pixel_stats, row_fit)

__all__ = ["TrapWeights"]

_PASS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout)


def _first_linear(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            return name
    return None


def _before(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[list[tuple[str, nn.Module]], torch.Tensor]:
    """Leaf modules run before ``layer`` on ``x`` (in call order) and the input ``layer`` receives."""
    mod = dict(model.named_modules())[layer]
    order: list[tuple[str, nn.Module]] = []
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    def grab(m_, i, o):
        seen.setdefault("in", i[0].detach())

    def note(m_, i, o, name):
        if "in" not in seen:
            order.append((name, m_))

    for name, m in model.named_modules():
        if m is mod:
            hooks.append(m.register_forward_hook(grab))
        elif not list(m.children()):
            hooks.append(m.register_forward_hook(lambda m_, i, o, name=name: note(m_, i, o, name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if "in" not in seen:
        raise ValidationError("trap-weights craft", [f"layer {layer!r} is not used in the model's forward pass"])
    return order, seen["in"]


@dataclass
class TrapOptions:
    """layer: the nn.Linear (with bias) to trap ('' = the first one). margin: how far each row leans negative
    (larger: fewer samples activate a neuron; choose it for the batch size: about 1/B of the samples per neuron
    isolates most). group_tol: relative distance under which two rows' read-outs are the same sample (0 = 1e3
    machine epsilons for FedSGD, sqrt(eps) for FedAvg, whose delta is rounded at the size of the parameters). fit_tol: a row is one sample when that candidate's own bias gradient explains the row to
    this relative error (0 = sqrt(eps))."""

    layer: str = ""
    margin: float = 0.05
    group_tol: float = 0.0
    fit_tol: float = 0.0


@register("trap-weights", aliases=("curious-abandon-honesty",))
class TrapWeights(Attack):
    """Trap weights (Boenisch et al., EuroS&P 2023): a malicious server sets the first fully connected layer so
    that few samples activate each neuron, then reads every isolated sample exactly off the layer's gradient
    (the fc-analytic read-out). Needs a model crafted by :meth:`craft` (a malicious server)."""

    paper = ("Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot. When the Curious Abandon Honesty: "
             "Federated Learning Is Not Private. EuroS&P 2023")
    Options = TrapOptions
    crafts_model = True

    def check_options(self, o: TrapOptions) -> list[str]:
        p = []
        if not (o.margin >= 0 and math.isfinite(o.margin)):
            p.append(f"margin must be >= 0, got {o.margin}")
        if o.group_tol < 0 or o.fit_tol < 0:
            p.append("group_tol and fit_tol must be >= 0")
        return p

    # ---- the server side ------------------------------------------------------------------------------
    def craft(self, model: nn.Module, spec: DataSpec, *, generator: torch.Generator | None = None) -> nn.Module:
        """A copy of ``model`` with trap weights in its first biased nn.Linear (or ``layer``) and, in a CNN, the
        layers before it set to pass the image through. Raises :class:`ValidationError` if they cannot."""
        if not isinstance(model, nn.Module) or not isinstance(spec, DataSpec):
            raise ValidationError("trap-weights craft", ["expected an nn.Module and a gradleak.DataSpec"])
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        model = copy.deepcopy(model).eval()
        layer = self.options.layer or _first_linear(model)
        mods = dict(model.named_modules())
        if layer is None or layer not in mods or not isinstance(mods[layer], nn.Linear) or mods[layer].bias is None:
            raise ValidationError("trap-weights craft", [f"needs an nn.Linear with a bias to trap, got layer "
                                                         f"{layer!r} (its biased linear layers: "
                                                         f"{[n for n, m in mods.items() if isinstance(m, nn.Linear)]})"])
        lin = mods[layer]
        p0 = lin.weight
        dtype, device = p0.dtype, p0.device
        D = math.prod(spec.shape)
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        probe = torch.rand((3, *spec.shape), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        xn = spec.normalize(probe)
        order, h = _before(model, layer, xn)
        convs = [(n, m) for n, m in order if not isinstance(m, _PASS)]
        if convs:
            self._pass_through(convs, spec, model)
            order, h = _before(model, layer, xn)
        h = h.reshape(h.shape[0], -1)
        tol = 1e3 * torch.finfo(dtype).eps
        if h.shape[1] >= D and torch.allclose(h[:, :D], probe.reshape(3, -1), atol=tol, rtol=tol):
            reads = "image"
        elif h.shape[1] == D and torch.allclose(h, xn.reshape(3, -1), atol=tol, rtol=tol):
            reads = "normalised"
        else:
            raise ValidationError("trap-weights craft", [f"layer {layer!r} does not receive the input after the "
                                                         "server's changes (the layers before it change the spatial "
                                                         "size or mix pixels: pooling, stride, or an unsupported "
                                                         f"module among {[n for n, _ in convs]})"])
        F = lin.in_features
        rows = lin.out_features
        z = torch.randn(rows, D, generator=generator, dtype=torch.float64).abs()
        neg = torch.rand(rows, D, generator=generator) < 0.5
        pos_sum = (z * ~neg).sum(1)
        neg_sum = (z * neg).sum(1).clamp_min(1e-12)
        s = pos_sum / neg_sum * (1 + self.options.margin)
        u = torch.where(neg, -s[:, None] * z, z) / math.sqrt(D)  # image-space rows: u . x
        W = torch.zeros(rows, F, dtype=torch.float64)
        if reads == "image":
            W[:, :D] = u
            b = torch.zeros(rows, dtype=torch.float64)
        else:
            std, mean = pixel_stats(spec)
            W = u * std.reshape(-1)
            b = u @ mean.reshape(-1)
        with torch.no_grad():
            lin.weight.copy_(W.to(dtype))
            lin.bias.copy_(b.to(dtype))
        setattr(model, MARK, CraftRecord("trap-weights", layer, {"reads": reads, "input_size": D,
                                                                 "margin": self.options.margin}))
        if hasattr(model, "zoo_name"):
            model.zoo_name = f"trap+{model.zoo_name}"
        return model

    @staticmethod
    def _pass_through(convs, spec: DataSpec, model: nn.Module) -> None:
        C = spec.channels
        first = True
        problems = []
        for name, m in convs:
            with torch.no_grad():
                if isinstance(m, nn.Conv2d):
                    k = m.kernel_size
                    if (m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or k[0] % 2 == 0 or k[1] % 2 == 0
                            or m.padding != (k[0] // 2, k[1] // 2) or m.out_channels < C
                            or (not first and m.in_channels < C)):
                        problems.append(f"module {name!r}: a {tuple(k)} convolution with stride {m.stride}, padding "
                                        f"{m.padding}, {m.in_channels}->{m.out_channels} channels cannot pass the "
                                        "image through (needs stride 1, 'same' padding, at least as many channels)")
                        continue
                    m.weight.zero_()
                    std, mean = (t[:, 0, 0] for t in pixel_stats(spec))
                    for c in range(C):
                        m.weight[c, c, k[0] // 2, k[1] // 2] = float(std[c]) if first else 1.0
                    if m.bias is not None:
                        m.bias.zero_()
                        if first:
                            m.bias[:C] = mean.to(m.bias.dtype)
                    elif first and bool((mean != 0).any()):
                        problems.append(f"{name}: has no bias to undo the input normalisation")
                    first = False
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0 - m.eps)
                else:  # an activation that passes the non-negative image unchanged (ReLU-like) is fine
                    t = torch.linspace(0, 1, 11, dtype=torch.float64).to(next(model.parameters()).dtype)
                    try:
                        ok = torch.equal(m(t), t)
                    except Exception:
                        ok = False
                    if not ok:
                        problems.append(f"module {name!r}: a {type(m).__name__} before the trap layer changes "
                                        "non-negative inputs, so the image cannot pass through it")
        if problems:
            raise ValidationError("trap-weights craft", problems)

    # ---- the read-out -----------------------------------------------------------------------------
    def requirements(self, case: Case) -> list[str]:
        rec = crafted_record(case.model, "trap-weights")
        if rec is None:
            return [not_crafted_problem("trap-weights", case.model)]
        missing = [f"{rec.layer}.{p}" for p in ("weight", "bias") if f"{rec.layer}.{p}" not in case.observed]
        if missing:
            return [f"the observed update lacks the trap layer's parameters {missing}"]
        if float(case.observed[f"{rec.layer}.bias"].abs().max()) == 0:
            return [f"the trap layer {rec.layer!r} received no gradient: no neuron was activated by any sample "
                    "(margin too large for this data)"]
        return []

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        record = crafted_record(case.model, "trap-weights")
        layer, reads, D = record.layer, record.facts["reads"], record.facts["input_size"]
        spec, B, dtype = case.spec, case.batch_size, case.dtype
        eps = torch.finfo(dtype).eps
        lin = recover_linear_input(case, layer)
        cand = lin.candidates[:, :D]
        img = cand.reshape(-1, *spec.shape) if reads == "image" else spec.denormalize(cand.reshape(-1, *spec.shape))
        xn = spec.normalize(img)
        # FedAvg: theta_K - theta_0 is rounded at the size of theta, so rows of one sample agree less closely
        tol = o.group_tol or (1e3 * eps if case.observation.gradient_is_exact(B) else math.sqrt(eps))
        groups = _group(img.flatten(1), tol, max(len(img), 1))
        reps = torch.tensor([gr[0] for gr in groups], dtype=torch.long)
        support = [len(gr[1]) for gr in groups]
        units = lin.rows[reps]
        # proofs of a mixture: pixels outside the range, or the row's own neuron inactive for the candidate
        in_range = in_value_range(spec, img[reps])
        Wl = case.parameters[f"{layer}.weight"]
        bl = case.parameters[f"{layer}.bias"]
        feats = (img[reps].flatten(1) if reads == "image" else xn[reps].flatten(1))
        pre = (feats * Wl[units, :D]).sum(1) + bl[units]
        active = pre > -math.sqrt(eps) * (1 + pre.abs())
        proven_mixture = ~(in_range & active.cpu())
        G = case.observation.as_gradient()
        fit_ok = per_sample_independent(case)
        fit_exact = fit_ok and case.observation.gradient_is_exact(B)
        single = torch.zeros(len(reps), dtype=torch.bool)
        cost = None
        if fit_ok:
            cost = row_fit(case, layer, xn[reps], units, G[f"{layer}.bias"][units]).cpu()
            best = cost.amin(1)
            if fit_exact:
                single = (best <= (o.fit_tol or math.sqrt(eps))) & ~proven_mixture
        status = ["single" if s else "mixture" if pm else "unverified"
                  for s, pm in zip(single.tolist(), proven_mixture.tolist())]
        # rows: verified singles first, then unverified groups by support; proven mixtures last
        rank = sorted(range(len(reps)), key=lambda i: ({"single": 0, "unverified": 1, "mixture": 2}[status[i]],
                                                       -support[i]))
        chosen = rank[:B]
        x = img[reps[chosen]]
        info: dict[str, Any] = {"layer": layer, "reads": reads, "rows_used": int(lin.rows.numel()),
                                "groups": len(groups), "support": [support[i] for i in chosen],
                                "row_status": [status[i] for i in chosen],
                                "rows_single": int(sum(status[i] == "single" for i in chosen)),
                                "protocol": case.protocol,
                                "note": "row r = dW[r] / db[r]: one sample's exact input if it alone activates "
                                        "neuron r; rows that agree form a group; 'single' rows are verified by their "
                                        "own bias gradient, 'mixture' rows proven to mix samples"}
        labels = None
        if cost is not None:
            sub = cost[chosen]
            labels, info["labels"] = pair_labels(sub, case.labels)
            info["fit_cost"] = sub.amin(1).tolist()
        n_single = info["rows_single"]
        # exact: B verified single rows; or (FedAvg on a layer reading the input, which does not change between
        # local steps) B rows that several neurons agree on and none proven a mixture; the base class then verifies
        # it by the residual. In a CNN the pass-through convolutions drift during the local steps: no such claim.
        agreed = reads == "normalised" and all(status[i] != "mixture" and support[i] >= 2 for i in chosen)
        claim = "exact" if len(chosen) == B and (n_single >= B or (not fit_exact and agreed)) else "mixture"
        info["share_single"] = n_single / B
        return Reconstruction(inputs=x, labels=None if labels is None else labels.to(case.device), info=info,
                              claim=claim)
