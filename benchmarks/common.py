"""Provenance shared by every benchmark script: one place that records where a result came from.

Every ``benchmarks/bench_*.py`` calls ``begin(name, args)`` first and ``finish(run, sections)`` last. The JSON
it writes, ``benchmarks/results/<name>.json``, holds the exact command line, the git commit, whether the tree
was clean (``git status --porcelain`` empty, ignoring ``benchmarks/results/``), the torch version, the machine
(cpu model, cores), the thread count, the start time, the wall seconds and ONLY the sections this run produced
(nothing is merged from an earlier file). A dirty tree is refused (exit 2, one line) unless ``--allow-dirty``
is given, and then the JSON says ``"clean": false``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
IGNORED = "benchmarks/results/"


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--quick`` stays each script's own: its meaning differs)."""
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on a tree with uncommitted changes (the JSON then records clean: false)")
    return ap


def _git(*cmd: str) -> str:
    out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout


def git_state() -> dict:
    """{'commit': full HEAD hash, 'clean': bool, 'changes': the porcelain lines outside benchmarks/results/}."""
    commit = _git("rev-parse", "HEAD").strip()
    lines = [ln for ln in _git("status", "--porcelain", "--untracked-files=all").splitlines() if ln.strip()]
    changes = [ln for ln in lines if not ln[3:].strip('"').startswith(IGNORED)]
    return {"commit": commit, "clean": not changes, "changes": changes}


def refuse_if_dirty(allow_dirty: bool, what: str) -> dict:
    """The git state; exit 2 with one line when the tree is dirty and dirty runs are not allowed."""
    state = git_state()
    if not state["clean"] and not allow_dirty:
        print(f"{what}: refusing to run on a dirty tree ({len(state['changes'])} uncommitted change(s), e.g. "
              f"{state['changes'][0].strip()!r}); commit first or pass --allow-dirty", file=sys.stderr)
        raise SystemExit(2)
    return state


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Run:
    """One benchmark run: what ``begin`` saw, written out by ``finish``."""

    def __init__(self, name: str, argv: list[str], state: dict):
        self.name = name
        self.path = RESULTS_DIR / f"{name}.json"
        self.t0 = time.perf_counter()
        self.provenance = {
            "command": shlex.join([Path(sys.executable).name, *argv]),
            "commit": state["commit"], "clean": state["clean"], "changes": state["changes"],
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
            "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_at_start": list(os.getloadavg()),
        }


def begin(name: str, args: argparse.Namespace) -> Run:
    """Check the tree, pin one torch thread, note the start. ``args`` must come from ``add_arguments``."""
    state = refuse_if_dirty(args.allow_dirty, f"benchmarks/{name}")
    torch.set_num_threads(1)
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:  # pragma: no cover - optional
        pass
    argv = [os.path.relpath(Path(sys.argv[0]).resolve(), ROOT), *sys.argv[1:]]
    return Run(name, argv, state)


def finish(run: Run, sections: dict) -> Path:
    """Write ``{'benchmark', 'provenance', **sections}`` to benchmarks/results/<name>.json (replacing it)."""
    clash = {"benchmark", "provenance"} & set(sections)
    if clash:
        raise ValueError(f"section names {sorted(clash)} are reserved for the provenance")
    prov = dict(run.provenance, wall_seconds=time.perf_counter() - run.t0,
                load_average_at_end=list(os.getloadavg()))
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.path.write_text(json.dumps({"benchmark": run.name, "provenance": prov, **sections}, indent=1) + "\n")
    print(f"wrote {run.path.relative_to(ROOT)}")
    return run.path


def load(name: str, results_dir: Path = RESULTS_DIR) -> dict:
    return json.loads((results_dir / f"{name}.json").read_text())
