"""DLG (Zhu, Liu, Han, NeurIPS 2019) and iDLG (Zhao, Mopuri, Bilen 2020).

- ``dlg``: squared L2 between the candidate's update and the observed one, summed over every parameter tensor,
  minimised by L-BFGS (lr 1) jointly over a dummy input x ~ N(0, 1) and dummy label logits (B, C) ~ N(0, 1)
  (soft labels softmax(logits)). When the case gives the labels they are used (``use_known_labels``).
- ``idlg``: the label from the last layer (iDLG: the sign of the bias gradient; count-based for a batch), then
  the same L-BFGS on the input only.

L-BFGS is known to go NaN or explode after 60-100 steps on some inputs: every evaluation is watched, a trial
that diverges (non-finite, exploded, or frozen in a flat saturated region well above its best loss) restarts
from a fresh random start (up to ``max_retries`` times) and the best finite result seen is kept. By default
the L-BFGS uses a strong-Wolfe line search: DLG's plain fixed-step L-BFGS (presets ``zhu2019``/``zhao2020``)
often jumps into saturated sigmoids on normalised photos and stays there (2 of 4 photos here). For FedAvg cases the distance is taken relative to the observed norm (deltas are tiny, ~lr x grad,
and L-BFGS's curvature test would otherwise reject every step); ``scale`` controls this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...case import Case, FedAvg
from ..base import Attack, Reconstruction, RunContext, register
from ..labels import label_recovery_problems, recover_labels
from . import batched as B
from . import common as C
from . import priors as P
from .driver import BoxProjection

SCALES = ("auto", "plain", "relative")


@dataclass
class DLGOptions:
    """max_iterations: L-BFGS ITERATIONS per trial (quasi-Newton updates, each one gradient evaluation plus
    what the line search adds; as for IG), run in outer steps of ``lbfgs_inner`` (DLG's code counts outer steps:
    its 300 are 6,000 iterations here, the default). ``rec.info`` reports ``iterations``, ``outer_steps`` and
    ``gradient_evaluations``, summed over trials, and each trial's stop reason (driver.py).
    restarts: independent trials (best by the matching distance). lr: L-BFGS learning rate.
    line_search: 'strong-wolfe' (default: robust) or '' (DLG's plain L-BFGS, which often jumps into saturated
    regions and stalls there). max_retries: fresh starts after a divergence.
    explode_factor: a loss above this multiple of the first counts as an explosion (0: off).
    scale: 'plain' (sum of squares), 'relative' (divided by the observed squared norm) or 'auto' (plain for
    FedSGD, relative for FedAvg). boxed: clamp to the image box after every outer step (DLG does not).
    use_known_labels: use the case's labels when it has them (otherwise the paper's joint label logits).
    regularizers, bn_prior, bn_weight: terms added to the objective (not to the score), as for Inverting
    Gradients (:mod:`.priors`; DLG itself has none: default off).
    batch_trials: run the restarts as one batched computation (:mod:`.batched`; one by one where it cannot,
    said in ``rec.info['batched']``; its ``paths`` says what a batched trial shares with its one-by-one run:
    L-BFGS's paths part after enough iterations). Retries after a divergence run as a second wave, their starts drawn
    after every first start (the same order batched or not)."""

    max_iterations: int = 6000
    restarts: int = 1
    lr: float = 1.0
    lbfgs_inner: int = 20
    history_size: int = 100
    line_search: str = "strong-wolfe"
    max_retries: int = 2
    explode_factor: float = 1e4
    scale: str = "auto"
    boxed: bool = False
    use_known_labels: bool = True
    regularizers: tuple = ()
    bn_prior: str = "none"
    bn_weight: float = 1e-2
    batch_trials: bool = True


def _check(o: DLGOptions) -> list[str]:
    p = []
    for name in ("max_iterations", "restarts", "lbfgs_inner", "history_size"):
        if getattr(o, name) < 1:
            p.append(f"{name} must be >= 1, got {getattr(o, name)}")
    if o.max_retries < 0:
        p.append(f"max_retries must be >= 0, got {o.max_retries}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        p.append(f"lr must be a positive number, got {o.lr}")
    if o.line_search not in ("", "strong-wolfe"):
        p.append(f"line_search must be '' or 'strong-wolfe', got {o.line_search!r}")
    if o.scale not in SCALES:
        p.append(f"scale must be one of {SCALES}, got {o.scale!r}")
    if not (o.explode_factor >= 0):
        p.append(f"explode_factor must be >= 0, got {o.explode_factor}")
    if o.bn_prior not in P.BN_SOURCES:
        p.append(f"bn_prior must be one of {P.BN_SOURCES}, got {o.bn_prior!r}")
    if not (o.bn_weight >= 0 and math.isfinite(o.bn_weight)):
        p.append(f"bn_weight must be a finite number >= 0, got {o.bn_weight}")
    return p + P.spec_problems(None, tuple(o.regularizers))


def prior_specs(case: Case, o) -> list:
    """The regularisers of an options object with ``bn_prior``/``bn_weight``/``regularizers`` (DLG, iDLG)."""
    on = P.resolve_bn_source(case, o.bn_prior) != "none"
    return ([("bn-statistics", o.bn_weight, {"source": o.bn_prior})] if on else []) + list(o.regularizers)


class _LBFGSMatching(Attack):
    budget_option = "max_iterations"
    restarts_option = "restarts"
    # iterations of L-BFGS (20 per outer step): quick 15 outer steps, standard 100, thorough the papers' 300 x 2
    budgets = {"quick": {"max_iterations": 300}, "standard": {"max_iterations": 2000},
               "thorough": {"max_iterations": 6000, "restarts": 2}}
    failed_residual, failed_residual_source = C.FAILED_RESIDUAL, C.FAILED_RESIDUAL_SOURCE
    typical_max_batch = 1
    typical_max_batch_source = ("measured for DLG on lenet, 3,000 iterations: 44.5 dB at batch 1, 9.9 dB at 3, 8.2 dB at 8; "
                                "Zhu et al. 2019 show batches up to 8 on their LeNet; iDLG's label rule is for one sample")
    batch_advice = "more --iterations and --restarts, a smaller batch, or inverting-gradients"
    """Shared driver: L-BFGS trials with divergence restarts over (x) or (x, label logits)."""

    Options = DLGOptions

    def check_options(self, o: DLGOptions) -> list[str]:
        return _check(o)

    def requirements(self, case: Case) -> list[str]:
        return C.matching_problems(case, list(case.observed)) + P.spec_problems(case, prior_specs(case, self.options))

    def _fixed_labels(self, case: Case, ctx: RunContext) -> tuple[torch.Tensor | None, dict]:
        raise NotImplementedError

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        scale = o.scale
        if scale == "auto":
            scale = "relative" if isinstance(case.observation, FedAvg) else "plain"
        matcher = C.GradientMatcher(case, None, None, "l2" if scale == "plain" else "l2-relative")
        labels, label_info = self._fixed_labels(case, ctx)
        joint = labels is None
        spec = case.spec
        like = torch.zeros((), dtype=case.dtype, device=case.device)
        lo, hi = C.box(case, like)

        prior = P.build(case, prior_specs(case, o))

        def objective(v):
            lab = C.soft_labels(case, v[1]) if joint else labels
            data, _ = matcher.terms(v[0], lab)
            reg = prior.value(v[0], lab)
            return (data, data) if reg is None else (data + reg, data)

        project = BoxProjection(lo, hi)  # v[0].clamp_(lo, hi); batched Adam trials clamp all rows at once

        def offer(score, v):
            lab = C.hard_labels(case, v[1]) if joint else labels
            ctx.offer(score, spec.denormalize(v[0]), lab)

        def on_step(step, total, score):
            ctx.history.append(total)
            ctx.update(o.lbfgs_inner, loss=total)

        ctx.progress(o.restarts * o.max_iterations)
        def draw() -> list[torch.Tensor]:
            v0 = [C.randn((case.batch_size, *spec.shape), ctx.generator, case)]
            if joint:
                v0.append(C.randn(C.label_logits_shape(case), ctx.generator, case))
            ctx.start(spec.denormalize(v0[0]), C.hard_labels(case, v0[1]) if joint else labels)
            return v0

        trials: list[C.Trial] = []
        wave = o.restarts
        notes = []
        for attempt in range(o.max_retries + 1):
            setup = B.TrialSetup(
                case=case, matcher=matcher, labels=labels, objective=objective, starts=[draw() for _ in range(wave)],
                settings=dict(optimizer="lbfgs", max_iterations=o.max_iterations, lr=o.lr, inner=o.lbfgs_inner,
                              history_size=o.history_size, line_search=o.line_search,
                              offer_every=5 * o.lbfgs_inner, explode_factor=o.explode_factor),
                priors=prior, project=project if o.boxed else None, on_step=on_step, on_offer=offer,
                names=[f"{self.name} trial {len(trials) + r}" for r in range(wave)], batched=o.batch_trials)
            new, note = B.run(setup)
            trials += new
            notes.append(note)
            wave = sum(1 for t in new if t.diverged)
            if not wave:
                break
        info: dict[str, Any] = {
            "trials": [t.summary() for t in trials],
            "retries": sum(1 for t in trials if t.diverged),
            "labels": label_info,
            "distance": f"squared L2 ({scale})",
            "priors": prior.describe(),
            "protocol": case.protocol,
            "batched": notes[0] if len(notes) == 1 else notes,
            **C.totals(trials),
        }
        rec, best = C.best_trial_result(case, trials, labels, joint, info, "chosen_trial")
        if best is not None:
            info["score"] = trials[best].score
            if joint:
                info["labels"] = {**label_info, "labels": rec.labels.tolist()}
        return rec


@register("dlg")
class DLG(_LBFGSMatching):
    """Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): squared-L2 gradient matching with L-BFGS,
    jointly over the dummy input and dummy soft labels."""

    paper = "Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019"
    presets = {
        # the paper's plain L-BFGS (no line search), joint labels even when the labels are known
        # (300 and 1,200 outer steps of 20 iterations: the paper's code's counts)
        "zhu2019": dict(max_iterations=6000, lr=1.0, use_known_labels=False, line_search=""),
        "zhu2019-images": dict(max_iterations=24000, lr=1.0, use_known_labels=False, line_search=""),
    }

    def _fixed_labels(self, case, ctx):
        if case.labels is not None and self.options.use_known_labels:
            return case.labels, {"source": "known"}
        return None, {"source": "joint", "note": "(B, C) label logits optimised with the input (soft labels)"}


@register("idlg")
class IDLG(_LBFGSMatching):
    """Improved DLG (Zhao, Mopuri, Bilen 2020): the label from the sign of the last layer's gradient, then
    L-BFGS gradient matching on the input alone."""

    paper = "Zhao, Mopuri, Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv:2001.02610, 2020"
    presets = {"zhao2020": dict(max_iterations=6000, lr=1.0, line_search="")}  # 300 outer steps of 20

    def requirements(self, case: Case) -> list[str]:
        problems = super().requirements(case)
        if case.labels is None or not self.options.use_known_labels:
            problems += label_recovery_problems(case)
        return problems

    def _fixed_labels(self, case, ctx):
        if case.labels is not None and self.options.use_known_labels:
            return case.labels, {"source": "known"}
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        est = recover_labels(case, generator=g)
        return est.labels, {"source": "recovered", **est.to_info()}
