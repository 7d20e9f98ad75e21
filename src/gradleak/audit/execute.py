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
from typing import Any, Callable

from .. import threads as threads_mod
from ..errors import ValidationError

STATUSES = ("done", "failed", "interrupted", "cancelled")
INTERRUPTED_EARLY = "interrupted before the attack had a result"


@dataclass
class Job:
    """One attack run: ``config`` is ``AttackRun.to_dict()``; ``threads``: torch threads for this job (None:
    the policy in :mod:`gradleak.threads` decides where the job runs)."""

    id: str
    config: dict
    threads: int | None = None


@dataclass
class Outcome:
    """What became of a job. status: 'done' | 'failed' | 'interrupted' (Ctrl-C while it ran; ``result`` holds
    the best so far when the attack had one) | 'cancelled' (never started). ``result``: the job's
    ``RunResult.to_json()``; ``error``: one line."""

    id: str
    status: str
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0


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
    """Run one job here: ``(status, result, error)`` with status 'done' | 'interrupted' | 'failed'. Every
    backend calls this. ``modules``: modules to import first (where the job's attack or model is registered)."""
    from ..experiment import AttackRun, run_attack
    from ..report import to_jsonable

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
    except Exception as e:
        return "failed", None, _one_line(e)
    row = to_jsonable(res.to_json())
    return ("interrupted" if row.get("interrupted") else "done"), row, None


# ------------------------------------------------------------------------------------------------ local workers

def _worker_main(conn, budget: int) -> None:
    """A pool worker: run the jobs the parent sends until it sends None (or goes away). SIGINT interrupts the
    RUNNING job once (it keeps its best so far and reports back); while idle, or while a job is already
    stopping, SIGINT is ignored, so a Ctrl-C that reaches the whole process group cannot kill a worker."""
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
        index, config, threads, max_memory, modules = msg
        if state["idle_hit"]:
            out = ("cancelled", None, "cancelled: the run was interrupted before this job started")
        else:
            state.update(busy=True, hit=False)
            try:
                out = run_job(config, threads, max_memory, modules=modules)
            except KeyboardInterrupt:  # between the job's own handlers
                out = ("interrupted", None, INTERRUPTED_EARLY)
            state["busy"] = False
        try:
            conn.send((index, *out))
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
    def __init__(self, ctx, budget: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, budget), daemon=True)
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

    def send(self, index: int, job: Job, max_memory, modules) -> None:
        self.job, self.started = index, time.perf_counter()
        try:
            self.conn.send((index, job.config, job.threads, max_memory, tuple(modules)))
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


def _run_inline(jobs, outcomes, finish, max_memory, progress) -> None:
    modules = [tuple(_plugin_modules(j.config)) for j in jobs]
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            status, result, error = run_job(job.config, job.threads, max_memory, progress=progress,
                                            modules=modules[i])
        except KeyboardInterrupt:
            status, result, error = "interrupted", None, INTERRUPTED_EARLY
        finish(i, Outcome(job.id, status, result, error, time.perf_counter() - t0))
        if status == "interrupted":
            return


def _run_pool(jobs, outcomes, finish, workers: int, max_memory) -> None:
    ctx = multiprocessing.get_context("spawn")
    budget = max(1, threads_mod.cores() // workers)
    modules = [_plugin_modules(j.config) for j in jobs]
    pending = list(range(len(jobs)))
    pool: list[_Worker] = []
    state = {"interrupts": 0}
    handled = 0

    def feed(w: _Worker) -> None:
        if pending and not state["interrupts"]:
            i = pending.pop(0)
            w.send(i, jobs[i], max_memory, modules[i])

    def died(w: _Worker) -> None:
        w.proc.join()
        finish(w.job, Outcome(jobs[w.job].id, "failed", None, death_message(w.proc.exitcode),
                              time.perf_counter() - w.started))
        w.conn.close()
        pool.remove(w)
        if pending and not state["interrupts"]:  # a fresh worker for the jobs still to run
            fresh = _Worker(ctx, budget)
            pool.append(fresh)
            feed(fresh)

    with _interrupts_counted(state):
        try:
            for _ in range(min(workers, len(jobs))):
                if state["interrupts"]:
                    break
                pool.append(_Worker(ctx, budget))
                feed(pool[-1])
            while any(w.job is not None for w in pool):
                if state["interrupts"] > handled:
                    handled = state["interrupts"]
                    for w in [w for w in pool if w.job is not None]:
                        if handled == 1:  # each running job stops with its best so far and reports it
                            w.interrupt()
                        else:  # a second Ctrl-C: stop waiting for them
                            w.stop(kill=True)
                            finish(w.job, Outcome(jobs[w.job].id, "interrupted", None,
                                                  "interrupted (the worker was stopped before it reported)",
                                                  time.perf_counter() - w.started))
                            pool.remove(w)
                busy = [w for w in pool if w.job is not None]
                ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.2)
                for w in busy:
                    if w.conn in ready:
                        try:
                            index, status, result, error = w.conn.recv()
                        except (EOFError, OSError):  # it died before it could report
                            died(w)
                            continue
                        finish(index, Outcome(jobs[index].id, status, result, error,
                                              time.perf_counter() - w.started))
                        w.job = None
                        feed(w)
                    elif w.proc.sentinel in ready:
                        died(w)
        finally:
            for w in pool:
                w.stop()


# -------------------------------------------------------------------------------------------------------- Ray

def _ray_task(config, threads, max_memory, modules):
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads_mod.worker_init(max(1, int(cpus)))
    return run_job(config, threads, max_memory, modules=modules)


def _run_ray(jobs, outcomes, finish, address: str | None, max_memory, workers: int | None) -> None:
    try:
        import ray
        from ray import exceptions as rex
    except ImportError:
        raise ValidationError("backend", ["'ray' needs Ray, which is not installed: pip install 'gradleak[ray]'"]) \
            from None
    import logging

    started_here = not ray.is_initialized()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU tasks: silence Ray's FutureWarning
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:  # a local Ray: its workers import what this process can (a user's module that registered an
            # attack or model, say), so they start with this process's import path
            path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            before = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = path
            try:
                ray.init(num_cpus=threads_mod.cores(), include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, configure_logging=True)
            finally:
                if before is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = before
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(_ray_task)
        need = [j.threads or 1 for j in jobs]
        pending = list(range(len(jobs)))
        running: dict[Any, tuple[int, float]] = {}
        used = 0
        interrupted = False

        def submit():
            nonlocal used
            while pending and not interrupted and (not running or used + need[pending[0]] <= cpus) and (
                    workers is None or len(running) < workers):
                i = pending.pop(0)
                ref = task.options(num_cpus=need[i], max_retries=0, retry_exceptions=False).remote(
                    jobs[i].config, jobs[i].threads, max_memory, tuple(_plugin_modules(jobs[i].config)))
                running[ref] = (i, time.perf_counter())
                used += need[i]

        state = {"interrupts": 0}
        handled = 0
        with _interrupts_counted(state):
            submit()
            while running:
                if state["interrupts"] > handled:
                    handled = state["interrupts"]
                    interrupted = True
                    for ref in running:  # the first Ctrl-C interrupts the tasks, a second one kills them
                        ray.cancel(ref, force=handled > 1)
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in done:
                    i, t0 = running.pop(ref)
                    used -= need[i]
                    status, result, error = _ray_result(ray, rex, ref)
                    finish(i, Outcome(jobs[i].id, status, result, error, time.perf_counter() - t0))
                submit()
    finally:
        if started_here:
            ray.shutdown()


def _ray_result(ray, rex, ref) -> tuple[str, dict | None, str | None]:
    try:
        return tuple(ray.get(ref))
    except rex.TaskCancelledError:
        return "interrupted", None, "interrupted (the Ray task was cancelled)"
    except rex.OutOfMemoryError as e:
        return "failed", None, "worker died (out of memory): " + _first_line(e)
    except rex.WorkerCrashedError as e:
        return "failed", None, "worker died: " + _first_line(e)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        return "failed", None, _one_line(cause) if cause is not None else _first_line(e)
    except rex.RayError as e:
        return "failed", None, _one_line(e)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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
             on_outcome: Callable[[Outcome], None] | None = None, max_memory=None) -> list[Outcome]:
    """Run ``jobs`` and return one :class:`Outcome` per job, in order (see the module docstring).

    backend: 'local' (default: a pool of ``workers`` spawned processes; ``workers=1`` runs the jobs one after
    another in this process, with a progress bar per job when ``progress``), 'ray' (``ray.init()`` here) or
    'ray:ADDRESS' (join a running cluster). ``workers``: local worker processes (default
    :func:`default_workers`); on Ray, the most tasks running at once (default: as many as its CPUs hold).
    ``on_outcome`` is called here as each job ends. ``max_memory``: each job's memory limit (run_attack's)."""
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
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        problems.append(f"workers must be an int >= 1, got {workers!r}")
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
    try:
        try:
            if kind == "ray":
                _run_ray(jobs, outcomes, finish, address, max_memory, workers)
            else:
                n = default_workers(jobs) if workers is None else min(workers, len(jobs))
                if n == 1:
                    _run_inline(jobs, outcomes, finish, max_memory, progress)
                else:
                    _run_pool(jobs, outcomes, finish, n, max_memory)
        except KeyboardInterrupt:  # between jobs, or while a backend started: nothing runs any more
            pass
        for i, j in enumerate(jobs):  # only an interrupted run leaves jobs unstarted
            if outcomes[i] is None:
                finish(i, Outcome(j.id, "cancelled", None, "cancelled: the run was interrupted before this job "
                                  "started", 0.0))
    finally:
        bar.close()
    return outcomes
