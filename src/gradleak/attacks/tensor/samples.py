"""From fitted span coordinates to inputs: norms, signs and labels, fixed by what the gradient identifies, the loss
residual (known or recovered labels), a first-layer bias, or a stated prior."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...case import Case
from .span import Span, SpanProblem
from .solver import Solution
from .view import TwoLayerView


def _residual_of_logits(loss_fn, logits: torch.Tensor, label: int) -> torch.Tensor:
    """Per-row dloss/dlogits (the residual r) for rows of logits (n, K) with one label."""
    lg = logits.detach().clone().requires_grad_(True)
    y = torch.full((lg.shape[0],), int(label), dtype=torch.long, device=lg.device)
    with torch.enable_grad():
        loss = loss_fn(lg, y) * lg.shape[0]
        (g,) = torch.autograd.grad(loss, lg)
    return g


def _norm_candidates(loss_fn, F: torch.Tensor, bias: torch.Tensor, q: torch.Tensor, labels: list[int],
                     typical: float) -> list[tuple[float, float, int]]:
    """Solve tau * r(tau F + bias, y) = q for tau > 0 (homogeneous sigma: the logits at x = tau u are tau F + bias).
    Returns local minima (relative misfit, tau, label), best first."""
    from scipy.optimize import minimize_scalar

    qn = float(q.norm())
    if qn == 0:
        return []
    taus = torch.exp(torch.linspace(math.log(typical * 1e-4), math.log(typical * 1e4), 801, dtype=torch.float64,
                                        device=F.device))
    out = []
    for y in labels:
        r = _residual_of_logits(loss_fn, taus[:, None] * F[None] + bias[None], y)
        mis = ((taus[:, None] * r - q[None]).norm(dim=1) / qn).cpu().numpy()
        for i in range(len(mis)):
            lo_ok = i == 0 or mis[i] <= mis[i - 1]
            hi_ok = i == len(mis) - 1 or mis[i] <= mis[i + 1]
            if not (lo_ok and hi_ok) or mis[i] > 0.5:
                continue
            a = math.log(float(taus[max(i - 1, 0)]))
            b = math.log(float(taus[min(i + 1, len(mis) - 1)]))

            def f(lt, _y=y):
                t = math.exp(lt)
                rr = _residual_of_logits(loss_fn, (t * F + bias)[None], _y)[0]
                return float((t * rr - q).norm() / qn)

            if b > a:
                res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-12})
                out.append((float(res.fun), math.exp(float(res.x)), y))
            else:
                out.append((float(mis[i]), float(taus[i]), y))
    out.sort()
    return out


def _box_violation(spec, x_flat: torch.Tensor) -> float:
    img = spec.denormalize(x_flat.reshape(1, *spec.shape))[0]
    lo, hi = spec.value_range
    v = torch.relu(lo - img) + torch.relu(img - hi)
    return float((v ** 2).mean())


def _box_max_norm(spec, u: torch.Tensor, frac: float = 0.01) -> float:
    """The largest tau such that at most ``frac`` of the pixels of denormalize(tau u) leave the value range."""
    lo, hi = spec.value_range
    zero = spec.denormalize(torch.zeros(1, *spec.shape, dtype=u.dtype, device=u.device))[0].reshape(-1)
    step = spec.denormalize(u.reshape(1, *spec.shape))[0].reshape(-1) - zero  # image change per unit tau
    with np.errstate(divide="ignore", invalid="ignore"):
        lim = torch.where(step > 0, (hi - zero) / step, torch.where(step < 0, (lo - zero) / step,
                                                                     torch.full_like(step, float("inf"))))
    lim = lim[torch.isfinite(lim)]
    if lim.numel() == 0:
        return 1.0
    return float(torch.quantile(lim.double(), frac))


def unused_labels(known: list[int], used: list[int]) -> list[int]:
    rest = list(known)
    for y in used:
        if y in rest:
            rest.remove(y)
    return rest


def _head_logits(case: Case, view: TwoLayerView, x: torch.Tensor) -> torch.Tensor:
    """Logits of the two-layer part at input x (d,) (float64)."""
    params = case.parameters
    h = params[view.weight_key].double() @ x.double()
    if view.has_bias:
        h = h + params[view.bias_key].double()
    out = params[view.out_key].double() @ view.activation.fn(h)
    ob = getattr(case.model.get_submodule(view.out), "bias", None)
    return out + (ob.detach().double() if ob is not None else 0.0)


def _prior_score(spec, x: torch.Tensor, prior: str) -> float:
    """Lower is more plausible: 'box' - squared excursion of the de-normalised image from the value range;
    'nonneg' - minus the mean (post-ReLU features are non-negative)."""
    if prior == "box":
        return _box_violation(spec, x)
    return -float(x.mean())


def resolve_samples(case: Case, view: TwoLayerView, sol: Solution, prob: SpanProblem, span: Span, B: int,
                     prior: str):
    """Turn the fitted span coordinates into inputs x_i (B, d) of the two-layer part, fixing what the gradient does
    not identify, and assign labels. For every sample and candidate label the loss residual r(f(x), y) is compared
    with the fitted residual (ReLU family: tau r(tau F, y) = q solved for the norm tau; odd sigma: both signs);
    with known labels the label multiset is assigned to the samples by a Hungarian assignment on that misfit
    (recovered samples come in no particular order). Returns (X, labels or None, per-sample reports, source)."""
    from scipy.optimize import linear_sum_assignment

    params = case.parameters
    d = view.d_in
    K = view.num_outputs
    odd = view.activation.odd
    known = case.labels.tolist() if case.labels is not None else None
    label_set = sorted(set(known)) if known is not None else list(range(max(K, 2)))
    W = params[view.weight_key].double()
    A = params[view.out_key].double()
    ob = getattr(case.model.get_submodule(view.out), "bias", None)
    obias = ob.detach().double() if ob is not None else torch.zeros(K, dtype=torch.float64, device=W.device)
    typical = math.sqrt(d)
    cands: list[dict[int, list[tuple[float, torch.Tensor, str, str]]]] = []  # sample -> label -> [(mis, x, norm, sign)]
    bases: list[tuple[torch.Tensor, str, str]] = []  # fallback per sample (x, norm how, sign how)
    for i in range(B):
        e = (span.U.double() @ sol.coords[i]) / prob.s  # augmented input x~ (up to the norm for the ReLU family)
        per: dict[int, list] = {}
        if view.has_bias and abs(float(e[d])) > 1e-12:
            x = e[:d] / e[d]
            norm_how = "bias (the augmented coordinate equals 1)"
            sign_how = "bias"
            # the fitted residual r_i: a pattern fit gives Q_i d_i = t rho_i with t = s |x~| = 1 / e_d (unit
            # coordinates d_i, x~ = e / e_d); a smooth fit gives rho_i = r_i / B directly
            if sol.homogeneous:
                r_fit = B * (sol.Q[i] @ sol.coords[i]) * float(e[d])
            else:
                r_fit = B * sol.rho[i]
            lg = _head_logits(case, view, x)
            for y in label_set:
                rr = _residual_of_logits(case.loss_fn, lg[None], y)[0]
                per[y] = [(float((rr - r_fit).norm() / max(float(r_fit.norm()), 1e-300)), x, norm_how, sign_how)]
            bases.append((x, norm_how, sign_how))
        elif sol.homogeneous:
            u = e[:d] / e[:d].norm()
            q = B * (sol.Q[i] @ sol.coords[i]) / prob.s  # = tau_i r_i
            F = A @ view.activation.fn(W @ u)
            for mis, tau, y in _norm_candidates(case.loss_fn, F, obias, q, label_set, typical):
                per.setdefault(y, []).append((mis, tau * u, "loss residual", "gradient (activation patterns)"))
            tau0 = _box_max_norm(case.spec, u) if prior == "box" else 1.0
            bases.append((tau0 * u, "prior: the largest norm keeping 99% of the pixels in the value range (the loss "
                          "residual did not determine it)" if prior == "box" else "unknown (unit vector)",
                          "gradient (activation patterns)"))
        else:
            x = e[:d]
            r_fit = B * sol.rho[i]
            signs = (1.0, -1.0) if odd else (1.0,)
            sign_how = "loss residual (odd activation: r(f(x), y) matched the fitted residual)" if odd \
                else "gradient"
            for sg in signs:
                lg = _head_logits(case, view, sg * x)
                for y in label_set:
                    rr = _residual_of_logits(case.loss_fn, lg[None], y)[0]
                    mis = float((rr - sg * r_fit).norm() / max(float(r_fit.norm()), 1e-300))
                    per.setdefault(y, []).append((mis, sg * x, "gradient (non-homogeneous activation)", sign_how))
            if odd:
                xb = x if _prior_score(case.spec, x, prior) <= _prior_score(case.spec, -x, prior) else -x
                bases.append((xb, "gradient (non-homogeneous activation)",
                              "prior: " + ("the sign closer to the value range" if prior == "box" else
                                           "non-negative mean feature") + " (odd activation: not identifiable)"))
            else:
                bases.append((x, "gradient (non-homogeneous activation)", "gradient"))
        for y in per:
            per[y].sort(key=lambda t: t[0])
        cands.append(per)

    # Every (label, input) candidate that fits the loss residual (misfit < tol) is admissible. Several admissible
    # inputs for one sample (a second norm root, or the other sign of an odd activation) are told apart only by
    # the prior: candidates are ranked by it (value range: squared excursion, then the larger norm, i.e. the
    # higher contrast; features: the larger mean). Known labels: a Hungarian assignment of the label multiset to
    # the samples, cost = misfit for inadmissible candidates, else 1e-3 x the prior rank.
    tol = 0.05

    def pkey(x):
        sc = _prior_score(case.spec, x, prior)
        return (sc if sc > 1e-12 else 0.0, -float(x.norm()))

    ranked = []  # per sample: list of (misfit, x, norm_how, sign_how, label, prior_rank) admissible, best first
    for i in range(B):
        adm = [(c[0], c[1], c[2], c[3], y) for y in cands[i] for c in cands[i][y] if c[0] < tol]
        distinct: list = []
        for c in sorted(adm, key=lambda c: pkey(c[1])):
            k = next((n for n, o_ in enumerate(distinct)
                      if float((c[1] - o_[0][1]).norm()) <= 1e-6 * float(o_[0][1].norm())), None)
            if k is None:
                distinct.append([c])
            else:
                distinct[k].append(c)
        ranked.append([(c[0], c[1], c[2], c[3], c[4], r) for r, grp in enumerate(distinct) for c in grp])
    chosen: list[tuple | None] = [None] * B
    if known is not None:
        cost = np.full((B, len(known)), 1e3)
        pick: dict[tuple[int, int], tuple] = {}
        for i in range(B):
            for sl, y in enumerate(known):
                opts = [c for c in ranked[i] if c[4] == y]
                if opts:
                    c = min(opts, key=lambda c: (c[5], c[0]))
                    cost[i, sl] = 1e-3 * c[5] + 1e-6 * c[0]
                    pick[(i, sl)] = c
                elif cands[i].get(y):
                    cost[i, sl] = 1.0 + cands[i][y][0][0]
        rows, cols = linear_sum_assignment(cost)
        for r_, c_ in zip(rows, cols):
            chosen[r_] = pick.get((r_, c_), ("label", known[c_]))
        source = "known (assigned to the recovered samples by the loss-residual misfit)"
    else:
        for i in range(B):
            if ranked[i]:
                chosen[i] = min(ranked[i], key=lambda c: (c[5], c[0]))
        source = "recovered from the loss residual"
    xs, reports, labs = [], [], []
    for i in range(B):
        c = chosen[i]
        rep: dict[str, Any] = {}
        if c is None or c[0] == "label":
            x, norm_how, sign_how = bases[i]
            rep.update(norm=norm_how, sign=sign_how)
            labs.append(c[1] if c is not None else None)
        else:
            mis, x, norm_how, sign_how, y, rank = c
            n_inputs = len({r[5] for r in ranked[i]})
            if n_inputs > 1:
                what = "sign" if odd and not sol.homogeneous else "norm"
                rep["ambiguous"] = (f"{n_inputs} inputs fit the gradient and the loss residual (the {what} is not "
                                    "identified by them); the one preferred by the "
                                    f"{'value-range' if prior == 'box' else 'non-negativity'} prior was taken")
                if what == "sign":
                    sign_how = "prior: " + ("value range" if prior == "box" else "non-negative mean") + \
                        " (odd activation: the sign is not identifiable)"
                else:
                    norm_how = "loss residual; root chosen by the " + \
                        ("value-range (highest contrast)" if prior == "box" else "non-negativity") + " prior"
            rep.update(norm=norm_how, sign=sign_how, residual_misfit=mis)
            labs.append(y)
        rep["label"] = labs[-1]
        xs.append(x)
        reports.append(rep)
    X = torch.stack(xs) if xs else torch.zeros(0, d, dtype=torch.float64, device=W.device)
    if known is not None:
        labels = torch.tensor([int(y) for y in labs], dtype=torch.long)
    elif all(y is not None for y in labs):
        labels = torch.tensor(labs, dtype=torch.long)
    else:
        labels, source = None, "unknown (the loss residual did not determine every label)"
    return X, labels, reports, source


_PROPS_CACHE: dict[str, dict] = {}
