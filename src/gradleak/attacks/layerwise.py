"""Layer-wise reconstruction with a pull-back constraint (Chen, Campbell 2021, "Understanding Training-data
Leakage from Gradients in Neural Networks for Image Classification", arXiv 2111.10178), with the per-layer
gradient-matching correction of the authors' follow-up (BMVC 2022, where the whole is called COPA, combined
optimisation attack). ALGORITHMS.md section 3.

Setting: one image, a random (untrained) model that is a chain of Linear / Conv2d layers with invertible
activations (tanh, leaky ReLU, sigmoid, softplus, identity), a last linear layer WITH bias, softmax
cross-entropy, a FedSGD gradient. Earlier layers may be bias-free. Labels are read from the bias gradient when
not given (its only negative entry).

The method solves backwards from the output, one problem per layer (the systems are the shared ones of
:mod:`gradleak.layers`, where the layer-wise paper's U x = V is R-GAP's [K; W] x = [dW; z - b]):

1. Output layer: with k_d = dL/dz_d = db_d, dW_d = k_d x_d^T, so x_d = dW_d^T k_d / |k_d|^2 (the least-squares
   form of x_d = dW_d[j, :] / db_d[j]); dL/dx_d = W_d^T k_d.
2. Layer i = d-1 ... 0: z_i = sigma_i^{-1}(x_{i+1}), delta_i = (dL/dx_{i+1}) * sigma_i'(z_i),
   dL/dx_i = W_i^T delta_i, and the layer's objective for its input x
       lambda_w |W_i x - (z_i - b_i)|^2 + lambda_g |D_i(delta_i) x - vec dW_i|^2 (+ lambda_p PB_{i-1}(x)).
   (a) closed form: the least-squares, minimum-norm solution of the stacked, block-balanced system (solved
       from its smaller side: an underdetermined layer uses A A^T). A rank-deficient layer is reported.
   (b) pull-back (option ``pullback``, ``pullback_steps`` > 0, i >= 1): x must be an output of layer i-1,
       x = sigma_{i-1}(u), with u = W_{i-1} y + b_{i-1} for some input y ('forward' reading), and the
       gradient of layer i-1 must be reproduced, K_{i-1}(delta_{i-1}(x)) y = dW_{i-1} with
       delta_{i-1}(x) = (W_i^T delta_i) * sigma_{i-1}'(u) ('gradient' reading); 'both' uses both. The
       paper's exact form could not be read; both readings are implemented and solved jointly over (u, y)
       by L-BFGS or Adam, starting from the closed form of layer i and of layer i-1 below it.
   (c) null-space prior (option ``prior_steps`` > 0; our addition, not in the papers): in a rank-deficient
       layer, the directions of the null space of U_i change neither W_i x nor D_i x, hence no gradient from
       layer i on: the gradient says nothing about them. Minimise TV(x) (the image prior, also applied to
       feature maps) by Adam moving only inside x + null(U_i) (and the data's box / the activation's range),
       so the layer's constraints stay exactly as solved.
   (d) correction (option ``correction_steps`` > 0): starting from the above, minimise
       a * sum_{parameter tensors of layers j >= i} (1 - cos(dL/dtheta(F_{i->d}(x), y), dtheta*)) + b * TV(x)
       + c * (|W_i x - t_i|^2 / |t_i|^2 + |D_i x - dW_i|^2 / |dW_i|^2) / 2
       with Adam, the (a, b, c) and steps of ALGORITHMS.md 3 per depth (input layer, second layer, deeper
       layers) as the preset 'paper' (Adam's learning rate 1e-3, constant, as in the authors' code). For
       i >= 1 the variable is the preceding layer's pre-activation u (x = sigma(u) stays in the activation's
       range); for the input layer the image (normalised space, clamped to the data's box).

Scale conventions: TV is the mean absolute neighbour difference (as in the authors' code and Inverting
Gradients); our squared system residuals are relative (divided by the squared norm of their right-hand side,
each block separately) where the authors' code uses the raw |U x - V|^2, so the weight c is scale-free here.
The authors' images live in [-0.5, 0.5]; ours in the data's normalised space.

Presets: 'fast' (the default: seconds on a CPU; null-space prior 300 steps, pull-back 20 L-BFGS steps, a
correction of 300 / 100 / 50 Adam steps with TV 0.01 at the input layer, only where the input is undetermined),
'paper' (the authors' correction budgets and weights, no prior; minutes), 'closed-form' (step (a) only).
The paper's TV weight 1 at the input layer measurably blurs (cnn2-c2, one photo: 22.2 dB after the prior,
21.7 dB after 200 paper-weight steps, 22.3 dB with TV 0.01), hence the lighter TV in 'fast'.

Per-layer report: ``Reconstruction.info["layers"]`` (input side first), one :class:`~gradleak.layers.LayerReport`
per layer (name, label, kind, unknowns, constraints, rank, deficiency (= unknowns - rank >= 0),
security_deficiency (= rank - unknowns <= 0), condition, residual / residual_weight / residual_gradient
(relative, final), seconds) with :class:`LayerwiseLayer` as its ``extra``: closed_form (the residuals after
step (a)), residual_pullback, the pull-back / prior / correction summaries and, from :func:`trace` with the
truth, input_error.
``info["security_index"]`` is the security metric S from these ranks (see :mod:`gradleak.risk.security`).
:func:`trace` also returns the per-layer reconstructed inputs and, given the truth, each layer's input error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from .. import layers as L
from ..case import Case, FedSGD, Truth
from ..errors import NumericalError, RequirementError
from .base import Attack, Reconstruction, RunContext, create, rank_facts, register
from .layerwise_steps import _closed_form, _correct, _inverse, _nz, _prior, _pullback, _rel2, _Sub

__all__ = ["Layerwise", "LayerwiseLayer", "LayerwiseOptions", "LayerwiseTrace", "trace", "layer_input_errors", "PULLBACK_MODES"]

PULLBACK_MODES = ("none", "forward", "gradient", "both")


@dataclass
class LayerwiseLayer(L.LayerExtra):
    """The layer-wise attack's own per-layer measurements (``LayerReport.extra``): closed_form (residual,
    residual_weight, residual_gradient of step (a)'s closed form, before any refinement); residual_pullback (the
    pull-back constraint's residual at the end, None without one); pullback / prior / correction (the summaries of
    steps (b), (c), (d) where they ran); input_error (set by :func:`trace` given the truth)."""

    attack: ClassVar[str] = "layerwise"
    closed_form: dict[str, float] | None = None
    residual_pullback: float | None = None
    pullback: dict[str, Any] | None = None
    prior: dict[str, Any] | None = None
    correction: dict[str, Any] | None = None
    input_error: dict[str, Any] | None = None
OPTIMIZERS = ("lbfgs", "adam")
SCHEDULES = ("constant", "step")
WHEN = ("always", "deficient")



@dataclass
class LayerwiseOptions:
    """Hyperparameters of the layer-wise attack (defaults: the paper's budgets; presets 'fast', 'closed-form').

    rtol: numerical-rank tolerance of the closed form (singular values of the block-balanced system below
        rtol * |A|_F count as zero). weight_weight / gradient_weight: lambda_w / lambda_g of the closed form and
        the pull-back (their ratio scales the balanced weight block).
    pullback: 'none' | 'forward' | 'gradient' | 'both' (the readings of the pull-back term, see the module
        docstring); pullback_weight: lambda_p; pullback_steps: iterations (0: skip); pullback_optimizer: 'lbfgs'
        or 'adam'; pullback_lr: its learning rate.
    correction_steps / correction_match (a) / correction_tv (b) / correction_system (c): per depth (input
        layer, second layer, deeper layers); correction_lr: Adam's learning rate; correction_schedule:
        'constant' (the authors') or 'step' (x0.1 at 3/8, 5/8, 7/8 of the steps); correction_layers: how many
        layers, counted from the input side, get the correction (-1: all); correction_when: 'always' (the
        authors') or 'deficient' (only where the layer's input is not determined by the gradient: the layer
        or a deeper one is rank-deficient; a correction can only blur an exact closed form).
    prior_steps / prior_lr: the null-space prior (step (c) of the module docstring; 0: skip) in each
        rank-deficient layer.
    max_dense: unknowns above which an overdetermined layer is solved by matrix-free LSQR.
    exact_tolerance: the largest relative system residual (weight and gradient blocks of every layer, the
        head's gradient and bias) for the result to be claimed exact (with every rank full); the base class
        then checks the claim against the gradient residual.
    """

    rtol: float = L.DEFAULT_RTOL
    weight_weight: float = 1.0
    gradient_weight: float = 1.0
    pullback: str = "both"
    pullback_weight: float = 1.0
    pullback_steps: int = 100
    pullback_optimizer: str = "lbfgs"
    pullback_lr: float = 1.0
    correction_steps: tuple = (10000, 8000, 1000)
    correction_match: tuple = (1.0, 1.0, 10.0)
    correction_tv: tuple = (1.0, 1.0, 0.1)
    correction_system: tuple = (0.05, 0.1, 1.0)
    correction_lr: float = 0.001
    correction_schedule: str = "constant"
    correction_layers: int = -1
    correction_when: str = "always"
    prior_steps: int = 0
    prior_lr: float = 0.1
    max_dense: int = 12000
    exact_tolerance: float = 1e-6


@register("layerwise", aliases=("copa", "layer-wise"))
class Layerwise(Attack):
    """Layer-wise reconstruction from the output back: closed-form least squares per layer, an optional
    pull-back penalty from the preceding layer, and an optional per-layer gradient-matching correction.

    Implements Chen & Campbell 2021 (arXiv 2111.10178) with the correction of their follow-up (COPA, BMVC 2022);
    see the module docstring. One image, FedSGD, cross-entropy, last layer linear with bias."""

    paper = ("Chen, Campbell. Understanding Training-data Leakage from Gradients in Neural Networks for Image "
             "Classification. arXiv:2111.10178, 2021 (+ the per-layer correction of their BMVC 2022 follow-up)")
    Options = LayerwiseOptions
    batch_advice = "an optimisation attack initialised with this result (gl.create('ig', init=rec))"

    def batch_facts(self, case: Case, rec: Reconstruction) -> list[str]:
        return super().batch_facts(case, rec) + rank_facts(rec.info.get("layers"))

    presets = {
        # ALGORITHMS.md 3 / the authors' code: (a, b, c) = (1, 1, 0.05) x 10,000 steps at the input layer,
        # (1, 1, 0.1) x 8,000 (4 x 2,000) at the second, (10, 0.1, 1) x 1,000 deeper; Adam lr 1e-3, constant
        "paper": dict(correction_steps=(10000, 8000, 1000), correction_match=(1.0, 1.0, 10.0),
                      correction_tv=(1.0, 1.0, 0.1), correction_system=(0.05, 0.1, 1.0), correction_lr=0.001,
                      correction_schedule="constant", correction_when="always", pullback="both",
                      pullback_steps=100, prior_steps=0),
        # our tuned budget that runs in seconds: null-space prior, short pull-back, a gradient-matching
        # correction with a light TV at the input layer (the paper's TV weight 1 undoes the prior there)
        "fast": dict(prior_steps=300, prior_lr=0.1, pullback="both", pullback_steps=20,
                     correction_steps=(300, 100, 50), correction_match=(1.0, 1.0, 10.0),
                     correction_tv=(0.01, 0.1, 0.1), correction_system=(0.05, 0.1, 1.0), correction_lr=0.03,
                     correction_schedule="step", correction_when="deficient"),
        # the closed form alone (steps (a) only)
        "closed-form": dict(pullback="none", pullback_steps=0, correction_steps=(0, 0, 0), prior_steps=0),
    }
    default_preset = "fast"
    # the closed form is the same at every budget; the correction steps are the fast preset's, then the paper's
    budgets = {"thorough": {"preset": "paper"}}

    def check_options(self, o: LayerwiseOptions) -> list[str]:
        p = []
        if not (0 < o.rtol < 1):
            p.append(f"rtol must be in (0, 1), got {o.rtol}")
        for nm in ("weight_weight", "gradient_weight", "pullback_weight", "pullback_lr", "correction_lr", "prior_lr"):
            v = getattr(o, nm)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                p.append(f"{nm} must be a positive number, got {v!r}")
        if o.pullback not in PULLBACK_MODES:
            p.append(f"pullback must be one of {PULLBACK_MODES}, got {o.pullback!r}")
        if o.pullback_optimizer not in OPTIMIZERS:
            p.append(f"pullback_optimizer must be one of {OPTIMIZERS}, got {o.pullback_optimizer!r}")
        for nm in ("pullback_steps", "prior_steps"):
            v = getattr(o, nm)
            if not isinstance(v, int) or v < 0:
                p.append(f"{nm} must be an int >= 0, got {v!r}")
        if o.correction_when not in WHEN:
            p.append(f"correction_when must be one of {WHEN}, got {o.correction_when!r}")
        if o.correction_schedule not in SCHEDULES:
            p.append(f"correction_schedule must be one of {SCHEDULES}, got {o.correction_schedule!r}")
        for nm, kind in (("correction_steps", int), ("correction_match", float),
                         ("correction_tv", float), ("correction_system", float)):
            v = getattr(o, nm)
            ok = isinstance(v, tuple) and len(v) == 3 and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0 for e in v)
            if ok and kind is int:
                ok = all(float(e).is_integer() for e in v)
            if not ok:
                p.append(f"{nm} must be 3 non-negative {'integers' if kind is int else 'numbers'} (input layer, "
                         f"second layer, deeper layers), got {v!r}")
        if not isinstance(o.correction_layers, int) or o.correction_layers < -1:
            p.append(f"correction_layers must be -1 (all) or an int >= 0, got {o.correction_layers!r}")
        if not (isinstance(o.exact_tolerance, (int, float)) and o.exact_tolerance > 0):
            p.append(f"exact_tolerance must be a positive number, got {o.exact_tolerance!r}")
        if not isinstance(o.max_dense, int) or o.max_dense < 1:
            p.append(f"max_dense must be a positive int, got {o.max_dense!r}")
        return p

    def requirements(self, case: Case) -> list[str]:
        return requirement_problems(case)

    #: the :class:`LayerwiseTrace` of this instance's latest completed run (None before one, or when the latest
    #: was interrupted); :func:`trace` reads it after running through the base class's ``reconstruct``
    last_trace: "LayerwiseTrace | None" = None

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        self.last_trace = None
        run = _run(case, self.options, ctx)
        self.last_trace = run
        return run.reconstruction(case)


# =====================================================================================================
# Requirements
# =====================================================================================================

def requirement_problems(case: Case) -> list[str]:
    """Every reason the layer-wise attack cannot run on ``case`` (one sentence each; [] if none): batch size,
    protocol, loss, the model's structure (unsupported layers, skip connections, non-invertible activations,
    each naming the module) and the head (last layer linear with a bias)."""
    from .labels import last_linear

    problems: list[str] = []
    if case.batch_size != 1:
        problems.append(f"needs batch size 1 (the layer systems are per sample), got {case.batch_size}")
    if not isinstance(case.observation, FedSGD):
        problems.append(f"needs a FedSGD gradient (one exact gradient), got a {case.protocol} update")
    if case.labels is None and case.loss_fn.label_from_bias is None:
        problems.append(f"the loss {case.loss!r} has no rule to read the label from the bias gradient: give the label")
    chain = L.walk(case.model, case.spec.shape)
    problems += chain.problems
    problems += chain.activation_problems()
    if chain.issues and chain.layers and not chain.layers[-1].activation.invertible:
        # the walker stopped before the head: the last layer it kept is a hidden layer, check it too
        last = chain.layers[-1]
        problems.append(f"'{last.activation_name or 'after ' + last.name}' ({last.activation.name}): not invertible: "
                        "the layer-wise attack needs an invertible activation after each hidden layer (identity, "
                        "leaky-relu, sigmoid, tanh, softplus)")
    head = chain.head if not chain.issues else None
    if head is not None and not head.can_be_head:
        problems.append(f"the last layer '{head.name}' must be dense (like nn.Linear), got {type(head.module).__name__}")
    else:
        hit = last_linear(case)
        if hit is None:
            problems.append("needs a last nn.Linear layer whose gradient is observed (found none)")
        elif hit[1].bias is None:
            problems.append(f"the last layer '{hit[0]}' has no bias: the layer-wise attack starts from "
                            "x_d = dW[j, :] / db[j] and needs the bias gradient")
        elif (p := case.loss_fn.output_problem(hit[1].out_features, case.spec.num_classes)) is not None:
            problems.append(f"the last layer '{hit[0]}': {p}")
    return problems


# =====================================================================================================
# The backward pass
# =====================================================================================================

@dataclass
class LayerwiseTrace:
    """Everything one run produced: ``inputs`` (per layer, input side first, float64 tensors of the layer's
    in_shape; ``inputs[0]`` is the normalised image), ``closed_form`` (the same after step (a) only),
    ``layers`` (the per-layer :class:`~gradleak.layers.LayerReport` list), ``label``, ``security_index`` and, with the truth given to
    :func:`trace`, ``errors`` (per-layer input errors, see :func:`layer_input_errors`)."""

    inputs: list[torch.Tensor]
    closed_form: list[torch.Tensor]
    layers: list[L.LayerReport]
    label: int
    label_source: str
    security_index: int | None
    kind: str  # the claim of the run; after trace(): the kind the base class derived (claim + residual)
    history: list[float] = field(default_factory=list)
    errors: list[dict] | None = None
    chain: L.Chain | None = None
    claim_residual: float = math.nan  # the largest system residual the claim was decided on (see _claim)
    result: Reconstruction | None = None  # set by trace(): the base class's result (verified kind, residual)

    def reconstruction(self, case: Case) -> Reconstruction:
        x = self.inputs[0].reshape(1, *case.spec.shape).to(case.dtype).to(case.device)
        info: dict[str, Any] = {"layers": self.layers, "security_index": self.security_index,
                                "labels": {"labels": [self.label], "method": self.label_source},
                                "claim_residual": self.claim_residual if math.isfinite(self.claim_residual) else None}
        if self.errors is not None:
            info["layer_errors"] = self.errors
        return Reconstruction(inputs=case.spec.denormalize(x), labels=torch.tensor([self.label], device=case.device),
                              history=list(self.history), info=info, claim=self.kind)


def _label(case: Case, db: torch.Tensor) -> tuple[int, str]:
    """The known label, or the loss's label-from-bias rule (certain for softmax cross-entropy)."""
    if case.labels is not None:
        return int(case.labels[0]), "known"
    label, certain = case.loss_fn.label_from_bias(db, 1)
    if not certain and case.loss_fn.counts_from_bias:
        raise RequirementError("layerwise", ["the bias gradient of the last layer has no single negative entry, so "
                                             "the label cannot be read from it (expected dL/db = softmax - onehot, "
                                             "as an undefended update has); give the label"])
    return int(label), "bias-gradient" if certain else "bias-gradient (uncertain)"


def _run(case: Case, o: LayerwiseOptions, ctx: RunContext) -> LayerwiseTrace:
    dt = torch.float64
    chain = L.walk(case.model, case.spec.shape)
    params = {k: v.detach().to(dt).cpu() for k, v in case.parameters.items()}
    grads = {k: v.detach().to(dt).cpu() for k, v in case.observed.items()}
    layers = chain.layers
    n = len(layers)
    head = layers[-1]
    Wd, bd = params[head.weight_name], params[head.bias_name]
    dWd, dbd = grads[head.weight_name], grads[head.bias_name]
    label, label_source = _label(case, dbd)
    t0 = time.perf_counter()

    # ---- budget for the progress bar -----------------------------------------------------------------
    def depth_of(i: int) -> int:
        return min(i, 2)

    def corrected(i: int) -> bool:
        return o.correction_layers < 0 or i < o.correction_layers

    total = 0
    for i in range(n - 1):
        total += o.prior_steps  # an upper bound: only rank-deficient layers use it
        if i >= 1 and o.pullback != "none":
            total += o.pullback_steps
        if corrected(i):
            total += int(o.correction_steps[depth_of(i)])
    if total:
        ctx.progress(total)

    # ---- step 1: the output layer ------------------------------------------------------------------------
    k = dbd
    kk = float(k @ k)
    if kk == 0.0:
        raise NumericalError("layerwise: the bias gradient of the last layer is zero (a perfectly classified "
                             "sample leaks nothing through it)")
    x_head = head.gradient_solve(k, dWd).reshape(-1)
    with torch.enable_grad():  # dL/dz at the head for the recovered input, through the case's loss
        z_head = (Wd @ x_head + bd).reshape(1, -1).requires_grad_(True)
        k_model, = torch.autograd.grad(case.loss_fn(z_head, torch.tensor([label], device=z_head.device)), z_head)
    rg_head = float((torch.outer(k, x_head) - dWd).norm() / _nz(float(dWd.norm())))
    head_rep = L.LayerReport.of(head, head=True, unknowns=head.n_in, constraints=head.n_weights + head.n_out,
                                rank=head.n_in, method="bias", condition=1.0, residual=rg_head,
                                residual_gradient=rg_head,
                                residual_bias=float((k_model.reshape(-1) - dbd).norm() / _nz(float(dbd.norm()))),
                                seconds=time.perf_counter() - t0, extra=LayerwiseLayer())
    reports: list[L.LayerReport] = [head_rep]
    x_next = x_head.reshape(head.in_shape)
    g_next = (Wd.T @ k).reshape(head.in_shape)
    inputs: list[torch.Tensor] = [x_next]
    closed: list[torch.Tensor] = [x_next.clone()]
    history: list[float] = []
    wr = math.sqrt(o.weight_weight / o.gradient_weight)
    undetermined = False  # some layer from here to the output is rank-deficient

    # ---- step 2: every earlier layer, from the output back -------------------------------------------------
    for i in range(n - 2, -1, -1):
        ts = time.perf_counter()
        layer = layers[i]
        W = params[layer.weight_name]
        b = params[layer.bias_name] if layer.has_bias else None
        dW = grads[layer.weight_name]
        act = layer.activation
        xo = x_next.reshape(layer.out_shape)
        go = g_next.reshape(layer.out_shape)
        z_hat = _inverse(act, xo)
        delta = go * act.grad(z_hat)
        target = z_hat - (b.reshape(layer.bias_shape()) if b is not None else 0.0)
        system = L.LayerSystem(layer, W, delta, dW, target, weight_ratio=wr)
        sol = _closed_form(system, o.rtol, o.max_dense)
        x = sol.x.reshape(layer.in_shape).to(dt)
        x_cf = x.clone()
        if i == 0:  # the closed-form image: a candidate an interrupted refinement falls back to
            _offer(case, ctx, x_cf, label, stage="closed-form")
        rep = L.LayerReport.of(layer, sol)
        rep.extra = ext = LayerwiseLayer(closed_form={"residual": sol.residual, "residual_weight": sol.residual_weight,
                                                      "residual_gradient": sol.residual_gradient})
        t_ref2 = _nz(float(target.pow(2).sum()))
        g_ref2 = _nz(float(dW.pow(2).sum()))

        def system_term(xv: torch.Tensor) -> torch.Tensor:
            xb = xv.reshape(1, *layer.in_shape)
            rw = layer.apply_weight(xb, W)[0] - target
            rg = layer.apply_grad(delta, xb[0]) - dW
            return (o.weight_weight * _rel2(rw, t_ref2) + o.gradient_weight * _rel2(rg, g_ref2)) / \
                (o.weight_weight + o.gradient_weight)

        # (b) pull-back from the preceding layer
        if i >= 1 and o.pullback != "none" and o.pullback_steps > 0:
            x, pb = _pullback(layers[i - 1], layer, params, grads, W, delta, x, system_term, o, ctx)
            ext.pullback = pb
            ext.residual_pullback = pb["residual_end"]
            history += pb.pop("_history")
        # (c) the null-space prior in a rank-deficient layer
        if o.prior_steps > 0 and sol.deficiency > 0:
            projector = system.null_projector(o.rtol)
            x, pr = _prior(case, i, layers, x, projector, o, ctx)
            ext.prior = pr
            history += pr.pop("_history")
        # (d) the per-layer gradient-matching correction
        undetermined = undetermined or sol.deficiency > 0
        if corrected(i) and int(o.correction_steps[depth_of(i)]) > 0 and (o.correction_when == "always"
                                                                          or undetermined):
            sub = _Sub.build(layers[i:], params, grads, label, case.loss_fn)
            x, cr = _correct(case, i, layers, x, sub, system_term, o, depth_of(i), ctx)
            ext.correction = cr
            history += cr.pop("_history")
        rep.residual, rep.residual_gradient, rep.residual_weight = system.residuals(x)
        rep.seconds = time.perf_counter() - ts
        reports.insert(0, rep)
        inputs.insert(0, x.reshape(layer.in_shape))
        closed.insert(0, x_cf.reshape(layer.in_shape))
        g_next = layer.apply_weight_T(delta.reshape(1, *layer.out_shape), W)[0].reshape(layer.in_shape)
        x_next = x.reshape(layer.in_shape)
        if not torch.isfinite(x_next).all():
            raise NumericalError(f"layerwise: layer {layer.label} ('{layer.name}') produced a non-finite input")

    hidden = reports[:-1]
    sec = L.security_index([r.security_deficiency for r in hidden], n) if n >= 1 else 0
    kind, worst = _claim(reports, o.exact_tolerance)
    _offer(case, ctx, inputs[0], label, claim=kind, stage="final")
    return LayerwiseTrace(inputs=inputs, closed_form=closed, layers=reports, label=label, label_source=label_source,
                          security_index=sec, kind=kind, history=history, chain=chain,
                          claim_residual=worst)


def _claim(reports: list[L.LayerReport], tol: float) -> tuple[str, float]:
    """'exact' only when every hidden layer has full rank AND every system the result must satisfy holds to
    ``tol`` (relative residuals of each layer's final input, after any pull-back / prior / correction, and of
    the head's gradient and bias): the ranks alone say nothing under noise, and a refinement step may move the
    closed form. Returns (claim, the largest residual)."""
    vals = [v for r in reports for v in r.residuals()]
    worst = max((v if math.isfinite(v) else math.inf for v in vals), default=math.inf)
    full = all(r.determined for r in reports[:-1])
    return ("exact" if full and worst <= tol else "estimate"), worst


def _offer(case: Case, ctx: RunContext, x: torch.Tensor, label: int, *, claim: str = "estimate", stage: str) -> None:
    """Offer the normalised input ``x`` scored by the case's residual (comparable across candidates)."""
    img = case.spec.denormalize(x.reshape(1, *case.spec.shape).to(case.dtype).to(case.device))
    lab = torch.tensor([label], device=case.device)
    ctx.offer(case.residual(img, lab), img, lab, claim=claim, stage=stage)


# =====================================================================================================
# Tracing with the truth (per-layer input errors)
# =====================================================================================================

def layer_input_errors(case: Case, truth: Truth, inputs: Sequence[torch.Tensor],
                       chain: L.Chain | None = None) -> list[dict]:
    """Per-layer errors of reconstructed layer inputs against the truth forwarded through the chain.

    inputs: the reconstructed input of every layer (input side first; ``inputs[0]`` normalised image space),
    as in :class:`LayerwiseTrace`. Returns one dict per layer: name, label, mse (mean squared error),
    relative (|x - x*| / |x*|) and, for the input layer, psnr of the image in [0, 1] space."""
    chain = chain or L.walk(case.model, case.spec.shape)
    params = {k: v.detach().to(torch.float64).cpu() for k, v in case.parameters.items()}
    h = case.spec.normalize(truth.inputs[:1].detach().to(torch.float64).cpu())
    out = []
    for (layer, xr), (hin, _) in zip(zip(chain.layers, inputs), L.forward(chain.layers, h, params)):
        xt = hin[0]
        xr = xr.reshape(layer.in_shape).to(torch.float64)
        mse = float((xr - xt).pow(2).mean())
        row = {"name": layer.name, "label": layer.label, "mse": mse,
               "relative": float((xr - xt).norm() / _nz(float(xt.norm())))}
        if layer.index == 0 and case.spec.is_image:
            a = case.spec.denormalize(xr[None]).clamp(*case.spec.value_range)
            t = case.spec.denormalize(xt[None])
            m = float((a - t).pow(2).mean())
            row["psnr"] = 10 * math.log10(1.0 / m) if m > 0 else math.inf
        out.append(row)
    return out


def trace(case: Case, truth: Truth | None = None, *, attack: Layerwise | None = None, preset: str | None = None,
          seed: int = 0, progress: bool = False, **options: Any) -> LayerwiseTrace:
    """Run the layer-wise attack and return its :class:`LayerwiseTrace` (per-layer inputs and report).

    ``attack`` (or ``preset`` / ``options`` to build one) chooses the settings. With ``truth`` (which the attack
    never sees) the trace also holds ``errors``: the per-layer input errors of the final and of the closed-form
    reconstructions, and ``layers[i].extra.input_error``. Raises RequirementError like ``reconstruct``."""
    att = attack if attack is not None else create("layerwise", preset=preset, **options)
    rec = att.reconstruct(case, seed=seed, progress=progress)  # requirements, run context, kind: the base class
    tr = att.last_trace
    if tr is None or rec.info.get("interrupted"):
        raise KeyboardInterrupt("layerwise.trace: the run was interrupted; its best candidate is not a trace")
    tr.result = rec
    tr.kind = rec.kind
    if truth is not None:
        final = layer_input_errors(case, truth, tr.inputs, tr.chain)
        cf = layer_input_errors(case, truth, tr.closed_form, tr.chain)
        tr.errors = [{**f, "closed_form_mse": c["mse"], "closed_form_relative": c["relative"],
                      **({"closed_form_psnr": c["psnr"]} if "psnr" in c else {})} for f, c in zip(final, cf)]
        for rep, e in zip(tr.layers, tr.errors):
            rep.extra.input_error = e
    return tr
