"""Quality and cost of the moment-tensor attack (Wang, Lee & Lei 2023) on bundled photos.

1. ``quality``: per width m and batch size B, at d = 3*16*16 = 768 (the first B bundled photos at 16x16, ImageNet
   normalisation, the zoo's ``two-layer`` network with one output per photo and cross-entropy, labels known),
   ReLU and tanh, float32, with the default random output weights ("random": at |x| ~ 28 the logits saturate, and
   a sample the network already classifies correctly has a ~zero residual, so it barely enters the gradient) and
   the mirrored initialisation ("mirrored": f = 0, every residual 1/K - e_y). Three stages, as separate fields:
   - ``tensor_step_*``: the tensor step ALONE (``recover_directions(fit='none')``: Jennrich + CP-ALS directions,
     only signs and a common scale fitted, the directions never moved): mean / min |cos| in the model's input
     space after Hungarian alignment;
   - ``after_fit_*``: the same measure for the directions after the gradient fit (``recover_directions`` with the
     default fit); ``fit_adds_abs_cos_mean`` is the difference: what the gradient fit adds;
   - ``attack_*``: the whole attack (norms, signs, labels; image space, gradleak.metrics.evaluate).
2. ``scale``: d = 3*32*32 = 3072, B = 8, ReLU, float32: seconds and the attack's OWN memory: the process's
   resident-set high-water mark is reset (Linux ``/proc/self/clear_refs``) after the case is built, so
   ``attack_peak_rss_mb`` is the peak during the attack alone and ``attack_peak_increase_mb`` what it adds over
   the resident size before it (the largest arrays the attack forms are m x (2B+10) and m x B, never d x d or
   d^p). Target: every cosine >= 0.99.

Each run writes only what it ran, with its command line, the git commit and whether the tree was clean.

Run:  python benchmarks/bench_tensor.py [--quick] [--only quality|scale] [--allow-dirty]
Writes benchmarks/results/tensor.json with the provenance of benchmarks/common.py (full ~12 min; --quick < 2 min;
one thread).
"""

from __future__ import annotations

import argparse
import gc
import time


import common
import gradleak as gl
from gradleak.attacks.tensor import direction_error, recover_directions
from gradleak.metrics import evaluate

def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux); False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case(size: int, B: int, m: int, act: str, seed: int = 0, mirrored: bool = False):
    data = gl.data.samples(size, num_images=B)
    x, y = data.batch(B)
    model = gl.models.build("two-layer", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=m,
                            activation=act, seed=seed, mirrored=mirrored)
    case, truth = gl.simulate(model, x, y, spec=data.spec)
    del model
    return case, truth


def _abs_cos(case, truth, **options) -> tuple[float, float, float] | str:
    t0 = time.perf_counter()
    try:
        dirs, _ = recover_directions(case, seed=0, **options)
    except gl.GradleakError as e:  # reported, not hidden
        return f"error: {e}"
    xt = case.spec.normalize(truth.inputs.double()).flatten(1)
    cos = direction_error(dirs.double(), xt)
    return float(cos.mean()), float(cos.min()), time.perf_counter() - t0


def quality(widths, batches, acts, inits) -> list[dict]:
    rows = []
    for init in inits:
        for act in acts:
            for B in batches:
                for m in widths:
                    case, truth = _case(16, B, m, act, mirrored=init == "mirrored")
                    t0 = time.perf_counter()
                    rec = gl.create("tensor").reconstruct(case, seed=0)
                    secs = time.perf_counter() - t0
                    sc = evaluate(rec, truth)
                    row = {"init": init, "activation": act, "batch_size": B, "width": m, "d": 768}
                    for stage, opts in (("tensor_step", {"fit": "none"}), ("after_fit", {})):
                        r = _abs_cos(case, truth, **opts)
                        if isinstance(r, str):
                            row[f"{stage}_error"] = r
                        else:
                            row.update({f"{stage}_abs_cos_mean": r[0], f"{stage}_abs_cos_min": r[1],
                                        f"{stage}_seconds": r[2]})
                    if "tensor_step_abs_cos_mean" in row and "after_fit_abs_cos_mean" in row:
                        row["fit_adds_abs_cos_mean"] = row["after_fit_abs_cos_mean"] - row["tensor_step_abs_cos_mean"]
                    row.update({"attack_cosine_mean": sc.cosine, "attack_cosine_min": min(sc.cosine_per_image),
                                "attack_cosine_per_image": sc.cosine_per_image, "attack_psnr": sc.psnr,
                                "attack_label_accuracy": sc.label_accuracy, "attack_seconds": secs,
                                "fit_residual": rec.info["fit_residual"], "gradient_residual": rec.residual,
                                "norm_sources": sorted({s.get("norm", "") for s in rec.info["samples"]}),
                                "sign_sources": sorted({s.get("sign", "") for s in rec.info["samples"]}),
                                "warnings": rec.info["warnings"], "draws_run": len(rec.info["draws"])})
                    rows.append(row)
                    ts = row.get("tensor_step_abs_cos_mean", float("nan"))
                    af = row.get("after_fit_abs_cos_mean", float("nan"))
                    print(f"{init:8s} {act:5s} B={B} m={m:>6}: tensor step |cos| {ts:.4f} -> after fit {af:.4f}; "
                          f"attack cos mean {sc.cosine:.4f} min {row['attack_cosine_min']:.4f}  "
                          f"fit {row['fit_residual']:.1e}  {secs:.1f}s", flush=True)
                    del case, truth, rec
                    gc.collect()
    return rows


def scale(m: int) -> dict:
    case, truth = _case(32, 8, m, "relu")
    gc.collect()
    st = _status_kb()
    build_peak, before = st["VmHWM"] / 1024, st["VmRSS"] / 1024
    reset = _reset_peak()
    t0 = time.perf_counter()
    rec = gl.create("tensor").reconstruct(case, seed=0)
    secs = time.perf_counter() - t0
    peak = _status_kb()["VmHWM"] / 1024 if reset else None
    sc = evaluate(rec, truth)
    d = 3 * 32 * 32
    row = {"d": d, "batch_size": 8, "width": m, "dtype": "float32", "seconds": secs,
           "cosine_mean": sc.cosine, "cosine_min": min(sc.cosine_per_image), "psnr": sc.psnr,
           "target_met": min(sc.cosine_per_image) >= 0.99,
           "build_peak_rss_mb": build_peak, "rss_mb_before_attack": before, "attack_peak_rss_mb": peak,
           "attack_peak_increase_mb": None if peak is None else peak - before,
           "memory_method": ("VmHWM reset via /proc/self/clear_refs after building the case: the attack's own peak"
                             if reset else "not measured: this system does not allow resetting the peak RSS"),
           "weights_mb": m * d * 4 / 2 ** 20, "d_cubed_float32_gb": d ** 3 * 4 / 2 ** 30,
           "fit_residual": rec.info["fit_residual"], "draws_run": len(rec.info["draws"])}
    mem = (f"attack peak RSS {peak:.0f} MB (+{peak - before:.0f} MB over {before:.0f} MB before it)" if reset
           else "attack memory not measured")
    print(f"scale d={d} B=8 m={m}: {secs:.1f}s, cos min {row['cosine_min']:.5f}, {mem}; the weights alone are "
          f"{row['weights_mb']:.0f} MB, a d^3 float32 array would be {row['d_cubed_float32_gb']:.0f} GB", flush=True)
    return row


def main() -> None:
    ap = common.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--quick", action="store_true",
                    help="< 2 min: ReLU at widths 1e3, 1e4 and tanh at 1e3; B in 4, 8; random init; scale at m = 20,000")
    ap.add_argument("--only", choices=["quality", "scale"], default=None)
    args = ap.parse_args()
    run_ = common.begin("tensor", args)
    out = {"quick": args.quick}
    if args.only in (None, "scale"):
        out["scale"] = scale(20_000 if args.quick else 40_000)
    if args.only in (None, "quality"):
        if args.quick:  # tanh at m = 1,000 only: its non-linear fit is the slow part
            out["quality"] = (quality((1_000, 10_000), (4, 8), ("relu",), ("random",))
                              + quality((1_000,), (4, 8), ("tanh",), ("random",)))
        else:
            out["quality"] = quality((1_000, 10_000, 100_000), (2, 4, 8), ("relu", "tanh"), ("random", "mirrored"))
    out["sections"] = [k for k in ("scale", "quality") if k in out]
    common.finish(run_, out)


if __name__ == "__main__":
    main()
