"""Fitting the raw gradient for smooth activations: non-linear least squares over span coordinates (norms
included) and residuals - slope-fixed alternating least squares, per-sample norm profiles, Levenberg-Marquardt
with variable projection, late sign flips."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...activations import Activation
from .fit_patterns import dirs_from_Q, pattern_ls
from .span import SpanProblem, subproblem


def _smooth_terms(prob: SpanProblem, C: torch.Tensor):
    H = prob.Z @ C.T
    return prob.act.grad(H), prob.act.fn(H)


def _flip_signs(sub, C: torch.Tensor, res: float, count: int) -> tuple[torch.Tensor, float, int]:
    """Greedy sign flips of the first ``count`` rows of C, each kept when it lowers the fit residual of ``sub``
    (a non-odd activation tells a sample from its negative). Returns (C, residual, number of flips kept)."""
    flips = 0
    for i in range(count):
        C2 = C.clone()
        C2[i] = -C2[i]
        _, r2 = _rho_ls(sub, C2)
        if r2 < res:
            C, res = C2, r2
            flips += 1
    return C, res, flips


def _rho_ls(prob: SpanProblem, C: torch.Tensor) -> tuple[torch.Tensor, float]:
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


def _smooth_residual(prob: SpanProblem, C: torch.Tensor, rho: torch.Tensor) -> float | torch.Tensor:
    S1, S0 = _smooth_terms(prob, C)
    coef = S1 * (prob.A.T @ rho.T)
    P_hat = coef @ C
    GA_hat = (S0 @ rho).T
    res = ((prob.P - P_hat) ** 2).sum() + ((prob.GA - GA_hat) ** 2).sum()
    res = res / max(prob.norm2, 1e-300)
    return res if C.requires_grad or rho.requires_grad else float(res)


def _scale_grid(sub: SpanProblem) -> np.ndarray:
    """Candidate norms of the span coordinates: a log grid around the weights' scale."""
    zscale = float(sub.Z.std())
    return np.exp(np.linspace(math.log(0.05), math.log(200.0), 36)) / max(zscale, 1e-12)


def _common_scale(sub: SpanProblem, d: torch.Tensor, grid: np.ndarray) -> tuple[float, float]:
    """The common norm t of the unit directions d (B, B) on ``grid`` fitting the gradient best (rho by linear
    least squares at each point). Returns (relative residual, t)."""
    best = None
    for t in grid:
        _, res = _rho_ls(sub, t * d)
        if best is None or res < best[0]:
            best = (res, float(t))
    return best


def fit_scale_only(prob: SpanProblem, dirs: torch.Tensor, odd: bool) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """The smooth model with the directions held FIXED (the tensor step's): a common norm from the log grid,
    greedy sign flips (not for odd sigma) and the residuals rho by linear least squares. Nothing moves the
    directions, so what comes out is what the tensor step alone identified. Returns (C, rho, residual, report)."""
    d = dirs / dirs.norm(dim=1, keepdim=True)
    sub = subproblem(prob, 8192)
    res, t = _common_scale(sub, d, _scale_grid(sub))
    C = t * d
    flips = 0
    if not odd:
        C, res, flips = _flip_signs(sub, C, res, prob.B)
    rho, res = _rho_ls(prob, C)
    return C, rho, res, {"initial_scale": t, "sign_flips": flips}


def fit_smooth(prob: SpanProblem, dirs: torch.Tensor, rounds: int, odd: bool) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Non-linear least squares over span coordinates C (norms included) and residuals rho.

    On a subsample of neurons: a common scale from a log grid (rho by linear least squares at each point), then
    alternating rounds - greedy sign flips (not for odd sigma, whose sign the gradient cannot tell), directions
    from the linear least squares with the slopes sigma'(z_j.c_i) held fixed (the smooth analogue of the pattern
    ALS), per-sample norm profiles on a wide log grid. Finally Levenberg-Marquardt on all neurons, (C, rho) jointly.
    Returns (C, rho, relative residual, report)."""
    B = prob.B
    d = dirs / dirs.norm(dim=1, keepdim=True)
    full = prob
    sub = subproblem(prob, 8192)
    grid = _scale_grid(sub)
    res, t = _common_scale(sub, d, grid)
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
            C, res, n = _flip_signs(sub, C, res, B)
            flips += n
        Q, _ = pattern_ls(sub, sub.act.grad(sub.Z @ C.T))
        nd = dirs_from_Q(Q, C / C.norm(dim=1, keepdim=True))
        Cn = nd * C.norm(dim=1, keepdim=True)
        _, rn = _rho_ls(sub, Cn)
        Cn, rn = norm_profile(Cn, rn, wide=True)
        if rn < res * (1 - 1e-6):
            C, res = Cn, rn
        else:
            break
    rho, res = _rho_ls(full, C)
    lm_prob = subproblem(full, 16384)
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


def _lm_pieces(prob: SpanProblem, C: torch.Tensor, rho: torch.Tensor, a: int, b: int, jac: bool):
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


def _levenberg_marquardt(prob: SpanProblem, C: torch.Tensor, rho: torch.Tensor, iters: int = 40,
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
