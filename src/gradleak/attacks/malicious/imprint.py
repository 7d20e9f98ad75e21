"""Robbing the Fed: the imprint module of Fowl, Geiping, Czaja, Goldblum, Goldstein (ICLR 2022).

The server inserts a block in front of the user's model. Its first layer has k bins, all with the SAME weight
row w (a linear measurement m(x) = w.x + o of the input) and biases o - t_i at increasing thresholds t_i, then
a ReLU, so bin i is active for a sample iff m(x) > t_i. For a sample n active in bin i the weight-gradient row
is gamma_n x_n and the bias gradient gamma_n, where gamma_n is the gradient reaching the bin. The block mixes
its bins into the input with a FIXED (non-trainable) direction, x + gain * (sum_i relu_i) * v, so gamma_n is the
same in every bin the sample activates. Hence, for consecutive bins,
    (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = x_n
exactly when sample n is the only one with t_i < m(x_n) <= t_{i+1}; two or more samples in that interval give
their gamma-weighted mixture, and an empty interval gives 0 / 0 (skipped).

Bins. The thresholds are the quantiles i/k (i = 1..k-1) of the measurement's distribution under a stated prior
(Gaussian; or a Gaussian fitted to public images), and t_0 lies below the smallest value the measurement takes
on the data's value box, so every sample activates bin 0 and each of the k intervals has prior mass 1/k.
The expected share of a batch of B samples that lands alone in an interval (and is recovered exactly) is
    sum_i p_i (1 - p_i)^(B-1)  =  (1 - 1/k)^(B-1) for equal masses p_i = 1/k,
reported beside the measured one in ``rec.info``.

Measurements: 'random' (default): w ~ N(0, I/D) in the normalised input space, whose values over images are
close to N(0, 1) when the spec's normalisation fits the data (normalised pixels have unit second moment);
'brightness' (the paper's example): the mean pixel value in image space, prior N(mean of spec.mean, 0.15^2).
On the bundled photos the brightness of several pairs differs by < 1e-3 (e.g. 0.4399 and 0.4403), which no
bin width separates, so the random measurement is the default.

FedAvg (what is implemented, not the paper's sparse/one-shot blocks): the same block under K local steps.
The input of the block does not change between steps and the mixing direction is fixed, so as long as no sample
crosses a threshold during the local steps (the bins move by local_lr times their gradient), bins i and i+1
keep identical active sets except for the samples of interval i, every step contributes the same x_n, and the
ratio of the accumulated differences is still x_n exactly. A sample that crosses a threshold during the local
steps is read as a mixture of its two intervals' contents; the residual check then refutes 'exact'.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from ...case import Case, DataSpec, FedAvg, _num_outputs
from ...errors import ValidationError
from ..base import Attack, Reconstruction, RunContext, register
from .crafted import (MARK, CraftRecord, crafted_record, in_value_range, not_crafted_problem, pair_labels,
                      per_sample_independent, pixel_stats, row_fit)

__all__ = ["Imprint", "ImprintBlock", "ImprintedModel", "expected_share", "interval_masses"]

MEASUREMENTS = ("random", "brightness")


class ImprintBlock(nn.Module):
    """x -> x + gain * sum_i relu(w.x + o - t_i) * v on NORMALISED inputs of ``shape``.

    ``bins`` (nn.Linear D -> k) holds the measurement row w in every row and the biases o - t_i; ``direction`` v
    (a buffer: not trained) is the one direction every bin feeds back into the input; ``thresholds`` t (k,) and
    ``masses`` (k,) (the prior mass of each interval) are buffers for the read-out."""

    def __init__(self, shape: tuple[int, ...], w: torch.Tensor, offset: float, thresholds: torch.Tensor,
                 masses: torch.Tensor, direction: torch.Tensor, gain: float):
        super().__init__()
        D, k = w.numel(), thresholds.numel()
        self.shape = tuple(shape)
        self.offset = float(offset)
        self.gain = float(gain)
        self.bins = nn.Linear(D, k)
        with torch.no_grad():
            self.bins.weight.copy_(w.reshape(1, D).expand(k, D))
            self.bins.bias.copy_(offset - thresholds)
        self.register_buffer("direction", direction.reshape(self.shape).clone())
        self.register_buffer("thresholds", thresholds.clone())
        self.register_buffer("masses", masses.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bins(x.flatten(1)))
        return x + self.gain * h.sum(1).reshape(-1, *([1] * len(self.shape))) * self.direction


class ImprintedModel(nn.Module):
    """The model the server sends: ``imprint`` (an :class:`ImprintBlock`) in front of the user's ``model``."""

    def __init__(self, imprint: ImprintBlock, model: nn.Module):
        super().__init__()
        self.imprint = imprint
        self.model = model
        self.num_outputs = _num_outputs(model)
        self.zoo_name = f"imprint+{getattr(model, 'zoo_name', type(model).__name__)}"
        if hasattr(model, "input_shape"):
            self.input_shape = model.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.imprint(x))


def interval_masses(thresholds: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Prior mass of each interval (t_i, t_{i+1}] (the last one open) under N(mean, std^2)."""
    t = thresholds.double().cpu().numpy()
    cdf = norm.cdf(np.append(t, np.inf), loc=mean, scale=std)
    return torch.from_numpy(np.diff(cdf))


def expected_share(masses, batch_size: int) -> float:
    """Expected share of a batch of ``batch_size`` samples that is alone in its interval: the probability that one
    sample's interval holds none of the other B - 1, sum_i p_i (1 - p_i)^(B-1) (the imprint paper's guarantee;
    (1 - 1/k)^(B-1) for k equal masses). Samples are i.i.d. from the prior."""
    p = torch.as_tensor(masses, dtype=torch.float64)
    return float((p * (1 - p) ** (batch_size - 1)).sum())


def _measurement(spec: DataSpec, kind: str, generator: torch.Generator, dtype) -> tuple[torch.Tensor, float]:
    """(w, o) with m(x) = w . normalise(x).flatten() + o."""
    D = math.prod(spec.shape)
    if kind == "random":
        w = torch.randn(D, generator=generator, dtype=torch.float64) / math.sqrt(D)
        return w.to(dtype), 0.0
    # brightness: mean over image-space pixels = sum_j (std_j / D) xn_j + mean_j(mean_j)
    std, mean = pixel_stats(spec)
    return (std.reshape(-1) / D).to(dtype), float(mean.mean())


def _box_min(spec: DataSpec, w: torch.Tensor, o: float) -> float:
    """The smallest value of w . xn + o over the data's value box (in normalised space)."""
    lo, hi = (torch.broadcast_to(b, spec.shape).reshape(-1) for b in spec.bounds(w.double()))
    wd = w.double()
    return float(torch.minimum(wd * lo, wd * hi).sum()) + o


@dataclass
class ImprintOptions:
    """bins: k, the number of bins (and intervals). measurement: 'random' (w ~ N(0, I/D) on the normalised input)
    or 'brightness' (mean image-space pixel). prior_mean / prior_std: the Gaussian prior of the measurement (NaN:
    the default of the measurement: random N(0, 1), brightness N(mean of spec.mean, 0.15^2)); a ``public`` batch
    given to :meth:`Imprint.craft` replaces them by its measurements' mean and std. gain: the size of the block's
    feedback into the input (the read-out does not depend on it). rel_threshold: an interval whose bias-gradient
    difference is below this fraction of max |db| is empty (0 = 1e4 machine epsilons). fit_tol: a row is one
    sample when its own bias gradient explains the observed one to this relative error (0 = sqrt(eps))."""

    bins: int = 128
    measurement: str = "random"
    prior_mean: float = float("nan")
    prior_std: float = float("nan")
    gain: float = 1e-3
    rel_threshold: float = 0.0
    fit_tol: float = 0.0


@register("imprint", aliases=("robbing-the-fed",))
class Imprint(Attack):
    """Robbing the Fed (Fowl et al., ICLR 2022): a malicious server inserts an imprint block of k bins in front of
    the model and reads each sample alone in its bin interval exactly from differences of consecutive bins'
    weight and bias gradients. Needs a model crafted by :meth:`craft` (a malicious server)."""

    paper = ("Fowl, Geiping, Czaja, Goldblum, Goldstein. Robbing the Fed: Directly Obtaining Private Data in "
             "Federated Learning with Modified Models. ICLR 2022")
    Options = ImprintOptions
    crafts_model = True

    def check_options(self, o: ImprintOptions) -> list[str]:
        p = []
        if o.bins < 2:
            p.append(f"bins must be >= 2, got {o.bins}")
        if o.measurement not in MEASUREMENTS:
            p.append(f"measurement must be one of {MEASUREMENTS}, got {o.measurement!r}")
        if not (math.isnan(o.prior_std) or o.prior_std > 0):
            p.append(f"prior_std must be > 0 (or NaN for the default), got {o.prior_std}")
        if not (o.gain > 0 and math.isfinite(o.gain)):
            p.append(f"gain must be a positive number, got {o.gain}")
        if not 0 <= o.rel_threshold < 1:
            p.append(f"rel_threshold must be in [0, 1), got {o.rel_threshold}")
        if o.fit_tol < 0:
            p.append(f"fit_tol must be >= 0, got {o.fit_tol}")
        return p

    # ---- the server side ------------------------------------------------------------------------------
    def prior(self, spec: DataSpec, w: torch.Tensor, o: float, public: torch.Tensor | None) -> tuple[float, float, str]:
        """(mean, std, source) of the measurement's Gaussian prior."""
        opt = self.options
        if public is not None:
            if not isinstance(public, torch.Tensor) or public.ndim != len(spec.shape) + 1 or \
                    tuple(public.shape[1:]) != spec.shape or public.shape[0] < 2:
                raise ValidationError("imprint craft", [f"public must be a tensor (N >= 2, *{spec.shape}) of images "
                                                        f"in image space, got {getattr(public, 'shape', public)!r}"])
            m = spec.normalize(public.double()).flatten(1) @ w.double() + o
            return float(m.mean()), max(float(m.std()), 1e-12), f"Gaussian fitted to {public.shape[0]} public images"
        if opt.measurement == "random":
            mean, std = 0.0, 1.0
        else:
            mean, std = float(np.mean(spec.mean)), 0.15
        mean = mean if math.isnan(opt.prior_mean) else opt.prior_mean
        std = std if math.isnan(opt.prior_std) else opt.prior_std
        return mean, std, "stated Gaussian prior"

    def craft(self, model: nn.Module, spec: DataSpec, *, generator: torch.Generator | None = None,
              public: torch.Tensor | None = None) -> ImprintedModel:
        """The model the server sends: a copy of ``model`` behind an :class:`ImprintBlock` of ``bins`` bins for
        data of ``spec``, its thresholds CDF-spaced under the prior (see :meth:`prior`). ``generator`` draws the
        random measurement and the feedback direction. The caller's model is not modified."""
        if not isinstance(model, nn.Module):
            raise ValidationError("imprint craft", [f"model must be a torch.nn.Module, got {type(model).__name__}"])
        if not isinstance(spec, DataSpec):
            raise ValidationError("imprint craft", [f"spec must be a gradleak.DataSpec, got {type(spec).__name__}"])
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        p0 = next(model.parameters())
        dtype, device = p0.dtype, p0.device
        k = self.options.bins
        w, o = _measurement(spec, self.options.measurement, generator, torch.float64)
        mean, std, source = self.prior(spec, w, o, public)
        t = torch.empty(k, dtype=torch.float64)
        t[0] = _box_min(spec, w, o) - 1.0  # below every value the measurement takes on the data box
        t[1:] = torch.from_numpy(norm.ppf(np.arange(1, k) / k, loc=mean, scale=std))
        if not bool((t[1:] > t[0]).all()):
            t[1:] = torch.maximum(t[1:], t[0] + 1e-9)
        masses = interval_masses(t, mean, std)
        v = torch.randn(spec.shape, generator=generator, dtype=torch.float64)
        v = v / v.norm()
        block = ImprintBlock(spec.shape, w, o, t, masses, v, self.options.gain)
        crafted = ImprintedModel(block, copy.deepcopy(model)).to(device=device, dtype=dtype)
        setattr(crafted, MARK, CraftRecord("imprint", "imprint.bins", {
            "bins": k, "measurement": self.options.measurement, "prior_mean": mean, "prior_std": std,
            "prior_source": source}))
        return crafted

    # ---- the read-out -----------------------------------------------------------------------------
    def requirements(self, case: Case) -> list[str]:
        rec = crafted_record(case.model, "imprint")
        if rec is None or not isinstance(case.model, ImprintedModel):
            return [not_crafted_problem("imprint", case.model)]
        missing = [n for n in ("imprint.bins.weight", "imprint.bins.bias") if n not in case.observed]
        if missing:
            return [f"the observed update lacks the imprint block's parameters {missing}"]
        return []

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        blk: ImprintBlock = case.model.imprint
        record = crafted_record(case.model, "imprint")
        spec, B, dtype = case.spec, case.batch_size, case.dtype
        eps = torch.finfo(dtype).eps
        G = case.observation.as_gradient()
        dW, db = G["imprint.bins.weight"], G["imprint.bins.bias"]
        k = db.numel()
        dWd = torch.cat([dW[:-1] - dW[1:], dW[-1:]])
        dbd = torch.cat([db[:-1] - db[1:], db[-1:]])
        top = float(db.abs().max())
        rel = o.rel_threshold or 1e4 * eps
        floor = torch.full_like(dbd, rel * top)
        if isinstance(case.observation, FedAvg):  # theta_K - theta_0 is rounded at the size of theta
            b0 = blk.bins.bias.detach().abs()
            scale = case.observation.local_lr * case.observation.local_steps
            floor = torch.maximum(floor, 1e3 * eps * (b0 + torch.cat([b0[1:], b0[-1:]])) / scale)
        rows = torch.nonzero(dbd.abs() > floor).flatten() if top > 0 else torch.zeros(0, dtype=torch.long)
        info: dict[str, Any] = {"bins": k, "measurement": record.facts.get("measurement"),
                                "prior": {"mean": record.facts.get("prior_mean"), "std": record.facts.get("prior_std"),
                                          "source": record.facts.get("prior_source")},
                                "protocol": case.protocol}
        share = expected_share(blk.masses, B)
        info.update(expected_share=share, expected_recovered=share * B,
                    expected_share_formula="sum_i p_i (1 - p_i)^(B-1); (1 - 1/k)^(B-1) for k equal-mass bins",
                    expected_share_equal_bins=(1 - 1 / k) ** (B - 1))
        if rows.numel() == 0:
            info.update(rows=0, note="every interval is empty: the imprint block received no gradient")
            x = torch.full((1, *spec.shape), float(np.mean(spec.value_range)), dtype=dtype, device=case.device)
            return Reconstruction(inputs=x, labels=None, info=info, claim="mixture")
        xn = (dWd[rows] / dbd[rows, None]).reshape(-1, *spec.shape)
        img = spec.denormalize(xn)
        # checks that can PROVE a row is not one sample: its measurement outside its interval, pixels outside
        # the value range
        t = blk.thresholds.to(torch.float64)
        w = blk.bins.weight[0].detach().to(torch.float64)
        m = xn.flatten(1).to(torch.float64) @ w + blk.offset
        lo_t = t[rows]
        hi_t = torch.cat([t[1:], torch.tensor([math.inf], dtype=torch.float64, device=t.device)])[rows]
        tol_m = math.sqrt(eps) * (1 + t[1:].abs().max().item())
        in_interval = (m > lo_t - tol_m) & (m <= hi_t + tol_m)
        in_range = in_value_range(spec, img)
        proven_mixture = ~(in_interval.cpu() & in_range)
        R = int(rows.numel())
        deficit = B - R
        single = torch.zeros(R, dtype=torch.bool)
        how = [""] * R
        # the counting argument needs every non-empty interval to hold a sample: an unperturbed gradient
        counting = case.observation.gradient_is_exact(B) and "defense" not in case.meta
        if not counting:
            pass
        elif deficit == 0:
            single[:] = True
            how = ["pigeonhole: B non-empty intervals for B samples"] * R
        elif deficit > 0 and int(proven_mixture.sum()) == deficit:
            single = ~proven_mixture
            how = ["pigeonhole: the proven mixtures account for every missing sample" if s else "" for s in single]
        # the row's own bias gradient: labels, and a single-sample check (FedSGD, per-sample independence)
        labels = None
        label_info: dict[str, Any] = {}
        fit_ok = per_sample_independent(case)
        cost = None
        if fit_ok:
            cost = row_fit(case, "imprint.bins", xn, torch.zeros(R, dtype=torch.long, device=xn.device), dbd[rows]).cpu()
            best = cost.amin(1)
            tol = o.fit_tol or math.sqrt(eps)
            if case.observation.gradient_is_exact(B):
                for r in range(R):
                    if not single[r] and not proven_mixture[r] and best[r] <= tol:
                        single[r] = True
                        how[r] = f"fit: its own bias gradient explains the row to {float(best[r]):.1e}"
            info["fit_cost"] = best.tolist()
            labels, label_info = pair_labels(cost, case.labels)
        else:
            label_info = {"source": "not paired: train-mode BatchNorm couples the samples, so a row's own "
                                    "gradient cannot be computed alone"}
        status = ["single" if s else "mixture" if pm else "unverified" for s, pm in zip(single.tolist(),
                                                                                   proven_mixture.tolist())]
        dropped = 0
        if R > B:  # more non-empty intervals than samples: a perturbed update; keep the B most credible rows
            keep = sorted(range(R), key=lambda r: ({"single": 0, "unverified": 1, "mixture": 2}[status[r]],
                                                   -float(dbd[rows[r]].abs())))[:B]
            keep.sort()
            dropped = R - B
            sel = torch.tensor(keep, dtype=torch.long)
            rows, img, xn = rows[sel], img[sel], xn[sel]
            in_interval, in_range, single = in_interval[sel], in_range[sel], single[sel]
            proven_mixture = proven_mixture[sel]
            status = [status[r] for r in keep]
            how = [how[r] for r in keep]
            if cost is not None:
                cost = cost[sel]
                labels, label_info = pair_labels(cost, case.labels)
            R = B
        info.update(rows=R, rows_dropped=dropped, counting_argument=counting, intervals=rows.tolist(), row_status=status, row_evidence=how,
                    rows_single=int(single.sum()), share_single=float(single.sum()) / B,
                    in_interval=in_interval.tolist(), in_range=in_range.tolist(), labels=label_info,
                    note="row i = (dW_i - dW_{i+1}) / (db_i - db_{i+1}): one sample's exact input if it is alone in "
                         "interval i, otherwise a mixture of the samples there; empty intervals are skipped")
        if R == B and not bool(proven_mixture.any()) and (counting or dropped == 0):
            # B rows, none proven a mixture: claimed exact; the base class verifies it by the residual
            return Reconstruction(inputs=img, labels=labels.to(case.device) if labels is not None else None,
                                  info=info, claim="exact")
        return Reconstruction(inputs=img, labels=labels.to(case.device) if labels is not None else None,
                              info=info, claim="mixture")
