"""Identifiability of a batch from one gradient of a random two-layer network (the setting of the moment-tensor
attack of Wang, Lee & Lei, AISTATS 2023), decided from the activation function alone.

For f(x) = sum_j a_j sigma(w_j^T x) with w_j ~ N(0, I), Stein's identity gives
E[sigma(w^T x) He_p(w)] = mu_p(|x|) x^{(x)p} with the Hermite coefficients

    mu_p(s) = E_{z ~ N(0,1)}[sigma^(p)(s z)] = s^{-p} E[sigma(s z) He_p(z)]        (s > 0),

computed here numerically from sigma alone (no derivatives), so any activation - a registry name or a Python
callable - can be analysed. What the gradient reveals then follows:

- directions x_i / |x_i|: identifiable by the order-p tensor when mu_p != 0 for p = 3 or 4 (the tensor method of
  order <= 4) and the batch is linearly independent (B <= d). Activations whose odd part is linear (ReLU, leaky
  ReLU, GELU, SiLU, softplus) have mu_3 = 0 and use p = 4; odd ones (tanh) and sigmoid have mu_4 = 0 and use p = 3.
- signs: for an odd sigma the map (x_i, r_i) -> (-x_i, -r_i) leaves both layers' gradients unchanged, so the sign
  is not identifiable from the gradient (it needs labels and a model output that differs, a bias, or a prior on
  the data); otherwise the sign is identifiable.
- norms: for a positively homogeneous sigma (ReLU family) only r_i |x_i| enters the gradient; the norm needs the
  residual r_i from the loss (known labels, or a mirrored initialisation where f = 0), a first-layer bias, or a
  prior. For other activations mu_p(s) depends on s and the norm is identifiable in principle (weakly so when
  |x| is large and sigma is nearly homogeneous there, e.g. GELU).

The coefficients, the tensor order and the symmetries come from the tensor attack's public API
(:mod:`gradleak.attacks.tensor.hermite`, re-exported here); this module only reads from ``gradleak.attacks``,
never the other way round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..attacks.tensor import (MomentTensor, SpanProblem, TensorOptions, activation_properties, cp_als_polish,
                              cp_objective, direction_error, find_two_layer, hermite_coefficients, hermite_order,
                              jennrich, normality_problem, solve, weight_normality)
from ..attacks.tensor.hermite import ActivationLike, resolve_activation_like
from ..errors import ValidationError

__all__ = ["hermite_coefficients", "hermite_order", "identifiability", "identifiability_of_model",
           "IdentifiabilityReport", "width_needed", "activation_properties"]

@dataclass
class IdentifiabilityReport:
    """What one gradient of a random two-layer network with this activation reveals about a batch.

    mu: Hermite coefficients mu_p at unit input norm (p = 0..6); mu_at_scale: at the typical input norm sqrt(d)
    (coordinates of unit variance) when d is given. order: the tensor order p (None: the method cannot work).
    directions / signs / norms: identifiable from the gradient alone (plus known output weights).
    width: rough width m for target errors at (d, B) (see :func:`width_needed`), when d and B are given.
    """

    activation: str
    mu: dict[int, float]
    quadrature: str
    order: int | None
    properties: dict[str, bool]
    directions: bool
    signs: bool
    norms: bool
    d: int | None = None
    batch_size: int | None = None
    batch_ok: bool | None = None
    scale: float | None = None
    mu_at_scale: dict[int, float] | None = None
    width: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mu", "mu_at_scale"):
            if d[k] is not None:
                d[k] = {str(p): float(v) for p, v in d[k].items()}
        return d

    def summary(self) -> str:
        if self.order is None:
            return f"{self.activation}: the moment-tensor attack cannot identify the batch (mu_3 = mu_4 = 0)"
        ident = ", ".join(n for n, ok in (("directions", self.directions), ("signs", self.signs),
                                          ("norms", self.norms)) if ok) or "nothing"
        s = f"{self.activation}: order p = {self.order}; identifiable from the gradient: {ident}"
        if self.batch_ok is False:
            return s + (f"; but B = {self.batch_size} > d = {self.d}: the samples are linearly dependent and the "
                        "batch is not identifiable at any width")
        if not self.width:
            return s + "; width not estimated"
        if self.width.get("width") is not None:
            s += f"; width m ~ {self.width['width']:,} for the tensor step to reach {self.width['target']}"
        if self.width.get("attack_width"):
            s += f" (the full attack reached it at m = {self.width['attack_width']:,} in simulation)"
        return s


def identifiability(activation: ActivationLike, d: int | None = None, batch_size: int | None = None, *,
                    target_error: float = 0.01, estimate_width: bool = True, seed: int = 0) -> IdentifiabilityReport:
    """Identifiability of a batch of ``batch_size`` samples in R^d from one gradient of a random two-layer network
    with ``activation`` (a registry name or a callable): Hermite coefficients, tensor order, what is identifiable
    (directions, signs, norms) and - with d and batch_size - a rough width m for 1 - cos <= ``target_error``.

    Returns an :class:`IdentifiabilityReport` (``to_dict()`` for JSON, ``summary()`` for one line)."""
    name, _, _ = resolve_activation_like(activation)
    problems = []
    if d is not None and (not isinstance(d, int) or d < 1):
        problems.append(f"d must be a positive int, got {d!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        problems.append(f"batch_size must be a positive int, got {batch_size!r}")
    if not (0 < target_error < 1):
        problems.append(f"target_error must be in (0, 1), got {target_error!r}")
    if problems:
        raise ValidationError("identifiability", problems)
    mu, method = hermite_coefficients(activation, range(0, 7), 1.0, return_method=True)
    props = activation_properties(activation)
    scale = math.sqrt(d) if d else None
    order = hermite_order(activation, scale)
    notes: list[str] = []
    directions = order is not None
    if props["linear"]:
        notes.append("a linear activation: the gradient is a linear function of the batch mean; only "
                     "span-level information leaks, no sample is identifiable by the tensor method")
    elif order is None:
        notes.append("mu_3 = mu_4 = 0: the order-3 and order-4 moment tensors vanish, the tensor method cannot "
                     "separate the samples")
    else:
        why = {3: "mu_3 != 0", 4: "mu_3 = 0 (the odd part of sigma is linear or sigma is even), mu_4 != 0"}[order]
        notes.append(f"order p = {order} ({why}); directions x_i/|x_i| are identifiable when the batch is linearly "
                     "independent")
    signs = directions and not props["odd"]
    if directions and props["odd"]:
        notes.append("sigma is odd: (x_i, r_i) -> (-x_i, -r_i) leaves the gradient unchanged, so the sign of each "
                     "sample is not identifiable from the gradient; it needs a bias, labels with a model output "
                     "that differs under the flip, or a prior (e.g. image pixels in [0, 1])")
    norms = directions and not props["positively_homogeneous"]
    if directions and props["positively_homogeneous"]:
        notes.append("sigma is positively homogeneous: only r_i |x_i| enters the gradient; the norm follows "
                     "from the loss residual r_i (known labels; exactly with a mirrored initialisation where f = 0), "
                     "from a Gaussian first-layer bias, or from a prior on the data")
    elif norms:
        notes.append("the norm enters mu_p(|x|) and the gradient non-linearly and is identifiable in principle "
                     "(weakly where sigma is nearly homogeneous at the input's scale)")
    batch_ok = None
    if d is not None and batch_size is not None:
        batch_ok = batch_size <= d
        if not batch_ok:
            notes.append(f"B = {batch_size} > d = {d}: the samples span at most d dimensions, the batch is not "
                         "identifiable")
    mu_s = hermite_coefficients(activation, range(0, 7), scale) if scale else None
    width = None
    if estimate_width and directions and d is not None and batch_size is not None and batch_ok:
        width = width_needed(activation, d, batch_size, target_error=target_error, seed=seed)
    return IdentifiabilityReport(activation=name, mu=mu, quadrature=method, order=order, properties=props,
                                 directions=directions, signs=signs, norms=norms, d=d, batch_size=batch_size,
                                 batch_ok=batch_ok, scale=scale, mu_at_scale=mu_s, width=width, notes=notes)


def identifiability_of_model(model, batch_size: int | None = None, **kw) -> IdentifiabilityReport:
    """:func:`identifiability` for a two-layer model (the zoo's ``two-layer`` or any Linear-Act-Linear network):
    reads the activation and d from the model. Also notes a mirrored initialisation or a first-layer bias,
    which make norms (and signs) identifiable."""
    view = find_two_layer(model)
    if isinstance(view, list):
        raise ValidationError("identifiability", view)
    rep = identifiability(view.activation, d=view.d_in, batch_size=batch_size, **kw)
    if view.has_bias:
        rep.notes.append("the first layer has a bias: with Gaussian biases the augmented input (x, 1) is "
                         "recovered, which fixes each sample's norm and sign exactly")
        rep.norms = rep.directions
        rep.signs = rep.directions
    if getattr(model, "mirrored", False):
        rep.notes.append("mirrored initialisation: f = 0, so every residual is known from its label and the "
                         "norm of each sample follows from the gradient")
        rep.norms = rep.directions
    return rep


def _synthetic_problem(f, B: int, m: int, gen, dt):
    """A random two-layer gradient in B dimensions (the span coordinates): Gaussian samples X (B, B), weights
    Z (m, B), output weights +-1/sqrt(m), residuals of random sign and unit size. Returns (problem, X)."""
    X = torch.randn(B, B, generator=gen, dtype=dt)
    Z = torch.randn(m, B, generator=gen, dtype=dt)
    a = (torch.randint(0, 2, (1, m), generator=gen).to(dt) * 2 - 1) / math.sqrt(m)
    r = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0).to(dt) * (0.5 + torch.rand(B, generator=gen,
                                                                                               dtype=dt))
    pre = Z @ X.T
    eps = 1e-6
    val = torch.as_tensor(f(pre.numpy()))
    der = (torch.as_tensor(f((pre + eps).numpy())) - torch.as_tensor(f((pre - eps).numpy()))) / (2 * eps)
    P = a[0][:, None] * ((der * r / B) @ X)
    GA = (val @ (r / B))[None]
    return P, Z, a, GA, X


def width_needed(activation: ActivationLike, d: int, batch_size: int, *, target_error: float = 0.01,
                 seed: int = 0, widths: tuple[int, ...] = (1_000, 4_000, 16_000), trials: int = 2,
                 attack: bool = True) -> dict[str, Any]:
    """A rough width m for 1 - |cos| <= ``target_error`` (mean over the batch) at batch size B, by simulation.

    After the exact span step only B dimensions matter (d enters through B <= d), so the problem is simulated in
    B dimensions on Gaussian samples at a few widths:
    - ``tensor``: the tensor step alone (Jennrich, best of 6 draws by the CP fit, CP-ALS polish). Its error is
      extrapolated as C / m from the largest width (the direction error of a moment estimate falls like
      m^-1/2, so 1 - cos falls like 1/m); if it is still large there (> 0.1: components not separated yet) the
      extrapolation is optimistic and flagged.
    - ``attack`` (``attack=True``): the whole solver (tensor + gradient fit, 4 draws): the smallest simulated
      width reaching the target, else None. For a noise-free gradient the fit is often exact far below the
      tensor step's width; gradient noise (defenses) brings the tensor figure back into play.
    Real, correlated samples (images) need more width than Gaussian ones. Returns a dict (JSON-able)."""
    name, f, act = resolve_activation_like(activation)
    B = int(batch_size)
    order = hermite_order(activation, math.sqrt(d))
    base = {"target": f"1-|cos| <= {target_error}", "target_error": target_error, "batch_size": B, "d": d,
            "order": order}
    if order is None:
        return {**base, "width": None, "reason": "mu_3 = mu_4 = 0: the tensor method cannot work"}
    if B > d:
        return {**base, "width": None, "reason": f"B = {B} > d = {d}: not identifiable at any width"}
    dt = torch.float64
    gen = torch.Generator().manual_seed(int(seed))
    props = activation_properties(activation)
    errs, att = [], []
    reached = False
    for m in widths:
        e, ea = [], []
        for _ in range(trials):
            P, Z, a, GA, X = _synthetic_problem(f, B, m, gen, dt)
            T = MomentTensor(Z, order=order, y=P / a[0][:, None])
            best = None
            for dr in jennrich(T, generator=gen, draws=6):
                V, _ = cp_als_polish(T, dr.directions, sweeps=4)
                obj = cp_objective(T, V)[0]
                if best is None or obj < best[0]:
                    best = (obj, V)
            e.append(float(1 - direction_error(best[1], X).mean()))
            if attack and act is not None and not reached:
                prob = SpanProblem(Z=Z, P=P, A=a, GA=GA, act=act, s=1.0)
                sol, _ = solve(prob, TensorOptions(draws=4, fit_rounds=20), order, gen, None)
                ea.append(float(1 - direction_error(sol.coords, X, signed=not props["odd"]).mean()))
        errs.append(float(np.mean(e)))
        if ea:
            att.append(float(np.mean(ea)))
            reached = att[-1] <= target_error
    m_last, e_last = widths[-1], errs[-1]
    m_star = int(math.ceil(max(m_last * e_last / target_error, 1.0) / 1000.0) * 1000)
    out = {**base, "width": m_star, "stage": "tensor step (Jennrich + CP-ALS), extrapolated as C/m",
           "widths": list(widths), "tensor_errors": errs, "trials": trials,
           "method": "simulation on B-dimensional Gaussian samples (the span coordinates)"}
    if e_last > 0.1:
        out["warning"] = (f"at m = {m_last} the tensor step has not separated the components yet (error {e_last:.2f}); "
                          "the extrapolated width is optimistic")
    if att:
        reach = [m for m, v in zip(widths, att) if v <= target_error]  # simulated up to the first success
        out["attack_errors"] = att
        out["attack_width"] = reach[0] if reach else None
        out["attack_note"] = ("tensor + gradient fit: the smallest simulated width reaching the target (None: none "
                              "of them); exact gradients only")
    return out


# ------------------------------------------------------------------------------------------------------------
# Integration with gradleak.risk.analyse (the `gradleak risk` report)
# ------------------------------------------------------------------------------------------------------------
def _add_to_rank_report(report, target, input_shape, **context) -> None:
    """Registered as the risk analysis "identifiability": for a two-layer network (Linear -> activation ->
    Linear, e.g. the zoo's ``two-layer``) fills ``report.extensions['identifiability']`` with
    :func:`identifiability_of_model` (Hermite coefficients, order, identifiable parts, rough width); for a deep
    network ending in such a head, states that the head's input features are the identifiable part. Other
    architectures get no entry."""
    from ..case import Case

    model = target.model if isinstance(target, Case) else target
    if isinstance(model, str):
        return
    view = find_two_layer(model)
    if isinstance(view, list):
        return
    B = int(target.batch_size if isinstance(target, Case) else (context.get("batch_size") or 1))
    if view.body:
        report.extensions["identifiability"] = {
            "applies_to": "head features",
            "note": (f"the model ends in a {view.activation.name} two-layer head of width {view.width}: if its first "
                     "layer is random Gaussian, the moment-tensor attack recovers the head's input features "
                     "phi(x) (gradleak.attacks.tensor.recover_head_features), not the images"),
            **identifiability(view.activation, d=view.d_in, batch_size=B, estimate_width=False,
                              seed=int(context.get("seed") or 0)).to_dict()}
        return
    rep = identifiability_of_model(model, batch_size=B, seed=int(context.get("seed") or 0))
    params = dict(model.named_parameters())
    stats = weight_normality(params[view.weight_key], params[view.bias_key] if view.has_bias else None)
    gaussian = normality_problem(stats) is None
    if not gaussian:
        rep.notes.append(f"these first-layer weights are not Gaussian (excess kurtosis {stats['excess_kurtosis']:+.2f}): "
                         "the attack refuses them; the analysis describes the same architecture with a random "
                         "Gaussian first layer (and Gaussian bias, if any)")
    report.extensions["identifiability"] = {"applies_to": "inputs", "gaussian_first_layer": gaussian,
                                            "weight_normality": stats, **rep.to_dict()}
    report.notes.append("moment-tensor attack (two-layer network): " + rep.summary()
                        + ("" if gaussian else " [for a Gaussian re-initialisation of the first layer]"))


# gradleak.risk imports this module once, after defining the registry: join its analyses.
from . import register_analysis  # noqa: E402

register_analysis("identifiability")(_add_to_rank_report)
