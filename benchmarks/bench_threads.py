"""The thread policy: the same IG run from the CLI and from Python, with torch's default thread count (what the
Python API did before gradleak.threads) and with the policy (what it does now).

Each condition runs in a fresh child process whose environment sets no OMP/MKL thread count (so torch starts
at its own default, the machine's cores), one after another in rounds (a busy, shared machine affects every
condition alike), and the medians are reported:

- ``cli``: ``python -m gradleak attack --attack ig ... --json`` (its default: the policy);
- ``python_default_threads``: ``gl.run_attack(...)`` with ``gl.threads.set(torch's default count)``;
- ``python_policy``: ``gl.run_attack(...)`` as a user calls it (the policy chooses).

The time is the attack's own ``seconds`` (the reconstruction, without the start of Python); the CLI's wall
time, start included, is recorded beside it. Each child reports the thread count its attack ran with.

Run:  python benchmarks/bench_threads.py [--quick]
Writes benchmarks/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CASES = [("lenet", 1), ("resnet20", 1)]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GRADLEAK_THREADS")

PY = """
import json, sys, torch
import gradleak as gl
default = torch.get_num_threads()
if sys.argv[1] == "default":
    gl.threads.set(default)  # the old behaviour: the attack runs with torch's default count
model, batch, iterations = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
res = gl.run_attack(gl.AttackRun(attack="ig", model=model, num_images=batch, iterations=iterations), write=False)
print(json.dumps({"seconds": res.reconstruction.seconds, "threads": gl.threads.for_case(res.case),
                  "torch_default_threads": default, "psnr": res.scores.psnr}))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _python(mode: str, model: str, batch: int, iterations: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PY, mode, model, str(batch), str(iterations)], env=_env(),
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"python {mode} {model}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(model: str, batch: int, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "gradleak", "attack", "--attack", "ig", "--model", model,
                              "--num-images", str(batch), "--iterations", str(iterations), "--out", str(run_dir),
                              "--json"], env=_env(), capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t
        if out.returncode != 0:
            raise RuntimeError(f"cli {model}: {out.stderr.strip()[-500:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        threads = json.loads((run_dir / "config.json").read_text())["threads"]
    return {"seconds": row["seconds"], "threads": threads, "wall_seconds": wall, "psnr": row["psnr"]}


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="50 iterations, one round (a rough look)")
    args = ap.parse_args()
    run_ = common.begin("threads", args)
    iterations, rounds = (50, 1) if args.quick else (300, 3)
    results = []
    for model, batch in CASES:
        rows = {"cli": [], "python_default_threads": [], "python_policy": []}
        for r in range(rounds):
            order = list(rows) if r % 2 == 0 else list(reversed(rows))
            for cond in order:
                rows[cond].append(_cli(model, batch, iterations) if cond == "cli" else
                                  _python("default" if cond == "python_default_threads" else "policy",
                                          model, batch, iterations))
        entry = {"model": model, "batch": batch, "iterations": iterations, "rounds": rounds}
        for cond, runs in rows.items():
            entry[cond] = {"median_seconds": statistics.median(x["seconds"] for x in runs),
                           "seconds": [x["seconds"] for x in runs], "threads": sorted({x["threads"] for x in runs}),
                           "psnr": [x["psnr"] for x in runs]}
            if cond == "cli":
                entry[cond]["median_wall_seconds"] = statistics.median(x["wall_seconds"] for x in runs)
            if cond == "python_default_threads":
                entry[cond]["torch_default_threads"] = runs[0]["torch_default_threads"]
        entry["default_over_policy"] = (entry["python_default_threads"]["median_seconds"]
                                        / entry["python_policy"]["median_seconds"])
        entry["policy_over_cli"] = entry["python_policy"]["median_seconds"] / entry["cli"]["median_seconds"]
        results.append(entry)
        print(f"{model} b{batch} {iterations} it: cli {entry['cli']['median_seconds']:.2f} s "
              f"({entry['cli']['threads']} thr), python default {entry['python_default_threads']['median_seconds']:.2f}"
              f" s ({entry['python_default_threads']['threads']} thr), python policy "
              f"{entry['python_policy']['median_seconds']:.2f} s ({entry['python_policy']['threads']} thr)", flush=True)
    common.finish(run_, {"target": "python_policy / cli ~ 1 (the Python API as fast as the CLI)",
                         "cores": os.cpu_count(), "results": results})


if __name__ == "__main__":
    main()
