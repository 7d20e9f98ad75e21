"""Inverting Gradients quality at a fixed budget: PSNR and SSIM after 100, 500 and 2000 iterations.

Setting (issue 2): the first 8 bundled photos at 32x32, untrained ``lenet`` (DLG's sigmoid LeNet) and
``resnet18`` (CIFAR stem), batch 1, FedSGD, labels known, zoo seed 0, attack seed 0, one thread.
Each budget is its own run (the step-decay schedule depends on the budget).

Configurations:
- ``ig`` with default options (optimizer 'auto': L-BFGS on the smooth LeNet, the paper's signed Adam on
  ResNet-18; TV 1e-4; an L-BFGS "iteration" is one gradient evaluation plus any extra line-search ones, and the
  evaluations are recorded);
- on LeNet also ``ig`` with the paper's signed Adam (``optimizer='signed-adam'``), for comparison.

Reference (issue 2): the leading open-source implementation reached 12.8 dB on LeNet after 2000 iterations
(0.0049 s/iteration) and 11.2 dB on CIFAR ResNet-18 after 500 iterations (0.157 s/iteration) on such a photo.

PSNR: 10 log10(1 / MSE) per image on [0, 1] (computed here); SSIM: torchmetrics.functional
structural_similarity_index_measure (data_range 1, default Gaussian window).

ResNet-18 is expensive on a shared 2-core CPU (~0.3-0.6 s per iteration): by default it runs the 100 and 500
iteration budgets on the first ``--resnet-photos`` photos (default 4); ``--full`` runs all 8 photos and 2000.

``--quick`` (a smoke run of the runner): LeNet on 2 photos at 100 / 300 iterations, ResNet-18 on 1 photo at 20.

Run:  python benchmarks/bench_ig_quality.py [--quick | --full] [--resnet-photos N] [--models lenet,resnet18]
Writes benchmarks/results/ig_quality.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchmetrics.functional import structural_similarity_index_measure as ssim_fn

import common
import gradleak as gl

REFERENCE = {"lenet": {"iterations": 2000, "psnr": 12.8, "s_per_iteration": 0.0049},
             "resnet18": {"iterations": 500, "psnr": 11.2, "s_per_iteration": 0.157}}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def run(model_name: str, config: str, options: dict, budgets, photos_idx, photos) -> list[dict]:
    model = gl.models.build(model_name, input_shape=(3, 32, 32), num_classes=photos.spec.num_classes, seed=0)
    rows = []
    for i in photos_idx:
        x, y = photos.batch(1, i)
        case, truth = gl.simulate(model, x, y, spec=photos.spec)
        for n in budgets:
            t = time.perf_counter()
            rec = gl.create("ig", max_iterations=n, **options).reconstruct(case, seed=0)
            sec = time.perf_counter() - t
            trial = rec.info["restarts"][rec.info.get("chosen_restart", 0)]
            row = {
                "model": model_name, "config": config, "photo": photos.names[i], "index": i, "iterations": n,
                "psnr": psnr(rec.inputs, truth.inputs),
                "ssim": float(ssim_fn(rec.inputs, truth.inputs, data_range=1.0)),
                "seconds": sec, "s_per_iteration": sec / n, "residual": rec.residual,
                "optimizer": rec.info["optimizer"],
                "evaluations": trial.get("gradient_evaluations", trial.get("evaluations")),
                "stopped": trial.get("reason"),
            }
            rows.append(row)
            print(f"{model_name:9s} {config:12s} {photos.names[i]:14s} {n:5d} its  PSNR {row['psnr']:6.2f} dB  "
                  f"SSIM {row['ssim']:.3f}  {sec:7.1f} s  ({row['optimizer']}, {row['evaluations']} gradient evaluations)",
                  flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["model"], r["config"], r["iterations"]) for r in rows})
    for m, c, n in keys:
        sel = [r for r in rows if (r["model"], r["config"], r["iterations"]) == (m, c, n)]
        out.append({"model": m, "config": c, "iterations": n, "photos": len(sel),
                    "mean_psnr": statistics.mean(r["psnr"] for r in sel),
                    "min_psnr": min(r["psnr"] for r in sel),
                    "mean_ssim": statistics.mean(r["ssim"] for r in sel),
                    "mean_s_per_iteration": statistics.mean(r["s_per_iteration"] for r in sel)})
    return out


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--full", action="store_true", help="ResNet-18 on all 8 photos and at 2000 iterations too")
    ap.add_argument("--quick", action="store_true", help="2 LeNet photos at 100/300, 1 ResNet-18 photo at 20")
    ap.add_argument("--resnet-photos", type=int, default=4)
    ap.add_argument("--models", default="lenet,resnet18")
    args = ap.parse_args()
    run_ = common.begin("ig_quality", args)
    photos = gl.data.samples(32, num_images=8)
    models = args.models.split(",")
    n_lenet, lenet_budgets = (2, (100, 300)) if args.quick else (8, (100, 500, 2000))
    rows: list[dict] = []
    notes = []
    if "lenet" in models:
        rows += run("lenet", "default", {}, lenet_budgets, range(n_lenet), photos)
        rows += run("lenet", "signed-adam", {"optimizer": "signed-adam"}, lenet_budgets, range(n_lenet), photos)
    if "resnet18" in models:
        if args.full:
            rows += run("resnet18", "default", {}, (100, 500, 2000), range(8), photos)
        elif args.quick:
            rows += run("resnet18", "default", {}, (20,), range(1), photos)
            notes.append("--quick: a smoke run, not a figure")
        else:
            k = max(1, min(8, args.resnet_photos))
            rows += run("resnet18", "default", {}, (100, 500), range(k), photos)
            notes.append(f"resnet18 cut to the first {k} photos and 100/500 iterations (shared 2-core CPU); "
                         "run with --full for 8 photos and 2000 iterations")
    summary = summarise(rows)
    for s in summary:
        print(f"{s['model']:9s} {s['config']:12s} {s['iterations']:5d} its: mean PSNR {s['mean_psnr']:6.2f} dB "
              f"(min {s['min_psnr']:.2f}), mean SSIM {s['mean_ssim']:.3f}, {s['mean_s_per_iteration']:.4f} s/it")
    common.finish(run_, {
        "reference": REFERENCE, "notes": notes,
        "setting": "first 8 bundled photos 32x32, untrained zoo seed 0, batch 1, FedSGD, labels known, seed 0",
        "summary": summary, "rows": rows,
    })


if __name__ == "__main__":
    main()
