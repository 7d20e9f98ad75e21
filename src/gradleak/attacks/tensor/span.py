"""The gradient's span and the two-layer gradient projected onto it: the B-dimensional problem every later step
works on (:class:`SpanProblem`), and the implicit moment tensors built from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...activations import Activation
from ...case import Case
from .moments import MomentTensor
from .view import TwoLayerView, observed_gradient


@dataclass
class Span:
    U: torch.Tensor  # (d_aug, B) orthonormal, case dtype
    singular_values: list[float]
    rank_gap: int
    gap_ratio: float
    numerical_rank: int


def top_span(gW: torch.Tensor, gb: torch.Tensor | None, B: int, generator: torch.Generator) -> Span:
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

    omega = torch.randn(da, k, generator=generator, dtype=torch.float64).to(device=gW.device, dtype=gW.dtype)
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
    return Span(U=U, singular_values=sv, rank_gap=gap_idx, gap_ratio=float(max(ratios) if ratios else float("inf")),
                 numerical_rank=nrank)


@dataclass
class SpanProblem:
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


def project(case: Case, view: TwoLayerView, U: torch.Tensor, s: float) -> SpanProblem:
    params = case.parameters
    keys = [view.weight_key, view.out_key] + ([view.bias_key] if view.has_bias else [])
    g = observed_gradient(case, keys)
    W = params[view.weight_key]
    d = view.d_in
    Z = W @ U[:d]
    P = g[view.weight_key] @ U[:d]
    if view.has_bias:
        Z = Z + params[view.bias_key][:, None] * U[d:d + 1]
        P = P + g[view.bias_key][:, None] * U[d:d + 1]
    return SpanProblem(Z=(Z / s).double(), P=(P * s).double(), A=params[view.out_key].double(),
                    GA=g[view.out_key].double(), act=view.activation, s=s)


def moment_tensor(prob: SpanProblem, order: int, estimator: str, c: torch.Tensor) -> MomentTensor:
    """The implicit moment tensor for class combination c (K,)."""
    if estimator == "output":
        return MomentTensor(prob.Z, order=order, g=c @ prob.GA)
    v = (prob.A ** 2).mean(dim=1).clamp_min(1e-300)  # (K,) variance of the output weights per class
    omega = (c[:, None] * prob.A / v[:, None]).sum(0)  # (m,): E[omega_j A_kj] = c_k
    return MomentTensor(prob.Z, order=order, y=prob.P * omega[:, None])


def subproblem(prob: SpanProblem, n: int) -> SpanProblem:
    """The first n neurons (the neurons are i.i.d., so this is a random subsample)."""
    if prob.Z.shape[0] <= n:
        return prob
    return SpanProblem(Z=prob.Z[:n], P=prob.P[:n], A=prob.A[:, :n], GA=prob.GA[:, :n], act=prob.act, s=prob.s)


def reduce_classes(prob: SpanProblem) -> tuple[SpanProblem, torch.Tensor | None]:
    """With K > B classes, the residual vectors rho_i (K,) span at most B dimensions, and so do the rows of the
    output-layer gradient GA = rho^T sigma(Z C^T)^T: rotate the class space onto GA's top-B left singular vectors V
    (K, B) - A -> V^T A, GA -> V^T GA - which loses nothing of an exact gradient and turns every per-class cost
    from K into B. Returns (reduced problem, V or None)."""
    if prob.K <= prob.B:
        return prob, None
    U, _, _ = torch.linalg.svd(prob.GA, full_matrices=False)
    V = U[:, : prob.B]
    return SpanProblem(Z=prob.Z, P=prob.P, A=V.T @ prob.A, GA=V.T @ prob.GA, act=prob.act, s=prob.s), V
