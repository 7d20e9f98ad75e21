"""Run the audit's jobs: in this process, on a local pool of worker processes, or as Ray tasks.

A :class:`Job` is one :class:`gradleak.experiment.AttackRun` (as a dict); every backend runs it through the same
function, :func:`run_job` (``run_attack(cfg, write=True)``), so the same seeds give the same numbers
everywhere. :func:`run_jobs` returns one :class:`Outcome` per job, in the jobs' order, and never raises for a
job: a job that raises is ``failed`` with its one-line message, a worker that dies (killed for memory, a
segfault in an extension) is ``failed`` with the signal and the other jobs go on on a fresh worker. Ctrl-C (or
SIGTERM under the CLI) stops the run: running jobs keep their best result so far (``interrupted``), jobs not
started are ``cancelled``, and :func:`run_jobs` returns normally so that the caller writes its report.

Threads: each local worker may use ``cores // workers`` cores and the policy in :mod:`gradleak.threads`
chooses within that share (so workers x threads <= cores); a Ray task asks Ray for ``threads`` CPUs.

Batched groups: jobs that share a ``group`` (the audit gives one to the jobs of one optimisation attack, defense
and batch size: the same model, different images) run as ONE unit of work, a call of
:func:`gradleak.experiment.run_attacks_batched` (``reconstruct_many``: every case's trials in one vmap per
step) that writes each job's own run directory as the job alone would. Units are what the backends schedule;
:func:`plan_units` cuts a group into units of at most ``group_size`` jobs and splits further until every
worker has one. A unit that raises (one bad case, say) runs its jobs again one by one, so that only the bad
job fails; a worker that dies running a unit has the unit's jobs requeued one by one. ``Outcome.group`` says
what happened. Ctrl-C while a unit runs: each of its jobs is written with its best result so far and is
``interrupted``, as a job running alone is (a resume runs them again); only a Ctrl-C before the unit's
reconstructions started (while its cases are built) leaves its jobs ``interrupted`` without a result.

Jobs whose attack or model was registered outside gradleak (a user's module): the worker imports that module
before running the job, so the registration exists there too (the module must be importable by name there).
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Callable

from .. import threads as threads_mod
from ..errors import RequirementError, ValidationError

STATUSES = ("done", "failed", "not applicable", "interrupted", "cancelled")
INTERRUPTED_EARLY = "interrupted before the attack had a result"
INTERRUPTED_BATCH = "interrupted while its batched group ran, before this job had a result"
CANCELLED = "cancelled: the run was interrupted before this job started"
DEFAULT_GROUP_SIZE = 16  # jobs (cases) per batched unit; each brings its restarts (16 lenet trials: 2.9x)


@dataclass
class Job:
    """One attack run: ``config`` is ``AttackRun.to_dict()``; ``threads``: torch threads for this job (None:
    the policy in :mod:`gradleak.threads` decides where the job runs)."""

    id: str
    config: dict
    threads: int | None = None
    group: str | None = None  # jobs with the same group (and threads) may run as one batched unit


@dataclass
class Outcome:
    """What became of a job. status: 'done' | 'failed' | 'not applicable' (the attack's requirement check, at run
    time, found this case outside what it handles; ``error`` says which fact) | 'interrupted' (Ctrl-C while it ran; ``result`` holds
    the best so far when the attack had one) | 'cancelled' (never started). ``result``: the job's
    ``RunResult.to_json()``; ``error``: one line. ``group``: None for a job that ran alone, else its unit:
    ``{"jobs": n, "batched": True}`` (one batched run) or ``{"jobs": n, "batched": False, "fallback": why}``
    (the batched run failed: its jobs ran one by one). ``seconds``: the job's share of its unit's time."""

    id: str
    status: str
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    group: dict | None = None


# ----------------------------------------------------------------------------------------------- the job itself

def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _plugin_modules(config: dict) -> list[str]:
    """Modules outside gradleak that registered this job's attack or model (a worker must import them)."""
    from ..attacks import attacks
    from ..models import models

    mods = []
    for registry, key, attr in ((attacks, "attack", None), (models, "model", "factory")):
        try:
            obj = registry.get(config.get(key))
        except Exception:  # an unknown name: the job itself reports it
            continue
        mod = getattr(getattr(obj, attr) if attr else obj, "__module__", None)
        if mod and mod != "__main__" and mod.split(".")[0] != "gradleak":
            mods.append(mod)
    return mods


def run_job(config: dict, threads: int | None = None, max_memory=None, progress: bool = False,
            modules: tuple[str, ...] = ()) -> tuple[str, dict | None, str | None]:
    """Run one job here: ``(status, result, error)`` with status 'done' | 'interrupted' | 'failed' | 'not
    applicable' (the attack's own check found at run time that it cannot run on this case). Every
    backend calls this. ``modules``: modules to import first (where the job's attack or model is registered)."""
    from ..experiment import AttackRun, run_attack

    try:
        for m in modules:
            importlib.import_module(m)
        cfg = AttackRun.from_dict(config)
        if threads is not None:
            cfg = dataclasses.replace(cfg, threads=threads)
        # the job's directory is the caller's to give: a run left there (interrupted, say) is replaced; the
        # planner does not submit a job whose directory holds a finished run
        res = run_attack(cfg, write=True, overwrite=True, max_memory=max_memory, progress=progress)
    except KeyboardInterrupt:
        return "interrupted", None, INTERRUPTED_EARLY
    except RequirementError as e:  # a fact of this very case the plan's probe could not see (e.g. a label
        return "not applicable", None, " ".join(str(e).split())  # unreadable under noise): a skip, not a failure
    except Exception as e:
        return "failed", None, _one_line(e)
    return _row(res, None)[:3]


def run_group(configs: list[dict], threads: int | None = None, max_memory=None,
              modules: tuple[str, ...] = ()) -> list[tuple[str, dict | None, str | None, dict | None]]:
    """Run one unit here: ``(status, result, error, group note)`` per job. One job runs as :func:`run_job`; more
    run as one batched computation, and if that raises, one by one (the note says why)."""
    if len(configs) == 1:
        return [(*run_job(configs[0], threads, max_memory, modules=modules), None)]
    from ..experiment import AttackRun, GroupInterrupted, run_attacks_batched

    n = len(configs)
    note = {"jobs": n, "batched": True}
    try:
        for m in modules:
            importlib.import_module(m)
        cfgs = [AttackRun.from_dict(c) for c in configs]
        if threads is not None:
            cfgs = [dataclasses.replace(c, threads=threads) for c in cfgs]
        # Ctrl-C during the batched run: each job is written with its best so far (status 'interrupted')
        results = run_attacks_batched(cfgs, overwrite=True, max_memory=max_memory)
    except KeyboardInterrupt as e:  # before the jobs had results, or while they were written
        written = [_row(r, note) for r in (e.results if isinstance(e, GroupInterrupted) else [])]
        return written + [("interrupted", None, INTERRUPTED_BATCH, note)] * (n - len(written))
    except Exception as e:  # one bad case must not lose the others: each job alone, only the bad one fails
        note = {"jobs": n, "batched": False, "fallback": _one_line(e)}
        out: list[tuple] = []
        for c in configs:
            if out and out[-1][0] == "interrupted":
                out.append(("cancelled", None, CANCELLED, note))
                continue
            try:
                out.append((*run_job(c, threads, max_memory, modules=modules), note))
            except KeyboardInterrupt:  # between the job's own handlers
                out.append(("interrupted", None, INTERRUPTED_EARLY, note))
        return out
    return [_row(r, note) for r in results]


def _row(result, note: dict | None) -> tuple[str, dict, None, dict | None]:
    """A finished run's outcome: 'interrupted' (its best so far) or 'done', with its result row."""
    from ..report import to_jsonable

    row = to_jsonable(result.to_json())
    return ("interrupted" if row.get("interrupted") else "done"), row, None, note


def group_size_problems(group_size) -> list[str]:
    if group_size is None or (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1):
        return []
    return [f"group_size must be an int >= 1 or None (no limit), got {group_size!r}"]


def plan_units(jobs: list[Job], workers: int, group_size: int | None = DEFAULT_GROUP_SIZE) -> list[list[int]]:
    """The units of work (lists of job indices, in the jobs' order): a job without a group alone; the jobs of
    one group (and thread count) in units of at most ``group_size`` (None: no limit) of near-equal size, then
    the largest units halved until there are ``workers`` units or none can be split (so no worker idles
    while one unit holds all the jobs)."""
    units: list[list[int]] = []
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        if j.group is None:
            units.append([i])
        else:
            groups.setdefault((j.group, j.threads), []).append(i)
    for members in groups.values():
        k = 1 if group_size is None else -(-len(members) // group_size)
        units += _split(members, k)
    while len(units) < workers:
        big = max(units, key=len, default=[])
        if len(big) < 2:
            break
        units.remove(big)
        units += _split(big, 2)
    return sorted(units, key=lambda u: u[0])


def _split(members: list[int], k: int) -> list[list[int]]:
    """``members`` in ``k`` consecutive parts of near-equal size."""
    q, r = divmod(len(members), k)
    out, at = [], 0
    for p in range(k):
        size = q + (p < r)
        out.append(members[at:at + size])
        at += size
    return [u for u in out if u]


# ------------------------------------------------------------------------------------------------ local workers

def _worker_main(conn, budget: int, stopping=None) -> None:
    """A pool worker: run the jobs the parent sends until it sends None (or goes away). SIGINT interrupts the
    RUNNING job once (it keeps its best so far and reports back); while idle, or while a job is already
    stopping, SIGINT is ignored, so a Ctrl-C that reaches the whole process group cannot kill a worker.
    ``stopping``: the parent's event, set before it forwards a Ctrl-C: a job that arrives after it is cancelled,
    so a SIGINT forwarded while this worker was still starting (ignored until its handler is installed) is not
    lost."""
    state = {"busy": False, "hit": False, "idle_hit": False}

    def on_sigint(signum, frame):
        if not state["busy"]:  # the run is being interrupted: a job still in the pipe will not start
            state["idle_hit"] = True
        elif not state["hit"]:
            state["hit"] = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threads_mod.worker_init(budget)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        index, configs, threads, max_memory, modules = msg
        if state["idle_hit"] or (stopping is not None and stopping.is_set()):
            out = [("cancelled", None, CANCELLED, None)] * len(configs)
        else:
            state.update(busy=True, hit=False)
            try:
                out = run_group(configs, threads, max_memory, modules=modules)
            except KeyboardInterrupt:  # between the jobs' own handlers
                out = [("interrupted", None, INTERRUPTED_EARLY, None)] * len(configs)
            state["busy"] = False
        try:
            conn.send((index, out))
        except (EOFError, OSError, BrokenPipeError):
            return


def death_message(exitcode: int | None) -> str:
    """'worker died (signal 9: SIGKILL, likely out of memory)' for a process's exit code."""
    if exitcode is not None and exitcode < 0:
        num = -exitcode
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = "unknown signal"
        hint = ", likely out of memory" if num == signal.SIGKILL else ""
        return f"worker died (signal {num}: {name}{hint})"
    return f"worker died (exit code {exitcode})"


class _Worker:
    def __init__(self, ctx, budget: int, stopping=None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, budget, stopping), daemon=True)
        # the worker starts with SIGINT ignored (inherited through exec) until its own handler is installed, so
        # a Ctrl-C while it imports cannot kill it
        main = threading.current_thread() is threading.main_thread()
        prev = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, prev)
        child.close()
        self.job: int | None = None
        self.started = 0.0

    def send(self, index: int, unit: list[Job], max_memory, modules) -> None:
        self.job, self.started = index, time.perf_counter()
        try:
            self.conn.send((index, [j.config for j in unit], unit[0].threads, max_memory, tuple(modules)))
        except OSError:  # it died meanwhile: its sentinel reports the job as failed
            pass

    def interrupt(self) -> None:
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def stop(self, *, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.proc.join(timeout=None if kill else 30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class _Progress:
    def __init__(self, total: int, on: bool):
        self.bar = None
        self.counts = {s: 0 for s in STATUSES}
        if on:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="jobs", unit="job", file=sys.stderr, dynamic_ncols=True)

    def add(self, o: Outcome) -> None:
        self.counts[o.status] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: v for k, v in self.counts.items() if v or k in ("done", "failed")},
                                 refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interrupts_counted(state: dict):
    """While the parent waits on workers, SIGINT and SIGTERM only count in ``state['interrupts']`` (the loop
    acts on them): a signal arriving while a worker's result is being received must not lose that result."""
    from ..interrupts import interrupt_on_signals

    def count(signum, frame):
        state["interrupts"] += 1

    return interrupt_on_signals(count)


class _Units:
    """The run's units of work (lists of job indices) and how their results become Outcomes."""

    def __init__(self, jobs: list[Job], units: list[list[int]], finish):
        self.jobs, self.units, self._finish = jobs, [list(u) for u in units], finish
        self.pending = list(range(len(self.units)))
        self.modules = [tuple(_plugin_modules(jobs[u[0]].config)) for u in self.units]
        self.notes: dict[int, dict] = {}  # a job requeued alone after its unit's worker died: what happened

    def configs(self, u: int) -> list[dict]:
        return [self.jobs[i].config for i in self.units[u]]

    def members(self, u: int) -> list[Job]:
        return [self.jobs[i] for i in self.units[u]]

    def finish(self, u: int, outs, seconds: float) -> None:
        share = seconds / len(self.units[u])
        for i, (status, result, error, note) in zip(self.units[u], outs):
            self._finish(i, Outcome(self.jobs[i].id, status, result, error, share, note or self.notes.get(i)))

    def fail(self, u: int, error: str, seconds: float, *, status: str = "failed", requeue: bool = True) -> None:
        """A unit's worker died (or was stopped): a group is requeued one job per unit (only a job that kills
        its worker alone fails); a single job ends with ``error``."""
        members = self.units[u]
        if requeue and len(members) > 1:
            for i in members:
                self.notes[i] = {"jobs": len(members), "batched": False, "fallback": error}
                self.units.append([i])
                self.modules.append(self.modules[u])
            self.pending[:0] = range(len(self.units) - len(members), len(self.units))
            return
        self.finish(u, [(status, None, error, None)] * len(members), seconds)


def _run_inline(jobs, units, max_memory, progress) -> None:
    for u, members in enumerate(units.units):
        t0 = time.perf_counter()
        job = jobs[members[0]]
        try:
            if len(members) == 1:  # a progress bar per job, as `gradleak attack` shows
                outs = [(*run_job(job.config, job.threads, max_memory, progress=progress,
                                  modules=units.modules[u]), None)]
            else:
                outs = run_group(units.configs(u), job.threads, max_memory, modules=units.modules[u])
        except KeyboardInterrupt:
            outs = [("interrupted", None, INTERRUPTED_EARLY, None)] * len(members)
        units.finish(u, outs, time.perf_counter() - t0)
        if any(o[0] == "interrupted" for o in outs):
            return


def _run_pool(units, workers: int, max_memory) -> None:
    ctx = multiprocessing.get_context("spawn")
    budget = max(1, threads_mod.cores() // workers)
    pool: list[_Worker] = []
    state = {"interrupts": 0}
    handled = 0
    stopping = ctx.Event()

    def feed(w: _Worker) -> None:
        if units.pending and not state["interrupts"]:
            u = units.pending.pop(0)
            w.send(u, units.members(u), max_memory, units.modules[u])

    def died(w: _Worker) -> None:
        w.proc.join()
        units.fail(w.job, death_message(w.proc.exitcode), time.perf_counter() - w.started,
                   requeue=not state["interrupts"])
        w.conn.close()
        pool.remove(w)
        if units.pending and not state["interrupts"]:  # a fresh worker for the jobs still to run
            fresh = _Worker(ctx, budget, stopping)
            pool.append(fresh)
            feed(fresh)

    with _interrupts_counted(state):
        try:
            for _ in range(min(workers, len(units.pending))):
                if state["interrupts"]:
                    break
                pool.append(_Worker(ctx, budget, stopping))
                feed(pool[-1])
            while any(w.job is not None for w in pool):
                if state["interrupts"] > handled:
                    handled = state["interrupts"]
                    stopping.set()  # a worker still starting up (SIGINT ignored there) cancels the job it is sent
                    for w in [w for w in pool if w.job is not None]:
                        if handled == 1:  # each running job stops with its best so far and reports it
                            w.interrupt()
                        else:  # a second Ctrl-C: stop waiting for them
                            w.stop(kill=True)
                            units.fail(w.job, "interrupted (the worker was stopped before it reported)",
                                       time.perf_counter() - w.started, status="interrupted", requeue=False)
                            pool.remove(w)
                busy = [w for w in pool if w.job is not None]
                ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.2)
                for w in busy:
                    if w.conn in ready:
                        try:
                            u, outs = w.conn.recv()
                        except (EOFError, OSError):  # it died before it could report
                            died(w)
                            continue
                        units.finish(u, outs, time.perf_counter() - w.started)
                        w.job = None
                        feed(w)
                    elif w.proc.sentinel in ready:
                        died(w)
        finally:
            for w in pool:
                w.stop()


# --------------------------------------------------------------------------------------------------- run_jobs

def parse_backend(backend: str) -> tuple[str, str | None]:
    """'local' -> ('local', None); 'ray' -> ('ray', None); 'ray:ADDRESS' -> ('ray', 'ADDRESS')."""
    if not isinstance(backend, str):
        raise ValidationError("backend", [f"expected 'local', 'ray' or 'ray:ADDRESS', got {backend!r}"])
    name, _, address = backend.partition(":")
    if name == "local" and not address:
        return "local", None
    if name == "ray":
        if _ and not address:
            raise ValidationError("backend", ["'ray:' needs an address after the colon (e.g. ray:auto)"])
        return "ray", address or None
    raise ValidationError("backend", [f"expected 'local', 'ray' or 'ray:ADDRESS', got {backend!r}"])


def default_workers(jobs: list[Job]) -> int:
    """Local workers for ``jobs``: as many as the cores hold at the jobs' thread counts (1 where the policy
    decides), never more than the jobs."""
    need = max((j.threads or 1 for j in jobs), default=1)
    return max(1, min(len(jobs), threads_mod.workers_for(need)))


def run_jobs(jobs: list[Job], *, backend: str = "local", workers: int | None = None, progress: bool = False,
             on_outcome: Callable[[Outcome], None] | None = None, max_memory=None,
             group_size: int | None = DEFAULT_GROUP_SIZE) -> list[Outcome]:
    """Run ``jobs`` and return one :class:`Outcome` per job, in order (see the module docstring).

    backend: 'local' (default: a pool of ``workers`` spawned processes; ``workers=1`` runs the jobs one after
    another in this process, with a progress bar per job when ``progress``), 'ray' (``ray.init()`` here) or
    'ray:ADDRESS' (join a running cluster). ``workers``: local worker processes (default
    :func:`default_workers`); on Ray, the most tasks running at once (default: as many as its CPUs hold).
    ``on_outcome`` is called here as each job ends. ``max_memory``: each job's memory limit (run_attack's).
    Jobs with the same ``group`` run as batched units of at most ``group_size`` jobs (:func:`plan_units`;
    None: no limit)."""
    jobs = list(jobs)
    problems = [f"jobs[{i}] must be a Job, got {type(j).__name__}" for i, j in enumerate(jobs) if not isinstance(j, Job)]
    ids = [j.id for j in jobs if isinstance(j, Job)]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"job ids must be unique, repeated: {dup}")
    for j in jobs:
        if isinstance(j, Job) and j.threads is not None and (isinstance(j.threads, bool) or
                                                            not isinstance(j.threads, int) or j.threads < 1):
            problems.append(f"job {j.id}: threads must be an int >= 1 or None, got {j.threads!r}")
        if isinstance(j, Job) and j.group is not None and not isinstance(j.group, str):
            problems.append(f"job {j.id}: group must be a str or None, got {type(j.group).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        problems.append(f"workers must be an int >= 1, got {workers!r}")
    problems += group_size_problems(group_size)
    kind, address = parse_backend(backend)
    if problems:
        raise ValidationError("run_jobs", problems)

    outcomes: list[Outcome | None] = [None] * len(jobs)
    bar = _Progress(len(jobs), progress)

    def finish(i: int, o: Outcome) -> None:
        if outcomes[i] is not None:
            return
        outcomes[i] = o
        bar.add(o)
        if on_outcome is not None:
            on_outcome(o)

    if not jobs:
        return []
    n = default_workers(jobs) if workers is None else min(workers, len(jobs))
    if kind == "ray" and workers is None:  # Ray's CPUs are known once it runs; split for this machine's
        n = threads_mod.workers_for(max(j.threads or 1 for j in jobs))
    units = _Units(jobs, plan_units(jobs, n, group_size), finish)
    try:
        try:
            if kind == "ray":
                from .ray_backend import run_ray

                run_ray(jobs, units, address, max_memory, workers)
            elif min(n, len(units.units)) == 1:
                _run_inline(jobs, units, max_memory, progress)
            else:
                _run_pool(units, min(n, len(units.units)), max_memory)
        except KeyboardInterrupt:  # between jobs, or while a backend started: nothing runs any more
            pass
        for i, j in enumerate(jobs):  # only an interrupted run leaves jobs unstarted
            if outcomes[i] is None:
                finish(i, Outcome(j.id, "cancelled", None, CANCELLED, 0.0))
    finally:
        bar.close()
    return outcomes
