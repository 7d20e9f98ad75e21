"""Trained vs untrained: how much does training change what Inverting Gradients and iDLG recover?

Part 1 (digits): LeNet and ConvNet-16 are trained on 80% of scikit-learn's digits (stratified split, seed 0;
LeNet Adam lr 3e-3, ConvNet Adam lr 1e-3, batch 32); the checkpoints after epochs 0, 1, 5, 20 are loaded back
with ``load_weights`` and attacked on the first 8 HELD-OUT digits (batch 1, labels known, FedSGD, BN in eval
mode): ``inverting-gradients`` (signed Adam pinned, cosine, TV 1e-4) and ``idlg`` (L-BFGS), float32. PSNR (peak 1,
capped at 300 dB for exact recoveries) and SSIM per image.

Part 2 (resnet18-224): one ImageNet-size reconstruction: the ImageNet-style ResNet-18 (1000 classes, untrained:
no ImageNet weights ship offline) on a bundled photo at 224x224, Inverting Gradients with a fixed small budget;
seconds per IG iteration and per training step (forward + backward), PSNR/SSIM after the budget.

Run:  python benchmarks/bench_trained.py            (about 15 min on one shared core)
      python benchmarks/bench_trained.py --quick    (a smoke run: 2 images, epochs 0 and 1)
Writes benchmarks/results/trained.json (written after each model, so a partial run keeps its results).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
import gradleak as gl
from gradleak.metrics import evaluate
from gradleak.models import build, load_weights
from gradleak.training import train

MODELS = {"lenet": ({}, 3e-3), "convnet": ({"width": 16}, 1e-3)}


# the paper's optimiser for IG (signed Adam, lr 0.1, decay at 3/8, 5/8, 7/8), pinned so the table does not move
# when the attack's 'auto' choice changes; iDLG: its defaults (L-BFGS)
ATTACK_OPTIONS = {"inverting-gradients": {"optimizer": "signed-adam"}, "idlg": {}}


def _attack(model, ds, idx, attack, iterations):
    rows = []
    info = {}
    for i in idx:
        case, truth = gl.simulate(model, ds.images[i:i + 1], ds.labels[i:i + 1], spec=ds.spec)
        t = time.perf_counter()
        rec = gl.create(attack, max_iterations=iterations, **ATTACK_OPTIONS[attack]).reconstruct(case, seed=0)
        sec = time.perf_counter() - t
        info = {k: v for k, v in rec.info.items() if isinstance(v, (str, int, float)) and k != "seconds"}
        s = evaluate(rec, truth)
        rows.append({"index": int(i), "label": int(ds.labels[i]), "psnr": s.psnr, "ssim": s.ssim,
                     "residual": rec.residual, "seconds": sec})
    ps = [r["psnr"] for r in rows]
    return {"iterations": iterations, "options": ATTACK_OPTIONS[attack], "attack_info": info, "psnr_mean": statistics.fmean(ps), "psnr_median": statistics.median(ps),
            "ssim_mean": statistics.fmean(r["ssim"] for r in rows),
            "recovered_30db": sum(p >= 30 for p in ps) / len(ps),
            "seconds_per_image": statistics.fmean(r["seconds"] for r in rows), "images": rows}


def digits_study(args, out: dict, run_) -> None:
    ds = gl.data.load("digits")
    epochs = [int(e) for e in args.epochs.split(",")]
    out["digits"] = {"setting": {"images": args.images, "epochs": epochs, "ig_iterations": args.ig_iterations,
                                 "idlg_iterations": args.idlg_iterations, "holdout": 0.2, "batch_size": 32,
                                 "dtype": "float32", "bn_mode": "eval"}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (opts, lr) in MODELS.items():
            if args.models and name not in args.models.split(","):
                continue
            t = time.perf_counter()
            net = build(name, input_shape=ds.spec.shape, num_classes=10, seed=0, **opts)
            res = train(net, ds, epochs=max(epochs), lr=lr, checkpoint_epochs=epochs, out=Path(tmp) / f"{name}.pt",
                        seed=0)
            train_s = time.perf_counter() - t
            idx = res.holdout_indices[:args.images].tolist()
            entry = {"options": opts, "lr": lr, "optimizer": "adam", "train_seconds": train_s,
                     "accuracy": {str(e): res.accuracy[e] for e in epochs}, "epochs": {}}
            for e in epochs:
                model = load_weights(net, res.checkpoints[e])
                row = {"accuracy": res.accuracy[e]}
                for attack, its in (("inverting-gradients", args.ig_iterations), ("idlg", args.idlg_iterations)):
                    row[attack] = _attack(model, ds, idx, attack, its)
                    print(f"{name} epoch {e:>2} acc {100 * res.accuracy[e]:5.1f}%  {attack:<20} PSNR mean "
                          f"{row[attack]['psnr_mean']:6.1f} median {row[attack]['psnr_median']:6.1f} dB  SSIM "
                          f"{row[attack]['ssim_mean']:.3f}  {row[attack]['seconds_per_image']:.1f} s/img", flush=True)
                entry["epochs"][str(e)] = row
            out["digits"]["models"][name] = entry
            common.finish(run_, dict(out, complete=False))


def resnet18_224(args, out: dict, run_) -> None:
    photos = gl.data.load("samples", num_images=1, start=args.photo, image_size=224)
    spec = dataclasses.replace(photos.spec, num_classes=1000)
    model = build("resnet18", input_shape=(3, 224, 224), num_classes=1000, seed=0)
    case, truth = gl.simulate(model, photos.images, photos.labels, spec=spec)
    # one training step (forward + backward) of the same model and batch, for scale
    x = spec.normalize(photos.images)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), photos.labels).backward()
        times.append(time.perf_counter() - t)
    step = min(times)
    rows = {}
    for n in (2, args.resnet_iterations):  # the difference removes the fixed cost (scoring, residual)
        t = time.perf_counter()
        rec = gl.create("inverting-gradients", max_iterations=n, **ATTACK_OPTIONS["inverting-gradients"]
                        ).reconstruct(case, seed=0)
        rows[n] = (time.perf_counter() - t, rec)
    (t2, _), (tn, rec) = rows[2], rows[args.resnet_iterations]
    per_it = (tn - t2) / (args.resnet_iterations - 2)
    s = evaluate(rec, truth)
    out["resnet18_224"] = {"photo": photos.names[0], "label": int(photos.labels[0]), "weights": "untrained (seed 0)",
                           "iterations": args.resnet_iterations, "seconds_per_iteration": per_it,
                           "seconds_per_training_step": step, "ratio_ig_to_training_step": per_it / step,
                           "seconds_total": tn, "psnr": s.psnr, "ssim": s.ssim, "residual": rec.residual}
    print(f"resnet18 224x224 '{photos.names[0]}': {per_it:.2f} s/IG iteration ({per_it / step:.1f}x a training "
          f"step of {step:.2f} s); PSNR {s.psnr:.2f} dB, SSIM {s.ssim:.3f} after {args.resnet_iterations} iterations",
          flush=True)
    common.finish(run_, dict(out, complete=False))


def main() -> None:
    ap = common.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--parts", default="digits,resnet18")
    ap.add_argument("--models", default="", help="subset of lenet,convnet")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--epochs", default="0,1,5,20")
    ap.add_argument("--ig-iterations", type=int, default=300)
    ap.add_argument("--idlg-iterations", type=int, default=100)
    ap.add_argument("--resnet-iterations", type=int, default=100)
    ap.add_argument("--photo", type=int, default=0, help="index of the bundled photo for the ResNet-18 run")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    run_ = common.begin("trained", args)
    if args.quick:
        args.images, args.epochs, args.ig_iterations, args.idlg_iterations, args.resnet_iterations = 2, "0,1", 50, \
            20, 6
    torch.set_flush_denormal(True)  # L-BFGS on tiny models slows ~10x on float32 denormals otherwise
    out: dict = {}
    if "digits" in args.parts:
        digits_study(args, out, run_)
    if "resnet18" in args.parts:
        resnet18_224(args, out, run_)
    common.finish(run_, dict(out, complete=True))


if __name__ == "__main__":
    main()
