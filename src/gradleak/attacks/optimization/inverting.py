"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020), FedSGD and FedAvg.

Minimise, in normalised input space,
    R(x) = 1 - <g(x), g*>_w / (|g(x)|_w |g*|_w) + alpha * TV(x) + sum_r reg_r(x)
(one cosine over the concatenated update, per-layer weights w, optional layer subset), with Adam applied to the
SIGN of dR/dx, learning rate x0.1 at 3/8, 5/8 and 7/8 of the budget, and a clamp to the image box after every
step; ``restarts`` trials from N(0, 1), the best one by the matching cost WITHOUT TV. For FedAvg cases g(x) is
the client's unrolled multi-step update (``Case.update``, same mini-batch order). A squared-L2 + L-BFGS variant
(``distance='l2', optimizer='lbfgs'``) is offered as well: on smooth models it can do much better (see
ALGORITHMS.md 1.4).

Default ``optimizer='auto'``: the paper's signed Adam on models that are not smooth in their input (ReLU,
max-pooling: ConvNet, ResNets), L-BFGS with a strong-Wolfe line search (box clamp after each outer step of
``lbfgs_inner`` iterations) on smooth ones such as DLG's sigmoid LeNet, where it is far better at an equal number
of gradient evaluations (benchmarks/results/ig_quality.json). ``preset='geiping2020'`` is the paper as
published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...case import Case
from ..base import Attack, Reconstruction, RunContext, register
from ..labels import label_recovery_problems, last_linear, recover_labels
from . import batched as B
from . import common as C
from . import parametrize as Z
from . import priors as P
from .driver import BoxProjection

OPTIMIZERS = ("auto", "signed-adam", "adam", "lbfgs")
DISTANCES = ("cosine", "l2")
LABEL_STRATEGIES = ("auto", "joint")


@dataclass
class IGOptions:
    """max_iterations: optimiser ITERATIONS per restart (Adam steps, or L-BFGS iterations: each one gradient
    evaluation plus the few extra a line search may take; run in outer steps of ``lbfgs_inner``), the same
    count as DLG/iDLG. ``rec.info`` reports ``iterations``, ``outer_steps`` and ``gradient_evaluations``.
    restarts: independent trials; the best by the matching cost without TV is returned.
    optimizer: 'signed-adam' (the paper), 'adam', 'lbfgs', or 'auto': L-BFGS when the model is smooth in its
    input (no ReLU family, no max-pooling: e.g. DLG's sigmoid LeNet, where it is far better at equal
    budget), signed Adam otherwise. lr: Adam step size; lbfgs_lr: L-BFGS learning rate.
    distance: 'cosine' (the paper) or 'l2' (squared L2 relative to the observed norm).
    tv: total-variation weight alpha (for one sample), or 'auto' (the default): the rule of :func:`resolve_tv`,
    1e-2 on a ResNet with BatchNorm, else 1e-4 (the paper's; every LeNet / sigmoid figure). ``rec.info['tv']``
    holds the weight used and ``rec.info['tv_choice']`` why. tv_batch_scaling: multiply it by min(B^2, 10) for a batch
    of B (x1, x4, x9, then x10 from B = 4; off in the paper presets). Measured on the sigmoid LeNet, bundled photos, 1,000 L-BFGS iterations (seed 0, mean dB):
    B = 1: 33.0 at 1e-4, 25.2 at 1e-3; B = 4: 14.1 / 21.2 / 23.0 at 1e-4 / 4e-4 / 1e-3; B = 8: 14.2 / 18.7 /
    18.1 at 1e-4 / 1e-3 / 3e-3 (benchmarks/bench_optim.py). lr_decay: x0.1 at 3/8, 5/8, 7/8. boxed: clamp to the image box.
    layer_weights: 'equal' | 'linear' | 'exp'. layers: parameter names or module prefixes to match (() = all;
    '!name' leaves one out: ``('!fc',)`` matches every observed tensor but the classifier's), or 'auto' (the
    default): the rule of :func:`resolve_matched_layers`, the classifier left out on a ResNet with BatchNorm in
    eval mode, untrained (BatchNorm statistics at their initial values), FedSGD, batch 1, images up to 32 px,
    labels known or recovered; else all. ``rec.info['layers_choice']`` says which and why.
    top_layers: keep only the k observed tensors with the largest norm (0 = all).
    label_strategy: for unknown labels, 'auto' (iDLG for one sample, count-based for a batch, joint logits if
    the model has no final linear layer) or 'joint' ((B, C) label logits optimised with the input).
    init: a Reconstruction or image-space tensor (B, *shape) to start the first trial from (e.g. R-GAP output).
    regularizers: more terms of the objective (not the score): registered priors as ``(name, weight)`` /
    ``(name, weight, options)`` / :class:`.priors.PriorSpec`, or callables ``(x_normalised (B, *shape)) -> 0-d
    tensor`` (weight 1). Every regulariser lives in :mod:`.priors`; the options below are shorthands for them.
    l2: weight of the image-norm prior ``mean(x^2)`` (GradInversion's alpha_l2; prior 'l2').
    bn_prior: BatchNorm statistics matching (GradInversion, Yin et al. 2021; prior 'bn-statistics'): 'none',
    'update' (the statistics the client's returned running buffers reveal: train mode; on FedAvg cases the
    client's local steps are replayed on the candidate, exactly, at the cost of a second unrolled update per
    iteration), 'running' (the model's
    running statistics: the threat model where the server's BatchNorm statistics describe the client's data),
    or 'auto' ('update' when the case has returned buffers in train mode, else 'running'; off for a model
    without BatchNorm). bn_weight: its weight.
    fc_features: weight of the prior 'fc-features' (0: off): the candidate's input features of the classifier
    (the last biased linear layer) matched to the ones its observed weight and bias gradients reveal, exactly
    for one sample and an update that is one gradient (:mod:`.priors`).
    group_consistency: weight of GradInversion's group term (0: off; needs restarts >= 2). The restarts run the
    first ``group_start`` fraction of the budget on their own, then their consensus (the mean after matching
    samples across restarts) is formed once and every restart continues for the rest of the budget with
    ``group_consistency * mean((x - consensus)^2)`` added (both stages batched over restarts where
    ``batch_trials`` can; ``rec.info['batched']`` then holds one note per stage). (GradInversion runs the
    restarts jointly and updates the consensus, with image registration, as it goes: this is the one-update
    form.)
    schedule: the Adam step size: 'step' (x0.1 at 3/8, 5/8, 7/8 of the budget; the paper), 'cosine' (linear
    warm-up over ``warmup`` steps then cosine decay: GradInversion, breaching's "modern" preset), 'constant', or
    'auto' (the default): the rule of :func:`resolve_schedule`, 'cosine' with a warm-up of a tenth of the budget
    (``warmup`` when given) where the image is parametrised as a pyramid (``parametrize``), else 'step'.
    ``rec.info['schedule']`` holds the one used (with ``warmup``) and ``rec.info['schedule_choice']`` why.
    ``lr_decay=False`` with 'step' or 'auto' keeps the rate constant (as before).
    start: the random start: 'randn' (N(0, 1)) or 'patterned-K' (an N(0, 1) tile of (H/K, W/K) repeated K x K
    times: breaching's "modern" preset uses K = 4).
    parametrize: what the optimiser moves (:mod:`.parametrize`): 'pixel' (the image itself), 'laplacian-K' (a
    Laplacian pyramid of K levels: x = z_0 + sum_k up(z_k), every level stepped on its own; the start and the
    box constraint stay those of the image), or 'auto' (the default): the rule of :func:`resolve_parametrize`,
    a pyramid down to 1 x 1 on a ResNet with BatchNorm, else 'pixel' (every LeNet / sigmoid figure).
    ``rec.info['parametrize']`` holds the one used and ``rec.info['parametrize_choice']`` why. Trials with a
    pyramid batch as pixel trials do (the batched objective evaluates every trial's pyramid image and steps and
    projects its levels; trials of different parametrisations are not grouped together).
    lbfgs_inner, history_size, line_search ('strong-wolfe' or ''): L-BFGS settings (optimizer='lbfgs').
    offer_every: steps between best-so-far snapshots (what Ctrl-C returns).
    batch_trials: run the restarts as one batched computation (:mod:`.batched`; falls back to one by one,
    said in ``rec.info['batched']``, where it cannot, e.g. with the 'bn-statistics' prior, which runs its own
    hooked forward pass); False: one by one. ``rec.info['batched']['paths']`` says what a batched trial shares
    with its one-by-one run (signed Adam in float64: the same path while every gradient sign agrees).
    """

    max_iterations: int = 1000
    restarts: int = 1
    lr: float = 0.1
    optimizer: str = "auto"
    distance: str = "cosine"
    tv: float | str = "auto"
    tv_batch_scaling: bool = True
    lr_decay: bool = True
    boxed: bool = True
    layer_weights: str = "equal"
    layers: tuple | str = "auto"
    top_layers: int = 0
    label_strategy: str = "auto"
    init: Any = None
    regularizers: tuple = ()
    l2: float = 0.0
    bn_prior: str = "none"
    bn_weight: float = 1e-2
    fc_features: float = 0.0
    group_consistency: float = 0.0
    group_start: float = 0.5
    schedule: str = "auto"
    warmup: int = 0
    start: str = "randn"
    parametrize: str = "auto"
    lbfgs_lr: float = 1.0
    lbfgs_inner: int = 20
    history_size: int = 100
    line_search: str = "strong-wolfe"
    offer_every: int = 25
    batch_trials: bool = True


TV_PAPER = 1e-4
TV_BN_RESNET = 1e-2
RESIDUAL_BLOCKS = ("BasicBlock", "Bottleneck")  # the zoo's and torchvision's ResNet blocks, by class name


def bn_resnet(model: nn.Module) -> tuple[int, int]:
    """(residual blocks, BatchNorm layers) of ``model``: blocks are modules whose class is named one of
    RESIDUAL_BLOCKS; BatchNorm layers those of :func:`gradleak.batchnorm.bn_layers`."""
    from ... import batchnorm as BN

    blocks = sum(type(m).__name__ in RESIDUAL_BLOCKS for m in model.modules())
    return blocks, len(BN.bn_layers(model))


def resolve_tv(tv: float | str, model: nn.Module) -> tuple[float, str]:
    """The TV weight for one sample that ``tv`` means on ``model``, and why.

    A number is itself. 'auto': TV_BN_RESNET (1e-2) when the model has residual blocks AND BatchNorm layers
    (the zoo ResNets, torchvision's), else TV_PAPER (1e-4). The evidence (docs/batchnorm.md "Measured"):
    Inverting Gradients at 500 iterations, batch 1, FedSGD, eval BatchNorm, untrained zoo models, bundled
    photos: on resnet18 (32 px) and resnet20 TV 1e-2 was above 1e-4 on (nearly) every photo; 1e-4 stays for
    everything else because that is what the LeNet / sigmoid figures were measured with (there L-BFGS at 1e-4
    beat 1e-3 at batch 1: 33.0 / 25.2 dB)."""
    if tv != "auto":
        return float(tv), "given"
    blocks, norms = bn_resnet(model)
    if blocks and norms:
        return TV_BN_RESNET, (f"auto: {TV_BN_RESNET:g}, the model is a ResNet with BatchNorm ({blocks} residual "
                              f"blocks, {norms} BatchNorm layers); the rule and its evidence: docs/batchnorm.md")
    why = "no residual blocks" if not blocks else "no BatchNorm layers"
    return TV_PAPER, f"auto: {TV_PAPER:g} (the paper's), the model is not a ResNet with BatchNorm ({why})"


def resolve_parametrize(name: str, model: nn.Module, shape, bn_mode: str = "eval") -> tuple[str, str]:
    """The parametrisation ``name`` means on ``model`` for samples of ``shape`` (the client running BatchNorm
    in ``bn_mode``), and why.

    A name other than 'auto' is itself. 'auto': on a ResNet with BatchNorm (the rule of :func:`resolve_tv`:
    residual blocks AND BatchNorm layers) run in eval mode, and image samples, a Laplacian pyramid down to 1 x 1
    (``laplacian-K``, K = floor(log2(min(H, W))) + 1: 6 levels at 32 px); else 'pixel'. The evidence
    (docs/batchnorm.md, "Image parametrisations"): Inverting Gradients at 500 iterations, TV 1e-2, batch 1,
    FedSGD, eval BatchNorm, untrained zoo resnet18 (32 px) and resnet20, the bundled photos; 'pixel' stays
    for everything else because that is what the LeNet / sigmoid figures were measured with, and in train mode
    because there the pyramid lost (resnet20, 300 iterations, 2 photos: 8.39 / 11.17 dB pixel against 6.93 /
    9.40 dB pyramid; docs/batchnorm.md)."""
    if name != "auto":
        return name, "given"
    shape = tuple(shape)
    blocks, norms = bn_resnet(model)
    if not (blocks and norms):
        why = "no residual blocks" if not blocks else "no BatchNorm layers"
        return "pixel", f"auto: pixel, the model is not a ResNet with BatchNorm ({why})"
    if bn_mode == "train":
        return "pixel", ("auto: pixel, the client ran BatchNorm in train mode (there the pyramid measured below "
                         "pixel; docs/batchnorm.md)")
    if len(shape) != 3 or min(shape[-2:]) < 2:
        return "pixel", f"auto: pixel, the samples are not images of at least 2 x 2 (shape {shape})"
    levels = Z.full_levels(shape)
    return f"laplacian-{levels}", (f"auto: laplacian-{levels} (a pyramid down to 1 x 1), the model is a ResNet "
                                   f"with BatchNorm ({blocks} residual blocks, {norms} BatchNorm layers); the rule "
                                   "and its evidence: docs/batchnorm.md")


def untrained_bn(model: nn.Module) -> bool:
    """Whether every BatchNorm layer of ``model`` (:func:`gradleak.batchnorm.bn_layers`) still holds its initial
    running statistics (mean exactly 0, variance exactly 1): a model whose BatchNorm has never run on data in
    train mode (an untrained model, e.g. a federation's first round). False for a model without such layers."""
    from ... import batchnorm as BN

    layers = BN.bn_layers(model).values()
    return bool(layers) and all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())
                                for m in layers)


AUTO_LAYERS_MAX_SIZE = 32  # layers='auto' leaves the classifier out only on images up to this size (the one measured)


def resolve_matched_layers(layers, case: Case, label_strategy: str = "auto") -> tuple[tuple, str]:
    """The ``layers`` selection that ``layers`` means for ``case`` (see :func:`.common.resolve_layers`), and why.

    A tuple is itself (() = every observed tensor). 'auto': the classifier's weight and bias are left out of the
    matched update (``('!fc',)`` for the zoo ResNets) where all of these hold: a ResNet with BatchNorm (the rule
    of :func:`resolve_tv`) whose client ran BatchNorm in eval mode (the condition of the pyramid,
    ``parametrize``), an update that is one gradient (FedSGD) of one sample, an image of at most
    AUTO_LAYERS_MAX_SIZE (32) px a side, BatchNorm running statistics still at
    their initial values (:func:`untrained_bn`: an untrained model), a classifier layer in the update
    (:func:`..labels.last_linear`), and labels known or read off that classifier (not optimised jointly); else
    every observed tensor. The labels are still read off the classifier's gradient. The evidence
    (docs/batchnorm.md, "Leaving the classifier out"): Inverting Gradients with IG's defaults at 500 iterations,
    32 px, eval BatchNorm, the bundled photos: ahead on every photo on the untrained zoo resnet18 (two attack
    seeds, 16 photos) and on resnet20-4 at seed 0, mixed on resnet20-4 at seed 1, at batch 8 and with FedAvg, up
    to 4.2 dB behind on resnet18 trained one epoch; 1.7 dB behind on resnet18 at 224 px (one photo)."""
    if layers != "auto":
        return tuple(layers), "given"
    blocks, norms = bn_resnet(case.model)
    if not (blocks and norms):
        return (), "auto: every observed tensor, the model is not a ResNet with BatchNorm"
    if case.bn_mode == "train":
        return (), "auto: every observed tensor, the client ran BatchNorm in train mode"
    if case.protocol != "fedsgd":
        return (), (f"auto: every observed tensor, the update is a {case.protocol} model change over local steps "
                    "(there leaving the classifier out measured mixed: docs/batchnorm.md)")
    if case.batch_size != 1:
        return (), (f"auto: every observed tensor, the batch has {case.batch_size} samples (leaving the classifier "
                    "out was measured at batch 1; at batch 8 it measured mixed: docs/batchnorm.md)")
    shape = tuple(case.spec.shape)
    if len(shape) != 3 or max(shape[-2:]) > AUTO_LAYERS_MAX_SIZE:
        return (), (f"auto: every observed tensor, the samples are not images of at most {AUTO_LAYERS_MAX_SIZE} x "
                    f"{AUTO_LAYERS_MAX_SIZE} (shape {shape}; leaving the classifier out was measured ahead at 32 px "
                    "and 1.7 dB behind at 224 px on one photo: docs/batchnorm.md)")
    if not untrained_bn(case.model):
        return (), ("auto: every observed tensor, the model's BatchNorm running statistics are not at their initial "
                    "values (a trained model: there leaving the classifier out measured up to 4.2 dB below "
                    "matching it, docs/batchnorm.md)")
    head = last_linear(case)
    if head is None:
        return (), "auto: every observed tensor, the update has no classifier layer to leave out"
    if case.labels is None and label_strategy == "joint":
        return (), ("auto: every observed tensor, label_strategy='joint' with unknown labels (label logits "
                    "optimised with the image are matched through the classifier's gradient)")
    return (f"!{head[0]}",), (f"auto: the classifier ({head[0]!r}) left out of the matched update, the model is an "
                              f"untrained ResNet with BatchNorm (running statistics at their initial values) run "
                              f"in eval mode on one sample of at most {AUTO_LAYERS_MAX_SIZE} px, FedSGD, and the "
                              f"labels are "
                              f"{'known' if case.labels is not None else 'read off the classifier'}; the rule and "
                              "its evidence: docs/batchnorm.md")


AUTO_WARMUP_FRACTION = 0.1  # schedule='auto' on a pyramid: the warm-up is this fraction of the budget


def resolve_schedule(schedule: str, warmup: int, parametrize: str, max_iterations: int,
                     lr_decay: bool = True) -> tuple[str, int, str]:
    """(schedule, warm-up steps, why) that ``schedule`` means for a run whose image parametrisation resolved to
    ``parametrize`` over a budget of ``max_iterations`` steps.

    A name other than 'auto' is itself ('step' with ``lr_decay=False`` is 'constant'). 'auto': on a pyramid
    ('laplacian-K') 'cosine' with a warm-up of ``warmup`` steps if given (> 0), else AUTO_WARMUP_FRACTION of the
    budget (50 of 500); else the paper's 'step' (every pixel-form figure was measured with it). The evidence
    (docs/batchnorm.md, "Image parametrisations"): Inverting Gradients with the pyramid on the untrained zoo
    resnet18 at 32 px, eval BatchNorm, batch 1, FedSGD, 500 iterations, the bundled photos, cosine with a
    50-step warm-up against step decay."""
    if schedule != "auto":
        name = "constant" if schedule == "step" and not lr_decay else schedule
        return name, int(warmup), "given"
    if not lr_decay:
        return "constant", int(warmup), "auto with lr_decay=False: a constant rate"
    if parametrize.startswith("laplacian-"):
        warm = int(warmup) if warmup > 0 else max(1, round(AUTO_WARMUP_FRACTION * max_iterations))
        return "cosine", warm, (f"auto: cosine decay after a {warm}-step warm-up, the image is a pyramid "
                                f"({parametrize}); the rule and its evidence: docs/batchnorm.md")
    return "step", int(warmup), "auto: step decay (the paper's), the image is not a pyramid"


def tv_weight(tv: float, batch_size: int, batch_scaling: bool) -> float:
    """The TV weight used: ``tv``, times min(B^2, 10) with ``batch_scaling`` (see IGOptions.tv)."""
    return float(tv) * (min(batch_size ** 2, 10) if batch_scaling else 1)


@register("inverting-gradients", aliases=("ig",))
class InvertingGradients(Attack):
    """Inverting Gradients (Geiping et al., NeurIPS 2020): cosine gradient matching + TV, signed Adam, box
    constraint, restarts; FedAvg multi-step updates through the unrolled client computation."""
    budget_option = "max_iterations"
    restarts_option = "restarts"
    # quick: the default (1,000 iterations: 33.0 / 40.2 dB on the first two bundled photos on lenet, seed 0);
    # standard doubles it with a second restart; thorough is a third of the paper's 24,000 x 8
    budgets = {"quick": {"max_iterations": 1000}, "standard": {"max_iterations": 2000, "restarts": 2},
               "thorough": {"max_iterations": 8000, "restarts": 4}}
    failed_residual, failed_residual_source = C.FAILED_RESIDUAL, C.FAILED_RESIDUAL_SOURCE
    typical_max_batch = 1
    typical_max_batch_source = ("measured on lenet, 3,000 iterations: 33.5 dB at batch 1, worst image 16.8 dB at 3 and 14.2 "
                                "dB at 8; Geiping et al. 2020 recover some, not all, images of larger batches")
    batch_advice = "more --iterations and --restarts, a smaller batch, or a closed-form attack where one applies"

    paper = "Geiping, Bauermeister, Droege, Moeller. Inverting Gradients - How easy is it to break privacy in " \
            "federated learning? NeurIPS 2020"
    Options = IGOptions
    presets = {
        # (the papers' presets optimise the image itself, parametrize='pixel', and match every observed
        # tensor, layers=())
        # the paper's CIFAR-10 runs: 24,000 steps, TV 1e-4, lr 0.1, signed Adam, 8 restarts (ALGORITHMS.md 1.3)
        "geiping2020": dict(max_iterations=24000, restarts=8, tv=1e-4, lr=0.1, optimizer="signed-adam",
                            distance="cosine", layer_weights="equal", tv_batch_scaling=False, parametrize="pixel",
                            layers=()),
        # the paper's ImageNet (trained ResNet) setting: TV 1e-1
        "geiping2020-imagenet": dict(max_iterations=24000, restarts=8, tv=1e-1, lr=0.1, optimizer="signed-adam",
                                     distance="cosine", tv_batch_scaling=False, parametrize="pixel", layers=()),
        # the budget of the paper's hyperparameter sweeps
        "geiping2020-sweep": dict(max_iterations=4800, restarts=1, tv=1e-4, lr=0.1, optimizer="signed-adam",
                                  tv_batch_scaling=False, parametrize="pixel", layers=()),
        # untrained models: TV 1e-6 (ALGORITHMS.md 1.3)
        "untrained": dict(tv=1e-6),
        # FedAvg multi-step updates: TV 1e-6, the paper's signed Adam + cosine (ALGORITHMS.md 1.4)
        "fedavg": dict(tv=1e-6, max_iterations=2000, optimizer="signed-adam"),
        # FedAvg with squared L2 + L-BFGS (ALGORITHMS.md 1.4: much better on smooth models). TV 1e-4, not the
        # paper's 1e-6: on sigmoid LeNet, 2 photos, 3 local steps it lifts 1,200 iterations from 12.6/13.4 dB to
        # 22.3/27.7 dB (the TV term resolves which image gets which content)
        "fedavg-lbfgs": dict(tv=1e-4, distance="l2", optimizer="lbfgs", lbfgs_lr=1.0, max_iterations=1200),
        # a quick look on a CPU
        "fast": dict(max_iterations=300, restarts=1),
        # ImageNet size on a CPU: ResNet-18 at 224 px, batch 1, in under an hour on one thread. Measured step
        # 1.38 s on a 2-core EPYC under load (bench_modern.py --imagenet; docs/batchnorm.md): 2,000 iterations
        # about 46 min. Another machine: time a few iterations first.
        "imagenet-cpu-hour": dict(max_iterations=2000, restarts=1),
        # GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov, CVPR 2021), as its parts are described:
        # Adam (unsigned) lr 0.1, warm-up + cosine decay, 20,000 iterations, TV 1e-4, image norm 1e-6, BatchNorm
        # statistics matching and the group term over restarts. The paper's BN targets are the trained model's
        # running statistics; bn_prior='auto' uses the revealed ones when the update carries them. The BN and
        # group weights (1e-2) and 4 restarts are this package's choice, not the paper's (not checked here);
        # the paper's image registration and label recovery are not part of it (labels: label_strategy).
        "gradinversion": dict(max_iterations=20000, restarts=4, optimizer="adam", lr=0.1, schedule="cosine",
                              warmup=50, distance="cosine", tv=1e-4, tv_batch_scaling=False, l2=1e-6,
                              bn_prior="auto", bn_weight=1e-2, group_consistency=1e-2, group_start=0.5,
                              parametrize="pixel", layers=()),
        # breaching's "modern" ideas (Geiping et al.'s library): signed Adam with warm-up + cosine decay and a
        # patterned start (4 x 4 tiles), TV and the BatchNorm prior where statistics exist (weights ours)
        "modern": dict(max_iterations=24000, restarts=1, optimizer="signed-adam", lr=0.1, schedule="cosine",
                       warmup=50, start="patterned-4", tv=1e-4, tv_batch_scaling=False, bn_prior="auto",
                       bn_weight=1e-2, parametrize="pixel", layers=()),
    }

    def check_options(self, o: IGOptions) -> list[str]:
        p = []
        if o.max_iterations < 1:
            p.append(f"max_iterations must be >= 1, got {o.max_iterations}")
        if o.restarts < 1:
            p.append(f"restarts must be >= 1, got {o.restarts}")
        for name in ("lr", "lbfgs_lr"):
            if not (getattr(o, name) > 0 and math.isfinite(getattr(o, name))):
                p.append(f"{name} must be a positive number, got {getattr(o, name)}")
        if o.optimizer not in OPTIMIZERS:
            p.append(f"optimizer must be one of {OPTIMIZERS}, got {o.optimizer!r}")
        if o.distance not in DISTANCES:
            p.append(f"distance must be one of {DISTANCES}, got {o.distance!r}")
        if o.tv != "auto" and not (isinstance(o.tv, (int, float)) and not isinstance(o.tv, bool) and o.tv >= 0
                                   and math.isfinite(o.tv)):
            p.append(f"tv must be 'auto' or a number >= 0, got {o.tv!r}")
        if o.layer_weights not in C.WEIGHT_SCHEMES:
            p.append(f"layer_weights must be one of {C.WEIGHT_SCHEMES}, got {o.layer_weights!r}")
        if o.layers != "auto" and (isinstance(o.layers, str) or not all(isinstance(s, str) for s in o.layers)):
            p.append(f"layers must be 'auto' or a tuple of parameter names or module prefixes (strings, e.g. "
                     f"('layer1', '!fc')), got {o.layers!r}")
        if o.top_layers < 0:
            p.append(f"top_layers must be >= 0, got {o.top_layers}")
        if o.label_strategy not in LABEL_STRATEGIES:
            p.append(f"label_strategy must be one of {LABEL_STRATEGIES}, got {o.label_strategy!r}")
        p += P.spec_problems(None, tuple(o.regularizers))
        for name in ("l2", "bn_weight", "group_consistency", "fc_features"):
            if not (getattr(o, name) >= 0 and math.isfinite(getattr(o, name))):
                p.append(f"{name} must be a finite number >= 0, got {getattr(o, name)}")
        if o.bn_prior not in P.BN_SOURCES:
            p.append(f"bn_prior must be one of {P.BN_SOURCES}, got {o.bn_prior!r}")
        if not 0 < o.group_start < 1:
            p.append(f"group_start must lie in (0, 1) (the fraction of the budget before the consensus), got "
                     f"{o.group_start}")
        if o.group_consistency > 0 and o.restarts < 2:
            p.append(f"group_consistency needs restarts >= 2 (a consensus of several restarts), got restarts="
                     f"{o.restarts}")
        if o.schedule != "auto" and o.schedule not in C.SCHEDULES:
            p.append(f"schedule must be one of {('auto', *C.SCHEDULES)}, got {o.schedule!r}")
        if o.warmup < 0:
            p.append(f"warmup must be >= 0, got {o.warmup}")
        p += C.start_problems(o.start)
        if o.parametrize != "auto":
            p += Z.problems(o.parametrize)
        if o.init is not None and not isinstance(o.init, (Reconstruction, torch.Tensor)):
            p.append(f"init must be a Reconstruction or an image-space tensor, got {type(o.init).__name__}")
        if o.line_search not in ("", "strong-wolfe"):
            p.append(f"line_search must be '' or 'strong-wolfe', got {o.line_search!r}")
        if o.lbfgs_inner < 1 or o.history_size < 1 or o.offer_every < 1:
            p.append("lbfgs_inner, history_size and offer_every must be >= 1")
        return p

    def requirements(self, case: Case) -> list[str]:
        o = self.options
        names, problems = C.resolve_layers(case, resolve_matched_layers(o.layers, case, o.label_strategy)[0],
                                           o.top_layers)
        problems += C.matching_problems(case, names)
        problems += C.init_problems(case, o.init)
        problems += P.spec_problems(case, self._prior_specs(case))
        problems += Z.case_problems(resolve_parametrize(o.parametrize, case.model, case.spec.shape, case.bn_mode)[0],
                                    tuple(case.spec.shape))
        return problems

    def _prior_specs(self, case: Case) -> list:
        """The objective's regularisers (:mod:`.priors`): TV, image norm, BatchNorm statistics, then the user's."""
        o = self.options
        specs: list = [("tv", self._tv(case)), ("l2", o.l2)]
        if P.resolve_bn_source(case, o.bn_prior) != "none":
            specs.append(("bn-statistics", o.bn_weight, {"source": o.bn_prior}))
        if o.fc_features > 0:
            specs.append(("fc-features", o.fc_features))
        return specs + list(o.regularizers)

    def _tv(self, case: Case) -> float:
        """The TV weight this case runs with (:func:`resolve_tv`, then the batch scaling of ``tv_weight``)."""
        return tv_weight(resolve_tv(self.options.tv, case.model)[0], case.batch_size, self.options.tv_batch_scaling)

    # ------------------------------------------------------------------------------------------------
    def _labels(self, case: Case, ctx: RunContext) -> tuple[torch.Tensor | None, dict]:
        """Fixed labels (known, from init, or recovered) or None for joint optimisation, and a report."""
        o = self.options
        if case.labels is not None:
            return case.labels, {"source": "known"}
        init = o.init
        if isinstance(init, Reconstruction) and init.labels is not None:
            return init.labels.to(case.device), {"source": "init"}
        if o.label_strategy == "auto" and not label_recovery_problems(case):
            g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
            est = recover_labels(case, generator=g)
            return est.labels, {"source": "recovered", **est.to_info()}
        return None, {"source": "joint", "note": "(B, C) label logits optimised with the input"}

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        layer_items, layers_choice = resolve_matched_layers(o.layers, case, o.label_strategy)
        names, _ = C.resolve_layers(case, layer_items, o.top_layers)
        weights = C.layer_weights(len(names), o.layer_weights)
        distance = o.distance if o.distance == "cosine" else "l2-relative"
        matcher = C.GradientMatcher(case, names, weights, distance)
        labels, label_info = self._labels(case, ctx)
        joint = labels is None
        like = torch.zeros((), dtype=case.dtype, device=case.device)
        lo, hi = C.box(case, like)
        prior = P.build(case, self._prior_specs(case))
        tv = self._tv(case)
        spec = case.spec
        param_name, param_choice = resolve_parametrize(o.parametrize, case.model, spec.shape, case.bn_mode)
        param = Z.build(param_name, tuple(spec.shape))
        n = param.count  # the variables: the parametrisation's n tensors, then the label logits when joint

        def objective_with(priors: P.Objective):
            """The one-by-one objective: the data term plus ``priors`` (the batched trials add the same)."""
            def objective(v: list[torch.Tensor]):
                x = param.image(v)
                lab = C.soft_labels(case, v[n]) if joint else labels
                data, cos = matcher.terms(x, lab)
                reg = priors.value(x, lab)
                return (data if reg is None else data + reg), cos
            return objective

        # the image back into the box: v[0].clamp_(lo, hi), or through the pyramid's finest level; batched trials
        # project all rows at once
        project = BoxProjection(lo, hi, param)

        def offer(score: float, v: list[torch.Tensor]):
            lab = C.hard_labels(case, v[n]) if joint else labels
            ctx.offer(score, spec.denormalize(param.image(v).detach()), lab)

        optimizer = o.optimizer
        rough = C.non_smooth_parts(case.model)
        if optimizer == "auto":
            optimizer = "signed-adam" if rough else "lbfgs"
        ctx.progress(o.restarts * o.max_iterations)
        inner = min(o.lbfgs_inner, o.max_iterations)

        def on_step(step: int, total: float, score: float):
            ctx.history.append(total)
            ctx.update(inner if optimizer == "lbfgs" else 1, loss=total)

        grouped = o.group_consistency > 0
        first = max(1, round(o.max_iterations * o.group_start)) if grouped else o.max_iterations
        sched_name, warmup, sched_choice = resolve_schedule(o.schedule, o.warmup, param_name, o.max_iterations,
                                                            o.lr_decay)
        sched = C.lr_schedule(sched_name, o.max_iterations, warmup, explicit=grouped)
        settings = dict(optimizer=optimizer, lr=o.lbfgs_lr if optimizer == "lbfgs" else o.lr, inner=inner,
                        history_size=o.history_size, line_search=o.line_search, offer_every=o.offer_every)

        def trial_setup(objective, priors, starts, iterations, decay, schedule, names):
            return B.TrialSetup(
                case=case, matcher=matcher, labels=labels, objective=objective, starts=starts,
                settings=dict(settings, max_iterations=iterations, decay=decay, schedule=schedule), priors=priors,
                score="data" if distance == "cosine" else "cosine", project=project if o.boxed else None,
                on_step=on_step, on_offer=offer, names=names, batched=o.batch_trials, param=param)

        def run(setup: B.TrialSetup):
            """B.run, then every trial's variables as [image, (label logits)] (the parametrisation undone)."""
            trials, note = B.run(setup)
            if n > 1:
                for t in trials:
                    if t.variables is not None:
                        t.variables = [param.image(t.variables).detach(), *t.variables[n:]]
            return trials, note

        starts = []
        for r in range(o.restarts):
            x0 = C.init_inputs(case, o.init if r == 0 else None, ctx.generator, o.start)
            if o.init is not None and r == 0 and o.boxed:
                x0 = torch.maximum(torch.minimum(x0, hi), lo)
            v0 = param.variables(x0)
            if joint:
                v0.append(C.randn(C.label_logits_shape(case), ctx.generator, case))
            ctx.start(spec.denormalize(x0), C.hard_labels(case, v0[n]) if joint else labels)
            starts.append(v0)
        trials, batch_note = run(trial_setup(objective_with(prior), prior, starts, first, o.lr_decay, sched,
                                             [f"{self.name} restart {r}" for r in range(o.restarts)]))
        group_info = None
        if grouped and first < o.max_iterations and sum(t.finite for t in trials) >= 2:
            # GradInversion's group term (one-update form): the consensus of the restarts after the first stage,
            # then every finite restart continues towards it for the rest of the budget (batched like the first
            # stage; the schedule goes on where it stopped)
            consensus = P.group_consensus([t.variables[0] for t in trials if t.finite], spec)
            grouped_prior = prior.plus(P.build(case, [("group-consistency", o.group_consistency,
                                                       {"target": consensus})]))
            stage1 = trials
            go_on = [r for r, t in enumerate(stage1) if t.finite]
            later = replace(sched, offset=first)
            stage2, note2 = run(trial_setup(objective_with(grouped_prior), grouped_prior,
                                            [param.variables(stage1[r].variables[0].clone())
                                             + [v.clone() for v in stage1[r].variables[1:]] for r in go_on],
                                            o.max_iterations - first, False, later,
                                            [f"{self.name} restart {r} (group)" for r in go_on]))
            joined = dict(zip(go_on, stage2))
            trials = [_joined(t1, joined[r]) if r in joined else t1 for r, t1 in enumerate(stage1)]
            batch_note = [batch_note, note2]
            group_info = {"weight": o.group_consistency, "consensus_at_iteration": first,
                          "restarts_in_consensus": len(go_on)}
        info: dict[str, Any] = {
            "restarts": [t.summary() for t in trials],
            "scores": [t.score if t.finite else None for t in trials],
            "score": "cosine distance over the matched layers, without TV",
            "labels": label_info,
            "matched_tensors": len(names) if len(names) < len(case.observed) else "all",
            "optimizer": optimizer, "distance": o.distance, "tv": tv, "tv_choice": resolve_tv(o.tv, case.model)[1],
            "priors": prior.describe(), "schedule": sched_name,
            **({"warmup": warmup} if sched_name == "cosine" else {}), "schedule_choice": sched_choice,
            "start": o.start if o.init is None else "init (first restart)",
            "parametrize": param_name, "parametrize_choice": param_choice, "layers_choice": layers_choice,
            "protocol": case.protocol,
            "batched": batch_note,
            **C.totals(trials),
        }
        if o.optimizer == "auto":
            info["optimizer_choice"] = (f"auto: signed Adam, the model is not smooth ({', '.join(rough[:3])}"
                                        f"{'...' if len(rough) > 3 else ''})" if rough else
                                        "auto: L-BFGS, the model is smooth in its input")
        if len(names) < len(case.observed):
            info["layers"] = names
        if o.bn_prior != "none":
            info["bn_prior"] = P.resolve_bn_source(case, o.bn_prior)
        if group_info is not None:
            info["group_consistency"] = group_info
        return C.best_trial_result(case, trials, labels, joint, info, "chosen_restart")[0]


def _joined(a: C.Trial, b: C.Trial) -> C.Trial:
    """One restart run in two stages (before and after the group consensus): the better iterate by score, the
    histories and counts added, the second stage's stop reason."""
    best = b if (b.finite and (not a.finite or b.score <= a.score)) else a
    return C.Trial(best.variables, best.score, a.history + b.history, a.outer_steps + b.outer_steps,
                   a.iterations + b.iterations, a.evaluations + b.evaluations,
                   a.diverged_at if a.diverged else (None if b.diverged_at is None else a.outer_steps + b.diverged_at),
                   b.stop, a.seconds + b.seconds)
