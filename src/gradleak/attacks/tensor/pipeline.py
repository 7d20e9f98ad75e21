"""The shared pipeline of the attack and the feature recovery: span, projection, checks, order and the best fit
over draws, with the solver report."""

from __future__ import annotations

import math

import torch

from ...case import Case
from ...errors import RequirementError
from ..base import RunContext
from .hermite import activation_properties, hermite_coefficients, hermite_order
from .options import TensorOptions
from .solver import Solution, solve
from .span import Span, SpanProblem, project, top_span
from .view import TwoLayerView, observed_gradient
from .weights import span_normality, weight_normality


def run_solver(case: Case, view: TwoLayerView, o: TensorOptions, ctx: RunContext
               ) -> tuple[Solution, SpanProblem, Span, int, dict]:
    """Span, projection, order, checks and the best fit over draws (randomness from ``ctx.generator``).
    Returns (solution, problem, span, B, info)."""
    gen = ctx.generator
    params = case.parameters
    keys = [view.weight_key, view.out_key] + ([view.bias_key] if view.has_bias else [])
    g = observed_gradient(case, keys)
    W = params[view.weight_key]
    s = float(W.double().pow(2).mean().sqrt()) if not view.has_bias else float(
        torch.cat([W.reshape(-1), params[view.bias_key].reshape(-1)]).double().pow(2).mean().sqrt())
    B_case = case.batch_size
    span = top_span(g[view.weight_key], g[view.bias_key] if view.has_bias else None, B_case, gen)
    B = B_case if o.batch_size == "case" else span.rank_gap
    notes = []
    if span.numerical_rank < B:
        notes.append(f"the gradient spans only {span.numerical_rank} dimensions for {B} samples (duplicates, or samples "
                     "the model already fits have ~zero residual); recovering that many")
        B = max(1, span.numerical_rank)
    if B != span.rank_gap:
        notes.append(f"the singular-value gap suggests B = {span.rank_gap} (ratio {span.gap_ratio:.3g}); using B = {B}")
    U = span.U[:, :B]
    span = Span(U=U, singular_values=span.singular_values, rank_gap=span.rank_gap, gap_ratio=span.gap_ratio,
                 numerical_rank=span.numerical_rank)
    prob = project(case, view, U, s)
    zn = span_normality(prob.Z, bool(getattr(case.model, "mirrored", False)))
    if min(zn["mean_p"], zn["cov_p"]) < 1e-6:
        msg = (f"the first-layer weights projected on the gradient's span are not N(0, I) (covariance p = "
               f"{zn['cov_p']:.2g}, mean p = {zn['mean_p']:.2g}): trained or data-dependent weights break Stein's "
               "identity")
        if o.check_weights:
            raise RequirementError("tensor", [msg + " (pass check_weights=False to run anyway)"])
        notes.append(msg)
    order = o.order or hermite_order(view.activation, math.sqrt(view.d_aug))
    props = activation_properties(view.activation)
    ctx.progress(max(1, o.draws))
    sol, draws = solve(prob, o, order, gen, ctx)
    if sol.residual > 0.05:
        notes.append(f"the best fit leaves {100 * sol.residual:.1f}% of the gradient unexplained: the recovery is "
                     "unreliable (too narrow a network for this batch, non-Gaussian weights, or a defense)")
    mu = hermite_coefficients(view.activation, range(0, 5))
    info = {
        "method": "moment tensor (Wang, Lee & Lei 2023): span SVD, Hermite tensor, Jennrich + CP-ALS, gradient fit",
        "order": order, "mu": {str(p): v for p, v in mu.items()}, "activation": view.activation.name,
        "activation_properties": props, "width": view.width, "d": view.d_in, "bias": view.has_bias,
        "batch_size_used": B, "batch_size_gap_estimate": span.rank_gap, "gap_ratio": span.gap_ratio,
        "singular_values": span.singular_values[: 2 * B + 2], "weight_scale": s,
        "weight_normality": {**weight_normality(W), **zn},
        "fit": "patterns" if sol.homogeneous else ("nonlinear" if o.fit in ("auto", "nonlinear") else o.fit),
        "fit_residual": sol.residual, "fit_report": {k: v for k, v in sol.report.items()
                                                     if isinstance(v, (int, float, bool, str))},
        "draws": draws,
        "identifiable": {"directions": True, "signs": not view.activation.odd or view.has_bias,
                         "norms": (not view.activation.positively_homogeneous) or view.has_bias},
        "warnings": notes,
    }
    if sol.Q is not None:
        # |t_i rho_i|: how strongly each sample speaks in the gradient (tiny = the model already fits it)
        w = [float((sol.Q[i] @ sol.coords[i]).norm()) for i in range(B)]
    else:
        w = [float(sol.rho[i].norm() * sol.coords[i].norm()) for i in range(B)]
    info["sample_weights"] = w
    weak = [i for i, v in enumerate(w) if v < 1e-3 * max(w)]
    if weak:
        notes.append(f"sample(s) {weak} carry < 0.1% of the gradient's weight (the model already fits them: tiny "
                     "residual); their recovery is the least reliable")
    info["assumptions"] = [
        "first-layer weights i.i.d. Gaussian N(0, s^2) (Stein's identity; checked: marginal moments and the "
        "projection on the gradient's span)" + ("" if o.check_weights else " - check disabled"),
        "output-layer weights known (they are part of the model the server sends)",
        "one gradient: FedSGD, or FedAvg with a single full-batch local step",
        f"B <= d and linearly independent samples (B = {B}, d = {view.d_aug})",
        "sign / norm / label fixes: see 'samples' (gradient, loss residual, bias, or a stated prior)",
    ]
    return sol, prob, span, B, info
