"""The moment-tensor attack of Wang, Lee & Lei (AISTATS 2023): a whole batch from ONE gradient of a random
two-layer network, by tensor decomposition.

Paper: Zihan Wang, Jason D. Lee, Qi Lei. "Reconstructing Training Data from Model Gradient, Provably."
AISTATS 2023 (arXiv 2212.03714). The paper's body was not available to us; this is our derivation of the
approach (ALGORITHMS.md section 4), checked numerically. Setting and assumptions:

- f_k(x) = sum_j a_kj sigma(w_j^T x) on the flattened, normalised input; rows w_j ~ N(0, s^2 I) i.i.d. (known,
  random: NOT trained - Stein's identity needs Gaussian weights, and the attack checks it); a known.
- one FedSGD gradient (or one FedAvg update of a single full-batch local step); B <= d.
- What the gradient identifies: directions x_i/|x_i| always (mu_3 or mu_4 != 0); signs unless sigma is odd;
  norms unless sigma is positively homogeneous (ReLU family). What it cannot identify is fixed from the loss
  residual (known or recovered labels; exactly with a mirrored initialisation), a Gaussian first-layer bias, or
  a stated prior (image pixels in the value range); ``info['samples']`` says which, per sample.

Algorithm (``_reconstruct``):
1. Span: the top-B right singular vectors U of the first-layer gradient (randomised SVD, never a d x d matrix);
   the singular-value gap gives an estimate of B (reported; the case's batch size is used unless
   ``batch_size='gap'``), the values beyond B the noise floor (numerical rank).
2. Project: z_j = U^T w_j / s, y_j = U^T g^W_j s / a_j (K classes: weighted by a random class combination);
   the order-p Hermite moment tensor T = (1/m) sum_j y_j (x) He_{p-1}(z_j) is kept implicit (contractions
   O(m B^2)); p = 3 or 4 from mu_p. With K > B classes the class space is first rotated onto the B directions
   the output-layer gradient spans (lossless).
3. Jennrich on two random slices, several draws, each polished by CP-ALS on the implicit tensor.
4. Fit the raw gradient (both layers) from every draw: ReLU family - activation-pattern alternating least
   squares in the rank-one form rho_i (x) c_i with greedy sign flips, then patterns snapped from the observed
   gradient (exact for a noise-free gradient); smooth activations - alternating slope-fixed least squares with
   per-sample norm profiles, then Levenberg-Marquardt (variable projection of the residuals), then late sign
   flips. The draw whose fit to the observed gradient is best wins (stop early at ``fit_tol`` or when two draws
   agree).
5. Norms, signs and labels: a Hungarian assignment of the (known) label multiset to the recovered samples by
   the loss-residual misfit; ties between admissible inputs are broken by the stated prior; optional
   gradient-matching refinement (L-BFGS on the full model).

For deep networks, :func:`recover_head_features` applies the same steps to a wide random two-layer head on top
of a body, and :func:`feature_matching_term` turns the recovered features into a regulariser
1 - cos^2(phi(x), z_hat) for ``inverting-gradients`` (``regularizers=(term,)``), as in Liu, Wang, Chen, Lei
2024 ("Data Reconstruction Attacks and Defenses: A Systematic Evaluation").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..activations import Activation
from ..activations import resolve as resolve_activation
from ..case import Case, FedAvg
from ..errors import RequirementError, ValidationError
from ..tensor_moments import MomentTensor, cp_als_polish, cp_objective, jennrich
from .base import Attack, Reconstruction, RunContext, register

__all__ = ["TensorAttack", "TensorOptions", "TwoLayerView", "find_two_layer", "recover_directions",
           "recover_head_features", "HeadFeatures", "feature_matching_term", "weight_normality"]

PAPER = ("Wang, Lee, Lei. Reconstructing Training Data from Model Gradient, Provably. AISTATS 2023 "
         "(arXiv 2212.03714)")



# ------------------------------------------------------------------------------------------------------------
# Finding the two-layer part of a model
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TwoLayerView:
    """Where the random two-layer part of a model lives.

    hidden / out: module names of the first Linear (d_in -> m) and the output Linear (m -> K);
    activation: the registry Activation between them; body: names of the leaf modules before the head (empty
    for a plain two-layer network); has_bias: the first layer has a (non-zero) bias."""

    hidden: str
    out: str
    activation: Activation
    d_in: int
    width: int
    num_outputs: int
    has_bias: bool
    body: list[str] = field(default_factory=list)

    @property
    def weight_key(self) -> str:
        return f"{self.hidden}.weight"

    @property
    def bias_key(self) -> str | None:
        return f"{self.hidden}.bias" if self.has_bias else None

    @property
    def out_key(self) -> str:
        return f"{self.out}.weight"

    @property
    def d_aug(self) -> int:
        return self.d_in + (1 if self.has_bias else 0)


_TRIVIAL = (nn.Flatten, nn.Identity, nn.Dropout)


def find_two_layer(model: nn.Module) -> TwoLayerView | list[str]:
    """Locate the final Linear -> activation -> Linear block of ``model`` (leaf modules in registration order,
    skipping Flatten / Identity / Dropout). Returns a :class:`TwoLayerView` or the list of problems found."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) and not isinstance(m, _TRIVIAL)]
    if len(leaves) < 3:
        return [f"expected a Linear -> activation -> Linear head, found only {len(leaves)} layer(s)"]
    (hn, h), (an, a), (on, o) = leaves[-3:]
    problems = []
    if not isinstance(h, nn.Linear):
        problems.append(f"the third-last layer {hn!r} must be nn.Linear (the random first layer), got {type(h).__name__}")
    act = resolve_activation(a)
    if act is None:
        problems.append(f"the second-last layer {an!r} must be an activation gradleak knows (gradleak Act, nn.ReLU, "
                        f"nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.LeakyReLU(0.2)), got {type(a).__name__}")
    if not isinstance(o, nn.Linear):
        problems.append(f"the last layer {on!r} must be nn.Linear (the output weights), got {type(o).__name__}")
    if problems:
        return problems
    if o.in_features != h.out_features:
        return [f"{on!r} takes {o.in_features} inputs but {hn!r} has {h.out_features} outputs"]
    has_bias = h.bias is not None and bool(torch.any(h.bias.detach() != 0))
    return TwoLayerView(hidden=hn, out=on, activation=act, d_in=h.in_features, width=h.out_features,
                        num_outputs=o.out_features, has_bias=has_bias, body=[n for n, _ in leaves[:-3]])


def weight_normality(W: torch.Tensor, b: torch.Tensor | None = None, max_entries: int = 2_000_000) -> dict[str, float]:
    """Marginal normality statistics of the first-layer weights (a deterministic subsample of at most
    ``max_entries`` entries): std, mean, skewness, excess kurtosis and their z-scores under i.i.d. N(0, s^2)."""
    x = W.detach().reshape(-1)
    if b is not None:
        x = torch.cat([x, b.detach().reshape(-1)])
    n_all = x.numel()
    if n_all > max_entries:
        step = n_all // max_entries
        x = x[::step][:max_entries]
    x = x.double()
    n = x.numel()
    s = float(x.pow(2).mean().sqrt())
    mean = float(x.mean())
    u = x / max(s, 1e-300)
    skew = float(u.pow(3).mean())
    kurt = float(u.pow(4).mean() - 3.0)
    return {"std": s, "mean": mean, "skewness": skew, "excess_kurtosis": kurt, "entries": n,
            "z_mean": mean / max(s, 1e-300) * math.sqrt(n), "z_skewness": skew / math.sqrt(6.0 / n),
            "z_kurtosis": kurt / math.sqrt(24.0 / n)}


def _normality_problem(stats: dict[str, float]) -> str | None:
    # A tolerance on top of the sampling error: float32 rounding and finite widths should not trip it, a uniform
    # (kurtosis -1.2), a sparse or a trained heavy-tailed matrix should.
    bad = []
    if abs(stats["excess_kurtosis"]) > 0.05 + 6 * math.sqrt(24.0 / stats["entries"]):
        bad.append(f"excess kurtosis {stats['excess_kurtosis']:+.3f} (Gaussian: 0)")
    if abs(stats["skewness"]) > 0.05 + 6 * math.sqrt(6.0 / stats["entries"]):
        bad.append(f"skewness {stats['skewness']:+.3f} (Gaussian: 0)")
    if abs(stats["mean"]) > 0.05 * stats["std"] + 6 * stats["std"] / math.sqrt(stats["entries"]):
        bad.append(f"mean {stats['mean']:+.3g} vs std {stats['std']:.3g} (Gaussian: 0)")
    if not bad:
        return None
    return ("the first-layer weights are not i.i.d. Gaussian (" + ", ".join(bad) + "): the moment-tensor attack needs "
            "a random Gaussian first layer (Stein's identity); trained or uniformly initialised weights break it "
            "(pass check_weights=False to run anyway)")


# ------------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------------
FITS = ("auto", "patterns", "nonlinear", "none")
ESTIMATORS = ("auto", "hidden", "output")
BATCH = ("case", "gap")


@dataclass
class TensorOptions:
    """order: Hermite order p (0: the smallest p in {3, 4} with mu_p != 0).
    draws: Jennrich draws; every one is polished and fitted to the gradient, the best fit is kept.
    polish_sweeps: CP-ALS sweeps on the implicit tensor after each Jennrich draw.
    estimator: 'hidden' (first-layer gradient x He_{p-1}, lower variance), 'output' (output-layer gradient x He_p)
    or 'auto' (= 'hidden').
    fit: 'patterns' (activation-pattern alternating least squares; ReLU family), 'nonlinear' (Levenberg-Marquardt
    over span coordinates and residuals), 'none' (tensor directions only; signs/scales by least squares), 'auto'.
    fit_rounds: rounds of the pattern ALS (then pattern snapping) / alternating rounds of the non-linear fit.
    fit_tol: stop trying draws once the relative gradient-fit residual is below this.
    refine_steps: optional L-BFGS gradient-matching steps on the full model afterwards (0 = none).
    batch_size: 'case' (the case's batch size) or 'gap' (estimated from the singular-value gap).
    check_weights: refuse non-Gaussian first-layer weights (RequirementError) instead of a warning in info.
    """

    order: int = 0
    draws: int = 8
    polish_sweeps: int = 4
    estimator: str = "auto"
    fit: str = "auto"
    fit_rounds: int = 10
    fit_tol: float = 1e-9
    refine_steps: int = 0
    batch_size: str = "case"
    check_weights: bool = True


# ------------------------------------------------------------------------------------------------------------
# The gradient of the two-layer part, projected onto the span
# ------------------------------------------------------------------------------------------------------------
def _observed_gradient(case: Case, keys: list[str]) -> dict[str, torch.Tensor]:
    obs = case.observation.as_gradient()
    return {k: obs[k] for k in keys}


def _protocol_problems(case: Case) -> list[str]:
    o = case.observation
    if isinstance(o, FedAvg) and (o.local_steps != 1 or o.local_batch_size < case.batch_size):
        return [f"needs one gradient: FedSGD, or FedAvg with one full-batch local step (got local_steps="
                f"{o.local_steps}, local_batch_size={o.local_batch_size} for batch {case.batch_size})"]
    return []


@dataclass
class _Span:
    U: torch.Tensor  # (d_aug, B) orthonormal, case dtype
    singular_values: list[float]
    rank_gap: int
    gap_ratio: float
    numerical_rank: int


def _span(gW: torch.Tensor, gb: torch.Tensor | None, B: int, generator: torch.Generator) -> _Span:
    """Top right singular vectors of [g^W, g^b] (m x d_aug) by a randomised range finder with one power step;
    never forms a d x d matrix. Returns U (d_aug, B) and the leading singular values."""
    m, d = gW.shape
    da = d + (1 if gb is not None else 0)
    k = min(da, m, max(2 * B, B + 10))

    def right(X):  # G @ X, X (da, k)
        out = gW @ X[:d]
        if gb is not None:
            out = out + gb[:, None] * X[d:d + 1]
        return out

    def left(Y):  # G^T @ Y, Y (m, k)
        top = gW.T @ Y
        if gb is not None:
            top = torch.cat([top, (gb @ Y)[None]], dim=0)
        return top

    omega = torch.randn(da, k, generator=generator, dtype=torch.float64).to(gW.dtype)
    Y = right(omega)
    Q, _ = torch.linalg.qr(Y)
    Q, _ = torch.linalg.qr(right(left(Q)))
    small = left(Q).T  # (k, da) = Q^T G
    _, S, Vh = torch.linalg.svd(small.double(), full_matrices=False)
    sv = S.tolist()
    # numerical rank: above 30x the noise floor, read off the singular values beyond B (rounding or defense noise),
    # or a dtype-based floor when none were computed
    tail = sv[B:]
    floor = float(np.median(tail)) if tail else 0.0
    floor = max(floor, max(sv[0], 1e-300) * (1e-14 if gW.dtype == torch.float64 else 1e-7))
    nrank = int(sum(v > 30 * floor for v in sv))
    ratios = [sv[i] / max(sv[i + 1], 1e-300) for i in range(len(sv) - 1)]
    gap_idx = int(np.argmax(ratios)) + 1 if ratios else 1
    U = Vh[:B].T.to(gW.dtype)
    return _Span(U=U, singular_values=sv, rank_gap=gap_idx, gap_ratio=float(max(ratios) if ratios else float("inf")),
                 numerical_rank=nrank)


@dataclass
class _Problem:
    """The two-layer gradient in span coordinates (all float64): Z (m, B) = U^T w_j / s, P (m, B) = s U^T g^W_j,
    A (K, m) output weights, GA (K, m) output-layer gradient, act the activation, s the weight scale.
    The model: P_j = sum_i sigma'(z_j.c_i) (sum_k A_kj rho_ik) c_i, GA_kj = sum_i rho_ik sigma(z_j.c_i) with c_i the
    span coordinates of s * x_i (x_i augmented with 1 if there is a bias) and rho_ik = r_ik / B."""

    Z: torch.Tensor
    P: torch.Tensor
    A: torch.Tensor
    GA: torch.Tensor
    act: Activation
    s: float

    @property
    def B(self) -> int:
        return self.Z.shape[1]

    @property
    def K(self) -> int:
        return self.A.shape[0]

    @property
    def norm2(self) -> float:
        return float((self.P ** 2).sum() + (self.GA ** 2).sum())


def _project(case: Case, view: TwoLayerView, U: torch.Tensor, s: float) -> _Problem:
    params = case.parameters
    keys = [view.weight_key, view.out_key] + ([view.bias_key] if view.has_bias else [])
    g = _observed_gradient(case, keys)
    W = params[view.weight_key]
    d = view.d_in
    Z = W @ U[:d]
    P = g[view.weight_key] @ U[:d]
    if view.has_bias:
        Z = Z + params[view.bias_key][:, None] * U[d:d + 1]
        P = P + g[view.bias_key][:, None] * U[d:d + 1]
    return _Problem(Z=(Z / s).double(), P=(P * s).double(), A=params[view.out_key].double(),
                    GA=g[view.out_key].double(), act=view.activation, s=s)


# ------------------------------------------------------------------------------------------------------------
# Moment tensors from the problem
# ------------------------------------------------------------------------------------------------------------
def _moment(prob: _Problem, order: int, estimator: str, c: torch.Tensor) -> MomentTensor:
    """The implicit moment tensor for class combination c (K,)."""
    if estimator == "output":
        return MomentTensor(prob.Z, order=order, g=c @ prob.GA)
    v = (prob.A ** 2).mean(dim=1).clamp_min(1e-300)  # (K,) variance of the output weights per class
    omega = (c[:, None] * prob.A / v[:, None]).sum(0)  # (m,): E[omega_j A_kj] = c_k
    return MomentTensor(prob.Z, order=order, y=prob.P * omega[:, None])


# ------------------------------------------------------------------------------------------------------------
# Fitting the raw gradient: ReLU family (activation patterns)
# ------------------------------------------------------------------------------------------------------------
def _levels(act: Activation) -> tuple[float, float]:
    one = torch.tensor([1.0, -1.0], dtype=torch.float64)
    g = act.grad(one)
    return float(g[0]), float(g[1])


def _pattern(prob: _Problem, dirs: torch.Tensor) -> torch.Tensor:
    return prob.act.grad(prob.Z @ dirs.T)


def _pattern_ls(prob: _Problem, D: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares for Q (B, K, B) with P_j = sum_i D_ji sum_k A_kj Q_ik; returns Q and the relative residual of
    both layers' gradients (the output layer predicted as GA_kj = sum_i D_ji z_j.Q_ik)."""
    m, B = D.shape
    K = prob.K
    Phi = (D[:, :, None] * prob.A.T[:, None, :]).reshape(m, B * K)
    N = Phi.T @ Phi
    R = Phi.T @ prob.P
    ridge = 1e-12 * float(N.diagonal().mean().clamp_min(1e-300))
    N = N + ridge * torch.eye(B * K, dtype=N.dtype)
    try:
        Qf = torch.linalg.solve(N, R)
    except RuntimeError:
        Qf = torch.linalg.lstsq(N, R).solution
    Q = Qf.reshape(B, K, B)
    return Q, _pattern_residual(prob, D, Q, Phi @ Qf)


def _pattern_residual(prob: _Problem, D: torch.Tensor, Q: torch.Tensor, P_hat: torch.Tensor | None = None) -> float:
    if P_hat is None:
        m, B = D.shape
        P_hat = ((D[:, :, None] * prob.A.T[:, None, :]).reshape(m, -1)) @ Q.reshape(-1, B)
    ZQ = torch.einsum("jb,ikb->jik", prob.Z, Q)
    GA_hat = torch.einsum("ji,jik->kj", D, ZQ)
    res = float(((prob.P - P_hat) ** 2).sum() + ((prob.GA - GA_hat) ** 2).sum())
    return res / max(prob.norm2, 1e-300)


def _dirs_from_Q(Q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each Q_i (K, B) (Q_i = rho_i (x) c_i), signed to agree with ``ref``."""
    out = torch.empty_like(ref)
    for i in range(Q.shape[0]):
        if Q.shape[1] == 1:
            v = Q[i, 0]
        else:
            _, _, Vh = torch.linalg.svd(Q[i], full_matrices=False)
            v = Vh[0]
        n = v.norm()
        v = v / n if n > 0 else ref[i]
        out[i] = v if float(v @ ref[i]) >= 0 else -v
    return out


def _pattern_step(prob: _Problem, D: torch.Tensor, C: torch.Tensor, inner: int = 3):
    """Least squares for fixed activation patterns D (m, B), in the rank-one form Q_i = rho_i (x) c_i.

    K = 1: one linear problem for q_i = rho_i c_i (B^2 unknowns). K > 1: alternate rho (B, K) from the output
    layer (GA_kj = sum_i rho_ik D_ji z_j.c_i, a B x B normal matrix) and C from the first layer (P_j = sum_i D_ji
    beta_ji c_i with beta_ji = sum_k A_kj rho_ik, again B x B): O(m B^2) per step instead of O(m B^2 K^2).
    Rows of C keep the sign of the previous ones (the patterns' sign). Returns (C, rho, relative residual)."""
    B = prob.B

    def ridge(N):
        return N + 1e-12 * float(N.diagonal().mean().clamp_min(1e-300)) * torch.eye(N.shape[0], dtype=N.dtype)

    if prob.K == 1:
        Q, _ = _pattern_ls(prob, D)
        q = Q[:, 0, :]
        sgn = torch.sign((q * C).sum(1))
        sgn[sgn == 0] = 1
        Cn = q * sgn[:, None]
        rho = sgn[:, None].clone()
    else:
        Cn = C.clone()
        rho = None
        for _ in range(max(1, inner)):
            H = D * (prob.Z @ Cn.T)  # (m, B)
            rho = torch.linalg.solve(ridge(H.T @ H), H.T @ prob.GA.T)  # (B, K)
            w = D * (prob.A.T @ rho.T)  # (m, B): D_ji beta_ji
            Cn = torch.linalg.solve(ridge(w.T @ w), w.T @ prob.P)  # (B, B)
            sgn = torch.sign((Cn * C).sum(1))
            sgn[sgn == 0] = 1
            Cn, rho = Cn * sgn[:, None], rho * sgn[:, None]
    w = D * (prob.A.T @ rho.T)
    rP = prob.P - w @ Cn
    rA = prob.GA.T - (D * (prob.Z @ Cn.T)) @ rho
    res = float((rP ** 2).sum() + (rA ** 2).sum()) / max(prob.norm2, 1e-300)
    return Cn, rho, res


def _fit_patterns(prob: _Problem, dirs: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Activation-pattern alternating least squares: patterns D_ji = sigma'(z_j.c_i) from the current signed
    span coordinates, least squares for rho_i (x) c_i with the patterns fixed (:func:`_pattern_step`), greedy sign
    flips (first rounds, and whenever a round stalls), until the fit stops improving (at most 6 x ``rounds``);
    then patterns snapped from the observed gradient itself (D_j (.) beta_j = P_j C^{-1}, rounded to the two slope
    levels; exact for a noise-free gradient once C is close), accepted only if the fit improves.
    Returns (signed unit directions (B, B), Q (B, K, B) = rho_i (x) c_i, relative residual, report)."""
    B = prob.B
    C = dirs / dirs.norm(dim=1, keepdim=True)
    C, rho, res = _pattern_step(prob, _pattern(prob, C), C)
    flips = 0
    it = 0
    last = float("inf")
    for it in range(1, 6 * max(1, rounds) + 1):
        if it <= 3 or res >= last * 0.999:
            for i in range(B):
                C2 = C.clone()
                C2[i] = -C2[i]
                C2, rho2, r2 = _pattern_step(prob, _pattern(prob, C2), C2)
                if r2 < res:
                    C, rho, res = C2, rho2, r2
                    flips += 1
        prev = res
        Cn, rhon, rn = _pattern_step(prob, _pattern(prob, C), C)
        moved = float((Cn / Cn.norm(dim=1, keepdim=True) - C / C.norm(dim=1, keepdim=True)).norm())
        if rn <= res:
            C, rho, res = Cn, rhon, rn
        if moved < 1e-13 or res < 1e-26 or (it > max(3, rounds) and res > prev * 0.98):
            break
        last = prev
    als_res = res
    hi, lo = _levels(prob.act)
    snapped = False
    agreement = float("nan")
    for _ in range(6):
        beta = prob.A.T @ rho.T  # (m, B)
        try:
            Dobs = (prob.P @ torch.linalg.inv(C)) / torch.where(beta.abs() > 1e-300, beta, torch.full_like(beta, 1e-300))
        except RuntimeError:
            break
        Dr = torch.where((Dobs - hi).abs() <= (Dobs - lo).abs(), torch.full_like(Dobs, hi), torch.full_like(Dobs, lo))
        # only decisive entries are snapped (a sample with a tiny residual gives noisy ones): the rest keep the
        # model's current pattern
        # sample i speaks in neuron j at all (with saturated residuals half the beta_ji vanish)
        strong = beta.abs() > 0.1 * torch.quantile(beta.abs(), 0.9, dim=0)
        decisive = ((Dobs - Dr).abs() < 0.25 * abs(hi - lo)) & strong
        Dr = torch.where(decisive, Dr, _pattern(prob, C))
        Cs, rhos, _ = _pattern_step(prob, Dr, C)
        # the snapped patterns must agree with the model's patterns z_j.c_i for the right sign of each sample
        pre = prob.Z @ Cs.T
        agree_pos = (prob.act.grad(pre) == Dr).double().mean(0)
        agree_neg = (prob.act.grad(-pre) == Dr).double().mean(0)
        sgn = torch.where(agree_pos >= agree_neg, 1.0, -1.0).to(Cs.dtype)
        Cs = Cs * sgn[:, None]
        Cn, rhon, rn = _pattern_step(prob, _pattern(prob, Cs), Cs)
        if rn < res:
            C, rho, res = Cn, rhon, rn
            snapped = True
            agreement = float(torch.maximum(agree_pos, agree_neg).min())
        else:
            break
    C, rho, res, deflated = _deflate_weak(prob, C, rho, res)
    d = C / C.norm(dim=1, keepdim=True)
    Q = torch.einsum("ik,ib->ikb", rho, C)
    return d, Q, res, {"rounds": it, "sign_flips": flips, "als_residual": als_res, "snapped": snapped,
                       "pattern_agreement": agreement, "deflated": deflated}


def _deflate_weak(prob: _Problem, C: torch.Tensor, rho: torch.Tensor, res: float, rel: float = 0.05):
    """Re-estimate samples that carry little of the gradient (|t_i rho_i| < ``rel`` x the largest): a joint fit
    barely notices them. Subtract every other sample's fitted first-layer contribution; what remains is one
    sample's, P_j ~ D_ji beta_ji c_i, a rank-one matrix whose top right singular vector is c_i's direction (the
    sign: the one whose activation pattern carries the remaining energy). Accepted when the joint fit improves."""
    B = prob.B
    w = (rho.norm(dim=1) * C.norm(dim=1))
    weak = [i for i in range(B) if float(w[i]) < rel * float(w.max())]
    done = 0
    for i in weak:
        D = _pattern(prob, C)
        beta = prob.A.T @ rho.T
        others = [l for l in range(B) if l != i]
        R = prob.P - (D[:, others] * beta[:, others]) @ C[others]
        try:
            _, _, Vh = torch.linalg.svd(R, full_matrices=False)
        except RuntimeError:
            continue
        u = Vh[0]
        energy = (R ** 2).sum(1)
        score = [float((energy * prob.act.grad(sg * (prob.Z @ u))).sum()) for sg in (1.0, -1.0)]
        u = u if score[0] >= score[1] else -u
        C2 = C.clone()
        C2[i] = u * C[i].norm()
        C2, rho2, r2 = _pattern_step(prob, _pattern(prob, C2), C2)
        if r2 < res:
            C, rho, res = C2, rho2, r2
            done += 1
    return C, rho, res, done


# ------------------------------------------------------------------------------------------------------------
# Fitting the raw gradient: smooth activations (non-linear least squares)
# ------------------------------------------------------------------------------------------------------------
def _smooth_terms(prob: _Problem, C: torch.Tensor):
    H = prob.Z @ C.T
    return prob.act.grad(H), prob.act.fn(H)


def _subproblem(prob: _Problem, n: int) -> _Problem:
    """The first n neurons (the neurons are i.i.d., so this is a random subsample)."""
    if prob.Z.shape[0] <= n:
        return prob
    return _Problem(Z=prob.Z[:n], P=prob.P[:n], A=prob.A[:, :n], GA=prob.GA[:, :n], act=prob.act, s=prob.s)


def _rho_ls(prob: _Problem, C: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The residuals rho (B, K) minimising the fit for fixed span coordinates C (B, B) (a linear problem)."""
    B, K = prob.B, prob.K
    S1, S0 = _smooth_terms(prob, C)
    G = C @ C.T
    m = S1.shape[0]
    Fm = (S1[:, :, None] * prob.A.T[:, None, :]).reshape(m, B * K)
    N = (Fm.T @ Fm) * torch.kron(G, torch.ones(K, K, dtype=C.dtype))
    N = N + torch.kron(S0.T @ S0, torch.eye(K, dtype=C.dtype))
    PC = prob.P @ C.T  # (m, B): P_j . c_i
    r = ((S1 * PC).T @ prob.A.T) + (prob.GA @ S0).T  # (B, K)
    N = N + 1e-12 * float(N.diagonal().mean().clamp_min(1e-300)) * torch.eye(B * K, dtype=C.dtype)
    try:
        rho = torch.linalg.solve(N, r.reshape(-1)).reshape(B, K)
    except RuntimeError:
        rho = torch.linalg.lstsq(N, r.reshape(-1, 1)).solution.reshape(B, K)
    return rho, _smooth_residual(prob, C, rho)


def _smooth_residual(prob: _Problem, C: torch.Tensor, rho: torch.Tensor) -> float | torch.Tensor:
    S1, S0 = _smooth_terms(prob, C)
    coef = S1 * (prob.A.T @ rho.T)
    P_hat = coef @ C
    GA_hat = (S0 @ rho).T
    res = ((prob.P - P_hat) ** 2).sum() + ((prob.GA - GA_hat) ** 2).sum()
    res = res / max(prob.norm2, 1e-300)
    return res if C.requires_grad or rho.requires_grad else float(res)


def _fit_smooth(prob: _Problem, dirs: torch.Tensor, rounds: int, odd: bool) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Non-linear least squares over span coordinates C (norms included) and residuals rho.

    On a subsample of neurons: a common scale from a log grid (rho by linear least squares at each point), then
    alternating rounds - greedy sign flips (not for odd sigma, whose sign the gradient cannot tell), directions
    from the linear least squares with the slopes sigma'(z_j.c_i) held fixed (the smooth analogue of the pattern
    ALS), per-sample norm profiles on a wide log grid. Finally Levenberg-Marquardt on all neurons, (C, rho) jointly.
    Returns (C, rho, relative residual, report)."""
    B = prob.B
    d = dirs / dirs.norm(dim=1, keepdim=True)
    full = prob
    sub = _subproblem(prob, 8192)
    zscale = float(sub.Z.std())
    grid = np.exp(np.linspace(math.log(0.05), math.log(200.0), 36)) / max(zscale, 1e-12)
    best = None
    for t in grid:
        _, res = _rho_ls(sub, t * d)
        if best is None or res < best[0]:
            best = (res, float(t))
    res, t = best
    C = t * d
    flips = 0
    fine = (0.6, 0.75, 0.87, 1.15, 1.33, 1.67)

    def norm_profile(C, res, wide: bool):
        """Per sample: the best norm among fine factors around the current one and (``wide``) on the absolute log
        grid (a sample drifting to a huge norm - the near-homogeneous regime of GELU-like activations - is pulled
        back)."""
        for i in range(B):
            n0 = float(C[i].norm())
            cur = (res, n0)
            for nrm in (list(grid) if wide else []) + [n0 * f for f in fine]:
                C2 = C.clone()
                C2[i] = C2[i] * (nrm / n0)
                _, r2 = _rho_ls(sub, C2)
                if r2 < cur[0]:
                    cur = (r2, float(nrm))
            if cur[1] != n0:
                C = C.clone()
                C[i] = C[i] * (cur[1] / n0)
                res = cur[0]
        return C, res

    alt = 0
    for alt in range(1, max(1, min(rounds, 8)) + 1):
        if not odd:
            for i in range(B):
                C2 = C.clone()
                C2[i] = -C2[i]
                _, r2 = _rho_ls(sub, C2)
                if r2 < res:
                    C, res = C2, r2
                    flips += 1
        Q, _ = _pattern_ls(sub, sub.act.grad(sub.Z @ C.T))
        nd = _dirs_from_Q(Q, C / C.norm(dim=1, keepdim=True))
        Cn = nd * C.norm(dim=1, keepdim=True)
        _, rn = _rho_ls(sub, Cn)
        Cn, rn = norm_profile(Cn, rn, wide=True)
        if rn < res * (1 - 1e-6):
            C, res = Cn, rn
        else:
            break
    rho, res = _rho_ls(full, C)
    lm_prob = _subproblem(full, 16384)
    C2, _, _, lm = _levenberg_marquardt(lm_prob, C, rho, iters=max(30, 3 * rounds))
    rho2, r2 = _rho_ls(full, C2)
    if math.isfinite(r2) and r2 < res:
        C, rho, res = C2, rho2, r2
    late = 0
    if not odd and res > 1e-16:
        # a wrong sign is a local minimum of its own (the odd part of GELU-like activations is linear): try each
        # flip followed by a short LM, keep what improves the fit
        for i in range(B):
            C2 = C.clone()
            C2[i] = -C2[i]
            rho2, _ = _rho_ls(lm_prob, C2)
            C2, _, _, _ = _levenberg_marquardt(lm_prob, C2, rho2, iters=max(8, rounds))
            rho2, r2 = _rho_ls(full, C2)
            if math.isfinite(r2) and r2 < res:
                C, rho, res = C2, rho2, r2
                late += 1
    return C, rho, res, {"initial_scale": t, "sign_flips": flips, "late_sign_flips": late,
                         "alternating_rounds": alt, **lm}


def _second_derivative(act: Activation, H: torch.Tensor) -> torch.Tensor:
    """sigma''(H) elementwise, by autograd through the activation's derivative."""
    with torch.enable_grad():
        h = H.detach().clone().requires_grad_(True)
        g = act.grad(h)
        if not g.requires_grad:  # piecewise-constant derivative
            return torch.zeros_like(H)
        (dd,) = torch.autograd.grad(g.sum(), h)
    return dd


def _lm_pieces(prob: _Problem, C: torch.Tensor, rho: torch.Tensor, a: int, b: int, jac: bool):
    """Residuals (obs - model) of neurons a:b, and with ``jac`` the Jacobian of the model (rows: the B first-layer
    coordinates then the K output-layer entries of each neuron; columns: C then rho)."""
    B, K = prob.B, prob.K
    Z, P, A, GA = prob.Z[a:b], prob.P[a:b], prob.A[:, a:b], prob.GA[:, a:b]
    H = Z @ C.T
    S1, S0 = prob.act.grad(H), prob.act.fn(H)
    beta = A.T @ rho.T  # (mc, B): sum_k A_kj rho_ik
    rP = P - (S1 * beta) @ C
    rA = GA.T - S0 @ rho  # (mc, K)
    r = torch.cat([rP, rA], dim=1).reshape(-1)
    if not jac:
        return r, None
    mc = Z.shape[0]
    S2 = _second_derivative(prob.act, H)
    eye = torch.eye(B, dtype=C.dtype)
    # first-layer rows (mc, B_out, ...)
    JPc = torch.einsum("ji,ib,je->jbie", S2 * beta, C, Z) + torch.einsum("ji,be->jbie", S1 * beta, eye)
    JPr = torch.einsum("ji,kj,ib->jbik", S1, A, C)
    # output-layer rows (mc, K_out, ...)
    JAc = torch.einsum("ik,ji,je->jkie", rho, S1, Z)
    JAr = torch.einsum("ji,kl->jkil", S0, torch.eye(K, dtype=C.dtype))
    top = torch.cat([JPc.reshape(mc, B, B * B), JPr.reshape(mc, B, B * K)], dim=2)
    bot = torch.cat([JAc.reshape(mc, K, B * B), JAr.reshape(mc, K, B * K)], dim=2)
    J = torch.cat([top, bot], dim=1).reshape(mc * (B + K), B * B + B * K)
    return r, J


def _levenberg_marquardt(prob: _Problem, C: torch.Tensor, rho: torch.Tensor, iters: int = 40,
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Levenberg-Marquardt on the smooth two-layer model over (C, rho) jointly, with the analytic Jacobian
    accumulated into J^T J chunk by chunk of neurons (memory O(chunk (B + K) n))."""
    B, K = prob.B, prob.K
    m = prob.Z.shape[0]
    scale2 = 1.0 / max(prob.norm2, 1e-300)
    nC = B * B

    def total(C_, rho_):
        return sum(float((_lm_pieces(prob, C_, rho_, a, min(m, a + chunk), False)[0] ** 2).sum())
                   for a in range(0, m, chunk)) * scale2

    rho, _ = _rho_ls(prob, C)
    f = total(C, rho)
    lam = 1e-3
    it = 0
    n = B * B + B * K
    for it in range(1, iters + 1):
        JtJ = torch.zeros(n, n, dtype=C.dtype)
        Jtr = torch.zeros(n, dtype=C.dtype)
        for a in range(0, m, chunk):
            r, J = _lm_pieces(prob, C, rho, a, min(m, a + chunk), True)
            JtJ += J.T @ J
            Jtr += J.T @ r
        diag = JtJ.diagonal().clamp_min(1e-30 * float(JtJ.diagonal().max().clamp_min(1e-300)))
        improved = False
        rel = 0.0
        for _ in range(12):
            try:
                step = torch.linalg.solve(JtJ + lam * torch.diag(diag), Jtr)
            except RuntimeError:
                lam *= 10
                continue
            C2 = C + step[:nC].reshape(B, B)
            rho2, _ = _rho_ls(prob, C2)  # variable projection: rho always at its optimum for C
            fc = total(C2, rho2)
            if math.isfinite(fc) and fc < f:
                rel = (f - fc) / max(f, 1e-300)
                C, rho, f = C2, rho2, fc
                lam = max(lam / 3, 1e-12)
                improved = True
                break
            lam *= 4
        if not improved or f < 1e-28 or rel < 1e-10:
            break
    return C, rho, f, {"lm_iterations": it}


def _fit_none(prob: _Problem, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """No direction refinement: signs by greedy flips and scales/residuals by least squares with the tensor's
    directions fixed (ReLU family: patterns; otherwise via the smooth model at the best common scale)."""
    if prob.act.positively_homogeneous:
        d = dirs.clone()
        Q, res = _pattern_ls(prob, _pattern(prob, d))
        for i in range(prob.B):
            d2 = d.clone()
            d2[i] = -d2[i]
            Q2, r2 = _pattern_ls(prob, _pattern(prob, d2))
            if r2 < res:
                d, Q, res = d2, Q2, r2
        return d, Q, res, {}
    C, rho, res, rep = _fit_smooth(prob, dirs, rounds=0, odd=False)
    return C, rho, res, rep


# ------------------------------------------------------------------------------------------------------------
# The solver (shared by the attack and the deep-network feature recovery)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Solution:
    coords: torch.Tensor  # (B, B) span coordinates c_i (pattern fits: unit signed directions)
    Q: torch.Tensor | None  # pattern fits: (B, K, B); q_i = Q_i c_i = t_i rho_i
    rho: torch.Tensor | None  # smooth fits: (B, K)
    residual: float
    homogeneous: bool
    report: dict


def _same_solution(a: _Solution, b: _Solution, tol: float = 1e-6) -> bool:
    """Two fits found the same inputs (up to order): every row of a matches a row of b to ``tol``."""
    ca = a.coords / a.coords.norm(dim=1, keepdim=True)
    cb = b.coords / b.coords.norm(dim=1, keepdim=True)
    if not a.homogeneous:
        ca, cb = a.coords, b.coords
        dist = torch.cdist(ca, cb) / cb.norm(dim=1).max().clamp_min(1e-300)
    else:
        dist = torch.cdist(ca, cb)
    return bool((dist.min(dim=1).values < tol).all())


def _reduce_classes(prob: _Problem) -> tuple[_Problem, torch.Tensor | None]:
    """With K > B classes, the residual vectors rho_i (K,) span at most B dimensions, and so do the rows of the
    output-layer gradient GA = rho^T sigma(Z C^T)^T: rotate the class space onto GA's top-B left singular vectors V
    (K, B) - A -> V^T A, GA -> V^T GA - which loses nothing of an exact gradient and turns every per-class cost
    from K into B. Returns (reduced problem, V or None)."""
    if prob.K <= prob.B:
        return prob, None
    U, _, _ = torch.linalg.svd(prob.GA, full_matrices=False)
    V = U[:, : prob.B]
    return _Problem(Z=prob.Z, P=prob.P, A=V.T @ prob.A, GA=V.T @ prob.GA, act=prob.act, s=prob.s), V


def _solve(prob: _Problem, o: TensorOptions, order: int, generator: torch.Generator, ctx: RunContext | None,
           odd: bool) -> tuple[_Solution, list[dict]]:
    """Every draw: moment tensor (random class combination), Jennrich, CP-ALS polish, gradient fit; returns the
    best fit (and a report per draw). Works in the reduced class space (:func:`_reduce_classes`) and maps the
    residuals back to the K classes."""
    full_prob = prob
    prob, V = _reduce_classes(prob)
    best, draws_report = _solve_reduced(prob, o, order, generator, ctx, odd)
    if V is not None:
        if best.Q is not None:
            best.Q = torch.einsum("ilb,kl->ikb", best.Q, V)
        if best.rho is not None:
            best.rho = best.rho @ V.T
        best.report["classes_reduced"] = f"{full_prob.K} -> {prob.K}"
    return best, draws_report


def _solve_reduced(prob: _Problem, o: TensorOptions, order: int, generator: torch.Generator,
                   ctx: RunContext | None, odd: bool) -> tuple[_Solution, list[dict]]:
    fit = o.fit
    if fit == "auto":
        fit = "patterns" if prob.act.positively_homogeneous else "nonlinear"
    estimator = "hidden" if o.estimator == "auto" else o.estimator
    seen: list[torch.Tensor] = []
    draws_report: list[dict] = []
    best: _Solution | None = None
    best_score = float("inf")
    agreements = 0
    for k in range(max(1, o.draws)):
        c = torch.ones(prob.K, dtype=torch.float64)
        if prob.K > 1:
            c = torch.randn(prob.K, generator=generator, dtype=torch.float64)
            c = c / c.norm()
        T = _moment(prob, order, estimator, c)
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
            coords, Q, res, frep = _fit_patterns(prob, V, o.fit_rounds)
            sol = _Solution(coords, Q, None, res, True, frep)
        elif fit == "nonlinear":
            coords, rho, res, frep = _fit_smooth(prob, V, o.fit_rounds, odd)
            sol = _Solution(coords, None, rho, res, False, frep)
        else:
            coords, QR, res, frep = _fit_none(prob, V)
            hom = prob.act.positively_homogeneous
            sol = _Solution(coords, QR if hom else None, None if hom else QR, res, hom, frep)
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


# ------------------------------------------------------------------------------------------------------------
# Norms, signs and labels
# ------------------------------------------------------------------------------------------------------------
def _residual_of_logits(loss_fn, logits: torch.Tensor, label: int) -> torch.Tensor:
    """Per-row dloss/dlogits (the residual r) for rows of logits (n, K) with one label."""
    lg = logits.detach().clone().requires_grad_(True)
    y = torch.full((lg.shape[0],), int(label), dtype=torch.long)
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
    taus = torch.exp(torch.linspace(math.log(typical * 1e-4), math.log(typical * 1e4), 801, dtype=torch.float64))
    out = []
    for y in labels:
        r = _residual_of_logits(loss_fn, taus[:, None] * F[None] + bias[None], y)
        mis = ((taus[:, None] * r - q[None]).norm(dim=1) / qn).numpy()
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
    zero = spec.denormalize(torch.zeros(1, *spec.shape, dtype=u.dtype))[0].reshape(-1)
    step = spec.denormalize(u.reshape(1, *spec.shape))[0].reshape(-1) - zero  # image change per unit tau
    with np.errstate(divide="ignore", invalid="ignore"):
        lim = torch.where(step > 0, (hi - zero) / step, torch.where(step < 0, (lo - zero) / step,
                                                                     torch.full_like(step, float("inf"))))
    lim = lim[torch.isfinite(lim)]
    if lim.numel() == 0:
        return 1.0
    return float(torch.quantile(lim.double(), frac))


# ------------------------------------------------------------------------------------------------------------
# The attack
# ------------------------------------------------------------------------------------------------------------
@register("tensor", aliases=("moment-tensor", "wang2023"))
class TensorAttack(Attack):
    """The moment-tensor attack of Wang, Lee & Lei (AISTATS 2023): all B samples from one gradient of a random
    two-layer network (Gaussian first layer), by Hermite moment tensors, Jennrich's algorithm and a fit of the
    raw gradient. Identifiability limits (signs for odd sigma, norms for the ReLU family) are resolved from the
    loss residual, a bias or a stated prior, reported per sample in ``info['samples']``."""

    paper = PAPER
    Options = TensorOptions
    presets = {
        # tensor directions only, as in the paper's statement of the algorithm (no gradient-fit refinement)
        "tensor-only": dict(fit="none", draws=10),
        "thorough": dict(draws=16, polish_sweeps=8, fit_rounds=40, refine_steps=50),
    }

    def check_options(self, o: TensorOptions) -> list[str]:
        p = []
        if o.order not in (0, 3, 4):
            p.append(f"order must be 0 (auto), 3 or 4, got {o.order}")
        if o.draws < 1:
            p.append(f"draws must be >= 1, got {o.draws}")
        if o.polish_sweeps < 0 or o.fit_rounds < 0 or o.refine_steps < 0:
            p.append("polish_sweeps, fit_rounds and refine_steps must be >= 0")
        if o.fit not in FITS:
            p.append(f"fit must be one of {FITS}, got {o.fit!r}")
        if o.estimator not in ESTIMATORS:
            p.append(f"estimator must be one of {ESTIMATORS}, got {o.estimator!r}")
        if o.batch_size not in BATCH:
            p.append(f"batch_size must be one of {BATCH}, got {o.batch_size!r}")
        if not (o.fit_tol >= 0):
            p.append(f"fit_tol must be >= 0, got {o.fit_tol}")
        return p

    def requirements(self, case: Case) -> list[str]:
        view = find_two_layer(case.model)
        if isinstance(view, list):
            return ["needs a two-layer network Linear -> activation -> Linear (e.g. the zoo's 'two-layer'): "
                    + "; ".join(view)]
        problems = _protocol_problems(case)
        if view.body:
            problems.append(f"needs a plain two-layer network; this model has {len(view.body)} layer(s) before its "
                            "Linear-activation-Linear head (use gradleak.attacks.tensor.recover_head_features for "
                            "the head's input features)")
        if view.activation.linear:
            problems.append("the activation is linear: mu_p = 0 for every p >= 2, no sample is identifiable")
        else:
            from ..risk.identifiability import hermite_order

            if self.options.order == 0 and hermite_order(view.activation) is None:
                problems.append(f"mu_p = 0 for every p <= 4 for activation {view.activation.name!r}: the moment "
                                "tensors vanish and the method cannot work")
        if case.batch_size > view.d_aug:
            problems.append(f"batch size {case.batch_size} exceeds the input dimension d = {view.d_aug}: the samples "
                            "cannot be linearly independent, the batch is not identifiable")
        if case.batch_size > view.width:
            problems.append(f"batch size {case.batch_size} exceeds the width {view.width}")
        params = case.parameters
        if self.options.check_weights:
            stats = weight_normality(params[view.weight_key], params[view.bias_key] if view.has_bias else None)
            msg = _normality_problem(stats)
            if msg:
                problems.append(msg)
        A = params[view.out_key]
        if view.num_outputs == 1 and bool((A == 0).any()):
            problems.append("some output weights a_j are 0: their neurons carry no first-layer gradient")
        return problems

    # --------------------------------------------------------------------------------------------------
    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        view = find_two_layer(case.model)
        spec = case.spec
        sol, prob, span, B, meta = _run(case, view, o, ctx)
        info: dict[str, Any] = dict(meta)
        d = view.d_in
        X, labels, samples, lab_source = _resolve_samples(case, view, sol, prob, span, B, prior="box")
        n_missing = case.batch_size - B
        if n_missing > 0:
            X = torch.cat([X, torch.zeros(n_missing, d, dtype=X.dtype)])
            if labels is not None and case.labels is not None:
                rest = _unused_labels(case.labels.tolist(), labels.tolist())
                labels = torch.cat([labels, torch.tensor(rest[:n_missing], dtype=torch.long)])
            elif labels is not None:
                labels = torch.cat([labels, torch.zeros(n_missing, dtype=torch.long)])
            samples += [{"unrecovered": True, "note": "the gradient spans fewer dimensions than the batch size; "
                         "filled with the data mean"} for _ in range(n_missing)]
        x_in = X.reshape(case.batch_size, *spec.shape).to(case.dtype)
        if labels is not None:
            labels = labels.to(case.device)
        if o.refine_steps > 0 and labels is not None:
            x_in, rinfo = _refine(case, x_in, labels, o.refine_steps)
            info["refinement"] = rinfo
        img = spec.denormalize(x_in)
        lo, hi = spec.value_range
        info["samples"] = samples
        info["labels_source"] = lab_source
        info["pixels_outside_range"] = float(((img < lo) | (img > hi)).double().mean())
        ctx.offer(sol.residual, img.clamp(lo, hi), labels)
        return Reconstruction(inputs=img, labels=labels, info=info)


def _unused_labels(known: list[int], used: list[int]) -> list[int]:
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


def _resolve_samples(case: Case, view: TwoLayerView, sol: _Solution, prob: _Problem, span: _Span, B: int,
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
    props = activation_properties_cached(view.activation)
    known = case.labels.tolist() if case.labels is not None else None
    label_set = sorted(set(known)) if known is not None else list(range(max(K, 2)))
    W = params[view.weight_key].double()
    A = params[view.out_key].double()
    ob = getattr(case.model.get_submodule(view.out), "bias", None)
    obias = ob.detach().double() if ob is not None else torch.zeros(K, dtype=torch.float64)
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
            signs = (1.0, -1.0) if props["odd"] else (1.0,)
            sign_how = "loss residual (odd activation: r(f(x), y) matched the fitted residual)" if props["odd"] \
                else "gradient"
            for sg in signs:
                lg = _head_logits(case, view, sg * x)
                for y in label_set:
                    rr = _residual_of_logits(case.loss_fn, lg[None], y)[0]
                    mis = float((rr - sg * r_fit).norm() / max(float(r_fit.norm()), 1e-300))
                    per.setdefault(y, []).append((mis, sg * x, "gradient (non-homogeneous activation)", sign_how))
            if props["odd"]:
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
                what = "sign" if props["odd"] and not sol.homogeneous else "norm"
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
    X = torch.stack(xs) if xs else torch.zeros(0, d, dtype=torch.float64)
    if known is not None:
        labels = torch.tensor([int(y) for y in labs], dtype=torch.long)
    elif all(y is not None for y in labs):
        labels = torch.tensor(labs, dtype=torch.long)
    else:
        labels, source = None, "unknown (the loss residual did not determine every label)"
    return X, labels, reports, source


_PROPS_CACHE: dict[str, dict] = {}


def activation_properties_cached(act: Activation) -> dict:
    from ..risk.identifiability import activation_properties

    if act.name not in _PROPS_CACHE:
        _PROPS_CACHE[act.name] = activation_properties(act)
    return _PROPS_CACHE[act.name]


def _refine(case: Case, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[torch.Tensor, dict]:
    """Gradient matching (squared distance relative to the observed update) from the tensor solution, L-BFGS."""
    target = case.observed
    norm = sum(float((v.double() ** 2).sum()) for v in target.values())
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")
    first = [None]

    def closure():
        opt.zero_grad()
        upd = case.update(x, labels, create_graph=True)
        loss = sum(((upd[k] - target[k]) ** 2).sum() for k in target) / norm
        loss.backward()
        if first[0] is None:
            first[0] = float(loss.detach())
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.enable_grad():
        upd = case.update(x.detach(), labels)
    final = float(sum(((upd[k] - target[k]) ** 2).sum() for k in target) / norm)
    if not math.isfinite(final) or (first[0] is not None and final > first[0]):
        return x0, {"steps": steps, "accepted": False, "start": first[0], "end": final}
    return x.detach(), {"steps": steps, "accepted": True, "start": first[0], "end": final}


# ------------------------------------------------------------------------------------------------------------
# The shared pipeline
# ------------------------------------------------------------------------------------------------------------
def _z_normality(Z: torch.Tensor, mirrored: bool) -> dict[str, float]:
    """Do the projected weights z_j = U^T w_j / s look i.i.d. N(0, I_B)? chi-square statistics of the sample mean
    and covariance (and their p-values): Stein's identity needs exactly this in the span of the data."""
    from scipy.stats import chi2

    if mirrored and Z.shape[0] % 2 == 0 and torch.equal(Z[: Z.shape[0] // 2], Z[Z.shape[0] // 2:]):
        Z = Z[: Z.shape[0] // 2]
    m, B = Z.shape
    mean = Z.mean(0)
    C = (Z.T @ Z) / m
    t_mean = float(m * (mean ** 2).sum())
    off = C - torch.diag(C.diagonal())
    t_cov = float(m * ((off ** 2).sum() / 2 + ((C.diagonal() - 1) ** 2).sum() / 2))
    dof_cov = B * (B + 1) // 2
    return {"mean_stat": t_mean, "mean_p": float(chi2.sf(t_mean, B)), "cov_stat": t_cov,
            "cov_p": float(chi2.sf(t_cov, dof_cov)), "neurons": m}


def _run(case: Case, view: TwoLayerView, o: TensorOptions, ctx: RunContext | None,
         generator: torch.Generator | None = None):
    """Span, projection, order, checks and the best fit over draws. Returns (solution, problem, span, B, info)."""
    from ..risk.identifiability import activation_properties, hermite_coefficients, hermite_order

    gen = ctx.generator if ctx is not None else generator
    params = case.parameters
    keys = [view.weight_key, view.out_key] + ([view.bias_key] if view.has_bias else [])
    g = _observed_gradient(case, keys)
    W = params[view.weight_key]
    s = float(W.double().pow(2).mean().sqrt()) if not view.has_bias else float(
        torch.cat([W.reshape(-1), params[view.bias_key].reshape(-1)]).double().pow(2).mean().sqrt())
    B_case = case.batch_size
    span = _span(g[view.weight_key], g[view.bias_key] if view.has_bias else None, B_case, gen)
    B = B_case if o.batch_size == "case" else span.rank_gap
    notes = []
    if span.numerical_rank < B:
        notes.append(f"the gradient spans only {span.numerical_rank} dimensions for {B} samples (duplicates, or samples "
                     "the model already fits have ~zero residual); recovering that many")
        B = max(1, span.numerical_rank)
    if B != span.rank_gap:
        notes.append(f"the singular-value gap suggests B = {span.rank_gap} (ratio {span.gap_ratio:.3g}); using B = {B}")
    U = span.U[:, :B]
    span = _Span(U=U, singular_values=span.singular_values, rank_gap=span.rank_gap, gap_ratio=span.gap_ratio,
                 numerical_rank=span.numerical_rank)
    prob = _project(case, view, U, s)
    zn = _z_normality(prob.Z, bool(getattr(case.model, "mirrored", False)))
    if min(zn["mean_p"], zn["cov_p"]) < 1e-6:
        msg = (f"the first-layer weights projected on the gradient's span are not N(0, I) (covariance p = "
               f"{zn['cov_p']:.2g}, mean p = {zn['mean_p']:.2g}): trained or data-dependent weights break Stein's "
               "identity")
        if o.check_weights:
            raise RequirementError("tensor", [msg + " (pass check_weights=False to run anyway)"])
        notes.append(msg)
    order = o.order or hermite_order(view.activation, math.sqrt(view.d_aug))
    props = activation_properties(view.activation)
    if ctx is not None:
        ctx.progress(max(1, o.draws))
    sol, draws = _solve(prob, o, order, gen, ctx, props["odd"])
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
        "identifiable": {"directions": True, "signs": not props["odd"] or view.has_bias,
                         "norms": (not props["positively_homogeneous"]) or view.has_bias},
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


def recover_directions(case: Case, *, generator: torch.Generator | None = None, seed: int = 0,
                       **options: Any) -> tuple[torch.Tensor, dict]:
    """The identifiable core of the attack: unit directions x_i / |x_i| (B, d) in the model's (normalised,
    flattened) input space, before any norm, sign or label is fixed (the sign is meaningful only where the
    activation identifies it; see ``info['identifiable']``). options: :class:`TensorOptions` fields, e.g.
    ``fit='none'`` for the tensor step alone. Returns (directions, solver report)."""
    attack = TensorAttack(**options)
    problems = attack.requirements(case)
    if problems:
        raise RequirementError("recover_directions", problems)
    view = find_two_layer(case.model)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    sol, prob, span, B, info = _run(case, view, attack.options, None, generator)
    E = (span.U.double() @ sol.coords.T).T[:, : view.d_in]
    return (E / E.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(case.dtype), info


# ------------------------------------------------------------------------------------------------------------
# Deep networks: the input features of a random two-layer head
# ------------------------------------------------------------------------------------------------------------
@dataclass
class HeadFeatures:
    """Recovered input features of a two-layer head: ``features`` (B, d_feat) (norm and sign as identifiable;
    see ``info['samples']``), ``directions`` (B, d_feat) unit vectors, ``body`` the module computing phi(x) (or
    None if the model is not an nn.Sequential and no body was given), and the solver report ``info``."""

    features: torch.Tensor
    directions: torch.Tensor
    body: nn.Module | None
    info: dict


def _sequential_body(model: nn.Module, view: TwoLayerView) -> nn.Module | None:
    if not isinstance(model, nn.Sequential):
        return None
    names = [n for n, _ in model.named_children()]
    top = view.hidden.split(".")[0]
    if top not in names:
        return None
    idx = names.index(top)
    return nn.Sequential(*[model[i] for i in range(idx)], nn.Flatten())


def recover_head_features(case: Case, *, body: nn.Module | None = None, generator: torch.Generator | None = None,
                          seed: int = 0, **options: Any) -> HeadFeatures:
    """Recover the B input features phi(x_i) of the model's final Linear -> activation -> Linear head (a wide
    random head with Gaussian first layer) from the case's gradient, with the moment-tensor attack's solver.

    body: the feature extractor phi (x_normalised -> (B, d_feat)); default: for an nn.Sequential model, every layer
    before the head. options: :class:`TensorOptions` fields. Norms follow the loss residual when it determines
    them; otherwise features are unit vectors whose sign is fixed by a non-negative-mean prior (post-ReLU
    features), stated in ``info['samples']``. Features come in no particular order (align with Hungarian).
    """
    view = find_two_layer(case.model)
    if isinstance(view, list):
        raise RequirementError("recover_head_features", view)
    o = TensorAttack(**options).options  # validates the option names and values
    problems = _protocol_problems(case)
    if case.batch_size > view.d_aug:
        problems.append(f"batch size {case.batch_size} exceeds the head's input dimension {view.d_aug}")
    params = case.parameters
    if o.check_weights:
        msg = _normality_problem(weight_normality(params[view.weight_key]))
        if msg:
            problems.append(msg)
    if problems:
        raise RequirementError("recover_head_features", problems)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    sol, prob, span, B, info = _run(case, view, o, None, generator)
    X, labels, samples, source = _resolve_samples(case, view, sol, prob, span, B, prior="nonneg")
    info["labels_source"] = source
    info["labels"] = None if labels is None else labels.tolist()
    feats = list(X)
    dirs = [x / x.norm().clamp_min(1e-300) for x in X]
    info["samples"] = samples
    if body is None:
        body = _sequential_body(case.model, view)
    F = torch.stack(feats).to(case.dtype)
    return HeadFeatures(features=F, directions=torch.stack(dirs).to(case.dtype), body=body, info=info)


def feature_matching_term(model_body: nn.Module, features_hat: torch.Tensor | HeadFeatures, *,
                          weight: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A regulariser for ``inverting-gradients`` (``regularizers=(term,)``): the mean over the batch of
    1 - cos^2(phi(x_b), z_hat_pi(b)), phi = ``model_body`` on normalised inputs, z_hat the recovered head features
    (B, d_feat) and pi the Hungarian assignment of the current features to the recovered ones (recomputed at every
    call, without gradient). cos^2 ignores the sign and norm, which the head's gradient may not identify.
    Follows Liu, Wang, Chen, Lei 2024 (the follow-up of the moment-tensor attack).

    Returns ``term(x_normalised (B, *shape)) -> 0-d tensor`` (times ``weight``)."""
    from scipy.optimize import linear_sum_assignment

    if isinstance(features_hat, HeadFeatures):
        features_hat = features_hat.features
    if not isinstance(model_body, nn.Module):
        raise ValidationError("feature_matching_term", [f"model_body must be an nn.Module, got {type(model_body).__name__}"])
    Zh = features_hat.detach()
    if Zh.ndim != 2:
        raise ValidationError("feature_matching_term", [f"features_hat must be (B, d_feat), got {tuple(Zh.shape)}"])
    Zh = Zh / Zh.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def term(x: torch.Tensor) -> torch.Tensor:
        phi = model_body(x).flatten(1)
        if phi.shape[1] != Zh.shape[1]:
            raise ValidationError("feature_matching_term", [f"the body outputs {phi.shape[1]} features, the recovered "
                                                            f"ones have {Zh.shape[1]}"])
        z = Zh.to(device=phi.device, dtype=phi.dtype)
        cos = (phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ z.T  # (B, B_hat)
        c2 = cos ** 2
        rows, cols = linear_sum_assignment(-c2.detach().cpu().double().numpy())
        return weight * (1.0 - c2[torch.as_tensor(rows), torch.as_tensor(cols)]).mean()

    return term
