"""How many torch CPU threads a piece of work gets: ONE policy, applied where the work runs.

An attack is thousands of small operations (a forward, a double backward, an optimiser step); on a small model
each operation lasts microseconds, and splitting it across threads costs more in hand-offs than it gains.
Worse, when the cores are shared (other processes, or the audit's own worker pool), OpenMP threads that
wait for a busy core make a run many times slower (measured: see docs/performance.md). So the policy is:

- ``choose(work, workers=W)``: one thread per ``FLOPS_PER_THREAD`` of work (the forward multiply-adds of the
  attacked batch, see :func:`work_of`), at least 1 and at most this process's share of the cores
  (``cores() // W``, so ``W x threads <= cores``). Small work gets one thread.
- an override wins over the policy: :func:`set` (``gradleak.threads.set(4)``), the environment variable
  ``GRADLEAK_THREADS``, the CLI's ``--threads``, an ``AttackRun(threads=...)``, and a
  ``torch.set_num_threads`` made after gradleak was imported (the caller's own choice, kept).
- :func:`using` sets torch's thread count for a block and restores it after.

``Attack.reconstruct`` and ``run_attack`` apply it, so the Python API runs as fast as the CLI. Results are
bit-reproducible for the same thread count on the same machine; ``config.json`` records the count used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from pathlib import Path
from typing import Iterator

import torch

from .errors import ValidationError

ENV = "GRADLEAK_THREADS"

# One more thread per this many forward FLOPs of the attacked batch. Measured on a shared 2-core machine (50
# IG steps, 1 vs 2 threads, docs/performance.md): a second thread never paid off, from lenet (1.4e6 FLOPs) to
# convnet width 64 (3.7e9: 22.8 s on one thread, 249 s on two); so the second thread starts an order of
# magnitude above the largest work measured, e.g. resnet18 at 224 px from a batch of 14.
FLOPS_PER_THREAD = 5e10

_override: int | None = None      # gradleak.threads.set(n)
_budget: int | None = None        # the cores this process may use (a pool worker's share); None: all of them
_baseline = torch.get_num_threads()  # torch's count when gradleak was imported (or a worker started)


def _check(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValidationError(what, [f"expected a thread count (an int >= 1), got {n!r}"])
    return n


def set(n: int | None) -> None:  # noqa: A001 - gradleak.threads.set(n) reads best
    """Use ``n`` torch threads for all gradleak work from now on (None: back to the policy)."""
    global _override
    _override = None if n is None else _check(n, "gradleak.threads.set")


def override() -> int | None:
    """The user's thread count, if they chose one: :func:`set`, else ``GRADLEAK_THREADS``, else a
    ``torch.set_num_threads`` made after gradleak was imported; None when the policy decides."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValidationError(ENV, [f"expected a thread count (an int >= 1), got {env!r}"])
        return int(env)
    current = torch.get_num_threads()
    return current if current != _baseline else None


def _cgroup_cpus() -> float | None:
    """CPUs the cgroup's quota allows (containers), or None without a quota."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota and by a worker's share
    (set by :func:`worker_init`)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    if _budget is not None:
        n = min(n, _budget)
    return max(1, n)


def choose(work: float, *, workers: int = 1, cores: int | None = None) -> int:
    """Torch threads for ``work`` (forward FLOPs of the attacked batch, :func:`work_of`) when ``workers``
    processes share ``cores`` (default :func:`cores`): the override if the user set one, else one thread
    per :data:`FLOPS_PER_THREAD`, between 1 and ``cores // workers``."""
    user = override()
    if user is not None:
        return user
    _check(workers, "workers")
    total = globals()["cores"]() if cores is None else _check(cores, "cores")
    share = max(1, total // workers)
    if not isinstance(work, (int, float)) or not math.isfinite(work) or work < 0:
        raise ValidationError("threads.choose", [f"work must be a non-negative number of FLOPs, got {work!r}"])
    return int(min(share, max(1, math.ceil(work / FLOPS_PER_THREAD))))


def workers_for(threads: int = 1, *, cores: int | None = None) -> int:
    """How many worker processes fit on ``cores`` (default :func:`cores`) at ``threads`` threads each."""
    total = globals()["cores"]() if cores is None else _check(cores, "cores")
    return max(1, total // _check(threads, "threads"))


@contextlib.contextmanager
def using(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave torch's setting) and restore the count after."""
    if n is None:
        yield
        return
    _check(n, "threads")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def pinned(n: int | None) -> Iterator[None]:
    """Like :func:`using`, and the work inside keeps ``n`` (it counts as the user's choice there), so a
    caller that decided once (``run_attack``) is not second-guessed by the attack it runs."""
    global _override
    if n is None:
        yield
        return
    before = _override
    _override = _check(n, "threads")
    try:
        with using(n):
            yield
    finally:
        _override = before


@contextlib.contextmanager
def process_default(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads as the process's default: work the policy covers (attacks) is
    still chosen per job, everything else runs on ``n``; restores the previous count and default after."""
    global _baseline
    before, base = torch.get_num_threads(), _baseline
    torch.set_num_threads(_check(n, "threads"))
    _baseline = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _baseline = base


def worker_init(budget: int) -> None:
    """Called at the start of a worker process that may use ``budget`` cores (a pool's share, a Ray task's
    CPUs): the policy then chooses within it, and torch starts at that many threads."""
    global _budget, _baseline
    _budget = _check(budget, "worker cores")
    torch.set_num_threads(min(_budget, cores()))
    _baseline = torch.get_num_threads()  # the worker's own start, not a user's choice


def work_of(case) -> float:
    """The work of attacking ``case``: the FLOPs (2 x multiply-adds) of one forward pass over its batch
    (convolutions and linear layers; other layers count their outputs), times the local steps of a FedAvg
    update. Counted on a copy of the model on PyTorch's ``meta`` device (shapes only: no memory, no compute,
    and the case's own model is never called), once per model structure and input (:func:`_forward_count`)."""
    steps = getattr(case.observation, "local_steps", 1) or 1
    return 2.0 * _forward_count(case.model, tuple(case.spec.shape), case.dtype) * case.batch_size * steps


_COUNTS: dict[tuple, int] = {}  # (model class, repr, input shape, dtype) -> multiply-adds of one forward
_COUNTS_MAX = 256


def _forward_count(model: torch.nn.Module, shape: tuple, dtype: torch.dtype) -> int:
    """Multiply-adds (plus other layers' outputs) of one forward of one sample, traced on the meta device once
    per model structure (its class and ``repr``: layer types, sizes, strides, paddings) and input: the trace
    deep-copies the model (0.3 s for a ResNet-20), and every attack run asks."""
    key = (type(model).__module__, type(model).__qualname__, repr(model), shape, str(dtype))
    if key in _COUNTS:
        return _COUNTS[key]
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else meta
    net = copy.deepcopy(model, memo)
    counts = [0]

    def hook(m, inputs, out):
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            counts[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, torch.nn.Linear):
            counts[0] += out.numel() * m.in_features
        elif not list(m.children()):
            counts[0] += out.numel()

    for m in net.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.empty((1, *shape), dtype=dtype, device="meta"))
    if len(_COUNTS) >= _COUNTS_MAX:
        _COUNTS.clear()
    _COUNTS[key] = counts[0]
    return counts[0]


def for_case(case) -> int:
    """Threads for attacking ``case``: the override, else :func:`choose` on :func:`work_of`."""
    user = override()
    if user is not None:
        return user
    try:
        work = work_of(case)
    except Exception:  # a model that cannot take a zero input: the attack itself will say what is wrong
        work = 0.0
    return choose(work)
