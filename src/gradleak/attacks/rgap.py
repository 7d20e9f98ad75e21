"""R-GAP: closed-form recursive reconstruction of one input from its gradient.

Paper: Junyi Zhu and Matthew B. Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021
(arXiv 2010.07733). Method statement: ALGORITHMS.md section 2.

The network is a chain of weight layers (fully connected or convolutional, any kernel, stride, zero padding,
dilation; biased or not), each followed by an invertible activation (identity, leaky ReLU, sigmoid, tanh,
softplus, or any :class:`~gradleak.activations.Activation` registered with an ``inverse``), ending in a linear
head. From the output back, each layer's input solves a linear system (``gradleak.layers.LayerSystem``):

    gradient constraint  K(k_i) x_i = dL/dW_i        weight constraint  W_i x_i = z_i - b_i

where z_i = sigma_i^-1(x_{i+1}) comes from the layer above and k_i = (W_{i+1}^T k_{i+1}) * sigma_i'(z_i).
The head starts the recursion:

- one output score, logistic loss, no bias (the paper's setting): s = <W_d, dL/dW_d> = -mu / (1 + e^mu) with
  mu = y f. :func:`logistic_mu_roots` solves it with a bracketed root finder: s > 0 has one root, s in
  (-0.2785, 0) two (both are tried), s < -0.2785 is impossible (reported; the nearest feasible mu is used and
  the result is an 'estimate'). k_d = -y / (1 + e^mu), x_d = dL/dW_d / k_d. The label sign y is needed: with
  unknown labels both signs are tried and the consistent one kept (``info['head']['label_source']``).
- a head with a bias (any loss, e.g. a multi-class cross-entropy classifier): k_d = dL/db_d and
  x_d = dL/dW_d^T k_d / ||k_d||^2 (Geiping et al.'s proposition); the label is the class with a negative k.
- a bias-free multi-output head: dL/dW_d = k x^T is rank one; the scale between k and x solves
  k = dL/df(W x) along the top singular pair (the loss is differentiated with autograd, so any loss works).

Every candidate start (roots x signs) is scored by how consistent the next layer's system is, and the best is
carried through. All systems are solved in float64, whatever the case's dtype (a float32 gradient carries
float32 rounding, so such a result is reported as an 'estimate'; measured: about 120 dB on CNN6).

Honest failure. Each layer's report (``info['layers']``, input side first) is a
:class:`~gradleak.layers.LayerReport` (name, label, unknowns, constraints, rank, deficiency, determined, residual
(relative, block-balanced), residual_gradient, residual_weight, residual_bias (consistency of k with the
observed bias gradient), condition, method) with :class:`RGAPLayer` as its ``extra`` (clipped: activation
inverses that left the domain). A rank-deficient layer gives the
minimum-norm solution, wrong in its null space, and the error propagates to every earlier layer: such a result
has ``kind == 'estimate'`` and ``info['deficient_layers']`` names the layers. ``'exact'`` only when
every layer has full rank, every residual is below ``exact_tolerance`` and the head was consistent.
Unsupported models (ReLU, pooling, BatchNorm, skip connections, ...) raise a
:class:`~gradleak.errors.RequirementError` naming every offending module before any work.

Batches. A gradient averaged over B > 1 samples cannot be split by R-GAP. On a fully connected network the
recursion still runs and returns ONE input (shape (1, *shape)) that is a linear combination of the B inputs
(exactly in their span: it is dL/dW_1^T k_1 / ||k_1||^2); ``kind == 'mixture'`` says so and
``info['mixture']['span_rank']`` estimates how many distinct inputs the first layer's gradient spans.
Convolutional networks need B = 1.

FedAvg: an update of ONE local step is a gradient (-delta / lr) and is accepted; more steps are not.

Hybrid (H-GAP, the paper's Table 1): where R-GAP alone is not exact (a rank-deficient layer, noise), use its
output as the starting point of an optimisation attack::

    rec = gl.create("rgap").reconstruct(case)
    refined = gl.create("inverting-gradients", init=rec).reconstruct(case)   # or "dlg"

The optimisation attacks accept ``init`` = a :class:`~gradleak.attacks.Reconstruction` (or a tensor in image
space).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from .. import layers as L
from ..case import Case, FedAvg
from ..errors import NumericalError
from .base import Attack, Reconstruction, RunContext, rank_facts, register

__all__ = ["RGAP", "RGAPLayer", "logistic_mu_roots", "logistic_score", "LOGISTIC_MU_STAR", "LOGISTIC_S_MIN"]


@dataclass
class RGAPLayer(L.LayerExtra):
    """R-GAP's own per-layer measurement (``LayerReport.extra``): ``clipped``, how many entries of the next
    layer's input left the activation's range when inverted (each makes the layer's target z wrong)."""

    attack: ClassVar[str] = "rgap"
    clipped: int = 0


# =====================================================================================================
# The logistic head: s = -mu / (1 + e^mu)
# =====================================================================================================

def logistic_score(mu: float) -> float:
    """s(mu) = f * dl/df = -mu / (1 + e^mu) for the logistic loss l = log(1 + e^-mu), mu = y f (stable)."""
    if mu >= 0:
        e = math.exp(-mu)
        return -mu * e / (1.0 + e)
    return -mu / (1.0 + math.exp(mu))


def _mu_star() -> float:
    # s'(mu) = 0  <=>  1 + e^mu - mu e^mu = 0
    return brentq(lambda m: 1.0 + math.exp(m) - m * math.exp(m), 1.0, 2.0, xtol=1e-15)


#: where s(mu) is smallest, and that smallest value (about 1.2785 and -0.2785)
LOGISTIC_MU_STAR = _mu_star()
LOGISTIC_S_MIN = logistic_score(LOGISTIC_MU_STAR)


def logistic_mu_roots(s: float, *, tol: float = 1e-12) -> list[float]:
    """All mu with -mu / (1 + e^mu) = s, by bracketed root finding (Brent).

    s > 0: one root, in (-2s, -s) (the sample is misclassified). s = 0: mu = 0.
    LOGISTIC_S_MIN < s < 0: two roots, one in (0, mu*) and one beyond mu* = 1.2785 (both must be tried).
    s within ``tol`` of LOGISTIC_S_MIN: the double root mu*. s < LOGISTIC_S_MIN: no root ([]): the observed
    gradient cannot come from one sample under the logistic loss (a batch, a defense, another loss).
    """
    s = float(s)
    if not math.isfinite(s):
        return []
    if s > 0:
        lo, hi = -2.0 * s, -s
        if logistic_score(lo) - s < 0:  # guard rounding at tiny s
            lo *= 1.5
        return [brentq(lambda m: logistic_score(m) - s, lo, hi, xtol=1e-15, maxiter=500)]
    if s == 0:
        return [0.0]
    if abs(s - LOGISTIC_S_MIN) <= tol:
        return [LOGISTIC_MU_STAR]
    if s < LOGISTIC_S_MIN:
        return []
    f = lambda m: logistic_score(m) - s  # noqa: E731
    r1 = brentq(f, 0.0, LOGISTIC_MU_STAR, xtol=1e-15, maxiter=500)
    hi = LOGISTIC_MU_STAR + 1.0
    while f(hi) < 0:
        hi *= 2.0
        if hi > 1e4:
            break
    r2 = brentq(f, LOGISTIC_MU_STAR, hi, xtol=1e-15, maxiter=500)
    return [r1, r2]


# =====================================================================================================
# The attack
# =====================================================================================================

@dataclass
class _Start:
    """One way to start the recursion at the head: the head's input x (in_shape), its k = dL/dz (out_shape)."""

    x: torch.Tensor
    k: torch.Tensor
    label: int | None
    info: dict[str, Any] = field(default_factory=dict)
    score: float = float("inf")  # residual of the first system below the head (lower = more consistent)


@register("rgap", aliases=("r-gap",))
class RGAP(Attack):
    """R-GAP (Zhu & Blaschko, ICLR 2021): closed-form recursive reconstruction, layer by layer from the output.

    Options: rtol (numerical-rank tolerance of each stacked system, relative to its Frobenius norm),
    exact_tolerance (largest relative residual of a layer for the result to count as exact), refine
    (refinement steps of each least-squares solve), method ('auto' | 'direct' | 'lsqr'), max_dense (largest
    layer input solved with a dense Gram matrix; larger ones use matrix-free LSQR), weight_ratio (weight of
    the weight constraint against the gradient constraint after balancing). Computation is in float64; the
    result has the case's dtype (a float32 case gives rounding-level residuals, so its kind is 'estimate').
    """

    paper = "Zhu & Blaschko, R-GAP: Recursive Gradient Attack on Privacy, ICLR 2021 (arXiv 2010.07733)"

    @dataclass
    class Options:
        rtol: float = L.DEFAULT_RTOL
        exact_tolerance: float = 1e-6
        refine: int = 1
        method: str = "auto"
        max_dense: int = 12000
        weight_ratio: float = 1.0

    presets = {"paper": {}}
    batch_advice = "an optimisation attack initialised with this result (H-GAP: gl.create('ig', init=rec))"

    def batch_facts(self, case: Case, rec: Reconstruction) -> list[str]:
        return super().batch_facts(case, rec) + rank_facts(rec.info.get("layers"))

    def check_options(self, o) -> list[str]:
        p = []
        if not (0 < o.rtol < 1):
            p.append(f"rtol must be in (0, 1), got {o.rtol}")
        if not (o.exact_tolerance > 0):
            p.append(f"exact_tolerance must be positive, got {o.exact_tolerance}")
        if o.refine < 0:
            p.append(f"refine must be >= 0, got {o.refine}")
        if o.method not in ("auto", "direct", "lsqr"):
            p.append(f"method must be 'auto', 'direct' or 'lsqr', got {o.method!r}")
        if o.max_dense < 1:
            p.append(f"max_dense must be >= 1, got {o.max_dense}")
        if not (o.weight_ratio > 0):
            p.append(f"weight_ratio must be positive, got {o.weight_ratio}")
        return p

    # ---- requirements ------------------------------------------------------------------------------
    def requirements(self, case: Case) -> list[str]:
        extra = []
        o = case.observation
        if isinstance(o, FedAvg) and o.local_steps != 1:
            extra.append(f"R-GAP needs one gradient: FedSGD, or FedAvg with ONE local step (got {o.local_steps} "
                         "local steps)")
        if isinstance(o, FedAvg) and o.local_steps == 1 and o.local_batch_size < case.batch_size:
            extra.append(f"a one-step FedAvg update on a mini-batch of {o.local_batch_size} out of "
                         f"{case.batch_size} samples covers only part of the batch")
        chain = L.walk(case.model, case.spec.shape)
        problems = chain.all_problems(invertible=True)
        if not problems and case.batch_size > 1 and not chain.all_linear:
            conv = [l.name for l in chain.layers if not l.dense]
            problems.append(f"R-GAP recovers one sample: batch size {case.batch_size} on a network with "
                            f"non-fully-connected layers {conv} (a batch on a fully connected network gives "
                            "one mixture)")
        return problems + extra

    # ---- the attack -----------------------------------------------------------------------------------
    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        cdt = torch.float64  # every system is solved in float64 on the CPU, whatever the case's dtype
        chain = L.walk(case.model, case.spec.shape)
        params = {k: v.detach().to(cdt).cpu() for k, v in case.parameters.items()}
        grads = self._gradients(case, cdt)
        labels = None if case.labels is None else case.labels.cpu()
        batch = case.batch_size
        notes: list[str] = []
        if case.dtype != torch.float64:
            notes.append(f"the observed gradient is {str(case.dtype).replace('torch.', '')}: its rounding limits the "
                         "accuracy (solved in float64); use a float64 case for an exact reconstruction")
        if batch > 1:
            notes.append(f"the gradient is averaged over {batch} samples: R-GAP recovers one linear combination "
                         "of them, not the samples")
        t0 = time.perf_counter()
        starts, head_info = self._starts(case, chain, params, grads, labels, cdt)
        if not starts:
            raise NumericalError("rgap could not start the recursion: the head's gradient is zero (nothing leaks "
                                 "through a zero gradient)")
        ctx.progress(len(chain.layers), desc="rgap")
        n_hidden = len(chain.layers) - 1
        # rank the starts by the consistency of the first system below the head
        if len(starts) > 1 and n_hidden > 0:
            for st in starts:
                st.score = self._first_step_score(chain, params, grads, st, o)
            starts.sort(key=lambda st: st.score)
            floor = max(o.exact_tolerance, 100.0 * starts[0].score)
            consistent = [st for st in starts if st.score <= floor]
        else:
            consistent = list(starts)
        if batch > 1:
            consistent = consistent[:1]
        # bias-free, positively homogeneous chains: starts with the same label sign are exact rescalings of each
        # other (x / c gives the same gradient), so one recursion serves them all
        homogeneous = (all(l.activation.positively_homogeneous for l in chain.layers[:-1])
                       and not any(l.has_bias for l in chain.layers))
        runs: dict[Any, tuple] = {}
        cands = []
        for st in consistent:
            key = st.label if homogeneous else id(st)
            if key in runs:
                x_run, reports, ok, st_run = runs[key]
                c = float(st.k.reshape(-1)[0] / st_run.k.reshape(-1)[0])
                x0 = x_run / c
                st.info["rescaled_from_mu"] = st_run.info.get("mu")
            else:
                x0, reports, ok = self._recurse(chain, params, grads, st, o, ctx, mixture=batch > 1)
                runs[key] = (x0, reports, ok, st)
            img = case.spec.denormalize(x0.reshape(1, *case.spec.shape)).to(case.dtype)
            lo, hi = case.spec.value_range
            box = float(((lo - img).clamp_min(0) ** 2 + (img - hi).clamp_min(0) ** 2).mean())
            lab = torch.tensor([st.label], dtype=torch.long) if (st.label is not None and batch == 1) else None
            res = float("nan")
            if batch == 1 and (lab is not None or labels is not None):
                try:
                    res = case.residual(img.clamp(lo, hi).to(case.device),
                                        (labels if labels is not None else lab).to(case.device))
                except Exception:  # the residual never hides a result
                    res = float("nan")
            res = res if math.isfinite(res) else float("inf")
            cands.append(((not ok, round(box, 12), res), img, lab, reports, ok, st, box, res))
            ctx.offer(res, img.clamp(lo, hi), lab)
        cands.sort(key=lambda c: c[0])
        _, img, lab, reports, ok, st, box, res = cands[0]
        deficient = [r.label for r in reports if not r.determined]
        kind = "mixture" if batch > 1 else ("exact" if ok and head_info.get("status") == "ok" else "estimate")
        head = {**head_info, **st.info, "starts": len(starts), "consistent_starts": len(consistent),
                "recursions": len(runs), "box_violation": box}
        if len(cands) > 1:
            ok_c = [c for c in cands if c[4]]
            head["chosen_by"] = "consistency" if len(ok_c) == 1 else "image range"
            if len(ok_c) > 1 and ok_c[1][6] <= ok_c[0][6] + 1e-12:
                head["ambiguous"] = True
                notes.append("several starts reproduce the gradient exactly and all lie in the image range (for "
                             "bias-free leaky-ReLU networks the two logistic roots give rescaled inputs with the "
                             "same gradient): the input is determined only up to that choice")
            elif len(ok_c) > 1:
                notes.append(f"{len(ok_c)} starts reproduce the gradient exactly (rescaled inputs with the same "
                             "gradient); the one inside the image range was kept")
        info: dict[str, Any] = {
            "layers": reports,
            "deficient_layers": deficient,
            "head": head,
            "rtol": o.rtol,
            "compute_dtype": str(cdt).replace("torch.", ""),
            "solve_seconds": time.perf_counter() - t0,
        }
        if deficient:
            notes.append("rank-deficient layer(s) " + ", ".join(deficient) + ": the minimum-norm solution is wrong "
                         "in their null space and the error propagates to every earlier layer; try an "
                         "optimisation attack initialised with this result (H-GAP)")
        if batch > 1:
            info["mixture"] = self._mixture_info(chain, grads, batch)
        if notes:
            info["notes"] = notes
        if lab is None and labels is not None:
            lab = labels.clone()
        return Reconstruction(inputs=img, labels=lab if batch == 1 else None, info=info, claim=kind)

    # ---- pieces -------------------------------------------------------------------------------------------
    @staticmethod
    def _gradients(case: Case, dtype) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype).cpu() for k, v in case.observation.as_gradient().items()}

    def _starts(self, case, chain, params, grads, labels, dtype) -> tuple[list[_Start], dict]:
        head = chain.head
        W = params[head.weight_name]
        gW = grads[head.weight_name]
        gb = grads.get(head.bias_name) if head.has_bias else None
        info: dict[str, Any] = {"layer": head.name}
        starts: list[_Start] = []
        # (1) a bias: k = dL/db exactly
        if gb is not None and float(gb.abs().max()) > 0:
            k = gb.reshape(-1)
            x = L.head_solve(gW, k)
            rule = case.loss_fn.label_from_bias
            label = rule(k, 1)[0] if rule is not None else None
            info.update(type="bias", status="ok", label_source="bias gradient" if label is not None else "none")
            return [_Start(x, k, label, {"recovered_label": label})], info
        if float(gW.abs().max()) == 0:
            info.update(type="none", status="zero gradient")
            return [], info
        # (2) the paper's head: one score, logistic loss, no bias
        if head.n_out == 1 and case.loss_fn.single_output:
            s = float((W * gW).sum())
            roots = logistic_mu_roots(s)
            status = "ok"
            if not roots:
                status = "impossible"
                roots = [LOGISTIC_MU_STAR]
            if labels is not None and case.batch_size == 1:
                signs, source = [2 * int(labels[0]) - 1], "given"
            elif labels is not None and bool((labels == labels[0]).all()):
                signs, source = [2 * int(labels[0]) - 1], "given"
            else:
                signs, source = [1, -1], "both signs tried"
            info.update(type="logistic", s=s, roots=roots, status=status, label_source=source,
                        s_min=LOGISTIC_S_MIN)
            for mu in roots:
                for y in signs:
                    k = torch.tensor([-y / (1.0 + math.exp(mu))], dtype=dtype) if mu < 700 else \
                        torch.tensor([-y * math.exp(-mu)], dtype=dtype)
                    x = gW[0] / k[0]
                    starts.append(_Start(x, k, (y + 1) // 2, {"mu": mu, "label_sign": y,
                                                              "recovered_label": (y + 1) // 2}))
            return starts, info
        # (3) any other bias-free head: dL/dW = k x^T, solve the scale along the top singular pair
        info.update(type="rank-one", status="ok")
        U, S, Vh = torch.linalg.svd(gW, full_matrices=False)
        u, sig, v = U[:, 0], float(S[0]), Vh[0]
        info["rank_one_ratio"] = float(S[1] / S[0]) if S.numel() > 1 else 0.0
        if labels is not None:
            cand_labels = [int(labels[0])]
        elif case.loss_fn.counts_from_bias:  # k = softmax - onehot: the label is the one entry of the other sign
            cand_labels = sorted({int(torch.argmin(u)), int(torch.argmax(u))})
        else:
            cand_labels = list(range(case.spec.num_classes))
        loss_fn = case.loss_fn
        found = []
        for y in cand_labels:
            yy = torch.tensor([y], dtype=torch.long)

            def dl_df(a: float) -> torch.Tensor:
                f = (W @ (sig * v / a)).reshape(1, -1).detach().requires_grad_(True)
                g, = torch.autograd.grad(loss_fn(f, yy), f)
                return g.reshape(-1)

            def mismatch(a: float) -> float:
                g = dl_df(a)
                return float((a * u - g).norm() / g.norm().clamp_min(1e-300))

            j = int(torch.argmax(u.abs()))

            def polish(a: float) -> float:
                # secant steps on the largest component of a u - dL/df(a) = 0 (the bounded search stops at ~1e-9)
                h = lambda t: float(t * u[j] - dl_df(t)[j])  # noqa: E731
                a0, a1 = a, a * (1 + 1e-7)
                h0, h1 = h(a0), h(a1)
                for _ in range(8):
                    if h1 == h0:
                        break
                    a0, a1, h0 = a1, a1 - h1 * (a1 - a0) / (h1 - h0), h1
                    h1 = h(a1)
                    if abs(a1 - a0) <= 1e-15 * abs(a1):
                        break
                return a1 if math.isfinite(a1) and mismatch(a1) <= mismatch(a) else a

            for sign in (1.0, -1.0):
                grid = sign * np.logspace(-8, 4, 121)
                vals = [mismatch(a) for a in grid]
                i = int(np.argmin(vals))
                lo, hi = sorted((grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]))
                r = minimize_scalar(mismatch, bounds=(lo, hi), method="bounded", options={"xatol": 1e-14})
                a = polish(float(r.x))
                found.append((mismatch(a), a, y))
        found.sort()
        kept: list[tuple[float, float, int]] = []
        for err, a, y in found:  # the best, plus other distinct scales that also fit
            if kept and (err > max(1e-6, 10 * kept[0][0]) or any(abs(a - b) <= 1e-8 * abs(b) and y == z
                                                                  for _, b, z in kept)):
                continue
            kept.append((err, a, y))
        for err, a, y in kept[:4]:
            starts.append(_Start(sig * v / a, a * u, y, {"scale": a, "scale_mismatch": err, "recovered_label": y}))
        if found and found[0][0] > 1e-3:
            info["status"] = "inconsistent"
        return starts, info

    def _layer_inputs(self, layer, nxt, params, x_next, k_next):
        """From the next layer's input x and k: this layer's z - b target, k, clipped count."""
        out = x_next.reshape(layer.out_shape)
        act = layer.activation
        z = act.inverse(out)
        back = act.fn(z)
        scale = out.abs().max().clamp_min(1e-300)
        clipped = int(((back - out).abs() > 1e-6 * scale).sum())
        Wn = params[nxt.weight_name]
        k = nxt.apply_weight_T(k_next.reshape(1, *nxt.out_shape), Wn)[0].reshape(layer.out_shape) * act.grad(z)
        target = z
        if layer.has_bias:
            target = z - params[layer.bias_name].reshape(layer.bias_shape())
        return target, k, clipped

    def _first_step_score(self, chain, params, grads, st: _Start, o) -> float:
        layer, nxt = chain.layers[-2], chain.layers[-1]
        try:
            target, k, _ = self._layer_inputs(layer, nxt, params, st.x, st.k)
            system = L.LayerSystem(layer, params[layer.weight_name], k, grads[layer.weight_name], target,
                                   weight_ratio=o.weight_ratio)
            sol = system.solve(rtol=o.rtol, method=o.method, refine=0, max_dense=o.max_dense)
        except Exception:
            return float("inf")
        return sol.residual if math.isfinite(sol.residual) else float("inf")

    def _recurse(self, chain, params, grads, st: _Start, o, ctx, *, mixture: bool):
        layers = chain.layers
        head = layers[-1]
        gW = grads[head.weight_name]
        kk = st.k.reshape(-1)
        rg = float((torch.outer(kk, st.x.reshape(-1)) - gW).norm() / gW.norm())
        head_rep = L.LayerReport.of(head, head=True, unknowns=head.n_in, constraints=head.n_weights + head.n_out,
                                    rank=head.n_in, method="head", residual=rg, residual_gradient=rg,
                                    extra=RGAPLayer())
        reports = [head_rep]
        ok = rg <= o.exact_tolerance
        x_next, k_next = st.x, st.k
        ctx.update(1)
        for i in range(len(layers) - 2, -1, -1):
            t = time.perf_counter()
            layer, nxt = layers[i], layers[i + 1]
            target, k, clipped = self._layer_inputs(layer, nxt, params, x_next, k_next)
            W = params[layer.weight_name]
            gW = grads[layer.weight_name]
            system = L.LayerSystem(layer, W, k, gW, target, weight_ratio=o.weight_ratio)
            if mixture and i == 0 and layer.dense:
                # the combination: dL/dW_1^T k_1 / ||k_1||^2 lies exactly in the span of the batch's inputs
                x = layer.gradient_solve(k, gW).reshape(-1)
                tot, rg, rw = system.residuals(x)
                rep = L.LayerReport.of(layer, unknowns=layer.n_in, constraints=system.constraints, rank=layer.n_in,
                                       residual=tot, residual_gradient=rg, residual_weight=rw, condition=1.0,
                                       method="gradient-only (mixture)")
            else:
                sol = system.solve(rtol=o.rtol, method=o.method, refine=o.refine, max_dense=o.max_dense)
                x = sol.x
                rep = L.LayerReport.of(layer, sol)
            rep.extra = RGAPLayer(clipped=clipped)
            if clipped:
                rep.notes.append(f"{clipped} activation inverse(s) left the activation's range (clipped)")
            if layer.has_bias:
                gb = grads[layer.bias_name]
                rep.residual_bias = float((layer.bias_grad(k) - gb.reshape(-1)).norm() / gb.norm().clamp_min(1e-300))
            rep.seconds = time.perf_counter() - t
            if not rep.determined or not (rep.residual <= o.exact_tolerance) or clipped:
                ok = False
            reports.append(rep)
            x_next, k_next = x, k
            ctx.update(1, layer=layer.label, residual=float(rep.residual))
        reports.reverse()
        x0 = x_next.reshape(-1)
        return x0, reports, ok

    @staticmethod
    def _mixture_info(chain, grads, batch) -> dict:
        first = chain.layers[0]
        g = grads[first.weight_name].reshape(first.n_out, first.n_in).to(torch.float64)
        sv = torch.linalg.svdvals(g)
        span = int((sv > 1e-6 * sv[0]).sum()) if float(sv[0]) > 0 else 0
        return {"batch_size": batch, "span_rank": span,
                "note": f"one linear combination of the {batch} inputs (in their span); the first layer's "
                        f"gradient spans {span} direction(s)"}
