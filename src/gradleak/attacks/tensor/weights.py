"""Are the first-layer weights i.i.d. Gaussian? Stein's identity, on which the moment tensors rest, needs it:
marginal moments of the weights (:func:`weight_normality`, :func:`normality_problem`) and the projection of the
weights on the gradient's span (:func:`span_normality`)."""

from __future__ import annotations

import math

import torch


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


def normality_problem(stats: dict[str, float]) -> str | None:
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


def span_normality(Z: torch.Tensor, mirrored: bool) -> dict[str, float]:
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
