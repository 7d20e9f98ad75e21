"""Metrics of a reconstruction against the truth. Images are compared in IMAGE space: the data's value range
(lo, hi) (``value_range``, :attr:`gradleak.DataSpec.value_range`; default (0, 1)) is mapped onto [0, 1] by
(x - lo) / (hi - lo) and clamped there, so PSNR is 10 log10(1 / MSE) on the unit range (peak hi - lo in the
data's own units), per image, then averaged (the Inverting Gradients convention), MSE is on the unit range and
SSIM's constants are those of data range 1.

A batch is first aligned to the truth (Hungarian assignment on per-pair MSE), since an attack may return the
samples in any order. Metrics never know which attack ran.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ValidationError

__all__ = ["psnr", "ssim", "mse", "cosine", "label_accuracy", "align", "evaluate", "Scores"]


UNIT_RANGE = (0.0, 1.0)


def _value_range(value_range, who: str) -> tuple[float, float]:
    """(lo, hi) as floats, or a :class:`ValidationError` saying what was expected."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValidationError(who, [f"value_range must be two numbers (low, high), got {value_range!r}"]) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValidationError(who, [f"value_range must be finite (low, high) with low < high, got {value_range!r}"])
    return lo, hi


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """``x`` (float64) mapped from ``value_range`` onto [0, 1] and clamped there."""
    lo, hi = value_range
    if (lo, hi) != UNIT_RANGE:
        x = (x - lo) / (hi - lo)
    return x.clamp(0, 1)


def _pair(rec: torch.Tensor, truth: torch.Tensor, who: str,
          value_range=UNIT_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    vr = _value_range(value_range, who)
    if rec.shape != truth.shape:
        raise ValidationError(who, [f"reconstruction has shape {tuple(rec.shape)}, truth {tuple(truth.shape)}; "
                                    "they must match (batch-first)"])
    if rec.ndim < 2:
        raise ValidationError(who, [f"expected batch-first tensors (B, ...), got shape {tuple(rec.shape)}"])
    return _unit(rec.detach().double(), vr), _unit(truth.detach().double(), vr)


def mse(rec: torch.Tensor, truth: torch.Tensor, value_range=UNIT_RANGE) -> torch.Tensor:
    """Per-image mean squared error, (B,), on images mapped from ``value_range`` onto [0, 1] and clamped."""
    r, t = _pair(rec, truth, "mse", value_range)
    return (r - t).pow(2).flatten(1).mean(1)


def psnr(rec: torch.Tensor, truth: torch.Tensor, value_range=UNIT_RANGE) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), on images mapped from ``value_range`` onto [0, 1] and clamped: peak 1 on the
    unit range (hi - lo in the data's units). A perfect image gives +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    r, t = _pair(rec, truth, "psnr", value_range)
    return peak_signal_noise_ratio(r, t, data_range=1.0, reduction="none", dim=tuple(range(1, r.ndim)))


def _window(k: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """Normalised 1-D Gaussian window of odd length ``k`` centred on 0."""
    x = torch.arange(k, dtype=dtype) - (k - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """SSIM (Wang et al. 2004, C1 = (0.01)^2, C2 = (0.03)^2 for data range 1) of each pixel, with local
    statistics from a Gaussian window of std ``sigma`` (length 2 * int(3.5 sigma + 0.5) + 1) over a reflect-padded
    image. The 2-D window is separable, so it is applied as two 1-D filters: memory O(image), not O(image x
    window area) as a 2-D convolution's unfolding needs."""
    k = 2 * int(3.5 * sigma + 0.5) + 1
    pad = (k - 1) // 2
    c = x.shape[1]
    w = _window(k, sigma, x.dtype)
    wh, ww = w.view(1, 1, k, 1).repeat(c, 1, 1, 1), w.view(1, 1, 1, k).repeat(c, 1, 1, 1)

    def blur(t):
        t = torch.nn.functional.pad(t, (pad, pad, pad, pad), mode="reflect")
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, wh, groups=c), ww, groups=c)

    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx * mx).clamp_min(0)
    vy = (blur(y * y) - my * my).clamp_min(0)
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(rec: torch.Tensor, truth: torch.Tensor, value_range=UNIT_RANGE) -> torch.Tensor:
    """Per-image SSIM, (B,), of images mapped from ``value_range`` onto [0, 1] and clamped (constants of data
    range 1), Gaussian window (11, sigma 1.5; shrunk for images smaller than 11 px), reflect padding, averaged
    over every pixel and channel (torchmetrics' convention). NaN for non-image data. Images are scored one at a
    time with separable filtering, so memory stays a few copies of one image."""
    r, t = _pair(rec, truth, "ssim", value_range)
    if r.ndim != 4:
        return torch.full((r.shape[0],), float("nan"), dtype=torch.float64)
    k = min(11, min(r.shape[-2:]))
    k = k if k % 2 == 1 else k - 1
    if k < 3:
        return torch.full((r.shape[0],), float("nan"), dtype=torch.float64)
    sigma = 1.5 * k / 11
    return torch.stack([_ssim_map(r[i:i + 1], t[i:i + 1], sigma).mean() for i in range(r.shape[0])])


def cosine(rec: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of the flattened images (no clamping), (B,)."""
    if rec.shape != truth.shape:
        raise ValidationError("cosine", [f"shapes differ: {tuple(rec.shape)} vs {tuple(truth.shape)}"])
    return torch.nn.functional.cosine_similarity(rec.detach().double().flatten(1), truth.detach().double().flatten(1), dim=1)


def label_accuracy(labels: torch.Tensor | None, truth: torch.Tensor) -> float | None:
    """Fraction of labels equal to the truth (after alignment); None if no labels were produced."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != truth.shape:
        raise ValidationError("label_accuracy", [f"{tuple(labels.shape)} labels vs {tuple(truth.shape)} truth"])
    return float((labels == truth.cpu()).double().mean())


def align(rec: torch.Tensor, truth: torch.Tensor, value_range=UNIT_RANGE) -> np.ndarray:
    """Hungarian assignment on per-pair MSE (of the images mapped from ``value_range`` onto [0, 1], clamped).

    With at least as many reconstructed samples as truth samples, ``order[i]`` is the index of the reconstructed
    sample matched to truth sample i (extra reconstructed samples are left out). With FEWER reconstructed samples
    (e.g. a mixture an attack reports as one image), ``order[j]`` is the truth sample matched to reconstructed
    sample j; use :func:`evaluate`, which handles both cases."""
    vr = _value_range(value_range, "align")
    r = _unit(rec.detach().double().cpu(), vr).flatten(1)
    t = _unit(truth.detach().double().cpu(), vr).flatten(1)
    if r.shape[1] != t.shape[1]:
        raise ValidationError("align", [f"sample sizes differ: {r.shape[1]} vs {t.shape[1]}"])
    if r.shape[0] < t.shape[0]:
        rows, cols = linear_sum_assignment(torch.cdist(r, t).pow(2).numpy())
        order = np.empty(r.shape[0], dtype=np.int64)
        order[rows] = cols
        return order
    cost = torch.cdist(t, r).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(t.shape[0], dtype=np.int64)
    order[rows] = cols
    return order


def _finite_mean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return float("nan")
    return float(v.mean())


@dataclass
class Scores:
    """Aggregated and per-image scores of one reconstruction (after alignment)."""

    psnr: float
    ssim: float
    mse: float
    cosine: float
    label_accuracy: float | None
    psnr_per_image: list[float]
    ssim_per_image: list[float]
    mse_per_image: list[float]
    cosine_per_image: list[float]
    order: list[int] = field(default_factory=list)
    unmatched_reconstructions: int = 0
    unmatched_truths: int = 0

    @property
    def notes(self) -> list[str]:
        """Sentences about what the scores do not cover (samples left out of the matching)."""
        out = []
        if self.unmatched_reconstructions:
            out.append(f"the reconstruction holds {self.unmatched_reconstructions} more sample(s) than the truth: "
                       "each truth image is scored against its best-matching reconstruction, the others are not "
                       "scored")
        if self.unmatched_truths:
            out.append(f"the reconstruction holds {self.unmatched_truths} fewer sample(s) than the truth (a "
                       "mixture): each reconstructed sample is scored against its best-matching truth image")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        out = {k: clean(v) for k, v in d.items()}
        if self.notes:
            out["score_notes"] = self.notes
        return out

    def summary(self) -> str:
        lab = "n/a" if self.label_accuracy is None else f"{100 * self.label_accuracy:.0f}%"
        return f"PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.3f}, MSE {self.mse:.3g}, labels {lab}"


def evaluate(rec, truth, value_range=UNIT_RANGE) -> Scores:
    """Score a :class:`~gradleak.Reconstruction` (or a tensor of images) against a :class:`~gradleak.Truth`
    (or a tensor), both in the data's ``value_range`` (pass ``case.spec.value_range``; default (0, 1)), which
    is mapped onto [0, 1] before clamping (see the module docstring). Aligns the batch first (Hungarian on MSE);
    PSNR is averaged over images after capping each at 300 dB (an exact reconstruction would otherwise give
    +inf). If the reconstruction holds fewer samples than the truth (a mixture), each reconstructed sample is
    scored against the truth sample it matches best (distinct ones), and ``order`` lists those truth indices. ``unmatched_reconstructions`` /
    ``unmatched_truths`` count the samples left out of the matching, and ``notes`` says so. Non-finite truth
    or reconstruction values, or a ``value_range`` that is not (low, high) with low < high, are a
    :class:`~gradleak.errors.ValidationError`."""
    vr = _value_range(value_range, "evaluate")
    r_in = getattr(rec, "inputs", rec)
    r_lab = getattr(rec, "labels", None)
    t_in = getattr(truth, "inputs", truth)
    t_lab = getattr(truth, "labels", None)
    if not isinstance(r_in, torch.Tensor) or not isinstance(t_in, torch.Tensor):
        raise ValidationError("evaluate", ["expected a Reconstruction / tensor and a Truth / tensor"])
    if r_in.shape[1:] != t_in.shape[1:] or r_in.shape[0] < 1:
        raise ValidationError("evaluate", [f"reconstruction {tuple(r_in.shape)} does not fit truth {tuple(t_in.shape)}: "
                                           "expected the same sample shape"])
    bad = [f"{who} holds {int((~torch.isfinite(v)).sum())} NaN/inf value(s)" for who, v in
           (("the truth", t_in), ("the reconstruction", r_in)) if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValidationError("evaluate", bad + ["expected finite images in the value range"])
    order = align(r_in, t_in, vr)
    idx = torch.as_tensor(order)
    if r_in.shape[0] < t_in.shape[0]:  # fewer reconstructions (a mixture): score each against its matched truth
        r = r_in.detach().cpu()
        t = t_in.detach().cpu()[idx]
        rl = r_lab.cpu() if r_lab is not None and r_lab.shape[0] == r_in.shape[0] else None
        tl = t_lab[idx] if t_lab is not None else None
        r_lab, t_lab = rl, tl
        idx = torch.arange(r.shape[0])
    else:
        r = r_in.detach().cpu()[idx]
        t = t_in.detach().cpu()
    p = psnr(r, t, vr).clamp(max=300.0)
    s = ssim(r, t, vr)
    m = mse(r, t, vr)
    c = cosine(r, t)
    la = None
    if r_lab is not None and t_lab is not None and r_lab.shape[0] == r_in.shape[0]:
        la = label_accuracy(r_lab.cpu()[idx], t_lab.cpu())
    n_rec, n_truth = int(r_in.shape[0]), int(t_in.shape[0])
    return Scores(psnr=_finite_mean(p), ssim=_finite_mean(s), mse=float(m.mean()), cosine=float(c.mean()),
                  label_accuracy=la, psnr_per_image=p.tolist(), ssim_per_image=s.tolist(), mse_per_image=m.tolist(),
                  cosine_per_image=c.tolist(), order=order.tolist(),
                  unmatched_reconstructions=max(n_rec - n_truth, 0), unmatched_truths=max(n_truth - n_rec, 0))
