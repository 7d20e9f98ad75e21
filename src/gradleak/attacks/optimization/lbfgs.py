"""The L-BFGS of the optimisation driver (:mod:`.driver`): limited-memory BFGS on one flat vector with a
strong-Wolfe line search, scale free by default (see :class:`LBFGS`), torch.optim.LBFGS's absolute tolerances
on request. tests/test_optim_driver.py checks it against torch.optim.LBFGS.
"""

from __future__ import annotations

import math

import torch


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
    ``fn(z) -> (loss float, grad flat tensor)``.

    Differences from torch.optim.LBFGS, all to make it independent of the objective's scale (a squared-L2
    gradient distance may be 1e3 at the start and 1e-8 at the end): a curvature pair is kept when
    y's > 1e-10 |y||s| (torch: y's > 1e-10), the loss-change test is relative (|f - f_prev| < tolerance_change
    |f_prev|; torch: absolute 1e-9) and so is the gradient test (max |g| <= tolerance_grad x max |g| at the
    first evaluation; torch: absolute 1e-7). Meeting the gradient test sets ``converged``. On a well-scaled
    problem the iterates are torch's (tests/test_optim_driver.py). ``absolute``: torch's tests instead (y's > 1e-10,
    |f - f_prev| < tolerance_change, max |g| <= tolerance_grad, stop when g'd > -tolerance_change; the line
    search's bracket test at 1e-9 as torch's), for a caller that keeps torch.optim.LBFGS's behaviour.
    ``exit`` names why the last :meth:`step` ended."""

    def __init__(self, z: torch.Tensor, *, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
                 line_search: bool = False, tolerance_grad: float = 1e-10, tolerance_change: float = 1e-12,
                 absolute: bool = False):
        self.z = z
        self.absolute = absolute
        self.exit = ""
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
        self.g0: float | None = None  # max |gradient| at the start: the gradient tolerance is relative to it
        self.converged = False

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
        bracket_tol = 1e-9 if self.absolute else self.tol_change  # torch's line search: its default 1e-9

        def ev(step):
            f, g = yield from fn(z + step * d)
            self.n_evals += 1
            return f, g, float(g @ d)

        f_new, g_new, gtd_new = yield from ev(t)
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
            f_new, g_new, gtd_new = yield from ev(t)
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
            if abs(tb - ta) * dnorm < bracket_tol:
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
            f_new, g_new, gtd_new = yield from ev(t)
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
        """Up to ``max_iter`` iterations; returns the loss at the start of the call (as torch does).
        ``fn(z) -> (loss, flat gradient)``."""
        def gen_fn(z):
            return fn(z)
            yield  # unreachable: makes gen_fn a generator function

        program = self.steps(gen_fn)
        try:
            while True:
                next(program)
        except StopIteration as stop:
            return stop.value

    def steps(self, fn):
        """:meth:`step` as a generator: ``fn(z)`` is a generator function returning (loss, flat gradient)
        (called as ``yield from fn(z)``), so that evaluations can be answered from outside (batched trials)."""
        self.converged = False
        z = self.z
        loss, g = yield from fn(z)
        self.n_evals += 1
        orig = loss
        self.current: float | None = loss
        evals = 1
        if self.g0 is None and math.isfinite(loss):
            self.g0 = float(g.abs().max())
        self.exit = "max_iter"
        if not math.isfinite(loss) or self._small(g):
            self.exit = "non-finite loss" if not math.isfinite(loss) else "tolerance_grad"
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
                # scale free (the objective may be ~1e-6); absolute: torch's ys > 1e-10
                if ys > 1e-10 * (1.0 if self.absolute else float(y.norm() * s.norm())):
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
            if self.absolute and gtd > -self.tol_change:  # torch: directional derivative below tolerance
                self.exit = "tolerance_change (directional derivative)"
                break
            if not self.absolute and gtd >= -1e-12 * float(g.norm() * d.norm()) and self.S:
                # stale curvature: steepest descent
                self.reset()
                self.n_iter = 1
                d = -g
                t = min(1.0, 1.0 / float(g.abs().sum())) * self.lr
                gtd = float(g @ d)
            if not gtd < 0:  # zero gradient
                self.exit = "no descent direction"
                break
            if self.line_search:
                loss, g, t, n = yield from self._strong_wolfe(fn, z, t, d, loss, g, gtd)
                z.add_(d, alpha=t)
                evals += n
                self.current = loss
            else:
                z.add_(d, alpha=t)
                self.current = None
                if _ + 1 != self.max_iter:
                    loss, g = yield from fn(z)
                    evals += 1
                    self.n_evals += 1
                    self.current = loss
            self.d, self.t = d, t
            if _ + 1 == self.max_iter:
                break
            if evals >= self.max_eval:
                self.exit = "max_eval"
                break
            if not math.isfinite(loss) or self._small(g):
                self.exit = "non-finite loss" if not math.isfinite(loss) else "tolerance_grad"
                break
            if float(d.abs().max()) * t <= self.tol_change or \
                    abs(loss - self.loss_prev) < self.tol_change * (1.0 if self.absolute else abs(self.loss_prev)):
                self.exit = "tolerance_change"
                break
        return orig

    def _small(self, g: torch.Tensor) -> bool:
        """The stop criterion: max |g| <= tolerance_grad x max |g0| (``absolute``: <= tolerance_grad; sets
        ``converged``)."""
        scale = 1.0 if self.absolute else self.g0
        if scale is not None and float(g.abs().max()) <= self.tol_grad * scale:
            self.converged = True
        return self.converged


