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


__all__ = ["environment"]
