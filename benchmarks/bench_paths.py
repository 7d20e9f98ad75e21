"""Batched and one-by-one paths: how far batched trials (an attack's restarts as one computation) stay on the
path the same trials take one by one, per optimiser and dtype (docs/performance.md, "Batched and one-by-one
paths"; what ``rec.info['batched']['paths']`` states, ``batched.path_claim``).

Each cell reconstructs the first bundled photo twice, ``batch_trials=True`` and ``False``, the same seed and
restarts, and compares every trial: its gradient evaluations and iterations, its best score, the largest
absolute difference of its returned variables; and the PSNR of the two returned reconstructions.

Cells: LeNet 32 px (sigmoid) with signed Adam (IG, pixel form), L-BFGS (DLG) and L-BFGS (IG's cosine
matching); resnet20 16 px (eval BatchNorm) with signed Adam; each in float64 and float32.

Run:  python benchmarks/bench_paths.py [--quick] [--iterations 300] [--restarts 3]
Writes benchmarks/results/paths.json.
"""

from __future__ import annotations

import argparse
import time

import torch

import common
import gradleak as gl
from gradleak.attacks.optimization import batched as B

CELLS = [  # (model, image size, attack, options)
    ("lenet", 32, "ig", {"optimizer": "signed-adam", "parametrize": "pixel"}),
    ("resnet20", 16, "ig", {"optimizer": "signed-adam", "parametrize": "pixel"}),
    ("lenet", 32, "dlg", {}),
    ("lenet", 32, "ig", {"optimizer": "lbfgs", "parametrize": "pixel"}),
]


def _case(model_name: str, size: int, dtype: torch.dtype):
    photos = gl.data.samples(size, num_images=1)
    model = gl.models.build(model_name, input_shape=(3, size, size), num_classes=photos.spec.num_classes, seed=0)
    x, y = photos.batch(1, 0)
    case, truth = gl.simulate(model, x, y, spec=photos.spec)  # BatchNorm: eval mode, simulate's default
    return case.to(dtype), truth


def cell(model_name: str, size: int, attack: str, options: dict, dtype: torch.dtype, iterations: int,
         restarts: int) -> dict:
    case, truth = _case(model_name, size, dtype)
    seen: list = []
    real = B.run_setups

    def recording(setups, **kw):
        out = real(setups, **kw)
        seen.append([t for trials, _ in out for t in trials])
        return out

    B.run_setups = recording
    runs = {}
    try:
        for batched in (True, False):
            seen.clear()
            t = time.perf_counter()
            rec = gl.create(attack, batch_trials=batched, max_iterations=iterations, restarts=restarts,
                            **options).reconstruct(case, seed=0)
            runs[batched] = (rec, list(seen[0]), time.perf_counter() - t)
    finally:
        B.run_setups = real
    (rb, tb, sb), (rs, ts, ss) = runs[True], runs[False]
    trials = []
    for a, b in zip(tb, ts):
        trials.append({"evaluations": [a.evaluations, b.evaluations], "iterations": [a.iterations, b.iterations],
                       "score": [a.score, b.score],
                       "max_abs_variable_difference": max(float((va - vb).abs().max())
                                                          for va, vb in zip(a.variables, b.variables))})
    row = {"model": model_name, "image_size": size, "attack": attack, "options": options,
           "optimizer": rb.info.get("optimizer", "lbfgs" if attack == "dlg" else None),
           "dtype": str(dtype).replace("torch.", ""), "iterations": iterations, "restarts": restarts,
           "batched_note": {k: rb.info["batched"].get(k) for k in ("batched", "engine", "paths", "reason")},
           "trials": trials,
           "max_abs_variable_difference": max(t["max_abs_variable_difference"] for t in trials),
           "psnr": [gl.evaluate(rb, truth).psnr, gl.evaluate(rs, truth).psnr],
           "seconds": [round(sb, 2), round(ss, 2)]}
    print(f"{model_name:8s} {attack:3s} {row['optimizer'] or '':12s} {row['dtype']:8s} max |dx| "
          f"{row['max_abs_variable_difference']:.3g}  PSNR {row['psnr'][0]:.3f} / {row['psnr'][1]:.3f} dB", flush=True)
    return row


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="20 iterations, float64 and float32, every cell")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--restarts", type=int, default=3)
    args = ap.parse_args()
    run = common.begin("paths", args)
    its = 20 if args.quick else args.iterations
    rows = [cell(m, size, a, o, dt, its, args.restarts)
            for m, size, a, o in CELLS for dt in (torch.float64, torch.float32)]
    common.finish(run, {"what": "batched vs one-by-one trials: per-trial differences and PSNR of the returned "
                                "best (first bundled photo, seed 0)", "rows": rows})


if __name__ == "__main__":
    main()
