"""Per-trial parameter gradients of many trials that share ONE model, from one ordinary batched forward and
one backward (the stacked formulation of batched trials).

All FedSGD trials on one case share the model's parameters; only their inputs differ. Where no layer couples
samples (eval mode: BatchNorm is a per-channel affine map), the N trials' inputs (N, B, ...) are stacked into
one batch of N*B samples of the ORDINARY model (unbatched weights: every convolution is an ordinary batched
convolution), and with z_l the output of layer l and a_l its input,

    delta_l = d(sum_t loss_t) / d z_l           (one autograd.grad with create_graph=True; the trials'
                                                 losses are independent, so the sum gives each its own)
    g_t(W_l) = sum_{s in trial t} rule_l(a_l[s], delta_l[s])

with the rules (per sample s, differentiable in a and delta, so a second backward reaches the inputs):

    Linear       dW = delta^T a (rows: the positions of a (…, in) input), db = sum delta
    Conv2d       dW = delta (O x L) @ unfold(a)^T (L output positions), db = sum over positions of delta;
                 its backward: two grouped convolutions, one group per trial (:class:`_ConvWeight`), the
                 output-gradient part a bmm against the kept unfold on few input channels
                 (:data:`BMM_MAX_CHANNELS`), the input part through the space-to-depth form on a strided
                 image layer (:data:`SPACE_TO_DEPTH_MAX_FLOPS`)
    BatchNorm    (eval: running statistics) dgamma = sum delta * (a - mean) / sqrt(var + eps), dbeta = sum delta

A trial of B > 1 samples sums its samples' rules in the same contraction (``einsum`` over (sample, position)).

One registration per layer type (:func:`register`): ``RULES[type] = (rule, problem)``; a module whose type
has no rule (or whose rule reports a problem: grouped convolution, a padding mode other than zeros, BatchNorm
with batch statistics, a module called twice per forward) makes :func:`problems` non-empty, and the caller
(:mod:`.batched`) uses the vmap formulation instead. FedAvg's local steps give every trial its own
parameters after the first step, so the stacked formulation is FedSGD only.

Isolation: nothing in the forward, the backward to delta or the rules sums across trials (a trial's
contractions run over its own samples), so a trial with a non-finite input changes no other trial's
gradient (tests/test_batched_stacked.py checks it).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# rule(module, a (N*B, ...), z (N*B, ...), delta (N*B, ...), trials N) -> {local parameter name: (N, *param.shape)}
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], dict]
Problem = Callable[[nn.Module], str]

RULES: dict[type, tuple[Rule, Problem]] = {}


def register(*types: type, problem: Problem | None = None):
    """Decorator: ``rule`` gives per-trial gradients of the parameters of modules of ``types`` (exact types;
    a subclass that overrides ``forward`` needs its own registration)."""
    def deco(rule: Rule) -> Rule:
        for t in types:
            RULES[t] = (rule, problem or (lambda m: ""))
        return rule
    return deco


def lookup(module: nn.Module) -> tuple[Rule, Problem] | None:
    """The rule of ``module``'s type: the nearest registered base class whose ``forward`` it still uses."""
    for base in type(module).__mro__:
        if base in RULES:
            return RULES[base] if type(module).forward is base.forward else None
    return None


@register(nn.Linear)
def _linear(m: nn.Linear, a, z, d, n):
    a2 = a.reshape(n, -1, a.shape[-1])                      # (N, B*positions, in)
    d2 = d.reshape(n, -1, d.shape[-1])                      # (N, B*positions, out)
    out = {"weight": torch.bmm(d2.transpose(1, 2), a2)}
    if m.bias is not None:
        out["bias"] = d2.sum(1)
    return out


def _conv_problem(m: nn.Conv2d) -> str:
    if m.groups != 1:
        return f"grouped convolution (groups={m.groups})"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r}"
    return ""


def _unfold(a: torch.Tensor, conv) -> torch.Tensor:
    """``F.unfold(a, ...)`` (NB, C*kh*kw, L), as one copy of a strided view of the padded input (the same
    values; about 2x faster than im2col on these sizes on a CPU). Not differentiable (used inside
    :class:`_ConvWeight`)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = conv[0], conv[1], conv[2], conv[3]
    ap = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    v = ap.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, c, ho, wo = v.shape[:4]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


class _ConvWeight(torch.autograd.Function):
    """Per-trial weight gradients of a Conv2d, (N, O, C*kh*kw) from its input a (N*B, C, H, W) and output
    gradient d (N*B, O, Ho, Wo): forward unfold + bmm (per trial, its samples' positions contracted together);
    backward two GROUPED convolutions (one group per trial, the trial's own gradient as the kernel), the
    ordinary conv kernels, instead of fold and transposed copies. Once differentiable (the attacks need the
    gradient w.r.t. the inputs of the matching objective, not its Hessian)."""

    @staticmethod
    def forward(ctx, a, d, n, conv):
        ctx.n, ctx.conv = n, conv
        k, dil, pad, st = conv
        nb, o = d.shape[:2]
        b = nb // n
        positions = d[0, 0].numel()
        ctx.small = positions * b <= SMALL_MAPS
        c = a.shape[1]
        if not ctx.small and c * k[0] * k[1] * positions > UNFOLD_MAX:
            ctx.save_for_backward(a, d, None)
            return _grouped_weight_gradient(a, d, n, conv)
        u = _unfold(a, conv)                                                          # (NB, Ckk, L)
        # the bmm backward (small maps), and the output-gradient part of the backward on few input channels,
        # need the unfolded input again: kept (as large as a's unfold)
        ctx.save_for_backward(a, d, u if ctx.small or c < BMM_MAX_CHANNELS else None)
        if b == 1:
            return torch.bmm(d.reshape(nb, o, -1), u.transpose(1, 2))
        d4 = d.reshape(n, b, o, -1).transpose(1, 2).reshape(n, o, -1)                 # (N, O, B*L)
        u4 = u.reshape(n, b, u.shape[1], -1).transpose(1, 2).reshape(n, u.shape[1], -1)
        return torch.bmm(d4, u4.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, d, u = ctx.saved_tensors
        n, (k, dil, pad, st) = ctx.n, ctx.conv
        nb, c, h, w = a.shape
        o = d.shape[1]
        b = nb // n
        if ctx.small:
            return _mm_backward(ctx, a, d, u, g, n, b, (k, dil, pad, st))
        kern = g.reshape(n * o, c, *k)
        # a trial's samples as the batch, its channels in its group: (B, N*C, H, W)
        ag = a.reshape(n, b, c, h, w).transpose(0, 1).reshape(b, n * c, h, w)
        dg = d.reshape(n, b, o, *d.shape[2:]).transpose(0, 1).reshape(b, n * o, *d.shape[2:])
        gd = gx = None
        if ctx.needs_input_grad[1] and u is not None:  # few input channels: bmm against the kept unfold
            gd = _mm_output_gradient(u, g, n, b, o, d.shape)
        elif ctx.needs_input_grad[1]:
            gd = F.conv2d(ag, kern, stride=st, padding=pad, dilation=dil, groups=n)
            gd = gd.reshape(b, n, o, *d.shape[2:]).transpose(0, 1).reshape(d.shape)
        if ctx.needs_input_grad[0]:
            gx = _grouped_input_gradient(ag.shape, kern, dg, n, (k, dil, pad, st))
            gx = gx.reshape(b, n, c, h, w).transpose(0, 1).reshape(a.shape)
        return gx, gd, None, None


def _grouped_input_gradient(shape, kern, dg, n, conv):
    """The input gradient of the grouped convolution (``n`` groups) of kernels ``kern`` at ``dg``; a strided
    one through its space-to-depth form (:data:`SPACE_TO_DEPTH_MAX_FLOPS`: a stride-1 transposed convolution
    (measured: 0.33 ms vs 0.77 ms on LeNet's first layer at 16 trials), then the rearranging back)."""
    k, dil, pad, st = conv
    k2 = _space_to_depth_kernel(kern, k, st, dil)
    if k2 is None:
        return torch.nn.grad.conv2d_input(shape, kern, dg, stride=st, padding=pad, dilation=dil, groups=n)
    b, nc, h, w = shape
    (sh, sw), (ph, pw) = st, pad
    hq = (dg.shape[2] + k2.shape[2] - 1) * sh
    wq = (dg.shape[3] + k2.shape[3] - 1) * sw
    g2 = torch.nn.grad.conv2d_input((b, nc * sh * sw, hq // sh, wq // sw), k2, dg, groups=n)
    gp = g2.reshape(b, nc, sh, sw, hq // sh, wq // sw).permute(0, 1, 4, 2, 5, 3).reshape(b, nc, hq, wq)
    return F.pad(gp, (-pw, w + pw - wq, -ph, h + ph - hq))  # the adjoint of _space_to_depth's padding


# Above this many unfolded entries per sample (C x kh x kw x output positions) a trial's weight gradient is
# the grouped convolution's weight gradient (one group per trial) instead of unfold + bmm: the unfold is a copy
# of that size, and measured on one thread (16 trials) the grouped form took 14 ms against 35 ms on a
# 64 -> 64 channel 3x3 convolution at 32x32 (ConvNet), 2.1 vs 3.0 ms at 16 -> 32 channels, while on LeNet's
# 3- and 12-channel 5x5 convolutions (<= 19,200 entries) unfold + bmm was faster (0.39 vs 0.55 ms).
UNFOLD_MAX = 1 << 16


def _grouped_weight_gradient(a, d, n, conv):
    """Per-trial weight gradients (N, O, C*kh*kw) as the weight gradient of a grouped convolution (a trial's
    samples as the batch, its channels in its group: its samples summed, no sample of another trial)."""
    k, dil, pad, st = conv
    nb, c, h, w = a.shape
    o = d.shape[1]
    b = nb // n
    ag = a.reshape(n, b, c, h, w).transpose(0, 1).reshape(b, n * c, h, w)
    dg = d.reshape(n, b, o, *d.shape[2:]).transpose(0, 1).reshape(b, n * o, *d.shape[2:])
    shape = a.new_empty(()).expand(n * o, c, *k)  # the weight's shape (its values are not read)
    gw = torch.ops.aten.convolution_backward(dg, ag, shape, None, list(st), list(pad), list(dil), False, [0, 0],
                                             n, [False, True, False])[1]
    return gw.reshape(n, o, c * k[0] * k[1])


# Below this many input channels (per trial: per group) the unfolded input is kept from the forward and the
# weight rule's gradient w.r.t. the output gradient is a bmm against it instead of a grouped convolution
# (measured one thread, 16 trials, min of 30: LeNet's 3- and 12-channel 5x5 convolutions 0.105 ms bmm vs 0.33,
# 0.21 and 0.18 ms grouped; 32 -> 64 channels stride 2 at 16x16: 0.41 vs 0.44; 64 -> 64 at 8x8: 0.82 vs 0.73).
BMM_MAX_CHANNELS = 32


def _mm_output_gradient(u, g, n, b, o, shape):
    """d(sum g . rule)/d(delta) = g_t @ unfold(a) per sample: (NB, O, L) as ``shape`` (u (NB, Ckk, L), g (N, O,
    Ckk))."""
    ckk, pos = u.shape[1], u.shape[2]
    ut = u.reshape(n, b, ckk, pos).transpose(1, 2).reshape(n, ckk, b * pos)
    return torch.bmm(g, ut).reshape(n, o, b, pos).transpose(1, 2).reshape(shape)


# Output maps of at most this many positions per trial (samples x positions) take the bmm backward: there
# the grouped convolutions' cost is re-laying out the (O, C, kh, kw) kernel of every trial (ResNet-18's 4x4
# layer4: 3x slower measured, one thread); on larger maps the convolutions are faster than unfold/fold (LeNet's
# 8x8 maps: a 16-trial round 4-8% faster with grouped convolutions than with bmm + fold; ResNet-20 equal).
SMALL_MAPS = 32


def _mm_backward(ctx, a, d, u, g, n, b, conv):
    """_ConvWeight's backward as bmm against the unfolded input ``u`` (NB, Ckk, L), then fold (small output
    maps)."""
    k, dil, pad, st = conv
    nb, c, h, w = a.shape
    o = d.shape[1]
    ckk, pos = u.shape[1], u.shape[2]

    def per_trial(t, rows):  # (NB, rows, L) -> (N, rows, B*L)
        return t.reshape(n, b, rows, pos).transpose(1, 2).reshape(n, rows, b * pos)

    def per_sample(t, rows):  # (N, rows, B*L) -> (NB, rows, L)
        return t.reshape(n, rows, b, pos).transpose(1, 2).reshape(nb, rows, pos)

    gd = gx = None
    if ctx.needs_input_grad[1]:
        gd = _mm_output_gradient(u, g, n, b, o, d.shape)
    if ctx.needs_input_grad[0]:
        gu = per_sample(torch.bmm(g.transpose(1, 2), per_trial(d.reshape(nb, o, pos), o)), ckk)
        gx = F.fold(gu, (h, w), k, dilation=dil, padding=pad, stride=st)
    return gx, gd, None, None


@register(nn.Conv2d, problem=_conv_problem)
def _conv2d(m: nn.Conv2d, a, z, d, n):
    w = _ConvWeight.apply(a, d, n, (m.kernel_size, m.dilation, m.padding, m.stride))
    out = {"weight": w.reshape(n, *m.weight.shape)}
    if m.bias is not None:
        out["bias"] = d.reshape(n, -1, d.shape[1], d[0, 0].numel()).sum((1, 3))
    return out


def _bn_problem(m: nn.modules.batchnorm._BatchNorm) -> str:
    if m.training or m.running_mean is None or m.running_var is None:
        return "BatchNorm with batch statistics (train mode or no running statistics)"
    return ""


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, problem=_bn_problem)
def _batchnorm(m, a, z, d, n):
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    c = a.shape[1]
    out = {}
    if m.weight is not None:
        out["weight"] = (d * xhat).reshape(n, -1, c, *a.shape[2:]).transpose(1, 2).reshape(n, c, -1).sum(2)
    if m.bias is not None:
        out["bias"] = d.reshape(n, -1, c, *a.shape[2:]).transpose(1, 2).reshape(n, c, -1).sum(2)
    return out


def problems(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Why the stacked formulation cannot give the gradients of parameters ``names`` of ``model`` ([] if it
    can): a matched parameter's module has no rule, or its rule reports a problem."""
    owners = _owners(model, names)
    out = []
    for prefix, (module, _) in owners.items():
        hit = lookup(module)
        label = prefix or "the model"
        if hit is None:
            out.append(f"no per-sample rule for {type(module).__name__} ({label})")
            continue
        p = hit[1](module)
        if p:
            out.append(f"{label}: {p}")
    return out


def _owners(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, list[tuple[str, str]]]]:
    """module prefix -> (module, [(full name, local name)]) for the parameters ``names``, in first-use order."""
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, list]] = {}
    for full in names:
        prefix, _, local = full.rpartition(".")
        out.setdefault(prefix, (modules[prefix], []))[1].append((full, local))
    return out


class _ConvInputOnly(torch.autograd.Function):
    """A Conv2d whose backward gives the input gradient as ``conv_transpose2d`` (differentiable ops, so the
    second backward is a plain convolution). The model's own conv backward (``convolution_backward`` under
    ``create_graph``) gives the same first backward, but its double backward also computes a weight-shaped
    correlation of the two gradients (measured: a (C, N, H, W) x (O, N, H, W) convolution per layer, 4% to
    12% of a 16-trial convnet round) that nothing uses here: the stacked model's weights need no gradient."""

    @staticmethod
    def forward(ctx, a, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(weight)
        ctx.conv = (tuple(a.shape[2:]), stride, padding, dilation)
        return F.conv2d(a, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, go):
        weight, = ctx.saved_tensors
        (h, w), stride, padding, dilation = ctx.conv
        k = weight.shape[2:]
        extra = [size - ((o - 1) * s - 2 * p + d * (kk - 1) + 1)
                 for size, o, s, p, d, kk in zip((h, w), go.shape[2:], stride, padding, dilation, k)]
        gi = F.conv_transpose2d(go, weight, None, stride, padding, tuple(extra), 1, dilation)
        return gi, None, None, None, None, None


def _conv_input_only(module: nn.Conv2d):
    """``module``'s forward through :class:`_ConvInputOnly` (weights that need no gradient, zero padding); a
    strided one in its space-to-depth form where that pays (:func:`_space_to_depth_kernel`)."""
    kern = _space_to_depth_kernel(module.weight.detach(), module.kernel_size, module.stride, module.dilation)
    if kern is not None:
        k, st, pad = module.kernel_size, module.stride, module.padding

        def forward(a):
            return _ConvInputOnly.apply(_space_to_depth(a, k, st, pad), kern, module.bias,
                                        (1, 1), (0, 0), (1, 1))
        return forward

    def forward(a):
        return _ConvInputOnly.apply(a, module.weight, module.bias, module.stride, module.padding, module.dilation)
    return forward


# A strided convolution (stride s, kernel k, no dilation) equals a stride-1 convolution of its zero-padded input
# rearranged space-to-depth (each s x s block's pixels as s*s channels: (C*s*s, H/s, W/s)) with its kernel
# zero-padded to a multiple of s and rearranged the same way ((O, C*s*s, ceil(k/s), ceil(k/s))). The stacked
# model runs its strided convolutions with few input channels (an image's) so where the padded kernel costs at
# most this factor in FLOPs: their input gradient (second backward) is then a stride-1 transposed convolution.
# Measured one thread, 16 trials, LeNet's 3 -> 12 channel 5x5 stride-2 layer at 32x32 (FLOP factor 1.44): the
# input gradient 0.24 ms against 0.73 ms for the stride-2 conv_transpose2d (the forward 0.25 vs 0.13 ms, the
# rearranging included), the rule's grouped input gradient 0.33 vs 0.77 ms; a 16-trial LeNet round 11.1 ms
# against 11.6 ms (median of 80 interleaved rounds). On its 12-channel stride-2 layer the rearranging costs
# more than the kernels save (the round 12.1 ms with both layers so). A 3x3 stride-2 kernel would cost 1.78x
# the FLOPs, a 1x1 stride-2 one 4x.
SPACE_TO_DEPTH_MAX_FLOPS = 1.5
SPACE_TO_DEPTH_MAX_CHANNELS = 4


def _space_to_depth_kernel(weight: torch.Tensor, k, stride, dilation) -> torch.Tensor | None:
    """The kernel of the space-to-depth form of a conv (see above), or None where it is not used (stride 1,
    dilation, or more than SPACE_TO_DEPTH_MAX_FLOPS times the FLOPs)."""
    if tuple(stride) == (1, 1) or tuple(dilation) != (1, 1) or weight.shape[1] > SPACE_TO_DEPTH_MAX_CHANNELS:
        return None
    q = [-(-kk // ss) for kk, ss in zip(k, stride)]
    if q[0] * stride[0] * q[1] * stride[1] > SPACE_TO_DEPTH_MAX_FLOPS * k[0] * k[1]:
        return None
    o, c = weight.shape[:2]
    (sh, sw), (qh, qw) = stride, q
    wp = F.pad(weight, (0, qw * sw - k[1], 0, qh * sh - k[0]))
    return wp.reshape(o, c, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(o, c * sh * sw, qh, qw).contiguous()


def _space_to_depth(a: torch.Tensor, k, stride, padding) -> torch.Tensor:
    """``a`` (N, C, H, W) zero-padded as the conv (kernel ``k``) pads it, and to the whole s x s blocks its
    padded kernel reads, rearranged to (N, C*sh*sw, H'/sh, W'/sw) (differentiable)."""
    n, c, h, w = a.shape
    (sh, sw), (ph, pw) = stride, padding
    qh, qw = -(-k[0] // sh), -(-k[1] // sw)
    ho, wo = (h + 2 * ph - k[0]) // sh + 1, (w + 2 * pw - k[1]) // sw + 1
    hq, wq = (ho + qh - 1) * sh, (wo + qw - 1) * sw
    # the padded kernel's extra zero rows read past the original conv's last window: pad (or crop) to hq x wq
    ap = F.pad(a, (pw, wq - w - pw, ph, hq - h - ph))
    return ap.reshape(n, c, hq // sh, sh, wq // sw, sw).permute(0, 1, 3, 5, 2, 4).reshape(n, c * sh * sw, hq // sh,
                                                                                             wq // sw)


class StackedGradients:
    """Per-trial gradients of ``names`` for N trials of one shared model (a private copy: its parameters do
    not require grad; forward hooks on the matched parameters' modules record (input, output))."""

    def __init__(self, model: nn.Module, names: Sequence[str], loss_fn: Callable):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in self.model.modules():  # convolutions without the unused weight term in the 2nd backward
            if lookup(module) is not None and isinstance(module, nn.Conv2d) and not _conv_problem(module):
                module.forward = _conv_input_only(module)
        self.names = list(names)
        self.loss_fn = loss_fn
        self._owners = _owners(self.model, self.names)
        self._record: dict[str, list] | None = None
        for prefix, (module, _) in self._owners.items():
            module.register_forward_hook(self._hook(prefix))

    def _hook(self, prefix: str):
        def hook(module, inputs, output):
            if self._record is not None:
                self._record.setdefault(prefix, []).append((inputs[0], output))
        return hook

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, B, *shape) candidate inputs; labels: (N, B) int or (N, B, C) soft. Returns one (N, n_l)
        tensor per name (the flat per-trial gradient), differentiable w.r.t. x (and soft labels)."""
        n, b = x.shape[0], x.shape[1]
        create = x.requires_grad or labels.requires_grad
        if not create:  # values only: a graph for the first-order backward, none kept for a second
            x = x.detach().requires_grad_(True)
        record: dict[str, list] = {}
        self._record = record
        try:
            out = self.model(x.reshape(n * b, *x.shape[2:]))
        finally:
            self._record = None
        twice = [p for p, r in record.items() if len(r) != 1]
        if twice:
            raise RuntimeError(f"modules {twice} ran {[len(record[p]) for p in twice]} times in one forward: "
                               "the stacked per-sample rules need one call per module")
        logits = out.reshape(n, b, *out.shape[1:])
        per_trial = getattr(self.loss_fn, "per_trial", None)  # a registered Loss: its stacked form
        losses = per_trial(logits, labels) if per_trial is not None else torch.vmap(self.loss_fn)(logits, labels)
        prefixes = list(self._owners)
        zs = [record[p][0][1] for p in prefixes]
        deltas = torch.autograd.grad(losses.sum(), zs, create_graph=create, allow_unused=True)
        flat: dict[str, torch.Tensor] = {}
        for p, z, d in zip(prefixes, zs, deltas):
            module, params = self._owners[p]
            if d is None:
                d = torch.zeros_like(z)
            a = record[p][0][0]
            g = lookup(module)[0](module, a, z, d, n)
            for full, local in params:
                flat[full] = g[local].reshape(n, -1)
        return [flat[k] for k in self.names]


__all__ = ["RULES", "register", "lookup", "problems", "StackedGradients"]
