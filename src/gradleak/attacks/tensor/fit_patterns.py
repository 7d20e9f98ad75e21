"""Fitting the raw gradient for the ReLU family: activation-pattern alternating least squares in the rank-one form
rho_i (x) c_i, greedy sign flips, patterns snapped from the observed gradient, weak samples re-estimated."""

from __future__ import annotations

import torch

from ...activations import Activation
from .span import SpanProblem


def _levels(act: Activation) -> tuple[float, float]:
    one = torch.tensor([1.0, -1.0], dtype=torch.float64)
    g = act.grad(one)
    return float(g[0]), float(g[1])


def pattern_matrix(prob: SpanProblem, dirs: torch.Tensor) -> torch.Tensor:
    return prob.act.grad(prob.Z @ dirs.T)


def pattern_ls(prob: SpanProblem, D: torch.Tensor) -> tuple[torch.Tensor, float]:
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


def _pattern_residual(prob: SpanProblem, D: torch.Tensor, Q: torch.Tensor, P_hat: torch.Tensor | None = None) -> float:
    if P_hat is None:
        m, B = D.shape
        P_hat = ((D[:, :, None] * prob.A.T[:, None, :]).reshape(m, -1)) @ Q.reshape(-1, B)
    ZQ = torch.einsum("jb,ikb->jik", prob.Z, Q)
    GA_hat = torch.einsum("ji,jik->kj", D, ZQ)
    res = float(((prob.P - P_hat) ** 2).sum() + ((prob.GA - GA_hat) ** 2).sum())
    return res / max(prob.norm2, 1e-300)


def dirs_from_Q(Q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
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


def _pattern_step(prob: SpanProblem, D: torch.Tensor, C: torch.Tensor, inner: int = 3):
    """Least squares for fixed activation patterns D (m, B), in the rank-one form Q_i = rho_i (x) c_i.

    K = 1: one linear problem for q_i = rho_i c_i (B^2 unknowns). K > 1: alternate rho (B, K) from the output
    layer (GA_kj = sum_i rho_ik D_ji z_j.c_i, a B x B normal matrix) and C from the first layer (P_j = sum_i D_ji
    beta_ji c_i with beta_ji = sum_k A_kj rho_ik, again B x B): O(m B^2) per step instead of O(m B^2 K^2).
    Rows of C keep the sign of the previous ones (the patterns' sign). Returns (C, rho, relative residual)."""
    def ridge(N):
        return N + 1e-12 * float(N.diagonal().mean().clamp_min(1e-300)) * torch.eye(N.shape[0], dtype=N.dtype, device=N.device)

    if prob.K == 1:
        Q, _ = pattern_ls(prob, D)
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


def fit_patterns(prob: SpanProblem, dirs: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """Activation-pattern alternating least squares: patterns D_ji = sigma'(z_j.c_i) from the current signed
    span coordinates, least squares for rho_i (x) c_i with the patterns fixed (:func:`_pattern_step`), greedy sign
    flips (first rounds, and whenever a round stalls), until the fit stops improving (at most 6 x ``rounds``);
    then patterns snapped from the observed gradient itself (D_j (.) beta_j = P_j C^{-1}, rounded to the two slope
    levels; exact for a noise-free gradient once C is close), accepted only if the fit improves.
    Returns (signed unit directions (B, B), Q (B, K, B) = rho_i (x) c_i, relative residual, report)."""
    B = prob.B
    C = dirs / dirs.norm(dim=1, keepdim=True)
    C, rho, res = _pattern_step(prob, pattern_matrix(prob, C), C)
    flips = 0
    it = 0
    last = float("inf")
    for it in range(1, 6 * max(1, rounds) + 1):
        if it <= 3 or res >= last * 0.999:
            for i in range(B):
                C2 = C.clone()
                C2[i] = -C2[i]
                C2, rho2, r2 = _pattern_step(prob, pattern_matrix(prob, C2), C2)
                if r2 < res:
                    C, rho, res = C2, rho2, r2
                    flips += 1
        prev = res
        Cn, rhon, rn = _pattern_step(prob, pattern_matrix(prob, C), C)
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
        Dr = torch.where(decisive, Dr, pattern_matrix(prob, C))
        Cs, rhos, _ = _pattern_step(prob, Dr, C)
        # the snapped patterns must agree with the model's patterns z_j.c_i for the right sign of each sample
        pre = prob.Z @ Cs.T
        agree_pos = (prob.act.grad(pre) == Dr).double().mean(0)
        agree_neg = (prob.act.grad(-pre) == Dr).double().mean(0)
        sgn = torch.where(agree_pos >= agree_neg, 1.0, -1.0).to(Cs.dtype)
        Cs = Cs * sgn[:, None]
        Cn, rhon, rn = _pattern_step(prob, pattern_matrix(prob, Cs), Cs)
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


def _deflate_weak(prob: SpanProblem, C: torch.Tensor, rho: torch.Tensor, res: float, rel: float = 0.05):
    """Re-estimate samples that carry little of the gradient (|t_i rho_i| < ``rel`` x the largest): a joint fit
    barely notices them. Subtract every other sample's fitted first-layer contribution; what remains is one
    sample's, P_j ~ D_ji beta_ji c_i, a rank-one matrix whose top right singular vector is c_i's direction (the
    sign: the one whose activation pattern carries the remaining energy). Accepted when the joint fit improves."""
    B = prob.B
    w = (rho.norm(dim=1) * C.norm(dim=1))
    weak = [i for i in range(B) if float(w[i]) < rel * float(w.max())]
    done = 0
    for i in weak:
        D = pattern_matrix(prob, C)
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
        C2, rho2, r2 = _pattern_step(prob, pattern_matrix(prob, C2), C2)
        if r2 < res:
            C, rho, res = C2, rho2, r2
            done += 1
    return C, rho, res, done
