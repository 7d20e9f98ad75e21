"""Hermite moment tensors of a random two-layer network and their decomposition.

The moment-tensor attack of Wang, Lee & Lei ("Reconstructing Training Data from Model Gradient, Provably",
AISTATS 2023) rests on Stein's identity: for w ~ N(0, I) and a smooth enough sigma,

    E[sigma(w^T x) He_p(w)] = mu_p(|x|) x^{(x)p},    mu_p(s) = E_{z ~ N(0,1)}[sigma^(p)(s z)],

where He_p is the probabilists' Hermite tensor (He_1(z) = z, He_2(z) = z z^T - I, He_3(z)_abc = z_a z_b z_c -
(d_ab z_c + d_ac z_b + d_bc z_a), ...). Averaging neuron-wise gradients against He_p of the neurons' weights
therefore estimates a symmetric tensor sum_i lambda_i v_i^{(x)p} whose components are the (projected) samples.

This module holds the tensor machinery, independent of any model:

- :func:`hermite_form`: multilinear forms He_n(z)[u_1, ..., u_k, I, I] for many z at once (vectorised).
- :class:`MomentTensor`: the empirical moment tensor T = (1/m) sum_j y_j (x) He_{p-1}(z_j) (vector weights, from
  the first-layer gradient) or (1/m) sum_j g_j He_p(z_j) (scalar weights, from the output-layer gradient), kept
  implicit: every contraction costs O(m B^2) and no B^p or d^p array is formed (``dense()`` exists for tests).
- :func:`jennrich`: Jennrich's simultaneous diagonalisation of two random slices, several draws ranked by the
  smallest eigenvalue gap; :func:`cp_als_polish`: CP alternating least squares on the implicit tensor.
- :func:`full_moment_tensor` and :func:`cp_oracle`: the small-d path that forms the d^p tensor and decomposes it
  with tensorly's ``parafac``; it exists as an oracle for the tests, never for real sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ...errors import ValidationError

__all__ = ["hermite_form", "hermite_tensor", "MomentTensor", "JennrichDraw", "jennrich", "cp_als_polish",
           "full_moment_tensor", "cp_oracle", "direction_error", "cp_objective"]


# ------------------------------------------------------------------------------------------------------------
# Hermite multilinear forms
# ------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _matchings(n: int) -> tuple[tuple[tuple[tuple[int, int], ...], tuple[int, ...]], ...]:
    """Every partial matching of slots 0..n-1 as (pairs, unmatched slots)."""
    out = []

    def rec(rest: tuple[int, ...], pairs: tuple, single: tuple):
        if not rest:
            out.append((pairs, single))
            return
        first, others = rest[0], rest[1:]
        rec(others, pairs, single + (first,))
        for k, b in enumerate(others):
            rec(others[:k] + others[k + 1:], pairs + ((first, b),), single)

    rec(tuple(range(n)), (), ())
    return tuple(out)


def hermite_form(z: torch.Tensor, vectors: Sequence[torch.Tensor], free: int = 0) -> torch.Tensor:
    """The multilinear form of the Hermite tensor He_n(z_j), n = len(vectors) + free, evaluated for every row z_j.

    z: (m, B). vectors: n - free tensors of shape (R, B) (R components evaluated at once; slot c gets
    ``vectors[c][r]`` for component r). free: 0, 1 or 2 slots left open (the last ones).
    Returns (m, R) for free=0, (m, R, B) for free=1, (m, R, B, B) for free=2.

    He_n(z)[u_1..u_n] = sum over partial matchings pi of the slots of (-1)^{|pi|} prod_{(a,b) in pi} <u_a, u_b>
    prod_{c unmatched} <z, u_c>; with open slots the unmatched open slot contributes z, an open slot matched to c
    contributes u_c and two open slots matched together contribute the identity.
    """
    if free not in (0, 1, 2):
        raise ValidationError("hermite_form", [f"free must be 0, 1 or 2, got {free}"])
    m, B = z.shape
    if vectors:
        R = vectors[0].shape[0]
    else:
        R = 1
    k = len(vectors)
    n = k + free
    s = [z @ v.T for v in vectors]  # (m, R) each
    g = {(a, b): (vectors[a] * vectors[b]).sum(-1) for a in range(k) for b in range(a + 1, k)}  # (R,)
    shape = {0: (m, R), 1: (m, R, B), 2: (m, R, B, B)}[free]
    out = torch.zeros(shape, dtype=z.dtype, device=z.device)
    eye = torch.eye(B, dtype=z.dtype, device=z.device)
    open_slots = tuple(range(k, n))
    for pairs, single in _matchings(n):
        sign = -1.0 if len(pairs) % 2 else 1.0
        scal = torch.full((m, R), sign, dtype=z.dtype, device=z.device)
        partner: dict[int, int | None] = {o: None for o in open_slots}
        both_open = False
        for a, b in pairs:
            if a < k and b < k:
                scal = scal * g[(a, b)]
            elif a >= k and b >= k:
                both_open = True
            elif a >= k:
                partner[a] = b
            else:
                partner[b] = a
        for c in single:
            if c < k:
                scal = scal * s[c]
        if free == 0:
            out += scal
            continue
        vecs = []
        for o in open_slots:
            if both_open:
                break
            if partner[o] is None:
                vecs.append(z[:, None, :])  # (m, 1, B): unmatched open slot -> z
            else:
                vecs.append(vectors[partner[o]][None, :, :])  # (1, R, B)
        if free == 1:
            out += scal[..., None] * vecs[0]
        elif both_open:
            out += scal[..., None, None] * eye
        else:
            out += scal[..., None, None] * (vecs[0][..., :, None] * vecs[1][..., None, :])
    return out


def hermite_tensor(z: torch.Tensor, n: int) -> torch.Tensor:
    """The dense Hermite tensor He_n(z) of one vector z (B,), shape (B,)*n. For tests and small B only."""
    B = z.shape[0]
    eye = torch.eye(B, dtype=z.dtype, device=z.device)
    out = torch.zeros((B,) * n, dtype=z.dtype, device=z.device)
    letters = "abcdefgh"[:n]
    for pairs, single in _matchings(n):
        ops, subs = [], []
        for a, b in pairs:
            ops.append(eye)
            subs.append(letters[a] + letters[b])
        for c in single:
            ops.append(z)
            subs.append(letters[c])
        term = torch.einsum(",".join(subs) + "->" + letters, *ops) if ops else torch.ones((), dtype=z.dtype)
        out += (-1.0) ** len(pairs) * term
    return out


# ------------------------------------------------------------------------------------------------------------
# The implicit moment tensor
# ------------------------------------------------------------------------------------------------------------
class MomentTensor:
    """The empirical Hermite moment tensor of order ``order`` in B dimensions, kept implicit.

    z: (m, B) projected standard-normal weights z_j. Exactly one of
    y: (m, B) vector weights (projected first-layer gradient of neuron j divided by its output weight):
       T = (1/m) sum_j y_j (x) He_{p-1}(z_j)   (mode 0 is the gradient mode);
    g: (m,) scalar weights (output-layer gradient of neuron j):  T = (1/m) sum_j g_j He_p(z_j).
    Both estimate sum_i lambda_i v_i^{(x)p} (see the module docstring). Contractions cost O(m B^2).
    """

    def __init__(self, z: torch.Tensor, *, order: int, y: torch.Tensor | None = None, g: torch.Tensor | None = None):
        problems = []
        if (y is None) == (g is None):
            problems.append("give exactly one of y (vector weights) or g (scalar weights)")
        if order < 2 or order > 5:
            problems.append(f"order must be 2..5, got {order}")
        if z.ndim != 2:
            problems.append(f"z must be (m, B), got {tuple(z.shape)}")
        elif y is not None and tuple(y.shape) != tuple(z.shape):
            problems.append(f"y must have the shape of z {tuple(z.shape)}, got {tuple(y.shape)}")
        elif g is not None and tuple(g.shape) != (z.shape[0],):
            problems.append(f"g must be ({z.shape[0]},), got {tuple(g.shape)}")
        if problems:
            raise ValidationError("MomentTensor", problems)
        self.z, self.y, self.g, self.order = z, y, g, int(order)
        self.m, self.dim = z.shape

    @property
    def hermite_order(self) -> int:
        return self.order - 1 if self.y is not None else self.order

    def contract(self, factors: Sequence[torch.Tensor], free_mode: int) -> torch.Tensor:
        """T contracted with ``factors[n][r]`` in every mode n except ``free_mode``, for R components at once.

        factors: ``order`` tensors of shape (R, B) (the entry at ``free_mode`` is ignored). Returns (R, B)."""
        p = self.order
        others = [factors[n] for n in range(p) if n != free_mode]
        if self.y is None:
            h = hermite_form(self.z, others, free=1)  # (m, R, B)
            return torch.einsum("j,jrb->rb", self.g, h) / self.m
        if free_mode == 0:
            h = hermite_form(self.z, others, free=0)  # (m, R)
            return torch.einsum("jb,jr->rb", self.y, h) / self.m
        w = self.y @ factors[0].T  # (m, R)
        h = hermite_form(self.z, others[1:], free=1)  # (m, R, B)
        return torch.einsum("jr,jrb->rb", w, h) / self.m

    def contract_all(self, factors: Sequence[torch.Tensor]) -> torch.Tensor:
        """T(f_0[r], f_1[r], ..., f_{p-1}[r]) for R components: (R,)."""
        return (self.contract(factors, 0) * factors[0]).sum(-1)

    def slice(self, alpha: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
        """The matrix T(I, I, alpha, ..., alpha) (B, B), symmetrised over which two modes stay open.

        For the vector-weighted tensor the open pair is either (gradient mode, a Hermite mode) or two Hermite
        modes; the estimate averages both kinds in proportion to their number (both have the same expectation).
        With ``symmetric=False`` only the (gradient, Hermite) slice is returned, unsymmetrised."""
        p = self.order
        a = alpha.reshape(1, -1)
        if self.y is None:
            h = hermite_form(self.z, [a] * (p - 2), free=2)[:, 0]  # (m, B, B)
            return torch.einsum("j,jbc->bc", self.g, h) / self.m
        hf = hermite_form(self.z, [a] * (p - 2), free=1)[:, 0]  # (m, B)
        m1 = self.y.T @ hf / self.m
        if not symmetric:
            return m1
        m1 = 0.5 * (m1 + m1.T)
        if p < 3:
            return m1
        w = self.y @ alpha  # (m,)
        h2 = hermite_form(self.z, [a] * (p - 3), free=2)[:, 0]  # (m, B, B)
        m2 = torch.einsum("j,jbc->bc", w, h2) / self.m
        n1, n2 = p - 1, (p - 1) * (p - 2) // 2
        return (n1 * m1 + n2 * m2) / (n1 + n2)

    def dense(self) -> torch.Tensor:
        """The full B^p tensor (for tests on small B only)."""
        p, B = self.order, self.dim
        if B ** p > 5_000_000:
            raise ValidationError("MomentTensor.dense", [f"B^p = {B}^{p} is too large to form; use the contractions"])
        out = torch.zeros((B,) * p, dtype=self.z.dtype)
        for j in range(self.m):
            if self.y is None:
                out += self.g[j] * hermite_tensor(self.z[j], p)
            else:
                out += torch.einsum("a,...->a...", self.y[j], hermite_tensor(self.z[j], p - 1))
        return out / self.m


# ------------------------------------------------------------------------------------------------------------
# Jennrich and ALS
# ------------------------------------------------------------------------------------------------------------
@dataclass
class JennrichDraw:
    """One Jennrich draw: directions (R, B) unit rows, its eigenvalue-gap score (larger is better) and the
    random vectors used."""

    directions: torch.Tensor
    score: float
    alpha: torch.Tensor
    beta: torch.Tensor


def _gap_score(ev: np.ndarray) -> float:
    """Smallest pairwise distance of the eigenvalues relative to their largest modulus, minus the largest
    imaginary part (a noisy slice pair gives complex eigenvalues)."""
    n = len(ev)
    if n < 2:
        return 1.0
    scale = max(float(np.max(np.abs(ev))), 1e-300)
    d = np.abs(ev[:, None] - ev[None, :])
    d[np.eye(n, dtype=bool)] = np.inf
    return float(np.min(d) / scale - np.max(np.abs(ev.imag)) / scale)


def jennrich(T: MomentTensor, *, generator: torch.Generator, draws: int = 10, rank: int | None = None) -> list[JennrichDraw]:
    """Jennrich's algorithm on two random slices, ``draws`` times; returns every draw, best score first.

    For T = sum_i lambda_i v_i^{(x)p}, M_a = T(I, I, a, ..., a) = V diag(lambda_i <v_i, a>^{p-2}) V^T, and the
    eigenvectors of M_a M_b^{-1} are the v_i. Random directions a, b come from ``generator``. rank: number of
    components (default: the tensor's dimension B); the eigenvectors of the ``rank`` largest eigenvalues in
    modulus are kept."""
    B = T.dim
    rank = B if rank is None else int(rank)
    out = []
    for _ in range(max(1, int(draws))):
        a = torch.randn(B, generator=generator, dtype=torch.float64).to(device=T.z.device, dtype=T.z.dtype)
        b = torch.randn(B, generator=generator, dtype=torch.float64).to(device=T.z.device, dtype=T.z.dtype)
        a, b = a / a.norm(), b / b.norm()
        Ma = T.slice(a).double().cpu().numpy()
        Mb = T.slice(b).double().cpu().numpy()
        try:
            X = np.linalg.solve(Mb.T, Ma.T).T  # Ma Mb^{-1}
            ev, vecs = np.linalg.eig(X)
        except np.linalg.LinAlgError:
            continue
        if not np.all(np.isfinite(ev)):
            continue
        order = np.argsort(-np.abs(ev))[:rank]
        ev, vecs = ev[order], vecs[:, order]
        V = np.real(vecs).T
        V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-300)
        out.append(JennrichDraw(torch.as_tensor(V, dtype=T.z.dtype, device=T.z.device), _gap_score(ev), a, b))
    out.sort(key=lambda d: -d.score)
    return out


def cp_als_polish(T: MomentTensor, directions: torch.Tensor, *, sweeps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine a CP decomposition T ~ sum_r lambda_r a^0_r (x) ... (x) a^{p-1}_r by alternating least squares on
    the implicit tensor (each mode update costs O(m R B)). Starts from ``directions`` (R, B) in every mode.

    Returns (directions (R, B) unit rows, the average of the mode factors with signs aligned to the last mode;
    weights lambda (R,))."""
    p = T.order
    R = directions.shape[0]
    factors = [directions.clone() for _ in range(p)]
    lam = torch.ones(R, dtype=directions.dtype, device=directions.device)
    for _ in range(max(0, int(sweeps))):
        for n in range(p):
            K = T.contract(factors, n)  # (R, B)
            H = torch.ones(R, R, dtype=directions.dtype, device=directions.device)
            for k in range(p):
                if k != n:
                    H = H * (factors[k] @ factors[k].T)
            try:
                A = torch.linalg.solve(H, K)
            except RuntimeError:
                A = torch.linalg.lstsq(H, K).solution
            lam = A.norm(dim=1)
            factors[n] = A / lam.clamp_min(1e-300)[:, None]
    ref = factors[-1]
    acc = torch.zeros_like(ref)
    for f in factors:
        s = torch.sign((f * ref).sum(-1))
        s[s == 0] = 1
        acc += s[:, None] * f
    V = acc / acc.norm(dim=1, keepdim=True).clamp_min(1e-300)
    if not torch.isfinite(V).all():  # ALS diverged (a degenerate start): keep the starting directions
        V = directions / directions.norm(dim=1, keepdim=True)
    return V, cp_objective(T, V)[1]


def cp_objective(T: MomentTensor, V: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The symmetric CP fit of unit directions V (R, B): the weights lambda minimising
    |T - sum_r lambda_r v_r^{(x)p}|^2 and the value of that objective minus the constant |T|^2 (lower is
    better; comparable across candidate V for the same T). Costs one implicit contraction."""
    p = T.order
    t = T.contract_all([V] * p)  # <T, v_r^{(x)p}>
    G = (V @ V.T) ** p  # Gram of the rank-one terms
    try:
        lam = torch.linalg.solve(G, t)
    except RuntimeError:
        lam = torch.linalg.lstsq(G, t[:, None]).solution[:, 0]
    obj = float(-(lam * t).sum())  # min over lambda of -2 lam.t + lam G lam = -t G^{-1} t
    return obj, lam


def direction_error(est: torch.Tensor, true: torch.Tensor, *, signed: bool = False) -> torch.Tensor:
    """Per-true-row best cosine after Hungarian alignment of the rows of ``est`` (R', B) to ``true`` (R, B).
    With ``signed=False`` the absolute cosine is used (directions up to sign). Returns (R,) cosines."""
    from scipy.optimize import linear_sum_assignment

    e = est / est.norm(dim=1, keepdim=True)
    t = true / true.norm(dim=1, keepdim=True)
    c = np.nan_to_num((t @ e.T).double().cpu().numpy(), nan=0.0)
    score = c if signed else np.abs(c)
    rows, cols = linear_sum_assignment(-score)
    out = np.zeros(t.shape[0])  # a true row left without an estimate scores 0
    out[rows] = score[rows, cols]
    return torch.as_tensor(out)


# ------------------------------------------------------------------------------------------------------------
# The dense small-d oracle
# ------------------------------------------------------------------------------------------------------------
def full_moment_tensor(weights: torch.Tensor, W: torch.Tensor, order: int) -> torch.Tensor:
    """The moment tensor formed densely in the full input dimension d, for the oracle tests.

    weights: (m, d) vector weights (first-layer gradient row j / a_j) or (m,) scalar weights (output gradient);
    W: (m, d) standard-normal weights. Returns (1/m) sum_j weights_j (x) He_{p-1}(w_j) (or g_j He_p(w_j)),
    shape (d,)*order, expanded over the matchings of the Hermite tensor (each term one einsum over the neurons).
    Memory O(d^p): small d only."""
    m, d = W.shape
    if d ** order > 2_000_000:
        raise ValidationError("full_moment_tensor", [f"d^p = {d}^{order} is too large for the dense oracle"])
    vec = weights.ndim == 2
    n = order - 1 if vec else order
    letters = "abcdefgh"
    head = "a" if vec else ""
    slots = letters[1:n + 1] if vec else letters[:n]
    eye = torch.eye(d, dtype=W.dtype, device=W.device)
    out = torch.zeros((d,) * order, dtype=W.dtype, device=W.device)
    for pairs, single in _matchings(n):
        ops = [weights]
        subs = ["j" + head]
        for c in single:
            ops.append(W)
            subs.append("j" + slots[c])
        for a, b in pairs:
            ops.append(eye)
            subs.append(slots[a] + slots[b])
        out += (-1.0) ** len(pairs) * torch.einsum(",".join(subs) + "->" + head + slots, *ops)
    return out / m


def cp_oracle(tensor: torch.Tensor, rank: int, *, seed: int = 0, n_iter_max: int = 500) -> torch.Tensor:
    """CP decomposition of a dense tensor with tensorly's ``parafac`` (the oracle); returns (rank, d) unit
    directions (from the first mode's factor)."""
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("the dense CP oracle needs tensorly: pip install 'gradleak[tensor]'") from e
    tl.set_backend("numpy")
    arr = tensor.detach().double().cpu().numpy()
    cp = parafac(arr, rank=rank, init="random", random_state=seed, n_iter_max=n_iter_max, tol=1e-12,
                 normalize_factors=True)
    A = np.asarray(cp.factors[0]).T
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    return torch.as_tensor(A)
