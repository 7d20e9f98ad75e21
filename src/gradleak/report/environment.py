"""What a result depends on besides its configuration: library versions, thread count, device, git commit."""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The commit of the gradleak source tree when it is a git checkout (None otherwise); ``+dirty`` when it
    has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(*, device=None, dtype=None) -> dict:
    """A JSON-able record of the software and settings a run used: gradleak, torch, numpy and python versions,
    torch's CPU thread count, whether deterministic algorithms were enforced, the device and dtype of the case,
    the platform and the git commit of gradleak (when installed from a checkout)."""
    import numpy

    from .. import __version__

    return {
        "gradleak_version": __version__,
        "git_commit": _git_commit(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "device": None if device is None else str(device),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "platform": f"{sys.platform} {platform.machine()}",
    }


def hardware() -> dict:
    """The machine: CPU model, cores this process may use, total memory, and the CUDA devices torch sees."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": cores, "memory_bytes": memory, "gpus": gpus}


__all__ = ["environment", "hardware"]
