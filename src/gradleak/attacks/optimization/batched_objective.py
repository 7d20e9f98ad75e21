"""The batched objective of :mod:`.batched`: ONE evaluation gives every running trial its total, score and
gradient, by either engine: ``torch.func.vmap`` over per-trial gradient matching (:data:`ENGINE`), or the
stacked formulation (:data:`STACKED`: the trials' inputs as one batch of the shared model, per-sample parameter
gradients from :mod:`.persample`'s rules). :class:`_Match` is the batched form of :class:`.common._Match`
(the same formulas per trial, with the hand-written backward).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.func import functional_call, grad, vmap

from ...case import FedAvg
from ...functional import minibatch_indices
from . import persample
from .common import norm2_floor
from .driver import Result

if TYPE_CHECKING:
    from .batched import TrialSetup

ENGINE = "torch.func.vmap over trials (per-trial gradient matching), one backward for all"
STACKED = ("stacked: the trials' inputs as one batch of the shared model, per-sample parameter-gradient rules "
           "(persample.py), one backward for all")

# The largest (trials x matched parameters) whose per-trial updates are joined into one tensor for the
# matching (one copy of that size per round; it saves ~25 small ops per layer, which dominate small models).
CONCAT_MAX_ELEMENTS = 1 << 24


def _same_tensors(a: dict, b: dict) -> bool:
    return all(a[k] is b[k] or torch.equal(a[k], b[k]) for k in a)


# ---- the batched objective --------------------------------------------------------------------------------
class _Match(torch.autograd.Function):
    """The data term of T trials at once from per-trial flat update tensors (T, n_l): the batched form of
    :class:`.common._Match` (the same formulas, per trial, with the hand-written backward)."""

    @staticmethod
    def forward(ctx, spec: dict, *gs: torch.Tensor) -> torch.Tensor:
        ctx.spec = spec
        if spec["distance"] == "cosine":
            value, diffs, gnorm = _cosine(gs, spec["vhat"], spec["w"])
            ctx.cos = (value, diffs, gnorm)
            return value.to(gs[0].dtype)
        ctx.save_for_backward(*gs)
        l2 = sum(w * torch.linalg.vecdot(g - t, g - t, dim=1).double() for w, g, t in
                 zip(spec["w"], gs, spec["targets"]))
        return (l2 * spec["scale"]).to(gs[0].dtype)

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        spec = ctx.spec
        out = []
        if spec["distance"] == "cosine":
            value, diffs, gnorm = ctx.cos
            ok = torch.isfinite(value) & (gnorm > 0)
            c = torch.where(ok, go.double() / torch.where(ok, gnorm, 1.0), 0.0)
            f = torch.where(ok, value, 0.0)
            every = bool(ok.all())
            for w, d, v in zip(spec["w"], diffs, spec["vhat"]):  # d = v^ - g^: -(1 - f) d - f v^, per row
                a = (-w * c * (1.0 - f)).to(d.dtype).unsqueeze(1)
                b = (-w * c * f).to(d.dtype).unsqueeze(1)
                r = torch.mul(d, a).addcmul_(v, b)  # d a + v b: two passes (a trial's row alone)
                out.append(r if every else torch.where(ok.unsqueeze(1), r, 0.0))
            return (None, *out)
        gs = ctx.saved_tensors
        a = (2.0 * go.double() * spec["scale"]).to(gs[0].dtype).unsqueeze(1)
        for w, g, t in zip(spec["w"], gs, spec["targets"]):
            out.append(g * (w * a) + t * (-w * a))
        return (None, *out)


def _cosine(gs: Sequence[torch.Tensor], vhat: Sequence[torch.Tensor], w: Sequence[float]):
    """Per trial (rows): (1 - cos, the differences v_l - g_l/|g|_w, |g|_w), by GradientMatcher.cosine's
    formulas for one trial, row by row (sums in float64): the plain sum of squares where it is safe for every
    row, else each row divided by its largest |entry| first (a batch with one unsafe row takes that path for
    all its rows, so such a batch agrees with one by one to the dtype's rounding, not bit for bit). 1 for a
    zero update, NaN for a non-finite one."""
    gd = [g.detach() for g in gs]
    plain = sum(wl * torch.linalg.vecdot(g, g, dim=1).double() for wl, g in zip(w, gd))
    if bool((torch.isfinite(plain) & (plain >= norm2_floor(gd[0].dtype))).all()):
        gnorm = plain.sqrt()
        inv = (1.0 / gnorm).to(gd[0].dtype).unsqueeze(1)
        diffs = [torch.addcmul(v, g, -inv) for g, v in zip(gd, vhat)]  # v - g/|g|: the one-trial op's bits
        half = 0.5 * sum(wl * torch.linalg.vecdot(d, d, dim=1).double() for wl, d in zip(w, diffs))
        return half.clamp(max=2.0), diffs, gnorm
    st = torch.stack([g.abs().amax(1) for g in gd], 1).amax(1)
    st = torch.where(st > 0, st, torch.ones_like(st))
    gh = [g / st.unsqueeze(1) for g in gd]
    gn2 = sum(wl * torch.linalg.vecdot(g, g, dim=1).double() for wl, g in zip(w, gh))
    finite = torch.isfinite(gn2)
    zero = gn2 == 0
    safe = torch.where(finite & ~zero, gn2, torch.ones_like(gn2))
    inv = safe.rsqrt()
    diffs = [g.mul_((-inv).to(g.dtype).unsqueeze(1)).add_(v) for g, v in zip(gh, vhat)]  # gh is ours: in place
    half = 0.5 * sum(wl * torch.linalg.vecdot(d, d, dim=1).double() for wl, d in zip(w, diffs))
    value = torch.where(zero, torch.ones_like(half), half.clamp(max=2.0))
    value = torch.where(finite, value, torch.full_like(half, float("nan")))
    gnorm = torch.where(zero, torch.zeros_like(half), st.double() / inv)
    return value, diffs, gnorm


class BatchedObjective:
    """(total, score, gradient) of many trials (each with its setup: same group key) in one vmap call."""

    def __init__(self, setups: Sequence[TrialSetup]):
        self.setups = list(setups)
        s0 = self.setups[0]
        case = s0.case
        self.case, self.model = case, case.model
        self.names = list(s0.matcher.names)
        self.fedavg = isinstance(case.observation, FedAvg)
        params = [dict(s.case.model.named_parameters()) for s in self.setups]
        buffers = [dict(s.case.model.named_buffers()) for s in self.setups]
        self.shared = all(_same_tensors(params[0], p) and _same_tensors(buffers[0], b)
                          for p, b in zip(params, buffers))
        self.params = [{k: v.detach() for k, v in p.items()} for p in params]
        self.buffers = [{k: v.detach() for k, v in b.items()} for b in buffers]
        loss_fn, model, names = case.loss_fn, self.model, self.names
        if self.fedavg:
            o = case.observation
            steps, lr, lbs, n = o.local_steps, float(o.local_lr), o.local_batch_size, case.batch_size

            def update(p, bufs, x, lab):
                cur = dict(p)
                for step in range(steps):
                    sl = minibatch_indices(n, lbs, step)

                    def loss(q, sl=sl):
                        return loss_fn(functional_call(model, {**q, **bufs}, (x[sl],)), lab[sl])

                    g = grad(loss)(cur)
                    cur = {k: cur[k] - lr * g[k] for k in cur}
                return [(cur[k] - p[k]).reshape(-1) for k in names]
        else:
            sel = set(names)

            def update(p, bufs, x, lab):
                pm = {k: v for k, v in p.items() if k in sel}
                rest = {**{k: v for k, v in p.items() if k not in sel}, **bufs}

                def loss(q):
                    return loss_fn(functional_call(model, {**q, **rest}, (x,)), lab)

                g = grad(loss)(pm)
                return [g[k].reshape(-1) for k in names]

        self._update = update
        self._specs: dict[tuple, dict] = {}
        # equal layer weights: the matching runs on ONE (T, sum n_l) tensor (the same formulas; sums in
        # another order), a few ops per round instead of a few per layer, where the copy is small
        self._matched = sum(self.params[0][k].numel() for k in names)
        self._equal_w = len(set(s0.matcher.w)) == 1
        # the stacked formulation (one ordinary batch of the shared model, per-sample rules) where it applies
        self.stacked_problems = (["FedAvg: the trials' parameters differ after the first local step"]
                                 if self.fedavg else [] if self.shared else
                                 ["the trials' models have different parameters"])
        self.stacked_problems += persample.problems(self.model, names) if not self.stacked_problems else []
        self._stacked = (persample.StackedGradients(self.model, names, loss_fn)
                         if not self.stacked_problems else None)
        self.engine = STACKED if self._stacked is not None else ENGINE
        self._soft = case.loss_fn.soft_labels
        self._extra = s0.priors.per_trial_value if s0.priors.terms else None  # (N, B, ...) -> (N,)

    def _spec(self, sidx: list[int]) -> dict:
        """The stacked targets of trials ``sidx`` (cached: the same trials run round after round, and
        stacking a large model's targets every round is a copy of T x parameters)."""
        key = tuple(sidx)
        if key not in self._specs:
            if len(self._specs) > 8:
                self._specs.clear()
            self._specs[key] = self._build_spec(sidx)
        return self._specs[key]

    def _build_spec(self, sidx: list[int]) -> dict:
        one = len(set(sidx)) == 1
        ms = [self.setups[i].matcher for i in sidx]

        def rows(get):
            if one:
                return [t.unsqueeze(0) for t in get(ms[0])]
            return [torch.stack(ts) for ts in zip(*(get(m) for m in ms))]

        m0 = ms[0]
        join = self._equal_w and len(m0.w) > 1 and self._matched * len(sidx) <= CONCAT_MAX_ELEMENTS

        def stacked(get):
            r = rows(get)
            return [torch.cat(r, 1)] if join else r

        spec: dict[str, Any] = {"distance": m0.distance, "w": m0.w[:1] if join else m0.w,
                                "vhat": stacked(lambda m: m.vhat), "join": join}
        if m0.distance != "cosine":
            spec["targets"] = stacked(lambda m: m.targets)
            scale = [1.0 / m.tnorm2 if (m.distance == "l2-relative" and m.tnorm2 > 0) else 1.0 for m in ms]
            spec["scale"] = torch.tensor(scale, dtype=torch.float64, device=self.case.device)
        return spec

    def __call__(self, sidx: list[int], requests: list[tuple[list[torch.Tensor], bool]]) -> list[Result]:
        """Results for trials whose setups are ``sidx`` and whose programs asked ``requests``."""
        need_grad = any(r[1] for r in requests)
        nvar = len(requests[0][0])
        xs = [torch.stack([r[0][j].detach() for r in requests]) for j in range(nvar)]
        tvals, svals, grads = self.stacked(sidx, xs, need_grad)
        out: list[Result] = []
        for t, (tv, sv) in enumerate(zip(tvals, svals)):
            if not math.isfinite(tv):
                out.append((tv, float("nan"), None))
            else:
                out.append((tv, sv, None if grads is None or not requests[t][1] else [g[t] for g in grads]))
        return out

    def stacked(self, sidx: list[int], xs: Sequence[torch.Tensor], need_grad: bool
                ) -> tuple[list[float], list[float], tuple[torch.Tensor, ...] | None]:
        """Totals, scores (floats, one per trial) and the stacked gradients (one (T, ...) tensor per variable,
        row t trial t's; None without ``need_grad``) of trials whose setups are ``sidx`` at the stacked
        variables ``xs`` (row t trial t's; not modified)."""
        leaves = [x.detach().requires_grad_(need_grad) for x in xs]
        spec = self._spec(sidx)
        s0 = self.setups[0]
        with torch.enable_grad():
            n = s0.param.count  # the image variables (Pixel: the image itself), then the label logits if joint
            x = s0.param.image(leaves[:n])  # stacked levels -> stacked images (per sample)
            if s0.joint:
                lab = self._soft(leaves[n])  # softmax / sigmoid over the last dim: per trial as it stands
            else:
                lab = torch.stack([self.setups[i].labels for i in sidx])
            if self._stacked is not None:
                gs = self._stacked(x, lab)
            else:
                if self.shared:
                    p, bufs, pdim = self.params[0], self.buffers[0], None
                else:
                    p = {k: torch.stack([self.params[i][k] for i in sidx]) for k in self.params[0]}
                    bufs = {k: torch.stack([self.buffers[i][k] for i in sidx]) for k in self.buffers[0]}
                    pdim = 0
                gs = vmap(self._update, in_dims=(pdim, pdim, 0, 0), randomness="error")(p, bufs, x, lab)
            if spec["join"]:
                gs = [torch.cat(gs, 1)]
            data = _Match.apply(spec, *gs)
            total = data if self._extra is None else data + self._extra(x, lab)
            if s0.score == "data":
                score = data.detach()
            else:
                with torch.no_grad():
                    score = _cosine([g.detach() for g in gs], spec["vhat"], spec["w"])[0].to(data.dtype)
            tvals = total.detach().tolist()
            svals = score.tolist()
            grads = None
            if need_grad:
                grads = torch.autograd.grad(total.sum(), leaves)
        return tvals, svals, grads


# ---- running trials -----------------------------------------------------------------------------------------


__all__ = ["BatchedObjective", "ENGINE", "STACKED", "CONCAT_MAX_ELEMENTS"]


def path_claim(optimizer: str | None, dtype: torch.dtype) -> str:
    """What a batched trial shares with the same trial run one by one (``info['batched']['paths']``).

    Every evaluation agrees with the one-by-one objective up to the batched kernels' rounding (the first round
    checks it). Whether the PATH stays the one-by-one path depends on how the optimiser treats that rounding
    (measured: docs/performance.md, "Batched and one-by-one paths"): signed Adam's step depends only on the
    gradient's signs, so the path is bit for bit the one-by-one path until a component's sign differs, which
    float64 made rare (none in 300 steps on LeNet and resnet20) and float32 does not; L-BFGS's line search
    branches on comparisons, so after enough iterations a trial is another run of the same optimiser from the
    same start. Unsigned Adam was not measured, and its claim says so."""
    if optimizer == "signed-adam":
        if dtype == torch.float64:
            return ("the one-by-one path bit for bit while every gradient sign agrees (signed Adam steps on the "
                    "signs only; float64: no sign differed in 300 steps on LeNet or resnet20, measured)")
        how = "signed Adam's steps follow the gradient's signs, and float32 rounding flips some near zero"
    elif optimizer == "lbfgs":
        how = "L-BFGS's line search branches on comparisons that rounding can tip"
    else:
        return ("each evaluation agrees with the one-by-one objective to rounding (checked in the first round); "
                f"how far {optimizer}'s path stays on the one-by-one path over a long run was not measured (its "
                "normalised steps carry rounding differences on); batch_trials=False repeats a one-by-one run")
    return ("not the one-by-one path pixel for pixel: each evaluation agrees with the one-by-one objective to "
            f"rounding (checked in the first round), but {how}, so after enough iterations a trial is another "
            "run of the same optimiser from the same start (its quality alike, its pixels not; measured in "
            "docs/performance.md); the same batched run with the same chunk size repeats bit for bit; "
            "batch_trials=False repeats a one-by-one run")
