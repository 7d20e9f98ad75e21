"""Per-image outcome of a reconstruction that may hold fewer rows than the batch (evaluation: reads the truth)."""

from __future__ import annotations

import torch

from ...metrics import evaluate, mse

__all__ = ["outcomes"]


def outcomes(rec, truth, *, threshold_db: float = 100.0, value_range=(0.0, 1.0)) -> dict:
    """Match the reconstructed rows to the truth (Hungarian, :func:`gradleak.metrics.evaluate`) and label every
    truth image: 'exact' (its matched row is at >= ``threshold_db`` dB), 'mixture' (its nearest row, by MSE, is
    not an exact match of another image: it is part of what that row mixes) or 'lost' (no row is near it).
    ``value_range``: the data's (``case.spec.value_range``), as :func:`gradleak.metrics.evaluate` takes it.

    Returns {'per_image': [...], 'share_exact', 'exact', 'mixture', 'lost', 'psnr_matched': [per row],
    'rows_matched_to': [truth index per row], 'every_exact_row_matched': bool}."""
    sc = evaluate(rec, truth, value_range)
    r_in = getattr(rec, "inputs", rec).detach().cpu()
    t_in = getattr(truth, "inputs", truth).detach().cpu()
    B, R = t_in.shape[0], r_in.shape[0]
    status = ["lost"] * B
    exact_rows: set[int] = set()
    if R < B:  # order[j] = truth matched to row j
        row_to_truth = list(sc.order)
        psnr_row = list(sc.psnr_per_image)
    else:  # order[i] = row matched to truth i
        row_to_truth = [-1] * R
        for i, j in enumerate(sc.order):
            row_to_truth[j] = i
        psnr_row = [float("nan")] * R
        for i, j in enumerate(sc.order):
            psnr_row[j] = sc.psnr_per_image[i]
    for j, i in enumerate(row_to_truth):
        if i >= 0 and psnr_row[j] >= threshold_db:
            status[i] = "exact"
            exact_rows.add(j)
    # nearest row of every other image
    d = torch.stack([mse(r_in[j:j + 1].expand_as(t_in), t_in, value_range) for j in range(R)])  # (R, B)
    for i in range(B):
        if status[i] == "exact":
            continue
        j = int(d[:, i].argmin())
        status[i] = "mixture" if j not in exact_rows else "lost"
    counts = {s: status.count(s) for s in ("exact", "mixture", "lost")}
    return {"per_image": status, "share_exact": counts["exact"] / B, **counts, "psnr_matched": psnr_row,
            "rows_matched_to": row_to_truth,
            "every_exact_row_matched": all(row_to_truth[j] >= 0 for j in exact_rows)}
