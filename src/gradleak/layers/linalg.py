"""The one linear-algebra core of the per-layer systems: the tolerance rule, numerical rank, minimum-norm
solves and null spaces of positive semi-definite Gram matrices, and the head solver. Every rank or
minimum-norm computation of rgap, layerwise, risk/rank and risk/security goes through here (through
:class:`gradleak.layers.LayerSystem`, which picks the Gram side and the strategy).

The tolerance rule (ONE, everywhere)
    A singular value of the (block-balanced) system A counts as zero when it is at most
    ``tol = rtol * ||A||_F`` (:func:`tolerance`; ||A||_F^2 = trace of either Gram matrix, so A^T A and A A^T
    give the same threshold), ``rtol`` = :data:`DEFAULT_RTOL` unless the caller passes its own. On a Gram matrix
    G the same rule reads: eigenvalues / pivots at most tol^2 are zero. Every strategy applies it:

    - 'svd' (eigh of G: all singular values, rank and condition);
    - 'cholesky' (LAPACK's pivoted Cholesky dpstrf stopped at pivots <= tol^2: rank, condition estimate);
    - 'certificate' (Cholesky of G - (100 tol)^2 I succeeds: proves every singular value > 100 tol, so the rank
      is full under the rule; a failure decides nothing and falls back to 'cholesky');
    - the minimum-norm solvers: :func:`psd_solver` (pivoted Cholesky) and :class:`EigenPseudoInverse` (eigh,
      also the null-space projector) drop exactly the directions the rule calls zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import torch

from ..errors import ValidationError

#: Default numerical-rank tolerance: singular values of the block-balanced stacked system below
#: ``DEFAULT_RTOL * ||A||_F`` count as zero. Round-off in the float64 Gram matrix puts the singular values of
#: true null directions near sqrt(eps) * ||A|| ~ 1e-8 (and below); genuine small singular values of the
#: systems we analysed stay above 1e-5 * ||A||_F.
DEFAULT_RTOL = 1e-6

#: Full-rank certificate margin: Cholesky of A^T A - (margin * tol)^2 I must succeed.
CERTIFICATE_MARGIN = 100.0

RANK_METHODS = ("svd", "cholesky", "certificate", "auto")


def tolerance(fro2: float, rtol: float = DEFAULT_RTOL) -> float:
    """THE rule: the absolute singular-value threshold rtol * ||A||_F from ||A||_F^2 = ``fro2``."""
    return rtol * math.sqrt(max(float(fro2), 0.0))


def head_solve(grad: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The one head solver: for dL/dW = k x^T (a dense layer, one sample), x = dW^T k / ||k||^2 (the least
    squares form of x = dW[j, :] / k[j]). grad (out, in), k (out,) -> (in,). ||k|| = 0 raises ValueError."""
    k = k.reshape(-1)
    kk = float(k @ k)
    if kk == 0.0:
        raise ValueError("head_solve: k is zero (a zero gradient leaks nothing)")
    return grad.reshape(k.numel(), -1).T @ k / kk


def full_rank_certificate(G: torch.Tensor, tol: float, margin: float = CERTIFICATE_MARGIN) -> bool:
    """True if Cholesky of G - (margin tol)^2 I succeeds, which proves sigma_min(A) > margin * tol (rounding in
    the factorisation is ~ n eps ||A||_F^2, far below (margin tol)^2 for margin * rtol >> sqrt(n eps))."""
    n = G.shape[0]
    shift = (margin * tol) ** 2
    _, info = torch.linalg.cholesky_ex(G - shift * torch.eye(n, dtype=G.dtype))
    return int(info) == 0


@dataclass
class RankInfo:
    """Numerical rank of a stacked system. sigma_*: singular values of the block-balanced system (None when
    not computed); tolerance: absolute threshold on singular values (rtol * ||A||_F); method: 'svd' (all
    singular values from the Gram matrix's eigenvalues), 'cholesky' (pivoted Cholesky, rank and a condition
    estimate), 'certificate' (full rank proven by one Cholesky) or 'zero' (A = 0)."""

    rank: int
    unknowns: int
    rtol: float
    tolerance: float
    method: str
    sigma_max: float | None = None
    sigma_min: float | None = None  # smallest singular value counted in the rank
    sigma_next: float | None = None  # largest singular value below the tolerance
    condition_estimate: float | None = None  # LAPACK estimate when the singular values were not computed
    side: str | None = None  # 'columns' (A^T A) or 'rows' (A A^T), set by LayerSystem.rank
    constraints: int | None = None  # rows of A, set by LayerSystem.rank

    @property
    def deficiency(self) -> int:
        return self.unknowns - self.rank

    @property
    def condition(self) -> float | None:
        """sigma_max / sigma_min (of the retained singular values), or the estimate."""
        if self.sigma_max is None or not self.sigma_min:
            return self.condition_estimate
        return self.sigma_max / self.sigma_min

    def to_dict(self) -> dict:
        return {"rank": self.rank, "unknowns": self.unknowns, "deficiency": self.deficiency, "rtol": self.rtol,
                "tolerance": self.tolerance, "method": self.method, "sigma_max": self.sigma_max,
                "sigma_min": self.sigma_min, "sigma_next": self.sigma_next, "condition": self.condition,
                "side": self.side, "constraints": self.constraints}


def numerical_rank(gram: torch.Tensor, *, rtol: float = DEFAULT_RTOL, method: str = "svd") -> RankInfo:
    """Numerical rank of A from its Gram matrix G = A^T A (n, n) (or A A^T: same non-zero singular values):
    the number of singular values of A above :func:`tolerance` (rtol ||A||_F, ||A||_F^2 = trace G).
    method 'svd': eigenvalues of G (O(n^3), all singular values); 'cholesky': LAPACK pivoted Cholesky with pivot
    threshold tol^2 (about 4x faster, rank and a condition estimate); 'certificate': first try the full-rank
    certificate (:func:`full_rank_certificate`, one plain Cholesky), then 'cholesky' if it fails."""
    if method not in ("svd", "cholesky", "certificate"):
        raise ValidationError("numerical_rank", [f"method must be 'svd', 'cholesky' or 'certificate', got {method!r}"])
    G = gram.detach().to(torch.float64).cpu()
    n = G.shape[0]
    fro2 = float(G.diagonal().sum())
    tol = tolerance(fro2, rtol)
    if n == 0 or fro2 == 0.0:
        return RankInfo(0, n, rtol, tol, "zero" if method == "certificate" else method, 0.0, None, None)
    if method == "certificate":
        if full_rank_certificate(G, tol):
            return RankInfo(n, n, rtol, tol, "certificate")
        method = "cholesky"
    if method == "svd":
        lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0).sqrt()
        keep = lam > tol
        r = int(keep.sum())
        return RankInfo(r, n, rtol, tol, "svd", float(lam[0]), float(lam[r - 1]) if r else None,
                        float(lam[r]) if r < n else None)
    if method == "cholesky":
        anorm = float(G.abs().sum(dim=0).max())
        U, _, r, _ = sla.lapack.dpstrf(G.numpy().T.copy(order="F"), tol=tol * tol, lower=0, overwrite_a=1)
        r = int(r)
        R11 = U[:r, :r] if r < n else U
        if r < n:
            R11 = np.asfortranarray(np.triu(R11))
            anorm = float(np.abs(R11).sum(axis=0).max() * np.abs(R11).sum(axis=1).max())
        rcond, _ = sla.lapack.dpocon(R11, anorm) if r else (0.0, 0)
        cond = math.sqrt(1.0 / rcond) if rcond > 0 else None
        return RankInfo(r, n, rtol, tol, "cholesky", condition_estimate=cond)
    raise AssertionError(method)


def psd_solver(G: torch.Tensor, tol: float):
    """Factor the PSD matrix G (N, N) in place with LAPACK's pivoted Cholesky (pivots below tol^2 stop it) and
    return (gsolve, rank, condition estimate of the retained part's square root, method tag), where gsolve(v)
    is the minimum-norm solution of G y = v (the exact solution when G has full rank)."""
    N = G.shape[0]
    anorm = float(G.abs().sum(dim=0).max())
    # G is symmetric, so its transpose is the Fortran-ordered array LAPACK wants: no copy
    U, piv, r, _ = sla.lapack.dpstrf(G.numpy().T, tol=tol * tol, lower=0, overwrite_a=1)
    r, piv = int(r), piv - 1
    if r == N:
        def gsolve(v: np.ndarray) -> np.ndarray:
            y = sla.solve_triangular(U, v[piv], trans="T", lower=False, check_finite=False)
            y = sla.solve_triangular(U, y, lower=False, check_finite=False)
            out = np.empty_like(y)
            out[piv] = y
            return out

        rcond, _ = sla.lapack.dpocon(U, anorm)
        return gsolve, r, (math.sqrt(1.0 / rcond) if rcond > 0 else float("inf")), "cholesky"
    # rank r < N: G[piv][:, piv] = R^T R with R = [R11 R12] (r x N); G y = v gives R P y = R11^-T (P v)[:r],
    # whose minimum-norm solution is P^T R^T (R R^T)^-1 R11^-T (P v)[:r]
    R = np.triu(U[:r, :])
    RRt = sla.cho_factor(R @ R.T, lower=False, check_finite=False)

    def gsolve(v: np.ndarray) -> np.ndarray:
        y = sla.solve_triangular(R[:, :r], v[piv][:r], trans="T", lower=False, check_finite=False)
        yp = R.T @ sla.cho_solve(RRt, y, check_finite=False)
        out = np.empty_like(yp)
        out[piv] = yp
        return out

    R11 = np.asfortranarray(R[:, :r])
    # 1-norm of R11^T R11 bounded by ||R11||_1 ||R11||_inf (an estimate, like dpocon's)
    anorm11 = float(np.abs(R11).sum(axis=0).max() * np.abs(R11).sum(axis=1).max())
    rcond, _ = sla.lapack.dpocon(R11, anorm11)
    return gsolve, r, (math.sqrt(1.0 / rcond) if rcond > 0 else float("inf")), "cholesky-minnorm"

class EigenPseudoInverse:
    """H^+ of a PSD Gram matrix H from its eigenvectors, dropping eigenvalues with sqrt(lambda) <= tol (the
    rule). rank, condition (sigma_max / smallest kept sigma), ``apply(v)`` = H^+ v, ``null_basis`` (the dropped
    eigenvectors). The 'rows-eigh' strategy of an underdetermined system (H = A A^T) and the null-space
    projector of any system."""

    def __init__(self, H: torch.Tensor, rtol: float = DEFAULT_RTOL):
        lam, V = torch.linalg.eigh(H.detach().to(torch.float64).cpu())
        sig = lam.clamp_min(0).sqrt()
        self.tol = tolerance(float(lam.clamp_min(0).sum()), rtol)
        keep = sig > self.tol
        self.rank = int(keep.sum())
        self.size = int(H.shape[0])
        self.V = V[:, keep].contiguous()
        self.lam = lam[keep].contiguous()
        self.null_basis = V[:, ~keep].contiguous()
        self.condition = float(sig.max() / sig[keep].min()) if self.rank else None

    def apply(self, v: np.ndarray | torch.Tensor) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float64)
        return (self.V @ ((self.V.T @ t) / self.lam)).numpy()
