"""How steep is the update as a function of the image? The matching objective's landscape near the truth.

For each photo (batch 1; ``--batch 8``: one case of the 8 photos; FedSGD, labels known, zoo seed 0, untrained unless the model name says trained) and
each BatchNorm mode in ``--bn-modes``: the observed update at the photo, and the update at the photo plus
N(0, sigma^2) noise (image space, clamped to [0, 1]) for each sigma in ``--sigmas``, and at a uniform random
image; each row gives the cosine distance 1 - cos between the update at the perturbed image and the observed
one (accumulated in float64), over every observed tensor (``all``) and without the classifier's (``no_fc``,
what IG's ``layers='auto'`` matches on an untrained ResNet in eval mode), and the noisy start's PSNR.

What it tells: a gradient-matching attack can only find the image if the cost falls towards the truth over a
neighbourhood its optimiser can reach. Where a little noise already costs as much as a random image, the cost
is 0 at the truth but its basin is too narrow for a local search to find (a needle); where the cost
grows smoothly with sigma, failures from random starts are the optimiser's (local minima), as
``bench_modern.py --truth-noise`` then shows by starting there.

Run:  python benchmarks/bench_landscape.py [--models resnet20-4] [--photos 4] [--bn-modes eval,train]
      [--sigmas 1e-4,1e-3,1e-2,3e-2,0.1,0.3] [--dtype float64]
Writes benchmarks/results/landscape.json (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import common
import gradleak as gl
from bench_modern import MODELS, TRAINED, model_and_spec


def update_vector(model, x, y, spec, bn_mode: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(every observed tensor, the same without the classifier's) of the FedSGD update at ``x``, flat, float64."""
    case, _ = gl.simulate(model, x.to(dtype), y, spec=spec, bn_mode=bn_mode, labels_known=True, protocol="fedsgd")
    t = case.observation.tensors
    flat = lambda keep: torch.cat([v.detach().flatten().double() for k, v in t.items() if keep(k)])
    return flat(lambda k: True), flat(lambda k: not k.startswith("fc."))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(1 - (a @ b) / (a.norm() * b.norm()))


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--models", default="resnet20-4", help=f"some of {','.join(MODELS)}")
    ap.add_argument("--photos", type=int, default=4, help="the first N of the 8 photos of bench_modern (batch 1)")
    ap.add_argument("--batch", type=int, choices=(1, 8), default=1, help="1: one case per photo; 8: one case of the 8")
    ap.add_argument("--bn-modes", default="eval,train")
    ap.add_argument("--sigmas", default="1e-4,1e-3,1e-2,3e-2,0.1,0.3")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="the model's and images' dtype (the distances are accumulated in float64 either way)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and the random image")
    ap.add_argument("--name", default="landscape")
    args = ap.parse_args()
    models, modes = args.models.split(","), args.bn_modes.split(",")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        ap.error(f"--sigmas must be numbers separated by commas, got {args.sigmas!r}")
    bad = [m for m in models if m not in MODELS] + [b for b in modes if b not in ("eval", "train")]
    if bad:
        ap.error(f"unknown model / BatchNorm mode {bad}: models {list(MODELS)}, modes eval, train")
    if not 1 <= args.photos <= 8:
        ap.error(f"--photos must be 1 ... 8, got {args.photos}")
    if not all(s > 0 for s in sigmas):
        ap.error(f"every sigma must be > 0, got {sigmas}")
    run = common.begin(args.name, args)
    dtype = getattr(torch, args.dtype)
    photos = gl.data.samples(32, num_images=8)
    rows = []
    for mname in models:
        model, note, spec = model_and_spec(mname, photos)
        model = model.to(dtype)
        for bn in modes:
            for i in (range(args.photos) if args.batch == 1 else [0]):
                g = torch.Generator().manual_seed(args.seed + i)
                x, y = photos.batch(args.batch, i)
                ref_all, ref_nofc = update_vector(model, x, y, spec, bn, dtype)
                row = {"model": mname, "model_note": note, "bn_mode": bn, "photos": photos.names[i:i + args.batch],
                       "points": []}
                for s in sigmas:
                    xs = (x + s * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
                    u_all, u_nofc = update_vector(model, xs, y, spec, bn, dtype)
                    psnr = gl.metrics.psnr(xs, x)
                    row["points"].append({"sigma": s, "start_psnr": [round(float(v), 2) for v in psnr],
                                          "all": cosine_distance(ref_all, u_all),
                                          "no_fc": cosine_distance(ref_nofc, u_nofc)})
                xr = torch.rand(x.shape, generator=g, dtype=x.dtype)
                r_all, r_nofc = update_vector(model, xr, y, spec, bn, dtype)
                row["random_image"] = {"all": cosine_distance(ref_all, r_all), "no_fc": cosine_distance(ref_nofc, r_nofc)}
                rows.append(row)
                print(f"{mname:10s} {bn:5s} {','.join(row['photos'])[:12]:12s} no_fc: " +
                      " ".join(f"{p['sigma']:g}:{p['no_fc']:.4f}" for p in row["points"]) +
                      f"  random:{row['random_image']['no_fc']:.4f}", flush=True)
    summary = []
    for mname in models:
        for bn in modes:
            sel = [r for r in rows if r["model"] == mname and r["bn_mode"] == bn]
            summary.append({"model": mname, "bn_mode": bn, "photos": len(sel),
                            "median_no_fc": {f"{s:g}": statistics.median(r["points"][j]["no_fc"] for r in sel)
                                             for j, s in enumerate(sigmas)},
                            "median_no_fc_random": statistics.median(r["random_image"]["no_fc"] for r in sel)})
    common.finish(run, {"setting": {"models": models, "photos": args.photos, "bn_modes": modes, "sigmas": sigmas,
                                    "dtype": args.dtype, "seed": args.seed, "trained": {m: TRAINED[m] for m in models
                                                                                        if m in TRAINED},
                                    "protocol": "fedsgd", "batch": args.batch, "labels_known": True},
                        "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
