"""The audit's Ray backend: each unit of work (one job, or one batched group) is a Ray task that runs
:func:`gradleak.audit.execute.run_group` with the CPUs Ray assigned it as its thread budget; the tasks' own
failures (cancelled, out of memory, a crashed worker, an exception) become the units' outcomes, as on the local
pool. :func:`gradleak.audit.execute.run_jobs` calls :func:`run_ray` for ``backend='ray'`` / ``'ray:ADDRESS'``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from .. import threads as threads_mod
from ..errors import ValidationError
from .execute import _interrupts_counted, _one_line, run_group


def _ray_task(configs, threads, max_memory, modules):
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads_mod.worker_init(max(1, int(cpus)))
    return run_group(configs, threads, max_memory, modules=modules)


def run_ray(jobs, units, address: str | None, max_memory, workers: int | None) -> None:
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
        running: dict[Any, tuple[int, float]] = {}
        used = 0
        interrupted = False

        def submit():
            nonlocal used
            while units.pending and not interrupted and (
                    not running or used + need[units.units[units.pending[0]][0]] <= cpus) and (
                    workers is None or len(running) < workers):
                u = units.pending.pop(0)
                first = jobs[units.units[u][0]]
                ref = task.options(num_cpus=need[units.units[u][0]], max_retries=0, retry_exceptions=False).remote(
                    units.configs(u), first.threads, max_memory, units.modules[u])
                running[ref] = (u, time.perf_counter())
                used += need[units.units[u][0]]

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
                    u, t0 = running.pop(ref)
                    used -= need[units.units[u][0]]
                    ok, value = _ray_result(ray, rex, ref)
                    if ok:
                        units.finish(u, value, time.perf_counter() - t0)
                    else:
                        status, error = value
                        units.fail(u, error, time.perf_counter() - t0, status=status,
                                   requeue=status == "failed" and not interrupted)
                submit()
    finally:
        if started_here:
            ray.shutdown()


def _ray_result(ray, rex, ref) -> tuple[bool, Any]:
    """(True, the unit's outcomes) or (False, (status, error)) when the task itself did not return."""
    try:
        return True, ray.get(ref)
    except rex.TaskCancelledError:
        return False, ("interrupted", "interrupted (the Ray task was cancelled)")
    except rex.OutOfMemoryError as e:
        return False, ("failed", "worker died (out of memory): " + _first_line(e))
    except rex.WorkerCrashedError as e:
        return False, ("failed", "worker died: " + _first_line(e))
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        return False, ("failed", _one_line(cause) if cause is not None else _first_line(e))
    except rex.RayError as e:
        return False, ("failed", _one_line(e))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


__all__ = ["run_ray"]
