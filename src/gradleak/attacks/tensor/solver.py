"""The decomposition driver: for every draw a moment tensor (random class combination), Jennrich, CP-ALS polish and
a fit of the raw gradient; the best fit wins. Shared by the attack, the deep-network feature recovery and the
identifiability simulation (:func:`solve` on a :class:`~.span.SpanProblem`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import RequirementError
from ..base import RunContext
from .fit_patterns import fit_patterns, pattern_ls, pattern_matrix
from .fit_smooth import fit_scale_only, fit_smooth
from .moments import cp_als_polish, cp_objective, jennrich
from .options import TensorOptions
from .span import SpanProblem, moment_tensor, reduce_classes


def _fit_none(prob: SpanProblem, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """No direction refinement: signs by greedy flips and scales/residuals by least squares with the tensor's
    directions fixed (ReLU family: patterns; otherwise via the smooth model at the best common scale)."""
    if prob.act.positively_homogeneous:
        d = dirs.clone()
        Q, res = pattern_ls(prob, pattern_matrix(prob, d))
        for i in range(prob.B):
            d2 = d.clone()
            d2[i] = -d2[i]
            Q2, r2 = pattern_ls(prob, pattern_matrix(prob, d2))
            if r2 < res:
                d, Q, res = d2, Q2, r2
        return d, Q, res, {}
    return fit_scale_only(prob, dirs, prob.act.odd)


@dataclass
class Solution:
    coords: torch.Tensor  # (B, B) span coordinates c_i (pattern fits: unit signed directions)
    Q: torch.Tensor | None  # pattern fits: (B, K, B); q_i = Q_i c_i = t_i rho_i
    rho: torch.Tensor | None  # smooth fits: (B, K)
    residual: float
    homogeneous: bool
    report: dict


def _same_solution(a: Solution, b: Solution, tol: float = 1e-6) -> bool:
    """Two fits found the same inputs (up to order): every row of a matches a row of b to ``tol``."""
    ca = a.coords / a.coords.norm(dim=1, keepdim=True)
    cb = b.coords / b.coords.norm(dim=1, keepdim=True)
    if not a.homogeneous:
        ca, cb = a.coords, b.coords
        dist = torch.cdist(ca, cb) / cb.norm(dim=1).max().clamp_min(1e-300)
    else:
        dist = torch.cdist(ca, cb)
    return bool((dist.min(dim=1).values < tol).all())


def solve(prob: SpanProblem, o: TensorOptions, order: int, generator: torch.Generator, ctx: RunContext | None,
) -> tuple[Solution, list[dict]]:
    """Every draw: moment tensor (random class combination), Jennrich, CP-ALS polish, gradient fit; returns the
    best fit (and a report per draw). Works in the reduced class space (:func:`reduce_classes`) and maps the
    residuals back to the K classes."""
    full_prob = prob
    prob, V = reduce_classes(prob)
    best, draws_report = _solve_reduced(prob, o, order, generator, ctx)
    if V is not None:
        if best.Q is not None:
            best.Q = torch.einsum("ilb,kl->ikb", best.Q, V)
        if best.rho is not None:
            best.rho = best.rho @ V.T
        best.report["classes_reduced"] = f"{full_prob.K} -> {prob.K}"
    return best, draws_report


def _solve_reduced(prob: SpanProblem, o: TensorOptions, order: int, generator: torch.Generator,
                   ctx: RunContext | None) -> tuple[Solution, list[dict]]:
    fit = o.fit
    if fit == "auto":
        fit = "patterns" if prob.act.positively_homogeneous else "nonlinear"
    estimator = "hidden" if o.estimator == "auto" else o.estimator
    seen: list[torch.Tensor] = []
    draws_report: list[dict] = []
    best: Solution | None = None
    best_score = float("inf")
    agreements = 0
    for k in range(max(1, o.draws)):
        c = torch.ones(prob.K, dtype=torch.float64, device=prob.Z.device)
        if prob.K > 1:  # drawn on the generator's device (CPU), then moved: the same draw on every device
            c = torch.randn(prob.K, generator=generator, dtype=torch.float64).to(prob.Z.device)
            c = c / c.norm()
        T = moment_tensor(prob, order, estimator, c)
        drs = jennrich(T, generator=generator, draws=1)
        if not drs:
            draws_report.append({"draw": k, "failed": "singular slice"})
            continue
        dr = drs[0]
        V, _ = cp_als_polish(T, dr.directions, sweeps=o.polish_sweeps)
        if not torch.isfinite(V).all():
            V = dr.directions
        cp_obj = cp_objective(T, V)[0]
        rep: dict[str, Any] = {"draw": k, "eigengap": round(dr.score, 6), "cp_objective": cp_obj}
        dup = any(float((V @ S.T).abs().max(dim=1).values.min()) > 0.9999 for S in seen)
        if dup:
            rep["duplicate"] = True
            draws_report.append(rep)
            if ctx is not None:
                ctx.update(1)
            continue
        seen.append(V)
        if fit == "patterns":
            coords, Q, res, frep = fit_patterns(prob, V, o.fit_rounds)
            sol = Solution(coords, Q, None, res, True, frep)
        elif fit == "nonlinear":
            coords, rho, res, frep = fit_smooth(prob, V, o.fit_rounds, prob.act.odd)
            sol = Solution(coords, None, rho, res, False, frep)
        else:
            coords, QR, res, frep = _fit_none(prob, V)
            hom = prob.act.positively_homogeneous
            sol = Solution(coords, QR if hom else None, None if hom else QR, res, hom, frep)
        rep["fit_residual"] = res
        rep.update({k2: v for k2, v in frep.items() if isinstance(v, (int, float, bool))})
        draws_report.append(rep)
        if ctx is not None:
            ctx.update(1, fit=res)
        same = best is not None and _same_solution(sol, best)
        # tensor directions only: with one class the draws share one tensor, and its CP fit ranks them best
        score = cp_obj if (fit == "none" and prob.K == 1) else res
        if best is None or score < best_score:
            best, best_score = sol, score
            best.report = {**frep, "draw": k}
        agreements = agreements + 1 if same else agreements
        if best.residual < o.fit_tol or agreements >= 2:
            break
    if best is None:
        raise RequirementError("tensor", ["every Jennrich draw failed (singular slices): the moment tensor carries no "
                                          "usable signal - too narrow a network, or samples the model already fits"])
    return best, draws_report
