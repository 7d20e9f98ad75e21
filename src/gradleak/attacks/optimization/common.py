"""Shared pieces of the gradient-matching attacks (DLG, iDLG, Inverting Gradients).

- :func:`total_variation`: anisotropic TV (mean absolute difference of horizontal + vertical neighbours).
- :func:`resolve_layers`, :func:`layer_weights`: layer subsets (names, module prefixes, top-k by observed norm)
  and per-layer weights ('equal' | 'linear' | 'exp', as in Geiping et al. 2020).
- :class:`GradientMatcher`: the data term between the update a candidate batch produces and the observed one
  (cosine over the concatenated update, or squared L2), with the constant parts precomputed once.
- :func:`run_adam` (Adam on the sign of the gradient, step decay at 3/8, 5/8, 7/8, box clamp) and
  :func:`run_lbfgs` (L-BFGS, DLG's optimiser): one trial each, with non-finite / explosion detection; a trial
  that diverges stops and returns the best finite iterate it saw.
- :func:`soft_labels` / :func:`hard_labels`: jointly optimised label logits (B, C) (or (B,) for one score);
  :func:`init_inputs`: the start (N(0, 1) from the attack's generator, or a given image-space batch);
  :func:`non_smooth_parts`: what makes a model non-smooth in its input (IG's 'auto' optimizer uses it).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ...activations import resolve as resolve_activation
from ... import functional as Fn
from ...case import Case, FedSGD
from ..base import Reconstruction

Objective = Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]

WEIGHT_SCHEMES = ("equal", "linear", "exp")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images x (B, C, H, W): mean |x[..., :, j+1] - x[..., :, j]| plus
    mean |x[..., i+1, :] - x[..., i, :]|. Returns a 0-d tensor (0 for non-image inputs)."""
    if x.ndim < 4:
        return x.new_zeros(())
    tv = x.new_zeros(())
    if x.shape[-1] > 1:
        tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    if x.shape[-2] > 1:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return tv


def box(case: Case, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The value range as a per-channel box in normalised space, broadcastable against (B, *shape)."""
    lo, hi = case.spec.bounds(like)
    return lo.unsqueeze(0), hi.unsqueeze(0)


def resolve_layers(case: Case, layers: Sequence[str] = (), top_layers: int = 0) -> tuple[list[str], list[str]]:
    """The observed tensors the objective matches, in observation order, and the problems found.

    layers: parameter names ('conv1.weight') or module prefixes ('conv1', 'layer4') to keep; () keeps all.
    top_layers: if > 0, keep (of those) the ``top_layers`` tensors with the largest observed norm.
    """
    names = list(case.observed)
    problems: list[str] = []
    if layers:
        keep: list[str] = []
        for item in layers:
            hit = [n for n in names if n == item or n.startswith(item + ".")]
            if not hit:
                close = [n for n in names if item in n][:4]
                problems.append(f"layer {item!r} is not in the observed update"
                                + (f" (did you mean {close}?)" if close else f" (names look like {names[:3]})"))
            keep += [n for n in hit if n not in keep]
        names = [n for n in names if n in keep]
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


class GradientMatcher:
    """The gradient-matching data term of one case, with everything constant precomputed.

    names: observed tensors to match (default: all); weights: one per name (default 1).
    distance: 'cosine' (1 - <g, g*>_w / (|g|_w |g*|_w) over the concatenation), 'l2' (sum_l w_l |g_l - g*_l|^2)
    or 'l2-relative' (the same divided by sum_l w_l |g*_l|^2, scale free: needed for FedAvg deltas).
    ``terms(x, labels)`` returns (data term, cosine distance), both 0-d tensors differentiable w.r.t. ``x``
    (normalised inputs (B, *shape)) and soft labels.

    The cosine (and the norm that 'l2-relative' divides by) is computed scale free: the observed update is
    stored divided by its largest |entry|, the candidate's is divided by its own before squaring, and the
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
        self.tscale = float(Fn._max_abs(self.targets))                      # float64 python scalar
        self.units = [t / self.tscale for t in self.targets]                # |entries| <= 1: squares are safe
        unorm2 = sum(w * float(torch.dot(u, u)) for w, u in zip(self.w, self.units))
        self.unorm = math.sqrt(unorm2)
        self.tnorm2 = unorm2 * self.tscale ** 2                             # float64: |g*|_w^2 (may be 1e-60)
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

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = True) -> list[torch.Tensor]:
        """The candidate's update for the matched tensors (list in ``names`` order)."""
        if self.fedsgd:
            with torch.enable_grad():
                loss = self.case.loss_fn(self._model(x), labels)
                return list(torch.autograd.grad(loss, self._leaves, create_graph=create_graph))
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
            cos = data.new_tensor(self.cosine(gs)[0])
        return data, cos

    def cosine(self, gs: Sequence[torch.Tensor]) -> tuple[float, float, float, float]:
        """(1 - cos, <g/s, u>_w, |g/s|_w^2, s) for flat candidate tensors gs, with s = max |g| and u the stored
        unit-scale target; float64 python scalars (the distance is 1 when the candidate update is zero)."""
        st = Fn._max_abs(gs).to(gs[0].dtype)
        w = torch.tensor(self.w, dtype=torch.float64, device=gs[0].device)
        gh = [g.detach() / st for g in gs]
        dots = torch.stack([torch.dot(g, u) for g, u in zip(gh, self.units)]).double()
        sq = torch.stack([torch.dot(g, g) for g in gh]).double()
        s, dot, gn2 = torch.stack([st.double(), (w * dots).sum(), (w * sq).sum()]).tolist()  # one sync
        denom = math.sqrt(gn2) * self.unorm
        if not denom > 0:
            return 1.0, dot, gn2, s
        return 1.0 - min(1.0, max(-1.0, dot / denom)), dot, gn2, s


class _Match(torch.autograd.Function):
    """The matcher's data term over a list of flat update tensors, with a hand-written backward: one fused
    pass per tensor (a*g + b*u) instead of autograd's five (two dot backwards, their sums). On large models
    (ResNet-18: 11M parameters) this elementwise work is a noticeable part of an IG step."""

    @staticmethod
    def forward(ctx, m: "GradientMatcher", *gs: torch.Tensor) -> torch.Tensor:
        ctx.m = m
        ctx.save_for_backward(*gs)
        if m.distance == "cosine":
            value, dot, gn2, s = m.cosine(gs)
            denom = math.sqrt(gn2) * m.unorm
            # with gh = g/s: d(1 - cos)/dg = (a*gh + b*u)/s, a = dot/(|gh|^2 denom), b = -1/denom
            ctx.coef = ((dot / (gn2 * denom), -1.0 / denom) if denom > 0 else (0.0, 0.0), 1.0 / s)
            return gs[0].new_tensor(value)
        l2 = float(sum(w * torch.dot(g - t, g - t).double() for w, g, t in zip(m.w, gs, m.targets)))
        scale = 1.0 / m.tnorm2 if (m.distance == "l2-relative" and m.tnorm2 > 0) else 1.0
        ctx.coef = ((2.0 * scale, -2.0 * scale), None)
        return gs[0].new_tensor(l2 * scale)

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        m = ctx.m
        gs = ctx.saved_tensors
        (a, b), inv = ctx.coef
        a, b = float(go) * a, float(go) * b
        out = []
        if inv is None:  # squared L2: 2 scale (g - t)
            for w, g, t in zip(m.w, gs, m.targets):
                out.append((g * (w * a)).add_(t, alpha=w * b))
        else:
            for w, g, u in zip(m.w, gs, m.units):
                out.append((g * inv).mul_(w * a).add_(u, alpha=w * b).mul_(inv))
        return (None, *out)


# ---------------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One optimisation run: the best finite iterate (variables), its score, the loss history, the number of
    steps run, and the step at which it diverged (None if it did not)."""

    variables: list[torch.Tensor] | None
    score: float = float("inf")
    history: list[float] = field(default_factory=list)
    steps: int = 0
    diverged_at: int | None = None
    seconds: float = 0.0
    reason: str = ""
    evaluations: int = 0
    iterations: int = 0

    @property
    def finite(self) -> bool:
        return self.variables is not None and math.isfinite(self.score)

    def summary(self) -> dict:
        out = {"score": self.score if math.isfinite(self.score) else None, "steps": self.steps,
               "diverged_at": self.diverged_at, "reason": self.reason or None, "seconds": round(self.seconds, 3)}
        if self.evaluations:
            out.update(lbfgs_iterations=self.iterations, evaluations=self.evaluations)
        return out


class _Best:
    def __init__(self):
        self.score = float("inf")
        self.vars: list[torch.Tensor] | None = None
        self.dirty = False

    def see(self, score: float, variables: list[torch.Tensor]) -> None:
        if math.isfinite(score) and score < self.score and all(bool(torch.isfinite(v).all()) for v in variables):
            self.score = score
            self.vars = [v.detach().clone() for v in variables]
            self.dirty = True


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class Adam:
    """Adam (Kingma & Ba) on a list of tensors, optionally on the SIGN of the gradient (Geiping et al.).
    Written here rather than taken from torch.optim, whose first use imports torch._dynamo (seconds)."""

    def __init__(self, leaves: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.leaves, self.lr, self.b1, self.b2, self.eps = leaves, lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(v) for v in leaves]
        self.v = [torch.zeros_like(v) for v in leaves]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        for x, g, m, v in zip(self.leaves, grads, self.m, self.v):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            x.addcdiv_(m, denom, value=-self.lr / bc1)


def run_adam(
    objective: Objective,
    variables: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    signed: bool = True,
    decay: bool = True,
    project: Callable[[list[torch.Tensor]], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    on_offer: Callable[[float, list[torch.Tensor]], None] | None = None,
    offer_every: int = 25,
    explode_factor: float = 0.0,
) -> Trial:
    """Minimise ``objective(variables) -> (total, score)`` with Adam on the SIGN of the gradient (``signed``),
    learning rate x0.1 at 3/8, 5/8 and 7/8 of ``steps`` (``decay``), ``project`` (e.g. a box clamp) after
    every step. The best finite iterate by ``score`` is kept; a non-finite loss or gradient (or a total above
    ``explode_factor`` x the first one, if > 0) stops the trial. ``on_offer(score, vars)`` is called every
    ``offer_every`` steps when the best improved (Ctrl-C safety)."""
    t0 = time.perf_counter()
    leaves = [v.detach().clone().requires_grad_(True) for v in variables]
    opt = Adam(leaves, lr=lr)
    milestones = {int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)} if decay else set()
    best = _Best()
    trial = Trial(None)
    first = None
    for step in range(steps):
        total, score = objective(leaves)
        tval = float(total.detach())
        sval = float(score.detach())
        if first is None and math.isfinite(tval):
            first = abs(tval)
        exploded = (explode_factor > 0 and first is not None and math.isfinite(tval)
                    and abs(tval) > explode_factor * max(first, 1e-30))
        if not math.isfinite(tval) or exploded:
            trial.diverged_at, trial.reason = step, ("exploded" if exploded else "non-finite loss")
            break
        grads = torch.autograd.grad(total, leaves)
        if not all(_finite(g) for g in grads):
            trial.diverged_at, trial.reason = step, "non-finite gradient"
            break
        best.see(sval, leaves)
        trial.history.append(tval)
        if step in milestones:
            opt.lr *= 0.1
        opt.step([g.sign() for g in grads] if signed else list(grads))
        if project is not None:
            with torch.no_grad():
                project(leaves)
        trial.steps = step + 1
        if on_step is not None:
            on_step(step, tval, sval)
        if on_offer is not None and best.dirty and (step + 1) % offer_every == 0:
            best.dirty = False
            on_offer(best.score, best.vars)
    else:
        # score the final iterate too (the loop scored each iterate before its step)
        total, score = objective(leaves)
        if math.isfinite(float(total.detach())):
            best.see(float(score.detach()), leaves)
    trial.variables, trial.score = best.vars, best.score
    trial.seconds = time.perf_counter() - t0
    if on_offer is not None and best.vars is not None:
        on_offer(best.score, best.vars)
    return trial


# ---- L-BFGS ---------------------------------------------------------------------------------------------------
def _cubic_min(x1, f1, g1, x2, f2, g2, lo, hi) -> float:
    """Minimiser of the cubic through (x1, f1, g1), (x2, f2, g2), clamped to [lo, hi]; bisection if none."""
    try:
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        disc = d1 * d1 - g1 * g2
        if disc >= 0 and math.isfinite(disc):
            d2 = math.sqrt(disc) * (1.0 if x2 >= x1 else -1.0)
            t = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
            if math.isfinite(t):
                return min(max(t, lo), hi)
    except (ZeroDivisionError, OverflowError, ValueError):
        pass
    return (lo + hi) / 2


class LBFGS:
    """Limited-memory BFGS on one flat vector (Nocedal & Wright, Alg. 7.4/7.5), with an optional strong-Wolfe
    line search (Alg. 3.5/3.6, cubic interpolation). ``step(fn)`` runs up to ``max_iter`` iterations like
    ``torch.optim.LBFGS.step`` (whose semantics DLG's "iterations" refer to), keeping its state between calls.
    ``fn(z) -> (loss float, grad flat tensor)``."""

    def __init__(self, z: torch.Tensor, *, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
                 line_search: bool = False, tolerance_grad: float = 1e-12, tolerance_change: float = 1e-14):
        self.z = z
        self.lr, self.max_iter, self.m = lr, max_iter, history_size
        self.max_eval = max_iter * 5 // 4
        self.line_search = line_search
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.rho: list[float] = []
        self.d: torch.Tensor | None = None
        self.t = 0.0
        self.g_prev: torch.Tensor | None = None
        self.loss_prev: float | None = None
        self.n_iter = 0
        self.n_evals = 0
        self.total_iter = 0

    def reset(self) -> None:
        """Forget the curvature pairs (after the iterate was moved from outside, e.g. projected)."""
        self.S, self.Y, self.rho = [], [], []
        self.n_iter = 0

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        q = -g
        alpha = []
        for s, y, rho in zip(reversed(self.S), reversed(self.Y), reversed(self.rho)):
            a = rho * float(s @ q)
            alpha.append(a)
            q = q - a * y
        if self.S:
            y = self.Y[-1]
            q = q * (float(self.S[-1] @ y) / float(y @ y))
        for (s, y, rho), a in zip(zip(self.S, self.Y, self.rho), reversed(alpha)):
            b = rho * float(y @ q)
            q = q + (a - b) * s
        return q

    def _strong_wolfe(self, fn, z, t, d, f0, g0, gtd0, c1=1e-4, c2=0.9, max_ls=25):
        """Returns (f, g, t, evaluations) at a step satisfying the strong Wolfe conditions (or the best found)."""
        dnorm = float(d.abs().max())

        def ev(step):
            f, g = fn(z + step * d)
            self.n_evals += 1
            return f, g, float(g @ d)

        f_new, g_new, gtd_new = ev(t)
        evals = 1
        t_prev, f_prev, g_prev, gtd_prev = 0.0, f0, g0, gtd0
        bracket = None
        done = False
        it = 0
        while it < max_ls:
            if not math.isfinite(f_new) or f_new > f0 + c1 * t * gtd0 or (it > 0 and f_new >= f_prev):
                bracket = [(t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new, gtd_new)]
                break
            if abs(gtd_new) <= -c2 * gtd0:
                return f_new, g_new, t, evals
            if gtd_new >= 0:
                bracket = [(t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new, gtd_new)]
                break
            lo, hi = t + 0.01 * (t - t_prev), t * 10
            t_next = _cubic_min(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, lo, hi)
            t_prev, f_prev, g_prev, gtd_prev = t, f_new, g_new, gtd_new
            t = t_next
            f_new, g_new, gtd_new = ev(t)
            evals += 1
            it += 1
        if bracket is None:  # ran out of evaluations while extrapolating
            return f_new, g_new, t, evals
        # zoom: bracket[0] is the low (better) end
        if not (math.isfinite(bracket[1][1])) or bracket[1][1] < bracket[0][1]:
            if math.isfinite(bracket[1][1]):
                bracket.reverse()
        insufficient = False
        while not done and it < max_ls:
            (ta, fa, ga, gtda), (tb, fb, gb, gtdb) = bracket
            if abs(tb - ta) * dnorm < self.tol_change:
                break
            lo_t, hi_t = min(ta, tb), max(ta, tb)
            if math.isfinite(fb):
                t = _cubic_min(ta, fa, gtda, tb, fb, gtdb, lo_t, hi_t)
            else:
                t = (ta + tb) / 2
            eps = 0.1 * (hi_t - lo_t)
            if min(hi_t - t, t - lo_t) < eps:  # too close to an end: move away (or bisect if stuck)
                if insufficient or t >= hi_t or t <= lo_t:
                    t = hi_t - eps if abs(t - hi_t) < abs(t - lo_t) else lo_t + eps
                    insufficient = False
                else:
                    insufficient = True
            else:
                insufficient = False
            f_new, g_new, gtd_new = ev(t)
            evals += 1
            it += 1
            if not math.isfinite(f_new) or f_new > f0 + c1 * t * gtd0 or f_new >= fa:
                bracket[1] = (t, f_new, g_new, gtd_new)
            else:
                if abs(gtd_new) <= -c2 * gtd0:
                    done = True
                elif gtd_new * (tb - ta) >= 0:
                    bracket[1] = bracket[0]
                bracket[0] = (t, f_new, g_new, gtd_new)
            if bracket[1][1] < bracket[0][1] and math.isfinite(bracket[1][1]):
                bracket.reverse()
        ta, fa, ga, _ = bracket[0]
        return fa, ga, ta, evals

    def step(self, fn) -> float:
        """Up to ``max_iter`` iterations; returns the loss at the start of the call (as torch does)."""
        z = self.z
        loss, g = fn(z)
        self.n_evals += 1
        orig = loss
        self.current: float | None = loss
        evals = 1
        if not math.isfinite(loss) or float(g.abs().max()) <= self.tol_grad:
            return orig
        for _ in range(self.max_iter):
            self.n_iter += 1
            self.total_iter += 1
            if self.n_iter == 1:
                d = -g
            else:
                y = g - self.g_prev
                s = self.d * self.t
                ys = float(y @ s)
                if ys > 1e-10 * float(y.norm() * s.norm()):  # scale free (the objective may be ~1e-6)
                    if len(self.S) == self.m:
                        self.S.pop(0), self.Y.pop(0), self.rho.pop(0)
                    self.S.append(s)
                    self.Y.append(y)
                    self.rho.append(1.0 / ys)
                d = self._direction(g)
            self.g_prev = g.clone()
            self.loss_prev = loss
            t = min(1.0, 1.0 / float(g.abs().sum())) * self.lr if self.n_iter == 1 else self.lr
            gtd = float(g @ d)
            if gtd >= -1e-12 * float(g.norm() * d.norm()) and self.S:  # stale curvature: steepest descent
                self.reset()
                self.n_iter = 1
                d = -g
                t = min(1.0, 1.0 / float(g.abs().sum())) * self.lr
                gtd = float(g @ d)
            if not gtd < 0:  # zero gradient
                break
            if self.line_search:
                loss, g, t, n = self._strong_wolfe(fn, z, t, d, loss, g, gtd)
                z.add_(d, alpha=t)
                evals += n
                self.current = loss
            else:
                z.add_(d, alpha=t)
                self.current = None
                if _ + 1 != self.max_iter:
                    loss, g = fn(z)
                    evals += 1
                    self.n_evals += 1
                    self.current = loss
            self.d, self.t = d, t
            if _ + 1 == self.max_iter or evals >= self.max_eval:
                break
            if not math.isfinite(loss) or float(g.abs().max()) <= self.tol_grad:
                break
            if float(d.abs().max()) * t <= self.tol_change or abs(loss - self.loss_prev) < self.tol_change:
                break
        return orig


def run_lbfgs(
    objective: Objective,
    variables: list[torch.Tensor],
    *,
    steps: int,
    lr: float = 1.0,
    inner: int = 20,
    history_size: int = 100,
    line_search: str = "",
    project: Callable[[list[torch.Tensor]], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    on_offer: Callable[[float, list[torch.Tensor]], None] | None = None,
    offer_every: int = 5,
    explode_factor: float = 1e4,
    stall_steps: int = 5,
) -> Trial:
    """Minimise ``objective(variables) -> (total, score)`` with L-BFGS (``steps`` outer steps of up to
    ``inner`` iterations each, as DLG's code). Every evaluation is watched: the best finite iterate by
    ``score`` is kept; a non-finite loss or iterate, a loss above ``explode_factor`` x the first, or a loss
    frozen for ``stall_steps`` outer steps at more than twice the best (a jump into a flat, saturated region)
    ends the trial as diverged (L-BFGS is known to go NaN after 60-100 steps on some inputs). A loss frozen at
    the best ends it as converged."""
    t0 = time.perf_counter()
    shapes = [v.shape for v in variables]
    sizes = [v.numel() for v in variables]
    z = torch.cat([v.detach().reshape(-1) for v in variables]).clone()
    best = _Best()
    trial = Trial(None)
    state: dict = {"first": None, "best_total": float("inf")}

    def unflat(flat: torch.Tensor) -> list[torch.Tensor]:
        return [p.view(sh) for p, sh in zip(flat.split(sizes), shapes)]

    def fn(zz: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Loss and flat gradient at zz; NaN (which the line search backs off from) if either is not finite."""
        leaves = [p.detach().clone().requires_grad_(True) for p in unflat(zz)]
        total, score = objective(leaves)
        tval = float(total.detach())
        if not math.isfinite(tval):
            return float("nan"), torch.zeros_like(zz)
        grads = torch.autograd.grad(total, leaves)
        g = torch.cat([q.reshape(-1) for q in grads])
        if not _finite(g):
            return float("nan"), torch.zeros_like(zz)
        best.see(float(score.detach()), leaves)
        state["best_total"] = min(state["best_total"], tval)
        return tval, g

    opt = LBFGS(z, lr=lr, max_iter=inner, history_size=history_size,
                line_search=line_search in ("strong-wolfe", "strong_wolfe"))
    still, fresh = 0, False
    for step in range(steps):
        lval = opt.step(fn)
        cur = opt.current
        if math.isfinite(lval) and state["first"] is None:
            state["first"] = abs(lval)
        if not _finite(z):
            trial.diverged_at, trial.reason = step, "non-finite iterate"
        elif not math.isfinite(lval) or (cur is not None and not math.isfinite(cur)):
            trial.diverged_at, trial.reason = step, "non-finite loss"
        elif explode_factor > 0 and max(abs(lval), abs(cur or 0.0)) > explode_factor * max(state["first"], 1e-30):
            trial.diverged_at, trial.reason = step, "exploded"
        if trial.diverged_at is not None:
            break
        if project is not None:
            with torch.no_grad():
                project(unflat(z))
        # a loss that no longer moves: converged, or stuck after a jump into a flat region (saturated units)
        still = still + 1 if trial.history and abs(lval - trial.history[-1]) <= 1e-12 * max(abs(lval), 1e-30) else 0
        trial.history.append(lval)
        trial.steps = step + 1
        if on_step is not None:
            on_step(step, lval, best.score)
        if on_offer is not None and best.dirty and (step + 1) % offer_every == 0:
            best.dirty = False
            on_offer(best.score, best.vars)
        if still >= stall_steps:
            if not fresh:  # first try again without the curvature memory
                opt.reset()
                still, fresh = 0, True
                continue
            if lval > 2.0 * state["best_total"] and state["best_total"] < float("inf"):
                trial.diverged_at, trial.reason = step, "stalled after a jump"
            else:
                trial.reason = "converged"
            break
        if still == 0:
            fresh = False
    trial.variables, trial.score = best.vars, best.score
    trial.seconds = time.perf_counter() - t0
    trial.iterations, trial.evaluations = opt.total_iter, opt.n_evals
    if on_offer is not None and best.vars is not None:
        on_offer(best.score, best.vars)
    return trial


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


def init_inputs(case: Case, init, generator: torch.Generator) -> torch.Tensor:
    """Normalised start (B, *shape): from ``init`` (a Reconstruction or an image-space tensor) or N(0, 1)."""
    if init is not None:
        x = init.inputs if isinstance(init, Reconstruction) else torch.as_tensor(init)
        x = x.detach().to(device=case.device, dtype=case.dtype)
        return case.spec.normalize(x).contiguous()
    x = torch.randn((case.batch_size, *case.spec.shape), generator=generator, dtype=torch.float64)
    return x.to(device=case.device, dtype=case.dtype)


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
