"""One layer's stacked, block-balanced system [K(k); W] x = [dW; z - b] (:class:`LayerSystem`) and its
least-squares, minimum-norm :class:`Solution`. The system picks the smaller Gram side and the strategy; the
rank / solve / null-space arithmetic and the tolerance rule are those of :mod:`gradleak.layers.linalg`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ..errors import ValidationError
from .linalg import DEFAULT_RTOL, EigenPseudoInverse, RankInfo, numerical_rank, psd_solver, tolerance
from .rules import Layer


@dataclass
class Solution:
    """The least-squares, minimum-norm solution of one layer's stacked system.

    x: (*in_shape) the layer's input (float64); rank / unknowns / deficiency: numerical rank of the balanced
    stacked system; constraints: its rows (gradient + weight); residual: ||A x - b|| / ||b|| (balanced);
    residual_gradient / residual_weight: the same per block, relative to that block's right-hand side;
    condition: sigma_max / sigma_min estimate (None if unknown); method: 'cholesky', 'cholesky-minnorm' or 'lsqr'.
    """

    x: torch.Tensor
    rank: int
    unknowns: int
    constraints: int
    residual: float
    residual_gradient: float
    residual_weight: float
    condition: float | None
    method: str
    rtol: float
    iterations: int = 0

    @property
    def deficiency(self) -> int:
        return self.unknowns - self.rank

    @property
    def deficient(self) -> bool:
        return self.rank < self.unknowns


def _t64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64).cpu()


class LayerSystem:
    """The stacked, block-balanced system of one layer for one sample:

        [ wg * K(k) ]  x  =  [ wg * vec(grad)  ]        wg = 1 / ||K(k)||_F
        [ ww * W    ]        [ ww * (z - bias) ]        ww = 1 / ||W||_F

    layer: the :class:`Layer`; weight: its weight tensor; k: dL/dz (*out_shape), the back-propagated map
    (R-GAP's k_i, the layer-wise attack's delta_i); grad: the observed dL/dW (None: no gradient block);
    target: z - bias, the pre-activation minus bias ((*out_shape); None: no weight block).
    ``blocks`` chooses the blocks ('gradient', 'weight'); ``balance`` False keeps the raw scales (wg = ww = 1).
    Everything is float64 on the CPU. Built once, it gives the Gram matrix, the rank and the solution.
    """

    def __init__(self, layer: Layer, weight: torch.Tensor, k: torch.Tensor | None, grad: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, *, blocks: Sequence[str] = ("gradient", "weight"),
                 balance: bool = True, weight_ratio: float = 1.0):
        bad = [b for b in blocks if b not in ("gradient", "weight")]
        if bad or not blocks:
            raise ValidationError("LayerSystem", [f"blocks must be a subset of ('gradient', 'weight'), got {tuple(blocks)}"])
        self.layer = layer
        self.weight = _t64(weight)
        self.k = None if k is None else _t64(k).reshape(layer.out_shape)
        self.grad = None if grad is None else _t64(grad).reshape(layer.weight_shape)
        self.target = None if target is None else _t64(target).reshape(layer.out_shape)
        self.use_grad = "gradient" in blocks
        self.use_weight = "weight" in blocks
        if self.use_grad and self.k is None:
            raise ValidationError("LayerSystem", ["the gradient block needs the back-propagated map k"])
        if self.use_grad:
            n2 = layer.grad_norm2(self.k)
            self.wg = (1.0 / math.sqrt(n2) if balance and n2 > 0 else 1.0)
        else:
            self.wg = 0.0
        if self.use_weight:
            n2 = layer.weight_norm2(self.weight)
            self.ww = (1.0 / math.sqrt(n2) if balance and n2 > 0 else 1.0) * float(weight_ratio)
        else:
            self.ww = 0.0
        self._gram: torch.Tensor | None = None
        self._rows: tuple | None = None

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def unknowns(self) -> int:
        return self.layer.n_in

    @property
    def constraints(self) -> int:
        return self.layer.n_weights * self.use_grad + self.layer.n_out * self.use_weight

    # ---- operators -----------------------------------------------------------------------------------
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x (n_in,) -> (constraints,) balanced."""
        x = x.reshape(1, *self.layer.in_shape)
        parts = []
        if self.use_grad:
            parts.append(self.wg * self.layer.apply_grad(self.k, x[0]).reshape(-1))
        if self.use_weight:
            parts.append(self.ww * self.layer.apply_weight(x, self.weight).reshape(-1))
        return torch.cat(parts)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """A^T r for r (constraints,) -> (n_in,)."""
        out = torch.zeros(self.layer.n_in, dtype=torch.float64)
        off = 0
        if self.use_grad:
            m = self.layer.n_weights
            out += self.wg * self.layer.apply_grad_T(self.k, r[off:off + m].reshape(self.layer.weight_shape)).reshape(-1)
            off += m
        if self.use_weight:
            m = self.layer.n_out
            out += self.ww * self.layer.apply_weight_T(r[off:off + m].reshape(1, *self.layer.out_shape),
                                                       self.weight).reshape(-1)
        return out

    def rhs(self) -> torch.Tensor:
        """b (constraints,) balanced; blocks without data are zero."""
        parts = []
        if self.use_grad:
            g = self.grad if self.grad is not None else torch.zeros(self.layer.weight_shape, dtype=torch.float64)
            parts.append(self.wg * g.reshape(-1))
        if self.use_weight:
            t = self.target if self.target is not None else torch.zeros(self.layer.out_shape, dtype=torch.float64)
            parts.append(self.ww * t.reshape(-1))
        return torch.cat(parts)

    def sparse(self) -> tuple[sp.csr_array, np.ndarray]:
        """(A, b) as a scipy sparse matrix and a vector (vectorised index arithmetic, no dense blocks)."""
        blocks = []
        if self.use_grad:
            blocks.append(self.wg * self.layer.grad_matrix(self.k))
        if self.use_weight:
            blocks.append(self.ww * self.layer.weight_matrix(self.weight))
        return sp.csr_array(sp.vstack(blocks, format="csr")), self.rhs().numpy()

    def operator(self) -> spla.LinearOperator:
        """A as a matrix-free scipy LinearOperator (convolutions and their adjoints)."""
        return spla.LinearOperator((self.constraints, self.unknowns), dtype=np.float64,
                                   matvec=lambda v: self.matvec(torch.from_numpy(np.asarray(v).reshape(-1))).numpy(),
                                   rmatvec=lambda v: self.rmatvec(torch.from_numpy(np.asarray(v).reshape(-1))).numpy())

    def gram(self) -> torch.Tensor:
        """A^T A (n_in, n_in), from the structured Gram blocks (cached)."""
        if self._gram is None:
            self._gram = self._build_gram()
        return self._gram

    def _build_gram(self) -> torch.Tensor:
        G = torch.zeros(self.unknowns, self.unknowns, dtype=torch.float64)
        if self.use_weight:
            self.layer.add_gram_weight(G, self.weight, self.ww ** 2)
        if self.use_grad:
            self.layer.add_gram_grad(G, self.k, self.wg ** 2)
        return G

    def normal_rhs(self) -> torch.Tensor:
        """A^T b (n_in,)."""
        return self.rmatvec(self.rhs())

    # ---- analysis --------------------------------------------------------------------------------------
    def residuals(self, x: torch.Tensor) -> tuple[float, float, float]:
        """(total, gradient block, weight block) relative residuals of ``x`` (nan for an absent block)."""
        x = _t64(x).reshape(-1)
        Ax, b = self.matvec(x), self.rhs()
        total = float((Ax - b).norm() / b.norm().clamp_min(1e-300))
        off, rg, rw = 0, float("nan"), float("nan")
        if self.use_grad:
            m = self.layer.n_weights
            rg = float((Ax[:m] - b[:m]).norm() / b[:m].norm().clamp_min(1e-300))
            off = m
        if self.use_weight:
            rw = float((Ax[off:] - b[off:]).norm() / b[off:].norm().clamp_min(1e-300))
        return total, rg, rw

    def row_gram(self) -> torch.Tensor:
        """A A^T (constraints, constraints) from the sparse matrices: the smaller Gram matrix when a layer has
        fewer constraints than unknowns (same nonzero singular values, same Frobenius norm)."""
        A, _ = self.sparse()
        return torch.from_numpy((A @ A.T).toarray())

    @property
    def wide(self) -> bool:
        """Fewer constraints than unknowns: the row Gram matrix is the smaller one (and the system is deficient)."""
        return self.constraints < self.unknowns

    def rank(self, *, rtol: float = DEFAULT_RTOL, method: str = "svd") -> RankInfo:
        """Numerical rank of the balanced stacked system (:func:`~gradleak.layers.linalg.numerical_rank`, the
        one tolerance rule; method 'svd' | 'cholesky' | 'certificate'), from the smaller of A^T A and A A^T
        (``info.side``). A dense layer (``layer.dense``) with k != 0 has K^T K = ||k||^2 I: its rank is full
        without a factorisation (method 'closed-form'). Leaves the cached Gram matrix intact."""
        n, m = self.unknowns, self.constraints
        if self.use_grad and self.layer.dense and not self.wide and self.layer.grad_norm2(self.k) > 0:
            fro2 = self.wg ** 2 * self.layer.grad_norm2(self.k)
            if self.use_weight:
                fro2 += self.ww ** 2 * self.layer.weight_norm2(self.weight)
            info = RankInfo(n, n, rtol, tolerance(fro2, rtol), "closed-form")
        elif self.wide:
            info = numerical_rank(self.row_gram(), rtol=rtol, method=method)
            info.unknowns, info.side = n, "rows"
        else:
            info = numerical_rank(self.gram(), rtol=rtol, method=method)
            info.side = "columns"
        info.constraints = m
        info.side = info.side or "columns"
        return info

    def rows_pinv(self, rtol: float = DEFAULT_RTOL) -> EigenPseudoInverse:
        """(A A^T)^+ by eigh (the 'rows-eigh' strategy of an underdetermined system; cached per rtol)."""
        if self._rows is None or self._rows[0] != rtol:
            A, _ = self.sparse()
            self._rows = (rtol, EigenPseudoInverse(torch.from_numpy((A @ A.T).toarray()), rtol), A, A.T.tocsr())
        return self._rows[1]

    def null_projector(self, rtol: float = DEFAULT_RTOL) -> "NullProjector":
        """The orthogonal projector onto the null space of A (directions the rule calls zero): from A A^T when
        the system is wide (P g = g - A^T (A A^T)^+ A g), else from the eigenvectors of A^T A."""
        if self.wide:
            H = self.rows_pinv(rtol)
            _, _, A, AT = self._rows
            return NullProjector(self.unknowns - H.rank,
                                 lambda g: g - torch.from_numpy(AT @ H.apply(A @ g.detach().numpy())))
        E = EigenPseudoInverse(self.gram(), rtol)
        N = E.null_basis
        return NullProjector(E.rank, lambda g: N @ (N.T @ g))

    def solve(self, *, rtol: float = DEFAULT_RTOL, method: str = "auto", refine: int = 1,
              max_dense: int = 12000, lsqr_iterations: int = 20000) -> Solution:
        """Least squares, minimum norm. method 'auto': 'direct' when the smaller Gram matrix has at most
        ``max_dense`` rows, else 'lsqr'. 'direct': the Gram matrix (A^T A, or A A^T when there are fewer
        constraints than unknowns) + LAPACK pivoted Cholesky, rank-revealing with the threshold
        (rtol ||A||_F)^2. Full rank: triangular solves. Rank r below the Gram size: the minimum-norm solution
        from the r x N pivoted factor R (y = P^T R^T (R R^T)^-1 R11^-T (P v)[:r]). Then ``refine`` steps of
        residual correction (r = b - A x, x += A^+ r, which brings the error back to about cond(A) * eps).
        'lsqr': matrix-free LSQR (rank not computed; reported as full, condition None)."""
        n = self.unknowns
        if method == "auto":
            method = "direct" if min(n, self.constraints) <= max_dense else "lsqr"
        if method == "rows-eigh":  # x = A^T (A A^T)^+ b by eigh, for an underdetermined system
            if not self.wide:
                raise ValidationError("LayerSystem.solve", ["method 'rows-eigh' needs fewer constraints than unknowns"])
            H = self.rows_pinv(rtol)
            _, _, A, AT = self._rows
            b = self.rhs().numpy()
            x = AT @ H.apply(b)
            for _ in range(int(refine)):
                x = x + AT @ H.apply(b - A @ x)
            x = torch.from_numpy(x)
            tot, rg, rw = self.residuals(x)
            return Solution(x.reshape(self.layer.in_shape), H.rank, n, self.constraints, tot, rg, rw, H.condition,
                            "rows-eigh", rtol)
        if method == "lsqr":
            res = spla.lsqr(self.operator(), self.rhs().numpy(), atol=1e-15, btol=1e-15, conlim=1e12,
                            iter_lim=lsqr_iterations)
            x = torch.from_numpy(res[0])
            tot, rg, rw = self.residuals(x)
            return Solution(x.reshape(self.layer.in_shape), n, n, self.constraints, tot, rg, rw, None, "lsqr",
                            rtol, iterations=int(res[2]))
        if method != "direct":
            raise ValidationError("LayerSystem.solve", [f"method must be 'auto', 'direct', 'lsqr' or 'rows-eigh', "
                                                        f"got {method!r}"])
        wide = self.wide
        G = self.row_gram() if wide else self.gram()
        self._gram = None  # the factorisation below overwrites it
        b = self.rhs()
        fro2 = float(G.diagonal().sum())
        if fro2 == 0.0:
            x = torch.zeros(n, dtype=torch.float64)
            tot, rg, rw = self.residuals(x)
            return Solution(x.reshape(self.layer.in_shape), 0, n, self.constraints, tot, rg, rw, None, "direct", rtol)
        gsolve, r, cond, tag = psd_solver(G, tolerance(fro2, rtol))
        if wide:  # x = A^T (A A^T)^+ b
            pinv = lambda v: self.rmatvec(torch.from_numpy(gsolve(v.numpy()))) # noqa: E731
        else:  # x = (A^T A)^+ A^T b
            pinv = lambda v: torch.from_numpy(gsolve(self.rmatvec(v).numpy()))  # noqa: E731
        x = pinv(b)
        for _ in range(int(refine)):
            x = x + pinv(b - self.matvec(x))
        tot, rg, rw = self.residuals(x)
        return Solution(x.reshape(self.layer.in_shape), r, n, self.constraints, tot, rg, rw, cond,
                        tag + ("-rows" if wide else ""), rtol)


@dataclass
class NullProjector:
    """Orthogonal projector onto the null space of a layer's system: ``project(g)`` (g (n,) float64);
    ``rank`` of the system under the tolerance rule."""

    rank: int
    _apply: object

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return self._apply(g)
