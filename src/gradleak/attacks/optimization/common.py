"""Shared pieces of the gradient-matching attacks (DLG, iDLG, Inverting Gradients).

- :func:`total_variation` (re-exported from :mod:`.priors`, where every regulariser lives).
- :func:`lr_schedule`: the step-size schedules of the Adam attacks ('step': x0.1 at 3/8, 5/8, 7/8; 'cosine':
  linear warm-up then cosine decay; 'constant'); :func:`start_inputs`: the random start ('randn' or
  'patterned-K').
- :func:`resolve_layers`, :func:`layer_weights`: layer subsets (names, module prefixes, top-k by observed norm)
  and per-layer weights ('equal' | 'linear' | 'exp', as in Geiping et al. 2020).
- :class:`GradientMatcher`: the data term between the update a candidate batch produces and the observed one
  (cosine over the concatenated update, or squared L2), with the constant parts precomputed once.
- :func:`run_trial` (in :mod:`.driver`, re-exported): the one optimisation driver (signed Adam / Adam /
  L-BFGS) with its stop criteria, counts and divergence detection.
- :func:`soft_labels` / :func:`hard_labels`: jointly optimised label logits (B, C) (or (B,) for one score);
  :func:`init_inputs`: the start (N(0, 1) from the attack's generator, or a given image-space batch);
  :func:`non_smooth_parts`: what makes a model non-smooth in its input (IG's 'auto' optimizer uses it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...activations import resolve as resolve_activation
from ...case import Case, FedSGD
from ..base import Reconstruction
from .driver import DivergenceWarning, Trial, run_adam, run_lbfgs, run_trial, totals  # noqa: F401 (the one driver)
from .priors import total_variation  # noqa: F401 (its home is the priors registry)

WEIGHT_SCHEMES = ("equal", "linear", "exp")


def box(case: Case, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The value range as a per-channel box in normalised space, broadcastable against (B, *shape)."""
    lo, hi = case.spec.bounds(like)
    return lo.unsqueeze(0), hi.unsqueeze(0)


def resolve_layers(case: Case, layers: Sequence[str] = (), top_layers: int = 0) -> tuple[list[str], list[str]]:
    """The observed tensors the objective matches, in observation order, and the problems found.

    layers: parameter names ('conv1.weight') or module prefixes ('conv1', 'layer4') to keep; () keeps all. An
    item starting with '!' leaves that name or prefix out ('!fc': every observed tensor but the classifier's);
    with only such items, all the others are kept.
    top_layers: if > 0, keep (of those) the ``top_layers`` tensors with the largest observed norm.
    """
    names = list(case.observed)
    problems: list[str] = []

    def matching(item: str) -> list[str]:
        hit = [n for n in names if n == item or n.startswith(item + ".")]
        if not hit:
            close = [n for n in names if item and item in n][:4]
            problems.append(f"layer {item!r} is not in the observed update"
                            + (f" (did you mean {close}?)" if close else f" (names look like {names[:3]})"))
        return hit

    if layers:
        wanted = [i for i in layers if not i.startswith("!")]
        dropped = {n for i in layers if i.startswith("!") for n in matching(i[1:])}
        keep: list[str] = []
        for item in wanted:
            keep += [n for n in matching(item) if n not in keep]
        names = [n for n in names if (not wanted or n in keep) and n not in dropped]
        if not names and not problems:
            problems.append(f"layers {tuple(layers)!r} leave no observed tensor to match")
    if top_layers < 0:
        problems.append(f"top_layers must be >= 0, got {top_layers}")
    elif top_layers and names:
        norms = torch.stack([case.observed[n].detach().double().norm() for n in names])
        idx = set(torch.topk(norms, min(top_layers, len(names))).indices.tolist())
        names = [n for i, n in enumerate(names) if i in idx]
    return names, problems


def layer_weights(n: int, scheme: str) -> list[float]:
    """Per-tensor weights in observation order (input side first): 'equal' (all 1), 'linear' (n/n ... 1/n,
    decreasing linearly from the input side) or 'exp' (softmax of n ... 1: mostly the first layers)."""
    if scheme == "equal":
        return [1.0] * n
    ranks = torch.arange(n, 0, -1, dtype=torch.float64)
    if scheme == "linear":
        return (ranks / n).tolist()
    if scheme == "exp":
        return ranks.softmax(0).tolist()
    raise ValueError(f"layer weight scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")


def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest |entry| over a list of tensors (float64, 0-d; not differentiable), 1 where all are zero: the
    scale to divide by before squaring, so that squares neither underflow (updates ~1e-30) nor overflow (~1e30).
    max(-min, max) from one min-max pass per tensor: no |entries| copy (exact; NaN propagates)."""
    with torch.no_grad():
        ends = [e for t in tensors for e in torch.aminmax(t)]  # each tensor's min and max
        m = torch.stack(ends).abs().max().double()
        return torch.where(m > 0, m, torch.ones_like(m))


def norm2_floor(dtype: torch.dtype) -> float:
    """The least plain sum of squares the cosine takes without rescaling first: 2^66 x the dtype's smallest
    normal, so that the squares lost to underflow (each below that smallest normal, < 2^36 of them) are
    below 2^-30 of the sum. 2^-60 in float32; above any sum of squares in float16 (always rescaled)."""
    return torch.finfo(dtype).tiny * 2.0 ** 66


class GradientMatcher:
    """The gradient-matching data term of one case, with everything constant precomputed.

    names: observed tensors to match (default: all); weights: one per name (default 1).
    distance: 'cosine' (1 - <g, g*>_w / (|g|_w |g*|_w) over the concatenation), 'l2' (sum_l w_l |g_l - g*_l|^2)
    or 'l2-relative' (the same divided by sum_l w_l |g*_l|^2, scale free: needed for FedAvg deltas).
    ``terms(x, labels)`` returns (data term, cosine distance), both 0-d tensors differentiable w.r.t. ``x``
    (normalised inputs (B, *shape)) and soft labels.

    The cosine (and the norm that 'l2-relative' divides by) is computed scale free: the observed update is
    stored divided by its largest |entry|, the candidate's is divided by its own before squaring where its
    plain sum of squares could have overflowed or lost squares to underflow (see :meth:`cosine`), and the
    per-tensor sums are combined in float64. An observed update x1e-30 or x1e30 (float32) gives the same
    cosine, and so the same attack, as the unscaled one; nothing underflows to 0 or overflows to inf.
    """

    def __init__(self, case: Case, names: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                 distance: str = "cosine"):
        if distance not in ("cosine", "l2", "l2-relative"):
            raise ValueError(f"distance must be 'cosine', 'l2' or 'l2-relative', got {distance!r}")
        self.case = case
        self.names = list(case.observed) if names is None else list(names)
        if not self.names:
            raise ValueError("GradientMatcher needs at least one observed tensor to match")
        self.distance = distance
        obs = case.observed
        self.targets = [obs[k].detach().reshape(-1) for k in self.names]
        self.w = [1.0] * len(self.names) if weights is None else [float(v) for v in weights]
        self.equal_weights = len(set(self.w)) == 1
        self.tscale = float(max_abs(self.targets))                      # float64 python scalar
        self.units = [t / self.tscale for t in self.targets]                # |entries| <= 1: squares are safe
        unorm2 = sum(w * float(torch.dot(u, u)) for w, u in zip(self.w, self.units))
        self.unorm = math.sqrt(unorm2)
        self.tnorm2 = unorm2 * self.tscale ** 2                             # float64: |g*|_w^2 (may be 1e-60)
        self.vhat = [u / self.unorm for u in self.units] if self.unorm > 0 else self.units  # unit target
        self._work: list[torch.Tensor] | None = None  # the cosine's reused work tensors (see _Match)
        self._generation = 0
        # FedSGD: a private copy of the model whose own parameters are the leaves (no per-step parameter
        # swapping as in functional_call), differentiated only w.r.t. the matched ones. Train-mode BatchNorm
        # updates only this copy's running statistics, which its (batch-statistics) output does not use.
        self.fedsgd = isinstance(case.observation, FedSGD)
        if self.fedsgd:
            sel = set(self.names)
            self._model = copy.deepcopy(case.model)
            params = dict(self._model.named_parameters())
            for k, p in params.items():
                p.requires_grad_(k in sel)
            self._leaves = [params[k] for k in self.names]
            self._pass = _SplitConvPass()
            split_convolutions(self._model, self._pass)

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = True) -> list[torch.Tensor]:
        """The candidate's update for the matched tensors (list in ``names`` order)."""
        if self.fedsgd:
            with torch.enable_grad():
                loss = self.case.loss_fn(self._model(x), labels)
                self._pass.weights = True
                try:
                    return list(torch.autograd.grad(loss, self._leaves, create_graph=create_graph))
                finally:
                    self._pass.weights = False
        full = self.case.update(x, labels, create_graph=create_graph)
        return [full[k] for k in self.names]

    def terms(self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(data term, cosine distance) for normalised inputs x (B, *shape) and labels (int (B,) or soft)."""
        gs = [g.reshape(-1) for g in self.update(x, labels, create_graph=create_graph)]
        data = _Match.apply(self, *gs)
        if self.distance == "cosine":
            return data, data
        with torch.no_grad():
            cos = data.new_tensor(self.cosine([g.detach() for g in gs])[0])
        return data, cos

    def cosine(self, gs: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None = None
               ) -> tuple[float, list[torch.Tensor] | None, float]:
        """(1 - cos, [u_l/|u|_w - g_l/|g|_w], |g|_w) for flat candidate tensors gs (u the stored unit-scale
        target). 1 - cos is computed as 1/2 |u/|u| - g/|g||_w^2, a sum of squared differences, so it is accurate
        to ~1e-14 near a match (the textbook 1 - <g, u>/(|g||u|) cancels to float32's 1e-7 there, a floor that
        stalled L-BFGS at ~27 dB on one LeNet photo). 1 (and no differences) when the candidate update is zero,
        NaN when it is not finite. ``out``: tensors shaped like gs to write the differences into (no fresh
        buffers: on ResNet-18 each fresh 44 MB one costs its page faults every step).

        Scale free in two ways. Where the plain sum of squares |g|_w^2 is finite and at least
        :func:`norm2_floor` of the dtype (then no entry overflowed, and the squares that underflowed are below
        2^-30 of it in all), the differences are u/|u| - g * (1/|g|) in one pass per tensor; otherwise (an
        update of ~1e-30 or ~1e30 in float32, or a non-finite one) the candidate is first divided by its
        largest |entry|. The first is three passes over the update where the second is six: on ResNet-18
        (11.2M entries) that was ~6 ms of a 160 ms IG step."""
        with torch.no_grad():
            outs = [None] * len(gs) if out is None else out  # out=None: fresh tensors
            gn2 = self._weighted_sum(gs)
            if math.isfinite(gn2) and gn2 >= norm2_floor(gs[0].dtype):
                gnorm = math.sqrt(gn2)
                gh = [torch.sub(v, g, alpha=1.0 / gnorm, out=o) for v, g, o in zip(self.vhat, gs, outs)]
                return min(0.5 * self._weighted_sum(gh), 2.0), gh, gnorm
            st = max_abs(gs).to(gs[0].dtype)
            gh = [torch.div(g, st, out=o) for g, o in zip(gs, outs)]
            gn2 = self._weighted_sum(gh)
            s = float(st)
            if not math.isfinite(gn2):
                return float("nan"), None, float("nan")
            if gn2 == 0:
                return 1.0, None, 0.0
            inv = 1.0 / math.sqrt(gn2)
            torch._foreach_mul_(gh, -inv)  # in place: no fresh buffers
            torch._foreach_add_(gh, self.vhat)
            half = 0.5 * self._weighted_sum(gh)
        return min(half, 2.0), gh, s / inv

    def _weighted_sum(self, ts: Sequence[torch.Tensor]) -> float:
        """sum_l w_l <t_l, t_l>: the per-tensor dots in the tensors' dtype, weighted and summed in float64 (in
        order, as Python floats: the operations of a float64 tensor sum, without one small op per term)."""
        dots = torch.stack([torch.dot(t, t) for t in ts]).tolist()
        return sum(wl * d for wl, d in zip(self.w, dots))

    def _buffers(self, gs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This matcher's reusable work tensors for the cosine's differences (and, in place, their gradient),
        shaped like ``gs``; a new generation each call (see :class:`_Match`)."""
        bufs = self._work
        if bufs is None or any(b.shape != g.shape or b.dtype != g.dtype or b.device != g.device
                               for b, g in zip(bufs, gs)):
            bufs = self._work = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in gs]
        self._generation += 1
        return bufs


class _Match(torch.autograd.Function):
    """The matcher's data term over a list of flat update tensors, with a hand-written backward: one fused
    pass per tensor instead of autograd's several. On large models (ResNet-18: 11M parameters) this
    elementwise work is a noticeable part of an IG step.

    Cosine: f = 1/2 |g^ - v^|_w^2 with g^ = g/|g|_w, v^ the unit target; df/dg_l = w_l (d_l - f g^_l)/|g|_w with
    d_l = g^_l - v^_l (the exact derivative of 1 - <g^, v^>_w, written through the accurate differences).
    The differences live in the matcher's work tensors and the backward writes its result over them (no
    parameter-sized allocations per step). A backward whose differences were overwritten since its forward
    (a later forward of the same matcher, or a second backward of the same graph) recomputes them from the
    saved update, with the same operations: the result is the same either way."""

    @staticmethod
    def forward(ctx, m: "GradientMatcher", *gs: torch.Tensor) -> torch.Tensor:
        ctx.m = m
        ctx.save_for_backward(*gs)
        if m.distance == "cosine":
            value, diffs, gnorm = m.cosine(gs, out=m._buffers(gs))
            ctx.cos = (value, diffs, gnorm)
            ctx.generation = m._generation
            return gs[0].new_tensor(value)
        l2 = m._weighted_sum(torch._foreach_sub(list(gs), m.targets))
        scale = 1.0 / m.tnorm2 if (m.distance == "l2-relative" and m.tnorm2 > 0) else 1.0
        ctx.coef = (2.0 * scale, -2.0 * scale)
        return gs[0].new_tensor(l2 * scale)

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        m = ctx.m
        gs = ctx.saved_tensors
        if m.distance == "cosine":
            value, diffs, gnorm = ctx.cos
            if diffs is not None and ctx.generation != m._generation:  # the work tensors were reused since
                value, diffs, gnorm = m.cosine(gs)
            ctx.generation = None  # this backward writes over the differences
            if diffs is None:  # zero or non-finite candidate update: no direction to move in
                return (None, *[torch.zeros_like(t) for t in m.targets])
            c = float(go) / gnorm
            # the differences are e = v^ - g^ = -d, so d - f g^ = (1 - f) d - f v^ = -(1 - f) e - f v^ (one
            # foreach op per step where the weights are equal)
            if m.equal_weights:
                w = m.w[0]
                torch._foreach_mul_(diffs, -w * c * (1.0 - value))
                torch._foreach_add_(diffs, m.vhat, alpha=-w * c * value)
            else:
                for w, d, v in zip(m.w, diffs, m.vhat):
                    d.mul_(-w * c * (1.0 - value)).add_(v, alpha=-w * c * value)
            return (None, *diffs)
        a, b = (float(go) * c for c in ctx.coef)
        if m.equal_weights:
            w = m.w[0]
            out = torch._foreach_mul(list(gs), w * a)
            torch._foreach_add_(out, m.targets, alpha=w * b)
        else:
            out = [(g * (w * a)).add_(t, alpha=w * b) for w, g, t in zip(m.w, gs, m.targets)]
        return (None, *out)


# ---- convolutions whose double backward skips an unused term ------------------------------------------------
class _SplitConvPass:
    """Whether the backward now running is the matcher's first-order one (the update, which needs the weight
    gradients) or a later one through that update (w.r.t. the candidate: no weight gradient is used)."""

    weights = False


def split_convolutions(model: torch.nn.Module, state: _SplitConvPass) -> int:
    """Route ``model``'s bias-free 2-d convolutions (zero padding, numeric padding) through :class:`_SplitConv`;
    the number routed. Only for a private model copy (the matcher's): its first-order update is then
    differentiable w.r.t. the inputs, not w.r.t. the parameters (what gradient matching differentiates).

    Why: torch's double backward of a convolution (``_convolution_double_backward``) computes the gradient
    w.r.t. the WEIGHT whenever the gradient of the first-order input gradient is defined, whether or not it
    is needed, as a convolution in the (C_in, B, H, W) layout that runs several times slower per FLOP than
    the forward one; an IG step needs it for no layer. Splitting the first-order backward into its input part
    and its weight part (two ops) leaves that term out. Each op and each sum of two contributions is the one
    torch computes, so gradients and the step are bit-for-bit the same (tests/test_optimization.py); convs with
    a bias stay as they are (their bias term would add in another order)."""
    n = 0
    for m in model.modules():
        if (type(m) is torch.nn.Conv2d and m.bias is None and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)):
            m.forward = _SplitConvForward(m, state)
            n += 1
    return n


# multiply-adds of one conv call from which the split pays on a CPU (measured one thread: ResNet-18 at 32 px,
# 19M-38M per 3x3 conv, steps 0.74-0.9x; ResNet-20, at most 9.4M at batch 4, was 5% slower split)
SPLIT_CONV_MIN_MACS = 10_000_000


class _SplitConvForward:
    def __init__(self, conv: torch.nn.Conv2d, state: _SplitConvPass):
        self.conv, self.state = conv, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        out = x.shape[0] * c.out_channels * math.prod(c.weight.shape[1:])
        out *= math.prod((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                         zip(x.shape[-2:], c.padding, c.dilation, c.kernel_size, c.stride))
        if out < SPLIT_CONV_MIN_MACS:  # the split's own overhead would cost more than the term it saves
            return c._conv_forward(x, c.weight, None)
        return _SplitConv.apply(x, c.weight, (c.stride, c.padding, c.dilation, c.groups), self.state)


class _SplitConv(torch.autograd.Function):
    """A bias-free conv2d whose backward is two differentiable ops: the input gradient (:class:`_ConvInput`)
    and, in the first-order pass only, the weight gradient (``aten.convolution_backward`` asked for the
    weight alone, so its own double backward has no input-gradient term to differentiate)."""

    @staticmethod
    def forward(ctx, x, w, conf, state):
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.state = conf, state
        stride, padding, dilation, groups = conf
        return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _ConvInput.apply(go, x.detach(), w.detach(), ctx.conf)
        if ctx.needs_input_grad[1] and ctx.state.weights:
            gw = torch.ops.aten.convolution_backward(go, x, w, None, list(stride), list(padding), list(dilation),
                                                     False, [0, 0], groups, [False, True, False])[1]
        return gx, gw, None, None


class _ConvInput(torch.autograd.Function):
    """The input gradient of a conv2d (torch's own kernel); its backward is the convolution of the incoming
    gradient with the weight (what torch's double backward computes for it), and nothing w.r.t. the weight."""

    @staticmethod
    def forward(ctx, go, x, w, conf):
        ctx.save_for_backward(w)
        ctx.conf = conf
        stride, padding, dilation, groups = conf
        return torch.ops.aten.convolution_backward(go, x, w, None, list(stride), list(padding), list(dilation),
                                                   False, [0, 0], groups, [True, False, False])[0]

    @staticmethod
    def backward(ctx, ggx):
        (w,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        return torch.nn.functional.conv2d(ggx, w, None, stride, padding, dilation, groups), None, None, None


# ---------------------------------------------------------------------------------------------------------
_NON_SMOOTH = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.RReLU, torch.nn.ELU,
               torch.nn.SELU, torch.nn.CELU, torch.nn.Hardtanh, torch.nn.Hardswish, torch.nn.Hardsigmoid,
               torch.nn.Threshold, torch.nn.Softshrink, torch.nn.Hardshrink,
               torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd)


def non_smooth_parts(model: torch.nn.Module) -> list[str]:
    """Modules that make the loss non-smooth in the input (activations that are not ``smooth``, max-pooling,
    the hard-threshold torch modules). L-BFGS needs a twice-differentiable model to beat signed Adam (DLG's
    observation); [] means the model looks smooth."""
    out = []
    for name, m in model.named_modules():
        act = resolve_activation(m)
        if act is not None:
            if not act.smooth:
                out.append(f"{name} ({act.name})")
        elif isinstance(m, _NON_SMOOTH):
            out.append(f"{name} ({type(m).__name__})")
    return out


def soft_labels(case: Case, logits: torch.Tensor) -> torch.Tensor:
    """Soft labels from optimised label variables (see :meth:`gradleak.losses.Loss.soft_labels`)."""
    return case.loss_fn.soft_labels(logits)


def hard_labels(case: Case, logits: torch.Tensor) -> torch.Tensor:
    """int64 (B,) labels from optimised label variables."""
    return case.loss_fn.hard_labels(logits)


def label_logits_shape(case: Case) -> tuple[int, ...]:
    return case.loss_fn.label_logits_shape(case.batch_size, case.spec.num_classes)


def init_inputs(case: Case, init, generator: torch.Generator, start: str = "randn") -> torch.Tensor:
    """Normalised start (B, *shape): from ``init`` (a Reconstruction or an image-space tensor), else the random
    ``start`` (:func:`start_inputs`)."""
    if init is not None:
        x = init.inputs if isinstance(init, Reconstruction) else torch.as_tensor(init)
        x = x.detach().to(device=case.device, dtype=case.dtype)
        return case.spec.normalize(x).contiguous()
    return start_inputs(case, start, generator)


SCHEDULES = ("step", "cosine", "constant")


def numbered(value, prefix: str) -> int | None:
    """K of an option value spelled ``prefix`` + K (K a whole number: 'patterned-4', 'laplacian-6'); else None."""
    if isinstance(value, str) and value.startswith(prefix) and value[len(prefix):].isdigit():
        return int(value[len(prefix):])
    return None


def start_problems(start: str) -> list[str]:
    """What is wrong with a ``start`` option value ([] if fine)."""
    if start == "randn" or (numbered(start, "patterned-") or 0) >= 1:
        return []
    return [f"start must be 'randn' or 'patterned-K' (K >= 1 tiles per side), got {start!r}"]


def start_inputs(case: Case, start: str, generator: torch.Generator) -> torch.Tensor:
    """A random normalised start (B, *shape): 'randn' draws N(0, 1) per entry; 'patterned-K' draws N(0, 1) for
    a (H/K, W/K) tile per image and channel and repeats it K x K times (the patterned start of breaching's
    "modern" preset: a start with K x K-fold repeated structure; K = 1 is 'randn')."""
    shape = (case.batch_size, *case.spec.shape)
    if start == "randn" or not case.spec.is_image:
        return randn(shape, generator, case)
    k = numbered(start, "patterned-")
    h, w = shape[-2:]
    tile = randn((shape[0], shape[1], -(-h // k), -(-w // k)), generator, case)
    return tile.repeat(1, 1, k, k)[..., :h, :w].contiguous()


@dataclass(frozen=True)
class Schedule:
    """A step-size factor per Adam step (``lr x schedule(step)``), see :func:`lr_schedule`. A value object (its
    ``repr`` names its settings) so that batched trials with the same schedule share one batch; ``offset``:
    the steps already run (a budget run in stages, e.g. before and after the group consensus)."""

    name: str
    max_iterations: int
    warmup: int = 0
    offset: int = 0

    def __call__(self, step: int) -> float:
        step = step + self.offset
        if self.name == "step":
            marks = [int(self.max_iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            return 0.1 ** sum(step >= m for m in marks)
        if self.name == "constant":
            return 1.0
        warm = max(0, min(int(self.warmup), self.max_iterations - 1))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(self.max_iterations - warm, 1)))


def lr_schedule(name: str, max_iterations: int, warmup: int = 0, *, explicit: bool = False) -> Schedule | None:
    """The step-size factor per step (a :class:`Schedule`, ``f(step) -> float``: lr x f), or None for the
    driver's built-in 'step' schedule (x0.1 at 3/8, 5/8 and 7/8 of the budget, Geiping et al. 2020; with
    ``explicit`` that schedule as a Schedule, for a budget run in several stages). 'cosine': a linear warm-up
    over ``warmup`` steps to the full rate, then 1/2 (1 + cos(pi t / T)) over the remaining T steps (warm-up
    plus cosine decay, as in GradInversion and breaching's "modern" preset); 'constant': 1."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name == "step" and not explicit:
        return None
    return Schedule(name, int(max_iterations), int(warmup))


def matching_problems(case: Case, names: Sequence[str]) -> list[str]:
    """Why the observed update cannot be matched ([] if it can)."""
    if names and all(float(case.observed[n].abs().max()) == 0.0 for n in names):
        return ["the observed update is zero on every matched tensor: there is nothing to match"]
    return []


def init_problems(case: Case, init) -> list[str]:
    """What is wrong with an ``init`` option value for this case ([] if fine)."""
    if init is None:
        return []
    if isinstance(init, Reconstruction):
        x = init.inputs
    elif isinstance(init, torch.Tensor):
        x = init
    else:
        return [f"init must be a Reconstruction or an image-space tensor (B, *shape), got {type(init).__name__}"]
    expected = (case.batch_size, *case.spec.shape)
    if tuple(x.shape) != expected:
        return [f"init has shape {tuple(x.shape)}, expected {expected} (batch, *sample shape)"]
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        return ["init must be a finite floating-point tensor"]
    return []


def randn(shape: tuple[int, ...], generator: torch.Generator, case: Case) -> torch.Tensor:
    """N(0, 1) draw from the CPU ``generator`` (the only randomness source), moved to the case's dtype/device."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=case.device, dtype=case.dtype)


def best_trial_result(case: Case, trials: Sequence["Trial"], labels: torch.Tensor | None, joint: bool,
                      info: dict, key: str) -> tuple[Reconstruction, int | None]:
    """The Reconstruction of the finite trial with the lowest score (its index stored as ``info[key]``), or a
    NaN-filled one (the base class turns it into a clear error) when every trial diverged. Variables of a
    trial: [normalised inputs] or [normalised inputs, label logits] when labels were optimised jointly."""
    finite = [i for i, t in enumerate(trials) if t.finite]
    if not finite:
        nan = torch.full((case.batch_size, *case.spec.shape), float("nan"), dtype=case.dtype, device=case.device)
        return Reconstruction(inputs=nan, info=info), None
    best = min(finite, key=lambda i: trials[i].score)
    bt = trials[best]
    info[key] = best
    lab = hard_labels(case, bt.variables[1]) if joint else labels
    return Reconstruction(inputs=case.spec.denormalize(bt.variables[0]), labels=lab, history=bt.history,
                          info=info), best


# The residual above which a gradient-matching result is reported as failed (Attack.failed_residual). Measured by
# `gradleak attack --attack ATTACK --model lenet|convnet --num-images B --iterations N --json` on the bundled
# photos, seed 0, one thread (convnet with --width 16 --image-size 16); figures in docs/guide.md "Batches".
FAILED_RESIDUAL = 1e-3
FAILED_RESIDUAL_SOURCE = ("measured with IG and DLG on lenet and convnet, bundled photos, batches 1-8: every residual above it "
                          "came with a failed reconstruction (<= 17 dB), every success (25-45 dB) ended below 7e-5")
