"""The one optimisation driver of the attacks: DLG, iDLG, Inverting Gradients, the layer-wise attack's
sub-steps (null-space prior, pull-back, correction) and the tensor attack's refinement.

:func:`run_trial` minimises ``objective(variables) -> (total, score)`` with signed Adam (Geiping et al.), Adam
(both torch.optim.Adam) or L-BFGS (:class:`LBFGS` below, DLG's optimiser), and does for all of them what a
trial needs: the best finite iterate by ``score``, non-finite / explosion / stall detection, the box
projection, progress and best-so-far callbacks, the counts, and the reason it stopped.

Budget and counts (the same for every attack): ``max_iterations`` counts optimiser ITERATIONS: Adam steps, or
L-BFGS iterations (quasi-Newton updates; each takes one gradient evaluation, plus the extra ones its line
search asks for). L-BFGS runs in OUTER steps of up to ``inner`` iterations (torch.optim.LBFGS.step with
``max_iter=inner``, the unit DLG's code counts), so DLG's "300 steps" are 300 x 20 = 6,000 iterations. A
:class:`Trial` records ``iterations``, ``outer_steps`` and ``gradient_evaluations``.

Stop reasons (``Trial.stop``), each a checked criterion:
- ``budget``: ``max_iterations`` iterations were run;
- ``converged``: (L-BFGS) max |gradient| fell to ``tol_grad`` x its value at the start;
- ``stalled``: (L-BFGS) the loss did not change by more than 1e-12 (relative) in ``stall_steps`` outer steps,
  twice (the curvature memory is dropped in between), at its best value: no further progress is made;
- ``diverged: ...``: a non-finite loss, gradient or iterate, a loss above ``explode_factor`` x the first one,
  or a stall at more than twice the best loss (a jump into a flat, saturated region). A diverged trial
  returns the best finite iterate it saw and emits a :class:`DivergenceWarning`.

Each optimiser is written as a TRIAL PROGRAM (a Python generator, :func:`trial_program`): it yields the
variables it wants evaluated and receives ``(total, score, gradients)`` back. :func:`run_trial` feeds it from
one objective; :mod:`.batched` feeds many trials' programs from ONE batched evaluation per round. A trial's
own state (Adam moments and step-size schedule, L-BFGS memory and line search, stop rules, best-so-far,
divergence) lives in its program, so a trial that stops leaves the others running and a diverging trial
touches nothing but its own state. Adam is :func:`adam_update` (torch.optim.Adam's single-tensor update
written out: the same operations in the same order; importing torch.optim costs 0.85 s once per process).
The L-BFGS is written here because torch's is not scale free (see :class:`LBFGS`); tests/test_optim_driver.py
checks both against torch.optim on a smooth problem.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import torch

from .lbfgs import LBFGS  # the L-BFGS the trial programs run

Objective = Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
OPTIMIZERS = ("signed-adam", "adam", "lbfgs")
TOLERANCES = ("relative", "absolute")  # L-BFGS stop and curvature tests: scale free, or torch.optim.LBFGS's
# what a trial program yields: (variables to evaluate, whether it needs their gradients); what it receives:
# (total, score, gradients or None) with total and score as floats; gradients are None when the total is not
# finite or when they were not asked for
Request = tuple[list[torch.Tensor], bool]
Result = tuple[float, float, "Sequence[torch.Tensor] | None"]
Program = Generator[Request, Result, None]


class DivergenceWarning(RuntimeWarning):
    """A trial of an optimisation attack diverged (its best finite iterate is kept; see ``rec.info``)."""


@dataclass
class Trial:
    """One optimisation run: the best finite iterate (variables), its score, the loss history (one entry per
    outer step), the counts, why it stopped, and the outer step at which it diverged (None if it did not)."""

    variables: list[torch.Tensor] | None
    score: float = float("inf")
    history: list[float] = field(default_factory=list)
    outer_steps: int = 0
    iterations: int = 0
    evaluations: int = 0
    diverged_at: int | None = None
    stop: str = ""
    seconds: float = 0.0

    @property
    def finite(self) -> bool:
        return self.variables is not None and math.isfinite(self.score)

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def summary(self) -> dict:
        return {"score": self.score if math.isfinite(self.score) else None, "iterations": self.iterations,
                "outer_steps": self.outer_steps, "gradient_evaluations": self.evaluations,
                "stop": self.stop, "diverged_at": self.diverged_at, "seconds": round(self.seconds, 3)}


def totals(trials: list[Trial]) -> dict:
    """Counts summed over trials, for ``rec.info`` (named as in :class:`Trial`)."""
    return {"iterations": sum(t.iterations for t in trials), "outer_steps": sum(t.outer_steps for t in trials),
            "gradient_evaluations": sum(t.evaluations for t in trials),
            "diverged_trials": sum(1 for t in trials if t.diverged)}


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


def trial_program(
    variables: list[torch.Tensor],
    *,
    optimizer: str,
    max_iterations: int,
    lr: float,
    inner: int = 20,
    history_size: int = 100,
    line_search: str = "strong-wolfe",
    decay: bool = True,
    schedule: Callable[[int], float] | None = None,
    project: Callable[[list[torch.Tensor]], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    on_offer: Callable[[float, list[torch.Tensor]], None] | None = None,
    offer_every: int = 25,
    explode_factor: float = 0.0,
    stall_steps: int = 5,
    tol_grad: float = 1e-10,
    tolerances: str = "relative",
    tol_change: float = 1e-12,
    max_outer_steps: int | None = None,
    name: str = "trial",
) -> tuple[Trial, Program]:
    """One trial of ``optimizer`` ('signed-adam' | 'adam' | 'lbfgs') from ``variables`` for up to
    ``max_iterations`` iterations (see the module docstring for counts and stop reasons), as a program to be
    fed evaluations (:func:`run_trial` from one objective, :mod:`.batched` for many trials at once). Returns
    the :class:`Trial` (filled in when the program ends) and the program.

    Adam: lr x0.1 at 3/8, 5/8, 7/8 of ``max_iterations`` (``decay``), or ``lr * schedule(step)`` at every step
    when a ``schedule`` is given (e.g. :func:`.common.lr_schedule`; give one with a stable ``repr`` so that
    batched trials with equal settings share one batch); signed: the step uses sign(gradient).
    L-BFGS: ``lr``, outer steps of ``inner`` iterations, ``history_size`` pairs, ``line_search``
    ('strong-wolfe' or '' for DLG's fixed step). ``project`` (e.g. the box clamp) runs after every Adam step /
    L-BFGS outer step. ``on_step(outer_step, total, best_score)``; ``on_offer(score, vars)`` every
    ``offer_every`` iterations when the best improved, and at the end (Ctrl-C safety).
    L-BFGS only: ``tolerances`` 'relative' (scale free, see :class:`LBFGS`) or 'absolute' (torch.optim.LBFGS's
    tests, with ``tol_grad`` / ``tol_change`` as its tolerance_grad / tolerance_change, e.g. 1e-7 / 1e-9);
    ``max_outer_steps`` stops after that many outer steps (1 with ``inner = max_iterations``: one
    torch.optim.LBFGS.step call, which also ends when ``inner`` x 5/4 evaluations are spent)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if tolerances not in TOLERANCES:
        raise ValueError(f"tolerances must be one of {TOLERANCES}, got {tolerances!r}")
    trial = Trial(None)

    def program() -> Program:
        t0 = time.perf_counter()
        best = _Best()
        if optimizer == "lbfgs":
            yield from _lbfgs(trial, best, variables, max_iterations=max_iterations, lr=lr, inner=inner,
                              history_size=history_size, line_search=line_search, project=project,
                              on_step=on_step, on_offer=on_offer, offer_every=max(1, offer_every // max(inner, 1)),
                              explode_factor=explode_factor, stall_steps=stall_steps, tol_grad=tol_grad,
                              tolerances=tolerances, tol_change=tol_change, max_outer_steps=max_outer_steps)
        else:
            yield from _adam(trial, best, variables, max_iterations=max_iterations, lr=lr,
                             signed=optimizer == "signed-adam", decay=decay, schedule=schedule, project=project,
                             on_step=on_step,
                             on_offer=on_offer, offer_every=offer_every, explode_factor=explode_factor)
        _finish(trial, best.vars, best.score, t0, on_offer, name)

    return trial, program()


def _finish(trial: Trial, variables, score: float, t0: float, on_offer, name: str, stacklevel: int = 5) -> None:
    """A trial's end: its best finite iterate and score, its time, the last offer, the divergence warning."""
    trial.variables, trial.score = variables, score
    trial.seconds = time.perf_counter() - t0
    if on_offer is not None and variables is not None:
        on_offer(score, variables)
    if trial.diverged:
        warnings.warn(f"{name} {trial.stop} at outer step {trial.diverged_at} (after {trial.iterations} "
                      f"iterations); " + ("the best finite iterate before it is kept" if trial.finite else
                                          "it has no finite iterate"), DivergenceWarning, stacklevel=stacklevel)


def evaluate(objective: Objective, variables: list[torch.Tensor], need_grad: bool = True) -> Result:
    """(total, score, gradients) of ``objective`` at ``variables`` as a trial program expects them: gradients
    None when the total is not finite (the program stops there) or when they are not needed."""
    leaves = [v.detach().requires_grad_(need_grad) for v in variables]
    with torch.enable_grad():
        total, score = objective(leaves)
        tval = float(total.detach())
        if not math.isfinite(tval):
            return tval, float("nan"), None
        sval = float(score.detach())
        return tval, sval, (torch.autograd.grad(total, leaves) if need_grad else None)


def feed(program: Program, evaluator: Callable[[list[torch.Tensor], bool], Result]) -> None:
    """Run a trial program to its end, answering each request with ``evaluator(variables, need_grad)``."""
    try:
        request = next(program)
        while True:
            request = program.send(evaluator(*request))
    except StopIteration:
        pass


def run_trial(objective: Objective, variables: list[torch.Tensor], **settings) -> Trial:
    """One trial (:func:`trial_program`'s settings) fed from ``objective(variables) -> (total, score)``."""
    trial, program = trial_program(variables, **settings)
    feed(program, lambda v, need_grad: evaluate(objective, v, need_grad))
    return trial


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_update(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float) -> None:
    """One Adam update of ``x`` in place (moments ``m``, ``v`` updated in place; ``step`` counts from 1):
    torch.optim.Adam's single-tensor update (betas 0.9, 0.999, eps 1e-8, no weight decay), op for op."""
    beta1, beta2 = ADAM_BETAS
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    denom = (v.sqrt() / bias_correction2 ** 0.5).add_(ADAM_EPS)
    x.addcdiv_(m, denom, value=-step_size)


def _milestones(max_iterations: int, decay: bool) -> set[int]:
    """The Adam steps where the lr drops x0.1 (3/8, 5/8, 7/8 of the budget; none without ``decay``)."""
    return {int(max_iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)} if decay else set()


def _exploded(tval: float, first: float | None, explode_factor: float) -> bool:
    """Whether a finite total ``tval`` is more than ``explode_factor`` times the first finite one (0: off)."""
    return (explode_factor > 0 and first is not None and math.isfinite(tval)
            and abs(tval) > explode_factor * max(first, 1e-300))


def _adam(trial, best, variables, *, max_iterations, lr, signed, decay, project, on_step, on_offer,
          offer_every, explode_factor, schedule=None) -> Program:
    leaves = [v.detach().clone() for v in variables]
    moments = [(torch.zeros_like(x), torch.zeros_like(x)) for x in leaves]
    base_lr = lr
    milestones = _milestones(max_iterations, decay)
    first = None
    trial.stop = "budget"
    for step in range(max_iterations):
        tval, sval, grads = yield leaves, True
        if first is None and math.isfinite(tval):
            first = abs(tval)
        exploded = _exploded(tval, first, explode_factor)
        if not math.isfinite(tval) or exploded:
            trial.diverged_at, trial.stop = step, ("diverged: exploded" if exploded else "diverged: non-finite loss")
            return
        trial.evaluations += 1
        if grads is None or not all(_finite(g) for g in grads):
            trial.diverged_at, trial.stop = step, "diverged: non-finite gradient"
            return
        best.see(sval, leaves)
        trial.history.append(tval)
        if schedule is not None:
            lr = base_lr * schedule(step)
        elif step in milestones:
            lr *= 0.1
        with torch.no_grad():
            for x, g, (m, v) in zip(leaves, grads, moments):
                adam_update(x, g.sign() if signed else g, m, v, step + 1, lr)
            if project is not None:
                project(leaves)
        trial.outer_steps = trial.iterations = step + 1
        if on_step is not None:
            on_step(step, tval, best.score)
        if on_offer is not None and best.dirty and (step + 1) % offer_every == 0:
            best.dirty = False
            on_offer(best.score, best.vars)
    # score the final iterate too (the loop scored each iterate before its step)
    tval, sval, _ = yield leaves, False
    if math.isfinite(tval):
        best.see(sval, leaves)


# the settings a fused Adam group takes (trial_program's Adam settings), and those only L-BFGS reads
_ADAM_SETTINGS = frozenset({"optimizer", "max_iterations", "lr", "decay", "schedule", "offer_every",
                            "explode_factor"})
_LBFGS_ONLY = frozenset({"inner", "history_size", "line_search", "stall_steps", "tol_grad", "tolerances",
                         "tol_change", "max_outer_steps"})


class BoxProjection:
    """A trial's ``project`` that puts its image into the box [lo, hi] in place (floats, or tensors
    broadcastable against it): the clamp of its first variable, or with ``param`` a parametrisation of more
    than one variable (:mod:`.parametrize`, e.g. a Laplacian pyramid) that parametrisation's ``project`` of its
    first ``param.count`` variables (the pyramid changes its finest level, the first variable, only).
    :class:`FusedAdam` projects the rows of trials whose boxes (and parametrisations) are the same as ONE stacked
    op instead of one call per trial (the same values: clamp is elementwise, the pyramid's upsampling acts per
    sample)."""

    def __init__(self, lo: float | torch.Tensor, hi: float | torch.Tensor, param=None):
        self.lo, self.hi = lo, hi
        self.param = param if param is not None and param.count > 1 else None
        self.count = 1 if self.param is None else self.param.count  # the variables it reads
        self.key = tuple((type(b).__name__, b) if not isinstance(b, torch.Tensor) else
                         (str(b.dtype), str(b.device), tuple(b.shape), tuple(b.reshape(-1).tolist()))
                         for b in (lo, hi)) + (self.param,)

    def __call__(self, v: list[torch.Tensor]) -> None:
        """Project one trial's variables, or the stacked rows of trials with this box (changes ``v[0]`` only)."""
        if self.param is None:
            v[0].clamp_(self.lo, self.hi)
        else:
            self.param.project(v, self.lo, self.hi)


class FusedAdam:
    """The Adam / signed-Adam programs (:func:`trial_program`) of T trials that share their settings and start
    together, run as ONE stacked update per round: the running trials' variables are the rows of (T, ...)
    tensors, and every round's Adam update (moments, bias corrections, the signed step), its finiteness
    checks and best-so-far copies are a few tensor operations over all rows instead of a few per trial. The
    operations are elementwise (or row-wise reductions), so each row gets exactly the values its own program
    would: bit for bit (tests/test_fused_adam.py). What stays per trial: its stop rule (non-finite loss or
    gradient, explosion) and divergence record, best score and iterate, counts, ``project`` (called on the
    trial's rows, as views; a :class:`BoxProjection` with another trial's values clamps with it), ``on_step`` / ``on_offer`` and the end (:func:`_finish`), in the order the
    programs would run them. A trial that stops leaves the batch (its rows are dropped at that round).

    Protocol (:mod:`.batched` feeds it): :meth:`request` gives (stacked variables of the running trials, need
    gradients) or None when every trial ended; :meth:`receive` takes one total and score per running row
    (floats; a non-finite total ends that trial) and the stacked gradients (rows in :attr:`running` order;
    None when they were not asked for). ``trials`` are the :class:`Trial` records it fills in."""

    def __init__(self, starts: Sequence[Sequence[torch.Tensor]], trials: Sequence[Trial], *,
                 projects: Sequence[Callable | None], on_steps: Sequence[Callable | None],
                 on_offers: Sequence[Callable | None], names: Sequence[str], **settings):
        unknown = set(settings) - _ADAM_SETTINGS - _LBFGS_ONLY
        if unknown:
            raise TypeError(f"FusedAdam got unknown settings {sorted(unknown)}")
        optimizer = settings.get("optimizer")
        if optimizer not in ("signed-adam", "adam"):
            raise ValueError(f"FusedAdam runs 'signed-adam' or 'adam' trials, got {optimizer!r}")
        n = len(starts)
        if not (len(trials) == len(projects) == len(on_steps) == len(on_offers) == len(names) == n) or n == 0:
            raise ValueError("FusedAdam needs one trial, project, on_step, on_offer and name per start (>= 1)")
        self.trials, self.names = list(trials), list(names)
        self.projects, self.on_steps, self.on_offers = list(projects), list(on_steps), list(on_offers)
        self.signed = optimizer == "signed-adam"
        self.max_iterations = settings["max_iterations"]
        self.lr = self.base_lr = settings["lr"]
        self.schedule = settings.get("schedule")
        decay = settings.get("decay", True)
        self.milestones = _milestones(self.max_iterations, decay)
        self.offer_every = settings.get("offer_every", 25)
        self.explode_factor = settings.get("explode_factor", 0.0)
        self.x = [torch.stack([s[j].detach() for s in starts]) for j in range(len(starts[0]))]
        self.moments = [(torch.zeros_like(x), torch.zeros_like(x)) for x in self.x]
        self.best = [torch.empty_like(x) for x in self.x]  # rows by trial (not compacted)
        self.best_score = [float("inf")] * n
        self.has_best = [False] * n
        self.dirty = [False] * n
        self.first: list[float | None] = [None] * n
        self.running = list(range(n))
        self.step = 0
        self.final = self.max_iterations <= 0
        for t in self.trials:
            t.stop = "budget"
        self.t0 = time.perf_counter()

    def request(self) -> tuple[list[torch.Tensor], bool] | None:
        return (self.x, not self.final) if self.running else None

    def _see(self, rows: list[int], svals: Sequence[float], xfin: list[bool]) -> None:
        """_Best.see for rows ``rows``: a finite score below the trial's best at a finite iterate is copied."""
        better = [r for r in rows if math.isfinite(svals[r]) and svals[r] < self.best_score[self.running[r]]
                  and xfin[r]]
        if not better:
            return
        tids = [self.running[r] for r in better]
        for r, t in zip(better, tids):
            self.best_score[t] = svals[r]
            self.has_best[t] = self.dirty[t] = True
        with torch.no_grad():
            if len(better) == len(self.running) == len(self.trials):
                for b, x in zip(self.best, self.x):
                    b.copy_(x)
            else:
                ti = torch.tensor(tids, device=self.x[0].device)
                ri = torch.tensor(better, device=self.x[0].device)
                for b, x in zip(self.best, self.x):
                    b.index_copy_(0, ti, x.index_select(0, ri))

    def _best_of(self, t: int) -> list[torch.Tensor] | None:
        return [b[t].clone() for b in self.best] if self.has_best[t] else None

    def _end(self, t: int) -> None:
        _finish(self.trials[t], self._best_of(t), self.best_score[t], self.t0, self.on_offers[t], self.names[t],
                stacklevel=4)

    def receive(self, tvals: Sequence[float], svals: Sequence[float],
                grads: Sequence[torch.Tensor] | None) -> None:
        running = self.running
        if self.final:  # the final iterate is scored too (the loop scored each iterate before its step)
            self._see([r for r in range(len(running)) if math.isfinite(tvals[r])], svals, _rows_finite(self.x)[0])
            for t in running:
                self._end(t)
            self.running = []
            return
        step, trials = self.step, self.trials
        ok, ended = [], set()
        for r, t in enumerate(running):
            tv = tvals[r]
            fin = math.isfinite(tv)
            if self.first[t] is None and fin:
                self.first[t] = abs(tv)
            exploded = _exploded(tv, self.first[t], self.explode_factor)
            if not fin or exploded:
                trials[t].diverged_at = step
                trials[t].stop = "diverged: exploded" if exploded else "diverged: non-finite loss"
                ended.add(r)
                continue
            trials[t].evaluations += 1
            ok.append(r)
        if ok:
            flags = _rows_finite(self.x, grads)
            xfin, gfin = flags[0], (flags[1] if grads is not None else [False] * len(running))
        keep = []
        for r in ok:
            t = running[r]
            if not gfin[r]:
                trials[t].diverged_at, trials[t].stop = step, "diverged: non-finite gradient"
                ended.add(r)
            else:
                keep.append(r)
        if keep:
            self._see(keep, svals, xfin)
            for r in keep:
                trials[running[r]].history.append(tvals[r])
        if self.schedule is not None:
            self.lr = self.base_lr * self.schedule(step)
        elif step in self.milestones:
            self.lr *= 0.1
        if keep:
            g = list(grads)
            if len(keep) < len(running):  # drop the rows of the trials that stopped
                idx = torch.tensor(keep, device=self.x[0].device)
                self.x = [x.index_select(0, idx) for x in self.x]
                self.moments = [(m.index_select(0, idx), v.index_select(0, idx)) for m, v in self.moments]
                g = [q.index_select(0, idx) for q in g]
            with torch.no_grad():
                for x, q, (m, v) in zip(self.x, g, self.moments):
                    adam_update(x, q.sign() if self.signed else q, m, v, step + 1, self.lr)
                boxes: dict[tuple, list[int]] = {}  # box projections by their values: one clamp per box
                for row, r in enumerate(keep):
                    project = self.projects[running[r]]
                    if isinstance(project, BoxProjection):
                        boxes.setdefault(project.key, []).append(row)
                for rows in boxes.values():
                    box = self.projects[running[keep[rows[0]]]]
                    if len(rows) == len(keep):
                        box(self.x)
                    elif len(rows) == 1:
                        box([x[rows[0]] for x in self.x[:box.count]])
                    else:
                        idx = torch.tensor(rows, device=self.x[0].device)
                        sub = [x.index_select(0, idx) for x in self.x[:box.count]]
                        box(sub)
                        self.x[0].index_copy_(0, idx, sub[0])
                for row, r in enumerate(keep):
                    project = self.projects[running[r]]
                    if project is not None and not isinstance(project, BoxProjection):
                        views = [x[row] for x in self.x]
                        given = list(views)
                        project(views)
                        for x, before, after in zip(self.x, given, views):
                            if after is not before:  # the project replaced a variable: copy it back
                                x[row].copy_(after)
        kept = set(keep)
        for r, t in enumerate(running):  # the programs' order: each trial's callbacks, or its end
            if r in ended:
                self._end(t)
                continue
            if r not in kept:
                continue
            trial = trials[t]
            trial.outer_steps = trial.iterations = step + 1
            if self.on_steps[t] is not None:
                self.on_steps[t](step, tvals[r], self.best_score[t])
            if self.on_offers[t] is not None and self.dirty[t] and (step + 1) % self.offer_every == 0:
                self.dirty[t] = False
                self.on_offers[t](self.best_score[t], self._best_of(t))
        self.running = [running[r] for r in keep]
        self.step = step + 1
        if self.step >= self.max_iterations:
            self.final = True


def _rows_finite(*groups: Sequence[torch.Tensor] | None) -> list[list[bool]]:
    """Per group of stacked tensors (rows = trials): whether each row of every tensor is finite (one sync).
    A row is finite iff the sum of its entries times 0 is 0 (an infinite or NaN entry gives NaN, finite ones
    +-0): two ops per tensor, where ``isfinite(...).all(1)`` took 5x the time (16 LeNet trials: 34 vs 203 us
    a round for the image and its gradient)."""
    sums = []
    for tensors in groups:
        if tensors is None:
            continue
        s = None
        for x in tensors:
            sx = x.reshape(x.shape[0], -1).mul(0).sum(1)
            s = sx if s is None else s + sx
        sums.append(s)
    return [[v == 0 for v in row] for row in torch.stack(sums).tolist()]


def _lbfgs(trial, best, variables, *, max_iterations, lr, inner, history_size, line_search, project,
           on_step, on_offer, offer_every, explode_factor, stall_steps, tol_grad, tolerances="relative",
           tol_change=1e-12, max_outer_steps=None) -> Program:
    shapes = [v.shape for v in variables]
    sizes = [v.numel() for v in variables]
    z = torch.cat([v.detach().reshape(-1) for v in variables]).clone()
    state: dict = {"first": None, "best_total": float("inf")}

    def unflat(flat: torch.Tensor) -> list[torch.Tensor]:
        return [p.view(sh) for p, sh in zip(flat.split(sizes), shapes)]

    def fn(zz: torch.Tensor):
        """Loss and flat gradient at zz; NaN (which the line search backs off from) if either is not finite
        (a generator: the evaluation is requested with ``yield``)."""
        leaves = unflat(zz)
        tval, sval, grads = yield leaves, True
        if not math.isfinite(tval) or grads is None:
            return float("nan"), torch.zeros_like(zz)
        g = torch.cat([q.reshape(-1) for q in grads])
        if not _finite(g):
            return float("nan"), torch.zeros_like(zz)
        best.see(sval, leaves)
        state["best_total"] = min(state["best_total"], tval)
        return tval, g

    opt = LBFGS(z, lr=lr, max_iter=inner, history_size=history_size, tolerance_grad=tol_grad,
                tolerance_change=tol_change, line_search=line_search in ("strong-wolfe", "strong_wolfe"),
                absolute=tolerances == "absolute")
    still, fresh = 0, False
    trial.stop = "budget"
    step = 0
    while opt.total_iter < max_iterations:
        opt.max_iter = min(inner, max_iterations - opt.total_iter)
        opt.max_eval = opt.max_iter * 5 // 4
        before = opt.total_iter
        lval = yield from opt.steps(fn)
        cur = opt.current
        if math.isfinite(lval) and state["first"] is None:
            state["first"] = abs(lval)
        if not _finite(z):
            trial.diverged_at, trial.stop = step, "diverged: non-finite iterate"
        elif not math.isfinite(lval) or (cur is not None and not math.isfinite(cur)):
            trial.diverged_at, trial.stop = step, "diverged: non-finite loss"
        elif explode_factor > 0 and max(abs(lval), abs(cur or 0.0)) > explode_factor * max(state["first"], 1e-300):
            trial.diverged_at, trial.stop = step, "diverged: exploded"
        if trial.diverged_at is not None:
            break
        if project is not None:
            with torch.no_grad():
                project(unflat(z))
        # a loss that no longer moves: stuck at its best (stalled), or after a jump into a flat region
        still = still + 1 if trial.history and abs(lval - trial.history[-1]) <= 1e-12 * max(abs(lval), 1e-300) else 0
        trial.history.append(lval)
        step += 1
        trial.outer_steps = step
        if on_step is not None:
            on_step(step - 1, lval, best.score)
        if on_offer is not None and best.dirty and step % offer_every == 0:
            best.dirty = False
            on_offer(best.score, best.vars)
        if opt.converged:
            trial.stop = (f"converged: max |gradient| <= {tol_grad:g}" if opt.absolute else
                          f"converged: max |gradient| <= {tol_grad:g} x its start value")
            break
        if max_outer_steps is not None and step >= max_outer_steps:
            trial.stop = f"outer steps: {step} (the last ended on {opt.exit})"
            break
        if opt.total_iter == before:  # no descent direction (zero gradient) and not converged
            trial.stop = "stalled: no descent direction"
            break
        if still >= stall_steps:
            if not fresh:  # first try again without the curvature memory
                opt.reset()
                still, fresh = 0, True
                continue
            if lval > 2.0 * state["best_total"] and state["best_total"] < float("inf"):
                trial.diverged_at, trial.stop = step - 1, "diverged: stalled after a jump"
            else:
                trial.stop = (f"stalled: loss unchanged (relative 1e-12) for {stall_steps} outer steps, twice "
                              "(curvature memory dropped in between)")
            break
        if still == 0:
            fresh = False
    trial.iterations, trial.evaluations = opt.total_iter, opt.n_evals


def run_adam(objective: Objective, variables: list[torch.Tensor], *, steps: int, lr: float, signed: bool = True,
             **kw) -> Trial:
    """:func:`run_trial` with (signed) Adam for ``steps`` iterations."""
    return run_trial(objective, variables, optimizer="signed-adam" if signed else "adam", max_iterations=steps,
                     lr=lr, **kw)


def run_lbfgs(objective: Objective, variables: list[torch.Tensor], *, max_iterations: int, lr: float = 1.0,
              **kw) -> Trial:
    """:func:`run_trial` with L-BFGS for ``max_iterations`` iterations."""
    return run_trial(objective, variables, optimizer="lbfgs", max_iterations=max_iterations, lr=lr, **kw)


# ---- L-BFGS ---------------------------------------------------------------------------------------------------
