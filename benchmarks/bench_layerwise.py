"""The layer-wise paper's central comparison: R-GAP, layer-wise (COPA), Inverting Gradients and DLG on the same
cases, for one full-rank and two rank-deficient architectures, with the security index of each.

Architectures (the layer-wise paper's test CNNs, untrained, zoo seed 0, tanh, linear head with bias, 10 classes,
float64): cnn2-c1 (every layer full rank, S = 0), cnn2-c2 (first layer 1,470 short, S = -1470), cnn3-c1 (second
layer 4,533 short, S = -2266). Data: the first 8 bundled photos at 32x32, ImageNet normalisation, label =
photo index mod 10, one image per case, FedSGD, labels known to the attacker.

Attacks and budgets (per image):
  rgap                     default options (closed form)
  layerwise-closed-form    layerwise, preset 'closed-form' (step (a) only: the same systems as R-GAP)
  layerwise                layerwise, preset 'fast' (null-space prior 300 steps, pull-back 20 L-BFGS steps,
                           correction 300/100/50 Adam steps)
  inverting-gradients      max_iterations=IG_ITERS (default 1000), 1 restart, TV 1e-4, the attack's defaults
                           ('auto' optimiser: L-BFGS on these smooth tanh networks)
  dlg                      preset 'zhu2019' (300 L-BFGS steps, joint label logits as in the paper)
Scores: PSNR (peak 1, images in [0, 1], capped at 300 dB per image as gradleak.metrics does) and SSIM averaged
over the images, mean seconds, mean residual (1 - cosine of the update). One torch thread.

Run:  python benchmarks/bench_layerwise.py [--images 8] [--ig-iters 1000] [--quick]
Writes benchmarks/results/layerwise.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import common
import gradleak as gl
from gradleak.attacks import create
from gradleak.metrics import evaluate
from gradleak.risk.security import security_analysis

ARCHS = ["cnn2-c1", "cnn2-c2", "cnn3-c1"]


def attack_table(ig_iters: int, dlg_iters: int) -> list[tuple[str, str, dict]]:
    return [
        ("rgap", "rgap", {}),
        ("layerwise-closed-form", "layerwise", {"preset": "closed-form"}),
        ("layerwise", "layerwise", {"preset": "fast"}),
        ("inverting-gradients", "inverting-gradients", {"max_iterations": ig_iters, "restarts": 1}),
        ("dlg", "dlg", {"preset": "zhu2019", "max_iterations": dlg_iters}),
    ]


def run(images: int, ig_iters: int, dlg_iters: int, archs: list[str]) -> dict:
    photos = gl.data.samples(32, num_images=images)
    spec = gl.DataSpec((3, 32, 32), 10, mean=photos.spec.mean, std=photos.spec.std, name="samples")
    table = attack_table(ig_iters, dlg_iters)
    out = {"architectures": {}, "settings": {"images": images, "ig_iterations": ig_iters, "dlg_iterations": dlg_iters,
                                             "dtype": "float64", "threads": 1, "attacks": {r: {"attack": a, **o}
                                                                                          for r, a, o in table}}}
    for arch in archs:
        model = gl.models.build(arch, dtype=torch.float64, num_classes=10)
        sec = security_analysis(model, (3, 32, 32))
        rows: dict[str, dict] = {r: {"psnr": [], "ssim": [], "seconds": [], "residual": [], "errors": []}
                                 for r, _, _ in table}
        for i in range(images):
            x, y = photos.batch(1, i)
            case, truth = gl.simulate(model, x.double(), y % 10, spec=spec)
            for row, name, opts in table:
                opts = dict(opts)
                preset = opts.pop("preset", None)
                t0 = time.perf_counter()
                try:
                    rec = create(name, preset=preset, **opts).reconstruct(case, seed=i)
                except gl.errors.GradleakError as e:
                    rows[row]["errors"].append(f"image {i}: {type(e).__name__}: {e}")
                    continue
                sc = evaluate(rec, truth)
                r = rows[row]
                r["psnr"].append(sc.psnr)
                r["ssim"].append(sc.ssim)
                r["seconds"].append(time.perf_counter() - t0)
                r["residual"].append(rec.residual)
                print(f"{arch:8s} img {i} {row:22s} psnr {sc.psnr:7.2f} ssim {sc.ssim:.3f} "
                      f"{time.perf_counter() - t0:6.1f} s", flush=True)
        summary = {}
        for row, r in rows.items():
            n = len(r["psnr"])
            summary[row] = {
                "psnr_mean": statistics.fmean(r["psnr"]) if n else None,
                "psnr_median": statistics.median(r["psnr"]) if n else None,
                "ssim_mean": statistics.fmean(r["ssim"]) if n else None,
                "seconds_mean": statistics.fmean(r["seconds"]) if n else None,
                "residual_mean": statistics.fmean([v for v in r["residual"] if math.isfinite(v)] or [math.nan]),
                "psnr_per_image": r["psnr"], "ssim_per_image": r["ssim"], "seconds_per_image": r["seconds"],
                "errors": r["errors"]}
        out["architectures"][arch] = {"security_index": sec.index, "deficiencies": sec.deficiencies,
                                      "attacks": summary}
    # does leakage order as the index predicts? (higher index = leaks more = higher PSNR)
    order = sorted(archs, key=lambda a: -out["architectures"][a]["security_index"])
    checks = {}
    for row, _, _ in table:
        ps = [out["architectures"][a]["attacks"][row]["psnr_mean"] for a in order]
        checks[row] = {"architectures_by_index": order, "psnr_mean": ps,
                       "ordered_as_index": all(p is not None for p in ps) and all(
                           ps[j] >= ps[j + 1] for j in range(len(ps) - 1))}
    out["ordering"] = checks
    return out


def main() -> None:
    ap = common.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--ig-iters", type=int, default=1000)
    ap.add_argument("--dlg-iters", type=int, default=300)
    ap.add_argument("--archs", nargs="*", default=ARCHS)
    ap.add_argument("--quick", action="store_true", help="2 images, short IG/DLG budgets (a smoke run)")
    a = ap.parse_args()
    run_ = common.begin("layerwise", a)
    if a.quick:
        a.images, a.ig_iters, a.dlg_iters = 2, 100, 30
    res = run(a.images, a.ig_iters, a.dlg_iters, a.archs)
    for arch, d in res["architectures"].items():
        print(f"\n{arch}: security index {d['security_index']} (d_i {d['deficiencies']})")
        for row, s in d["attacks"].items():
            if s["psnr_mean"] is None:
                print(f"  {row:22s} failed: {s['errors'][:1]}")
                continue
            print(f"  {row:22s} PSNR {s['psnr_mean']:7.2f} dB  SSIM {s['ssim_mean']:.3f}  {s['seconds_mean']:6.1f} s")
    print("\nordering by index:", {k: v["ordered_as_index"] for k, v in res["ordering"].items()})
    common.finish(run_, res)


if __name__ == "__main__":
    main()
