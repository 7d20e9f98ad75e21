"""Batched trials: many optimisation trials (an attack's restarts, and independent cases on one model) run as
ONE computation per optimiser step.

Every trial stays its own :func:`~.driver.trial_program` (its own Adam moments and step-size schedule, L-BFGS
memory and line search, stop rule, best-so-far and divergence check); only the EVALUATION is shared: each
round, the variables every running trial asks for are stacked, and one ``torch.func.vmap`` over the
per-trial gradient matching gives every trial's (total, score) and, by one backward pass, its gradient:

    per trial t:  g_t = grad_theta loss(f(theta_t; x_t), y_t)  (FedSGD; FedAvg: the unrolled local steps)
                  total_t = D(g_t, g*_t) + sum_r w_r prior_r(x_t),  score_t as the attack defines it

(the priors: the attack's built :class:`.priors.Objective`, the same one its one-by-one objective adds).
x_t is the image of trial t's first ``param.count`` variables under the setup's parametrisation
(:mod:`.parametrize`: the variable itself for 'pixel'; a Laplacian pyramid's levels, stacked, give the stacked
images), so the gradient reaches every variable, and the fused Adam update and the box projection act on them
all per trial (:class:`~.driver.BoxProjection`); setups of different parametrisations are never grouped.

Two engines compute the g_t. Where every trial is FedSGD on the SAME parameters and every matched
parameter's layer has a per-sample rule (:mod:`.persample`: Linear, Conv2d, eval-mode BatchNorm), the
STACKED engine runs the trials' inputs as one ordinary batch of the model, takes the gradients w.r.t. every
layer's output in one backward, and forms each trial's parameter gradients from them (no batched weights, so
no grouped convolutions in the forward; the second backward's grouped convolutions are per trial's own
kernel). Otherwise (FedAvg, different parameters, a layer without a rule; ``note['stacked_problems']`` says
which) the vmap engine runs; ``theta_t`` is not copied when the trials share the case's parameters
(``in_dims=None``: the trials become a batch of the same model). The totals of different trials are
independent, so the gradient of their SUM is each trial's own gradient; a trial that went non-finite keeps its NaN to itself (no operation mixes trials)
and its program stops as it would alone; a trial that stopped is simply not asked again.

Equal to running the trials one by one up to the reduction order of the batched kernels (checked by
tests/test_batched_trials.py and tests/test_batched_stacked.py in float64: candidates and best scores
agree to ~1e-10 relative).
Where vmap cannot run the objective (BatchNorm in train mode, a prior registered with a ``batch_problem`` such
as 'bn-statistics' (its own hooked forward pass), a regulariser that is not a function of its argument alone,
...) the trials run one by one and ``rec.info['batched']`` says why. Before trusting the
batched objective the first round compares the first and the last trial's batched totals with the
sequential objective (a module that mixes the samples of a batch would couple the stacked trials); a
disagreement also falls back, with the figures in the note.

Chunks: at most ``chunk`` trials go into one vmap call, chosen from the memory estimate
(:func:`gradleak.resources.estimate_trials`) and the limit (:func:`memory_limit`, ``--max-memory``, default the
memory available), so a large batch runs in pieces instead of failing.

Public: :func:`reconstruct_many` (N cases x their restarts in one batched run, each Reconstruction exactly as
``attack.reconstruct`` returns it) and :func:`run` (what an attack's restart loop calls).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import os
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ... import resources, threads
from ...case import Case
from ..base import Attack, Reconstruction
from . import parametrize as Z
from . import priors as P
from .common import GradientMatcher
from .batched_objective import CONCAT_MAX_ELEMENTS, ENGINE, STACKED, BatchedObjective, path_claim  # noqa: F401 (re-exported)
from .driver import FusedAdam, Objective, Result, Trial, evaluate, feed, trial_program



@dataclass
class TrialSetup:
    """One attack run's trials on one case: what :func:`run` needs to run them one by one (``objective``) or
    batched (the pieces of that objective).

    matcher: the data term; param: the parametrisation (:mod:`.parametrize`): a trial's first ``param.count``
    variables are its, the candidate is ``param.image(variables[:param.count])`` (Pixel: the first variable
    itself); labels: fixed int labels (B,), or None when the variable after those are label logits;
    priors: the added terms, a built :class:`.priors.Objective` (``total = data + priors.value(x, labels)``);
    tv, regularizers: shorthands folded into ``priors`` (the 'tv' prior with weight ``tv``, and plain callables
    ``(x) -> 0-d tensor`` or prior specs); score: 'data' (the score is
    the data term) or 'cosine' (the cosine distance, the data term being an L2); starts: one variable list
    per trial; settings: :func:`~.driver.trial_program` settings shared by the trials (optimizer, budget,
    lr, ...); project / on_step / on_offer: the trial callbacks; names: one per trial (for warnings); batched:
    False runs them one by one, for ``not_batched_reason``."""

    case: Case
    matcher: GradientMatcher
    labels: torch.Tensor | None
    objective: Objective
    starts: list[list[torch.Tensor]]
    settings: dict
    tv: float = 0.0
    regularizers: tuple = ()
    score: str = "data"
    priors: P.Objective | None = None
    project: Callable | None = None
    on_step: Callable | None = None
    on_offer: Callable | None = None
    names: list[str] = field(default_factory=list)
    batched: bool = True
    not_batched_reason: str = "batch_trials is off"  # what info['batched'] and batch_problems say when not batched
    param: Any = field(default_factory=Z.Pixel)

    def __post_init__(self):
        extra = ([("tv", self.tv)] if self.tv > 0 else []) + list(self.regularizers)
        built = P.build(self.case, extra)
        self.priors = built if self.priors is None else self.priors.plus(built)

    @property
    def joint(self) -> bool:
        return self.labels is None


# ---- memory limit -----------------------------------------------------------------------------------------
_LIMIT: contextvars.ContextVar = contextvars.ContextVar("gradleak_batched_memory_limit", default=None)


@contextlib.contextmanager
def memory_limit(limit: int | str | None):
    """Within the block, batched trials size their chunks to ``limit`` (bytes or '8GB'; None: the memory
    available, the default)."""
    token = _LIMIT.set(None if limit is None else resources.parse_size(limit))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def chunk_size(setup: TrialSetup, trials: int, limit: int | None = None) -> tuple[int, dict]:
    """How many trials of ``setup`` go into one vmap call so that the estimate fits ``limit`` (default:
    :func:`memory_limit`'s, else the memory available); at least 1. Returns (chunk, facts for the note)."""
    case = setup.case
    o = case.observation
    opt = setup.settings.get("optimizer", "signed-adam")
    copies = 2 * int(setup.settings.get("history_size", 100)) + 4 if opt == "lbfgs" else 4
    shared, per = resources.estimate_trials(case.model, tuple(case.spec.shape), batch_size=case.batch_size,
                                            dtype=case.dtype, local_steps=getattr(o, "local_steps", 1),
                                            candidate_copies=copies,
                                            variable_scale=setup.param.scale)
    limit = limit if limit is not None else _LIMIT.get()
    source = "memory_limit" if limit is not None else "available memory"
    if limit is None:
        limit = resources.available_memory()
    if limit is None:
        return trials, {"memory_per_trial_estimate": per.total, "limit": None}
    chunk = max(1, min(trials, int((limit - shared.total) // max(per.total, 1))))
    return chunk, {"memory_per_trial_estimate": per.total, "memory_shared_estimate": shared.total,
                   "limit": limit, "limit_source": source}


# ---- when vmap cannot be used -----------------------------------------------------------------------------
def vmap_problems(setup: TrialSetup) -> list[str]:
    """Why ``setup``'s objective cannot be batched with vmap ([] if it can be tried)."""
    case = setup.case
    p = []
    if case.bn_mode == "train" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                       for m in case.model.modules()):
        p.append("BatchNorm in train mode (batch statistics and running-statistic updates) is not batched")
    if any(getattr(m, "inplace", False) for m in case.model.modules()):
        p.append("the model has in-place modules (inplace=True), which vmap over trials does not support")
    return p + setup.priors.batch_problems()


# On a CPU, batching trials of a large model does not pay: each trial's update is its own (several passes over
# T x parameters of memory per round) and the convolutions are already compute-bound at batch 1. Measured with
# benchmarks/bench_throughput.py (stacked engine, one thread, 16 trials, docs/performance.md): lenet (23k
# parameters) 2.2x, resnet20 (273k) 1.3x (2.5x at 64), convnet width 16 1.0x, resnet18 (11.2M) 0.87x in CPU
# time (a 16-trial round 1.8x slower than 16 sequential evaluations). An
# attack's own restarts are therefore batched on a CPU only up to this many parameters; reconstruct_many (an
# explicit request) batches whatever it can.
CPU_BATCH_MAX_PARAMETERS = 2_000_000




def worth_batching(case: Case) -> str:
    """'' when batching an attack's restarts is expected to pay on ``case``'s device, else why not."""
    n = sum(p.numel() for p in case.model.parameters())
    if case.device.type == "cpu" and n > CPU_BATCH_MAX_PARAMETERS:
        return (f"the model has {n:,} parameters: on a CPU, batched trials of a model above "
                f"{CPU_BATCH_MAX_PARAMETERS:,} parameters are not faster (benchmarks/bench_throughput.py)")
    return ""


def batch_problems(attack: Attack, case: Case, *, pays: bool = True) -> list[str]:
    """Why ``attack``'s trials on ``case`` (and on cases like it: the same model, other images) would run one by
    one instead of batched ([] if they batch): not an optimisation attack (no ``batch_trials`` option), its
    ``batch_trials`` off, the :func:`vmap_problems` of the trial setup it builds on ``case`` (BatchNorm in train
    mode, in-place modules, a prior such as 'bn-statistics'), and where ``pays``, :func:`worth_batching` (what an
    attack's own restarts and the audit's planner heed; :func:`reconstruct_many` batches regardless: give
    ``pays=False`` for its answer). The reasons are the sentences ``info['batched']['reason']`` gives.

    The setup is built as :func:`reconstruct_many`'s first pass builds it (the attack runs up to its first
    batched call: its starts drawn, its labels read or recovered; no optimiser step). Not foreseen: the first
    batched round's agreement check with the sequential objective, which can still fall back at run time."""
    if not hasattr(getattr(attack, "options", None), "batch_trials"):
        return ["not an optimisation attack with batched trials"]
    many = _Many()
    token = _MANY.set(many)
    try:
        attack.reconstruct(case, seed=0)
    except _Captured:
        pass
    finally:
        _MANY.reset(token)
    setup = many.captured.get(0)
    if setup is None:
        return ["the attack ran no batched trials on this case"]
    if not setup.batched:
        return [setup.not_batched_reason]
    problems = vmap_problems(setup)
    slow = worth_batching(case) if pays else ""
    return problems + ([slow] if slow and not problems else [])


def _architecture(case: Case) -> tuple:
    """The model's structure: its class and its parameters' and buffers' names and shapes."""
    m = case.model
    return (type(m), tuple((k, tuple(v.shape)) for k, v in m.named_parameters()),
            tuple((k, tuple(v.shape)) for k, v in m.named_buffers()))


def _group_key(setup: TrialSetup) -> tuple:
    """Setups with equal keys can share one batched objective: same model structure, protocol, loss, matched
    tensors and weights, distance, added terms, parametrisation, variable shapes, optimiser settings and
    device/dtype."""
    case, m = setup.case, setup.matcher
    o = case.observation
    arch = _architecture(case)
    proto = (type(o).__name__, getattr(o, "local_steps", None), getattr(o, "local_lr", None),
             getattr(o, "local_batch_size", None))
    shapes = tuple(tuple(tuple(v.shape) for v in s) for s in setup.starts[:1])
    settings = tuple(sorted((k, repr(v)) for k, v in setup.settings.items()))
    return (id(case.model.__class__), arch, proto, case.loss, case.dtype, str(case.device), tuple(m.names),
            tuple(m.w), m.distance, setup.priors.key(), setup.score, setup.joint,
            shapes, settings, case.batch_size, setup.project is not None, setup.param)


def _programs(setup: TrialSetup):
    out = []
    for r, start in enumerate(setup.starts):
        name = setup.names[r] if r < len(setup.names) else f"trial {r}"
        out.append(trial_program(start, **setup.settings, project=setup.project, on_step=setup.on_step,
                                 on_offer=setup.on_offer, name=name))
    return out


def _sequential(setup: TrialSetup, programs) -> None:
    for _, program in programs:
        feed(program, lambda v, need_grad: evaluate(setup.objective, v, need_grad))


def _agree(a: Result, b: Result, dtype: torch.dtype) -> bool:
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    (ta, sa, _), (tb, sb, _) = a, b
    if not (math.isfinite(ta) and math.isfinite(tb)):
        return math.isfinite(ta) == math.isfinite(tb)
    return abs(ta - tb) <= tol * max(abs(tb), 1e-30) + tol * 1e-6 and abs(sa - sb) <= tol * max(abs(sb), 1e-30) + tol * 1e-6


# glibc's malloc serves blocks above a dynamic threshold (128 KB at first) with fresh mmap pages and returns
# the top of its heap to the system when 128 KB+ is free there: a batched round's (trials x matched parameters)
# temporaries (1.5 MB each on LeNet at 16 trials) then fault their pages in again every round. Measured (one
# thread, 16 LeNet trials, 100 rounds): ~1,100 page faults per round, none with a fixed threshold; the
# sequential run's small tensors fault none either way. Batched runs therefore fix the threshold and the trim
# threshold (mallopt, glibc only; once per process; freed memory up to STEADY_HEAP_TRIM stays with the process).
# GRADLEAK_STEADY_HEAP=0 in the environment leaves malloc as it is.
STEADY_HEAP_MMAP = 32 << 20   # glibc's largest mmap threshold on 64-bit
STEADY_HEAP_TRIM = 256 << 20
_STEADY: list[bool] = []
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def steady_heap() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process (see above); whether they are set."""
    if not _STEADY:
        ok = False
        if os.environ.get("GRADLEAK_STEADY_HEAP", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                ok = (bool(libc.mallopt(_M_MMAP_THRESHOLD, STEADY_HEAP_MMAP))
                      and bool(libc.mallopt(_M_TRIM_THRESHOLD, STEADY_HEAP_TRIM)))
            except (OSError, AttributeError):  # not glibc
                ok = False
        _STEADY.append(ok)
    return _STEADY[0]


def _run_group(setups: list[TrialSetup], programs: list[list], limit: int | None) -> list[dict]:
    """Drive every program of the group in lockstep from one batched objective; falls back to one by one
    (for the whole group) if the batched objective fails or disagrees with the sequential one."""
    heap = steady_heap()
    owner = [(s, r) for s, progs in enumerate(programs) for r in range(len(progs))]
    flat = [programs[s][r][1] for s, r in owner]
    total_trials = len(flat)
    chunk, mem = chunk_size(setups[0], total_trials, limit)
    engine = BatchedObjective(setups)
    note: dict[str, Any] = {"batched": True, "engine": engine.engine, "trials_in_batch": total_trials,
                            "setups_in_batch": len(setups), "chunk": chunk, "shared_parameters": engine.shared,
                            "steady_heap": heap, **mem,
                            "paths": path_claim(setups[0].settings.get("optimizer"), setups[0].case.dtype)}
    if engine.stacked_problems:
        note["stacked_problems"] = engine.stacked_problems
    if FUSE_ADAM and setups[0].settings.get("optimizer") in ("adam", "signed-adam"):
        fused = _run_fused(setups, programs, owner, chunk, engine, note)
        if fused is not None:
            return fused
    pending: dict[int, tuple] = {}
    for i, program in enumerate(flat):
        try:
            pending[i] = next(program)
        except StopIteration:
            pass
    checked = False
    fallback: str | None = None
    rounds = 0
    while pending:
        idx = list(pending)
        results: dict[int, Result] = {}
        if fallback is None:
            try:
                for c in range(0, len(idx), chunk):
                    part = idx[c:c + chunk]
                    res = engine([owner[i][0] for i in part], [pending[i] for i in part])
                    results.update(zip(part, res))
                if not checked:
                    checked = True
                    for i0 in dict.fromkeys((idx[0], idx[-1])):
                        ref = evaluate(setups[owner[i0][0]].objective, *pending[i0])
                        if not _agree(results[i0], ref, setups[0].case.dtype):
                            fallback = (f"the batched objective disagreed with the sequential one (total "
                                        f"{results[i0][0]:.17g} vs {ref[0]:.17g}): a regulariser or module "
                                        "the batch does not run faithfully (vmap, or one that mixes samples)")
                            break
            except Exception as e:  # vmap cannot run this objective: one by one, said in the note
                fallback = f"vmap could not run the objective ({type(e).__name__}: {str(e)[:200]})"
            if fallback is not None:
                results = {}
        if fallback is not None:
            for i in idx:
                results[i] = evaluate(setups[owner[i][0]].objective, *pending[i])
        rounds += 1
        for i in idx:
            try:
                pending[i] = flat[i].send(results[i])
            except StopIteration:
                del pending[i]
    if fallback is not None:
        note = {"batched": False, "reason": fallback, "trials": total_trials}
    else:
        note["rounds"] = rounds
    return [dict(note) for _ in setups]


# The Adam trials of one group (same settings, started together: they run in lockstep) are updated as ONE
# stacked op sequence per round (driver.FusedAdam; bit for bit their programs' updates) instead of one
# program per trial; False runs the programs (tests compare the two).
FUSE_ADAM = True


def _stacked_evaluation(engine: BatchedObjective, sidx: list[int], xs: list[torch.Tensor], need_grad: bool,
                        chunk: int):
    """engine.stacked in chunks of at most ``chunk`` trials (rows), joined."""
    if len(sidx) <= chunk:
        return engine.stacked(sidx, xs, need_grad)
    tv: list[float] = []
    sv: list[float] = []
    gs: list[tuple] = []
    for c in range(0, len(sidx), chunk):
        a, b, g = engine.stacked(sidx[c:c + chunk], [x[c:c + chunk] for x in xs], need_grad)
        tv += a
        sv += b
        gs.append(g)
    return tv, sv, (None if not need_grad else tuple(torch.cat(parts) for parts in zip(*gs)))


def _one_by_one(setups: list[TrialSetup], sidx: list[int], xs: list[torch.Tensor], need_grad: bool):
    """What _stacked_evaluation gives, from each trial's sequential objective (after a batched failure)."""
    res = [evaluate(setups[s].objective, [x[r] for x in xs], need_grad) for r, s in enumerate(sidx)]
    grads = None
    if need_grad:
        grads = tuple(torch.stack([g[j] if g is not None else torch.full_like(x[r], float("nan"))
                                   for r, (_, _, g) in enumerate(res)]) for j, x in enumerate(xs))
    return [r[0] for r in res], [r[1] for r in res], grads


def _run_fused(setups: list[TrialSetup], programs: list[list], owner: list[tuple[int, int]], chunk: int,
               engine: BatchedObjective, note: dict) -> list[dict] | None:
    """_run_group for Adam trials: every round ONE batched evaluation and ONE stacked update
    (:class:`~.driver.FusedAdam`). None (before anything ran) where the first round's batched objective
    fails or disagrees with the sequential one: the group then runs as programs (which say why)."""
    fused = FusedAdam([setups[s].starts[r] for s, r in owner], [programs[s][r][0] for s, r in owner],
                      projects=[setups[s].project for s, _ in owner],
                      on_steps=[setups[s].on_step for s, _ in owner],
                      on_offers=[setups[s].on_offer for s, _ in owner],
                      names=[setups[s].names[r] if r < len(setups[s].names) else f"trial {r}" for s, r in owner],
                      **setups[0].settings)
    rounds, fallback = 0, None
    while (request := fused.request()) is not None:
        xs, need_grad = request
        sidx = [owner[t][0] for t in fused.running]
        if fallback is None:
            try:
                tv, sv, gs = _stacked_evaluation(engine, sidx, xs, need_grad, chunk)
            except Exception as e:
                if rounds == 0:
                    return None
                fallback = f"vmap could not run the objective ({type(e).__name__}: {str(e)[:200]})"
            if rounds == 0:
                for r0 in dict.fromkeys((0, len(sidx) - 1)):
                    ref = evaluate(setups[sidx[r0]].objective, [x[r0] for x in xs], need_grad)
                    if not _agree((tv[r0], sv[r0], None), ref, setups[0].case.dtype):
                        return None
        if fallback is not None:
            tv, sv, gs = _one_by_one(setups, sidx, xs, need_grad)
        fused.receive(tv, sv, gs)
        rounds += 1
    if fallback is not None:
        note = {"batched": False, "reason": fallback, "trials": len(owner)}
    else:
        note = {**note, "rounds": rounds, "update": "fused (one stacked Adam update per round)"}
    return [dict(note) for _ in setups]


def run_setups(setups: Sequence[TrialSetup], *, limit: int | None = None, auto: bool = False
               ) -> list[tuple[list[Trial], dict]]:
    """Run every setup's trials, batching what can be batched (setups with the same group key share one
    batched objective); returns (trials, note) per setup, trials in start order. ``auto``: also run one by
    one where batching is not expected to pay (:func:`worth_batching`)."""
    t0 = time.perf_counter()
    programs = [_programs(s) for s in setups]
    notes: list[dict | None] = [None] * len(setups)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(setups):
        problems = vmap_problems(s)
        slow = worth_batching(s.case) if auto else ""
        if not s.batched:
            notes[i] = {"batched": False, "reason": s.not_batched_reason, "trials": len(s.starts)}
        elif problems:
            notes[i] = {"batched": False, "reason": "; ".join(problems), "trials": len(s.starts)}
        elif len(s.starts) == 1 and len(setups) == 1:
            notes[i] = {"batched": False, "reason": "one trial: nothing to batch", "trials": 1}
        elif slow:
            notes[i] = {"batched": False, "reason": slow, "trials": len(s.starts)}
        else:
            groups.setdefault(_group_key(s), []).append(i)
            continue
        _sequential(s, programs[i])
    for members in groups.values():
        group_notes = _run_group([setups[i] for i in members], [programs[i] for i in members], limit)
        for i, n in zip(members, group_notes):
            notes[i] = n
    seconds = time.perf_counter() - t0
    out = []
    for s, progs, note in zip(setups, programs, notes):
        note["seconds_all_setups"] = round(seconds, 3)
        out.append(([t for t, _ in progs], note))
    return out


# ---- the attacks' entry point, and reconstruct_many -------------------------------------------------------
class _Captured(Exception):
    """Raised inside attack.reconstruct by reconstruct_many's first pass once the setup is known."""


class _Many:
    def __init__(self):
        self.mode = "capture"
        self.pos = 0
        self.captured: dict[int, TrialSetup] = {}
        self.results: dict[int, tuple[list[Trial], dict]] = {}
        self.used: set[int] = set()
        self.seen: dict[int, dict] = {}  # per case: the steps and the best offer its batched trials reported
        self.stopped = False  # Ctrl-C: no case runs further; each returns what it has

    def _record(self, setup: TrialSetup) -> None:
        """Let the batched trials' callbacks also record what they report (for :meth:`_tell`)."""
        # on_step(outer_step, total, best_score) of every trial, compactly (24 bytes a step)
        seen = self.seen.setdefault(self.pos, {"steps": (array("q"), array("d"), array("d")), "best": None})
        step, offer = setup.on_step, setup.on_offer

        def on_step(outer_step, total, score):
            for column, value in zip(seen["steps"], (outer_step, total, score)):
                column.append(value)
            if step is not None:
                step(outer_step, total, score)

        def on_offer(score, v):
            if seen["best"] is None or score < seen["best"][0]:
                seen["best"] = (score, [t.detach().clone() for t in v])
            if offer is not None:
                offer(score, v)

        setup.on_step, setup.on_offer = on_step, on_offer

    def _tell(self, setup: TrialSetup) -> None:
        """Report to the second pass's callbacks what the first pass's trials reported (the history and the best
        offer), so its run context holds what a one-by-one run's would: a Ctrl-C keeps that best so far."""
        seen = self.seen.get(self.pos, {"steps": ((), (), ()), "best": None})
        if setup.on_step is not None:
            for outer_step, total, score in zip(*seen["steps"]):
                setup.on_step(outer_step, total, score)
        if setup.on_offer is not None and seen["best"] is not None:
            setup.on_offer(*seen["best"])

    def handle(self, setup: TrialSetup) -> tuple[list[Trial], dict]:
        if self.mode == "capture":
            self._record(setup)
            self.captured[self.pos] = setup
            raise _Captured
        if self.pos in self.captured and self.pos not in self.used:
            self.used.add(self.pos)
            first = self.captured[self.pos]
            same = len(first.starts) == len(setup.starts) and all(
                torch.equal(a, b) for sa, sb in zip(first.starts, setup.starts) for a, b in zip(sa, sb))
            if not same:
                raise RuntimeError("reconstruct_many: the attack drew different starts on its second pass "
                                   "(its setup is not deterministic given the seed)")
            self._tell(setup)
            if self.pos not in self.results:  # the batched run was interrupted: the attack keeps its best so far
                raise KeyboardInterrupt
            return self.results[self.pos]
        if self.stopped:
            raise KeyboardInterrupt
        return run_setups([setup], auto=True)[0]  # later waves (e.g. DLG's retries after a divergence)


_MANY: contextvars.ContextVar = contextvars.ContextVar("gradleak_batched_many", default=None)


def run(setup: TrialSetup) -> tuple[list[Trial], dict]:
    """Run one attack run's trials (batched when ``setup.batched`` and possible); (trials, note for info)."""
    many = _MANY.get()
    if many is not None:
        return many.handle(setup)
    return run_setups([setup], auto=True)[0]


def reconstruct_many(attack: Attack, cases: Sequence[Case], *, seeds: Sequence[int] | int | None = None,
                     max_memory: int | str | None = None) -> list[Reconstruction]:
    """Reconstruct every case with ``attack``, the optimisation trials of all cases (and their restarts) run
    as one batched computation where they can share it (same model structure and settings; see the module
    docstring). Each result is what ``attack.reconstruct(case, seed=seeds[i])`` returns (residual, kind,
    history, info), up to the batched kernels' rounding; ``info['batched']`` describes the batch and
    ``info['seconds']`` is this case's share of the batched time. ``seeds``: one per case, one for all, or
    None (0). ``max_memory``: the chunk limit (bytes or '8GB'; default the memory available).
    Attacks that are not optimisation attacks simply run one by one. Ctrl-C (KeyboardInterrupt) returns every
    case's best so far, as ``attack.reconstruct`` interrupted at the same round would (the best candidate its
    trials offered, else its start point; ``info['interrupted']``); the cases after one interrupted in a
    later wave do not run theirs."""
    from ...errors import ValidationError

    cases = list(cases)
    if seeds is None or isinstance(seeds, int):
        seeds = [0 if seeds is None else seeds] * len(cases)
    seeds = list(seeds)
    if len(seeds) != len(cases):
        raise ValidationError("reconstruct_many", [f"got {len(seeds)} seeds for {len(cases)} cases: give one "
                                                   "per case, one int for all, or None"])
    if not isinstance(attack, Attack):
        raise ValidationError("reconstruct_many", [f"expected a gradleak Attack, got {type(attack).__name__}"])
    if len(cases) == 1:  # nothing to share between cases: the attack batches its own restarts
        return [attack.reconstruct(cases[0], seed=seeds[0])]
    many = _Many()
    direct: dict[int, Reconstruction] = {}
    token = _MANY.set(many)
    counts: dict[tuple, int | None] = {}

    def count(case: Case) -> int:
        """The thread count attack.reconstruct would choose for ``case`` (the user's, else the policy's),
        decided once per model structure and work: threads.for_case traces the model on the meta device
        (0.34 s per call on resnet20; asked by both passes of every case it was 63% of a 16-trial batched
        run's CPU time). Pinned for the case's passes, so the attack does not ask again."""
        key = (_architecture(case), tuple(case.spec.shape), case.batch_size, case.dtype,
               getattr(case.observation, "local_steps", 1))
        if key not in counts:
            counts[key] = threads.for_case(case)
        return counts[key]

    try:
        for i, (case, seed) in enumerate(zip(cases, seeds)):
            many.pos = i
            try:
                with threads.pinned(count(case)):
                    direct[i] = attack.reconstruct(case, seed=seed)
                many.stopped = many.stopped or bool(direct[i].info.get("interrupted"))
            except _Captured:
                pass
            if many.stopped:
                break
        order = sorted(many.captured)
        t0 = time.perf_counter()
        limit = None if max_memory is None else resources.parse_size(max_memory)
        # the thread policy, as Attack.reconstruct applies it (the batched rounds run outside it): a user's
        # choice (threads.set, GRADLEAK_THREADS, a torch.set_num_threads after import) wins
        try:
            if not many.stopped:
                with threads.using(count(cases[order[0]]) if order else None):
                    many.results = dict(zip(order, run_setups([many.captured[i] for i in order], limit=limit)))
        except KeyboardInterrupt:  # every case returns its best so far (the second pass below)
            many.stopped = True
        batch_seconds = time.perf_counter() - t0
        many.mode = "replay"
        total_trials = sum(len(many.captured[i].starts) for i in order) or 1
        out: list[Reconstruction] = []
        for i, (case, seed) in enumerate(zip(cases, seeds)):
            if i in direct:
                out.append(direct[i])
                continue
            many.pos = i
            with threads.pinned(count(case)):
                rec = attack.reconstruct(case, seed=seed)
            many.stopped = many.stopped or bool(rec.info.get("interrupted"))
            share = batch_seconds * len(many.captured[i].starts) / total_trials if i in many.captured else 0.0
            rec.info["seconds_assembly"] = rec.info.get("seconds")
            rec.info["seconds"] = share + float(rec.info.get("seconds") or 0.0)
            out.append(rec)
    finally:
        _MANY.reset(token)
    return out


__all__ = ["TrialSetup", "BatchedObjective", "STACKED", "run", "run_setups", "reconstruct_many", "memory_limit", "chunk_size",
           "vmap_problems", "worth_batching", "batch_problems", "CPU_BATCH_MAX_PARAMETERS"]
