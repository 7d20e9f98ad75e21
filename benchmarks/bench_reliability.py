"""Reliability figures: how fast bad jobs are refused, and how the memory estimate compares with real peaks.

- refusal: seconds from ``gradleak.cli.main([...])`` to its exit-2 return (in-process, torch imported), for
  ``--out /dev/null`` on a 100,000-iteration attack and a 1,000-epoch training, and ``--image-size 10000``.
- memory: for a few attack jobs, the estimate of :mod:`gradleak.resources` against the growth of the peak RSS
  of a fresh process during ``run_attack`` (``ru_maxrss``); ratio = estimate / measured, >= 1 is an upper bound.

Run:  python benchmarks/bench_reliability.py [--quick] [--allow-dirty]
Writes benchmarks/results/reliability.json (with the provenance of benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

PEAK = r'''
import json, resource, sys, torch
torch.set_num_threads(1)
import gradleak as gl
from gradleak import experiment
model, size, b, attack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = gl.AttackRun(attack=attack, model=model, image_size=size, num_images=b, iterations=3)
est = experiment.resources.estimate_attack(model, (3, size, size), 19, batch_size=b,
                                           candidate_copies=experiment._candidate_copies(gl.create(attack)))
gl.data.load("samples", num_images=b, image_size=size)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gl.run_attack(cfg, write=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"estimate_bytes": est.total, "measured_bytes": peak - base}))
'''


def main() -> None:
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="one timing per refusal, two memory jobs")
    args = ap.parse_args()
    run_ = common.begin("reliability", args)
    from gradleak.cli import main as cli

    refusals = {}
    for name, argv in (
            ("attack --out /dev/null", ["attack", "--attack", "ig", "--model", "lenet", "--iterations", "100000",
                                        "--out", "/dev/null"]),
            ("train --out /dev/null", ["train", "--model", "lenet", "--epochs", "1000", "--out", "/dev/null"]),
            ("attack --image-size 10000", ["attack", "--attack", "ig", "--model", "lenet", "--image-size", "10000"])):
        times = []
        for _ in range(1 if args.quick else 3):
            t0 = time.perf_counter()
            code = cli(argv)
            times.append(time.perf_counter() - t0)
            assert code == 2, (name, code)
        refusals[name] = {"exit": 2, "seconds_first": round(times[0], 3), "seconds_min": round(min(times), 3)}
    jobs = [("lenet", 256, 4, "ig"), ("lenet", 256, 2, "dlg"), ("convnet", 64, 2, "ig"), ("resnet18", 64, 2, "ig"),
            ("resnet18", 128, 4, "ig")]
    memory = []
    src = str(Path(__file__).resolve().parents[1] / "src")
    for model, size, b, attack in jobs[:2] if args.quick else jobs:
        r = subprocess.run([sys.executable, "-c", PEAK, model, str(size), str(b), attack], capture_output=True,
                           text=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=900)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        memory.append({"model": model, "image_size": size, "batch": b, "attack": attack,
                       "estimate_MB": round(d["estimate_bytes"] / 1e6, 1),
                       "measured_MB": round(d["measured_bytes"] / 1e6, 1),
                       "ratio": round(d["estimate_bytes"] / max(d["measured_bytes"], 1), 2)})
    common.finish(run_, {"refusal": refusals, "memory": memory})


if __name__ == "__main__":
    main()
