"""The thread policy: the same IG run from the CLI and from Python, with torch's default thread count (what the
Python API did before gradleak.threads) and with the policy (what it does now).

Each condition runs in a fresh child process whose environment sets no OMP/MKL thread count (so torch starts
at its own default, the machine's cores), one after another in rounds (a busy, shared machine affects every
condition alike), and the medians are reported:

- ``cli``: ``python -m gradleak attack --attack ig ... --json`` (its default: the policy);
- ``python_default_threads``: ``gl.run_attack(...)`` with ``gl.threads.set(torch's default count)``;
- ``python_policy``: ``gl.run_attack(...)`` as a user calls it (the policy chooses).

A second section, ``scaling``, is what the policy's rule rests on: a fixed 50-step IG reconstruction
(``gl.create("ig", max_iterations=50).reconstruct(case)``) at 1 and 2 threads, per model and batch, stopped at
``--cap`` seconds (SIGALRM; the attack keeps its best so far and the row says ``capped``).

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


SCALING = """
import json, signal, sys, time, torch
import gradleak as gl
model, opts, batch, threads, cap = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
photos = gl.data.samples(32, num_images=batch)
net = gl.models.build(model, input_shape=photos.spec.shape, num_classes=photos.spec.num_classes, **opts)
case, _ = gl.simulate(net, *photos.batch(batch), spec=photos.spec)
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, stop)
gl.threads.set(threads)
signal.alarm(cap)
t = time.perf_counter()
rec = gl.create("ig", max_iterations=50).reconstruct(case, seed=0)
seconds = time.perf_counter() - t
signal.alarm(0)
print(json.dumps({"seconds": seconds, "capped": bool(rec.info.get("interrupted")), "work": gl.threads.work_of(case)}))
"""
SCALING_CASES = [("lenet", {}, 1), ("lenet", {}, 4), ("convnet", {"width": 16}, 1), ("convnet", {"width": 16}, 4),
                 ("resnet20", {}, 1), ("resnet20", {}, 4)]


def _scaling(model: str, opts: dict, batch: int, threads: int, cap: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCALING, model, json.dumps(opts), str(batch), str(threads), str(cap)],
                         env=_env(), capture_output=True, text=True, timeout=cap + 600)
    if out.returncode != 0:
        raise RuntimeError(f"scaling {model}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaling(cases, rounds: int, cap: int) -> list[dict]:
    rows = []
    for model, opts, batch in cases:
        runs = {1: [], 2: []}
        for r in range(rounds):
            for t in ((1, 2) if r % 2 == 0 else (2, 1)):
                runs[t].append(_scaling(model, opts, batch, t, cap))
        row = {"model": model, "options": opts, "batch": batch, "work_flops": runs[1][0]["work"], "rounds": rounds}
        for t, rs in runs.items():
            row[f"threads_{t}"] = {"median_seconds": statistics.median(x["seconds"] for x in rs),
                                   "seconds": [x["seconds"] for x in rs], "capped": [x["capped"] for x in rs]}
        row["two_over_one"] = row["threads_2"]["median_seconds"] / row["threads_1"]["median_seconds"]
        rows.append(row)
        print(f"scaling {model} {opts} b{batch}: 1 thread {row['threads_1']['median_seconds']:.2f} s, 2 threads "
              f"{row['threads_2']['median_seconds']:.2f} s{' (capped)' if any(row['threads_2']['capped']) else ''}",
              flush=True)
    return rows


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
    ap.add_argument("--quick", action="store_true", help="50 iterations, one round, two scaling cases (a rough look)")
    ap.add_argument("--cap", type=int, default=60, help="seconds after which a scaling run is stopped")
    args = ap.parse_args()
    run_ = common.begin("threads", args)
    iterations, rounds = (50, 1) if args.quick else (300, 3)
    scale = scaling(SCALING_CASES[::4] if args.quick else SCALING_CASES, rounds, args.cap)
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
                         "cores": os.cpu_count(), "load_average": list(os.getloadavg()), "results": results,
                         "scaling": scale})


if __name__ == "__main__":
    main()
