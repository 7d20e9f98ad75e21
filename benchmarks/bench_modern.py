"""Leakage on deployed architectures: CIFAR ResNets with BatchNorm, realistic settings x attack options.

Models (32x32, CIFAR stem, zoo seed 0, untrained): ``resnet20-4`` (zoo ``resnet20`` with ``width=4``: Inverting
Gradients' ResNet20-4) and ``resnet18`` (zoo ``resnet18``, CIFAR stem below 128 px); ``resnet20`` (width 1, 16x
cheaper per iteration than resnet20-4) for the settings that are too slow on the larger ones here;
``resnet20-digits-e2``: resnet20 trained 2 epochs on digits, ``resnet18-digits-e1``: resnet18 trained 1 epoch on
digits (TRAINED below: "trained for a few epochs"; one epoch of resnet18 costs about what 14 of resnet20 do).

Settings (issue 16, part 3), named ``{bn}-b{B}-{protocol}[-recovered]``:
- ``bn``: ``eval`` (BatchNorm with the running statistics) or ``train`` (batch statistics; the client returns its
  updated running statistics, ``case.observed_buffers``);
- ``B``: 1 (one photo per case, over the first ``--photos`` photos) or 8 (one case of the first 8 photos);
- ``protocol``: ``fedsgd`` or ``fedavg5`` (5 local SGD steps of lr ``--local-lr`` on the whole batch);
- labels known, or ``-recovered`` (the attack recovers them: iDLG / count-based, gradleak's 'auto').

Configurations (part 2), all Inverting Gradients at ``--iterations`` per restart; every one but ``ig-auto``,
``ig-auto-all``, ``ig-auto-nofc`` and the ``lap6`` ones pins ``parametrize='pixel'`` (the form they were first
measured with), and every one but ``ig-auto`` and ``ig-auto-nofc`` matches every observed tensor (``layers=()``,
as before ``layers='auto'``):
- ``ig``: the options before ``tv='auto'`` (signed Adam on ReLU networks, TV 1e-4 pinned, step decay);
- ``ig-auto``: IG's defaults (``tv='auto'``: 1e-2 on these ResNets; ``parametrize='auto'``: a Laplacian pyramid
  on them in eval mode; ``schedule='auto'``: warm-up plus cosine decay on the pyramid; ``layers='auto'``: the
  classifier's gradient left out of the matched update on them untrained, in eval mode, FedSGD, batch 1);
  ``ig-auto-all``: the same with
  every observed tensor matched (IG's defaults before ``layers='auto'``; the ``ig-auto`` of results before it);
  ``ig-auto-nofc``: ``layers=('!fc',)`` given; ``ig+tv``: TV 1e-2 given;
- ``ig+bn``: ``bn_prior='auto'`` (the statistics the returned buffers reveal in train mode, the model's running
  statistics in eval mode), ``bn_weight`` 1e-2;
- ``ig+cosine``: ``schedule='cosine'`` (warm-up 50) and ``start='patterned-4'``, no BN prior;
- ``ig-lbfgs``: ``optimizer='lbfgs'`` (cosine matching, strong-Wolfe L-BFGS, on a ReLU network);
- ``ig+bn+cosine``: the BN prior with ``schedule='cosine'`` (warm-up 50) and ``start='patterned-4'``;
- ``ig+tv+lap6``: TV 1e-2 and ``parametrize='laplacian-6'`` (the optimiser moves a 6-level Laplacian pyramid),
  the paper's step decay; ``ig+tv+lap6+adam``: the same with unsigned Adam; ``ig+tv+lap6+cos``: the pyramid with
  warm-up (a tenth of the budget) plus cosine decay, what IG's defaults run there (``schedule='auto'``);
- ``gradinversion``: the ``gradinversion`` preset at this budget (Adam, cosine, BN prior, image norm, 2
  restarts with the group term).

A configuration name may carry overrides: ``NAME:key=value[:key=value]`` (e.g. ``ig+tv:lr=0.3``).
``--size S``: photos and models at S x S px (default 32; the zoo ResNets keep the CIFAR stem below 128 px).
``--first-photo K``: the batch-1 cases start at photo K (so a run can add photos to an earlier one).

``--truth-noise SIGMA`` (a diagnostic, not an attack: it uses the private batch): every run starts from the truth
plus N(0, SIGMA^2) noise in image space, clamped to the box (seeded by ``--seed``), instead of the random start;
each row records ``start_psnr``. It separates the two ways an attack can fail: if the objective's minimum near
the truth is lower (``score``, the matching cost without TV) than where the attack ends from a random start and
the run from near the truth stays near it, the objective identifies the image and the optimiser does not reach
it (local minima, step sizes); if the run from near the truth drifts away, either the objective's minimum is
elsewhere or its basin at the truth is too narrow to hold a run (``bench_landscape.py`` measures how the cost grows
away from the truth).

PSNR/SSIM: ``gl.evaluate`` (Hungarian alignment for batches; PSNR peak 1 on [0, 1]). Medians are over the
images (batch 1: one per photo; batch 8: the 8 images of the case).

Budget: the full grid (2 models x 16 settings x 4 configurations x 8 photos x 500 and 2,000 iterations) is far
beyond a shared 2-core CPU. By default this runs ``--models resnet20-4`` on ``--photos 2`` photos, 500
iterations, the settings in ``--settings`` and the configurations in ``--configs``; every figure says what it ran.
``--quick``: a smoke run (resnet20-4, 1 photo, 20 iterations, two settings, two configurations).

``--cells reduced``: the REDUCED grid below (the one docs/batchnorm.md reports). ``--imagenet``: ResNet-18 at 224
px, batch 1 (part 4), ``--imagenet-iterations`` (100) on photo ``--imagenet-photo``: step time, the projected
CPU-hour budget, PSNR, peak memory, the run directory's files (written through the ``gradleak attack`` path).

Run:  python benchmarks/bench_modern.py [--quick] [--models resnet20-4,resnet18] [--photos N]
      [--iterations 500,2000] [--settings eval-b1-fedsgd,train-b1-fedsgd] [--configs ig,ig+bn]
      python benchmarks/bench_modern.py --cells reduced --name modern-reduced
      python benchmarks/bench_modern.py --imagenet --name modern-imagenet
Writes benchmarks/results/modern.json (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import time


import common
import gradleak as gl
from gradleak import batchnorm
from gradleak.attacks.optimization.inverting import AUTO_WARMUP_FRACTION

MODELS = {"resnet20-4": ("resnet20", {"width": 4}), "resnet18": ("resnet18", {}), "resnet20": ("resnet20", {}),
          "resnet20-digits-e2": ("resnet20", {}), "resnet18-digits-e1": ("resnet18", {})}
# "trained for a few epochs" (part 3): MODEL-digits-eE is the zoo MODEL (seed 0) trained E epochs on
# scikit-learn's digits at 32 x 32 x 3 (gradleak.training.train: Adam lr 1e-3, batch 32, 80% train split, no
# augmentation), so its weights and BatchNorm running statistics have tracked real data; its 10-class head then
# attacks the bundled photos with their labels 0-7 (another domain than the training data: no ImageNet or CIFAR
# weights ship offline). Attacks on it use the case's photo normalisation.
TRAINED = {"resnet20-digits-e2": 2, "resnet18-digits-e1": 1}


def build_model(mname: str, num_classes: int, size: int = 32):
    """The model of ``mname`` for ``size`` x ``size`` inputs and a note of how it was obtained (untrained, or
    trained on digits at that size)."""
    zoo, opts = MODELS[mname]
    if mname not in TRAINED:
        return gl.models.build(zoo, input_shape=(3, size, size), num_classes=num_classes, seed=0, **opts), \
            {"trained": False}
    from gradleak.training import train

    digits = gl.data.load_digits(image_size=size, channels=3)
    model = gl.models.build(zoo, input_shape=(3, size, size), num_classes=digits.spec.num_classes, seed=0, **opts)
    res = train(model, digits, epochs=TRAINED[mname], holdout=0.2, checkpoint_epochs=None, seed=0)
    note = {"trained": True, "data": f"digits {size}x{size}x3", "epochs": TRAINED[mname],
            "holdout_accuracy": [round(a, 4) for a in res.accuracy], "train_seconds": round(res.seconds, 1)}
    print(f"{mname}: trained {TRAINED[mname]} epochs on digits, held-out accuracy {res.accuracy}", flush=True)
    return res.model, note
def model_and_spec(mname: str, photos):
    """(model, note, the photos' DataSpec with the model's number of classes) for attacking ``photos`` with
    ``mname`` at their size (a trained model keeps its digits head)."""
    model, note = build_model(mname, photos.spec.num_classes, photos.spec.shape[-1])
    spec = dataclasses.replace(photos.spec, num_classes=model.num_outputs) if mname in TRAINED else photos.spec
    return model, note, spec


# the configurations measured before parametrize='auto' pin the pixel form, and all measured before
# layers='auto' match every observed tensor (layers=()), so their figures stay comparable
ALL = {"layers": ()}
PIXEL = {"parametrize": "pixel", **ALL}
CONFIGS = {
    # IG's options before tv='auto': TV 1e-4 (the paper's), pinned so the figures stay comparable
    "ig": {"tv": 1e-4, **PIXEL},
    # IG's defaults now: tv='auto' (1e-2 on a BatchNorm ResNet, see resolve_tv), parametrize='auto',
    # schedule='auto', layers='auto' (the classifier left out on an untrained BatchNorm ResNet in eval mode,
    # FedSGD, batch 1; see inverting.resolve_matched_layers)
    "ig-auto": {},
    # IG's defaults before layers='auto' (every observed tensor matched): the "ig-auto" of results before it
    "ig-auto-all": {**ALL},
    # the classifier's gradient left out of the matched update, given (layers '!fc': the zoo ResNets' last layer)
    "ig-auto-nofc": {"layers": ("!fc",)},
    "ig+bn": {"tv": 1e-4, "bn_prior": "auto", "bn_weight": 1e-2, **PIXEL},
    "ig+cosine": {"tv": 1e-4, "schedule": "cosine", "warmup": 50, "start": "patterned-4", **PIXEL},
    "ig-lbfgs": {"tv": 1e-4, "optimizer": "lbfgs", **PIXEL},
    "ig+bn+cosine": {"tv": 1e-4, "bn_prior": "auto", "bn_weight": 1e-2, "schedule": "cosine", "warmup": 50,
                     "start": "patterned-4", **PIXEL},
    "gradinversion": {"preset": "gradinversion", "restarts": 2},
    "ig+tv": {"tv": 1e-2, **PIXEL},
    "ig+tv+cosine": {"tv": 1e-2, "schedule": "cosine", "warmup": 50, "start": "patterned-4", **PIXEL},
    # 2 restarts at half the iterations: equal compute
    "ig-2x-half": {"tv": 1e-4, "restarts": 2, "iterations_scale": 0.5, **PIXEL},
    # TV 1e-2 with the optimiser moving a 6-level Laplacian pyramid (parametrize.py; 32 px: 32 ... 1)
    "ig+tv+lap6": {"tv": 1e-2, "parametrize": "laplacian-6", "schedule": "step", **ALL},
    # the same with unsigned Adam
    "ig+tv+lap6+adam": {"tv": 1e-2, "parametrize": "laplacian-6", "optimizer": "adam", "schedule": "step", **ALL},
    # the pyramid with warm-up (a tenth of the budget) plus cosine decay: what schedule='auto' runs on it
    "ig+tv+lap6+cos": {"tv": 1e-2, "parametrize": "laplacian-6", "schedule": "cosine",
                       "warmup_fraction": AUTO_WARMUP_FRACTION, **ALL},
}
# The reduced grid (``--cells reduced``): what a shared 2-core CPU allows in about 40 minutes, chosen for the
# comparisons the issue asks about (part 3): eval vs train BatchNorm, FedSGD vs FedAvg (5 local steps), labels
# known vs recovered, the revealed statistics on vs off (train mode), and the options against the default in
# eval mode at equal iterations. All on the untrained zoo ``resnet20`` (width 1), batch 1, the first
# ``--photos`` (2) bundled photos; (setting, configs, iterations) per cell. Not run: batch 8, resnet20-4 /
# resnet18 at 32 px, trained models, 2000 iterations (see docs/batchnorm.md).
REDUCED = [
    ("eval-b1-fedsgd", ("ig", "ig+tv", "ig+cosine", "ig+tv+cosine", "ig-2x-half"), 500),
    ("eval-b1-fedsgd-recovered", ("ig",), 500),
    ("train-b1-fedsgd", ("ig", "ig+bn"), 300),
    ("train-b1-fedsgd-recovered", ("ig", "ig+bn"), 300),
    ("eval-b1-fedavg5", ("ig",), 100),
    ("train-b1-fedavg5", ("ig", "ig+bn"), 100),
]
# ImageNet size (``--imagenet``, issue 16 part 4): zoo ``resnet18`` (ImageNet stem) at 224 x 224, batch 1, one
# torch thread, FedSGD, eval BatchNorm, labels known, IG's defaults. IMAGENET_CPU_HOUR is the budget that fits a
# CPU hour on the machine measured (docs/batchnorm.md "ImageNet size"): iterations = 0.9 x 3600 s / step time.
IMAGENET_CPU_HOUR = dict(gl.attacks.attacks.get("ig").presets["imagenet-cpu-hour"])  # the IG preset of that name
SETTINGS = {f"{bn}-b{b}-{p}{'-recovered' if rec else ''}": {"bn_mode": bn, "batch": b, "protocol": p,
                                                             "labels_known": not rec}
            for bn, b, p, rec in itertools.product(("eval", "train"), (1, 8), ("fedsgd", "fedavg5"), (False, True))}
DEFAULT_SETTINGS = "eval-b1-fedsgd,train-b1-fedsgd,train-b1-fedavg5"


def config_options(name: str) -> dict | None:
    """The options of configuration ``name``: a named one of CONFIGS, optionally followed by ``:key=value``
    overrides (e.g. ``ig+tv:lr=0.3``, ``ig:tv=3e-3:schedule=cosine:warmup=50``; values are numbers or strings).
    None for an unknown name."""
    base, *over = name.split(":")
    if base not in CONFIGS:
        return None
    o = dict(CONFIGS[base])
    for kv in over:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            return None
        try:
            o[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            o[k] = v
    return o
DEFAULT_CONFIGS = "ig,ig+bn,ig+cosine,gradinversion"


def cases(model, setting: dict, photos, n_photos: int, local_lr: float, spec=None, first: int = 0):
    """(case, truth, photo names) for a setting: one per photo at batch 1 (photos first .. first + n_photos - 1),
    one of the first 8 at batch 8;
    ``spec``: the photos' DataSpec with the model's number of classes (default: the photos')."""
    b = setting["batch"]
    spec = spec or photos.spec
    starts = range(first, first + n_photos) if b == 1 else [0]
    for i in starts:
        x, y = photos.batch(b, i)
        kw = dict(protocol="fedavg", local_steps=5, local_lr=local_lr, local_batch_size=b) \
            if setting["protocol"] == "fedavg5" else dict(protocol="fedsgd")
        case, truth = gl.simulate(model, x, y, spec=spec, bn_mode=setting["bn_mode"],
                                  labels_known=setting["labels_known"], **kw)
        yield case, truth, photos.names[i:i + b]


def truth_start(truth, sigma: float, seed: int):
    """The truth's images plus N(0, sigma^2) noise, clamped to [0, 1], and the start's PSNR (dB) against them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (truth.inputs + sigma * torch.randn(truth.inputs.shape, generator=g, dtype=truth.inputs.dtype)).clamp(0, 1)
    return x, [round(float(v), 2) for v in gl.metrics.psnr(x, truth.inputs)]


def run_cells(cells, models, photos, n_photos: int, local_lr: float, first: int = 0, seed: int = 0,
              truth_noise: float | None = None) -> list[dict]:
    """Rows of (model, setting, config, iterations) for every case of each cell; ``truth_noise``: start every run
    from the truth plus that much noise (the diagnostic ``--truth-noise``)."""
    rows = []
    for mname in models:
        model, model_note, spec = model_and_spec(mname, photos)
        for sname, cnames, budgets in cells:
            setting = SETTINGS[sname]
            for case, truth, names in cases(model, setting, photos, n_photos, local_lr, spec, first):
                channel = batchnorm.side_channel(case)
                for cname, n in itertools.product(cnames, budgets):
                    o = config_options(cname)
                    preset = o.pop("preset", None)
                    its = max(1, round(n * o.pop("iterations_scale", 1.0)))
                    if "warmup_fraction" in o:
                        o["warmup"] = max(1, round(its * o.pop("warmup_fraction")))
                    start_psnr = None
                    if truth_noise is not None:
                        o["init"], start_psnr = truth_start(truth, truth_noise, seed)
                    t = time.perf_counter()
                    rec = gl.create("ig", preset=preset, **{**o, "max_iterations": its}).reconstruct(case, seed=seed)
                    sec = time.perf_counter() - t
                    s = gl.evaluate(rec, truth)
                    row = {"model": mname, "model_note": model_note, "setting": sname, "config": cname, "iterations": n,
                           "iterations_per_restart": its, "attack_seed": seed, "photos": list(names),
                           "psnr_per_image": s.psnr_per_image, "ssim_per_image": s.ssim_per_image,
                           "label_accuracy": s.label_accuracy, "seconds": round(sec, 1),
                           "bn_prior": rec.info.get("bn_prior"), "tv": rec.info.get("tv"),
                           "tv_choice": rec.info.get("tv_choice"), "parametrize": rec.info.get("parametrize"),
                           "schedule": rec.info.get("schedule"), "warmup": rec.info.get("warmup"), "labels": rec.info["labels"].get("source"),
                           "side_channel": None if channel is None else channel["note"],
                           "score": rec.info.get("scores"), "layers_choice": rec.info.get("layers_choice"),
                           **({} if truth_noise is None else {"truth_noise": truth_noise, "start_psnr": start_psnr})}
                    rows.append(row)
                    print(f"{mname:10s} {sname:26s} {cname:14s} {n:5d} its {','.join(names)[:30]:30s} "
                          f"PSNR {statistics.median(s.psnr_per_image):6.2f} dB  SSIM "
                          f"{statistics.median(s.ssim_per_image):.3f}  {sec:7.1f} s"
                          + ("" if start_psnr is None else f"  (start {statistics.median(start_psnr):.2f} dB)"), flush=True)
    return rows


def imagenet(iterations: int, photo: int) -> dict:
    """ResNet-18 at 224 px, batch 1, through the whole `gradleak attack` path (data at 224, the memory check,
    the run directory and its report images): step time, the projected CPU-hour budget, PSNR."""
    import resource
    import tempfile
    from pathlib import Path

    from gradleak.experiment import AttackRun, run_attack

    with tempfile.TemporaryDirectory() as tmp:
        cfg = AttackRun(attack="ig", model="resnet18", image_size=224, num_images=1, start=photo,
                        iterations=iterations, threads=1, out=str(Path(tmp) / "run"))
        t = time.perf_counter()
        res = run_attack(cfg)
        wall = time.perf_counter() - t
        rec = res.reconstruction
        files = sorted(p.name for p in Path(res.out_dir).iterdir())
        from PIL import Image

        with Image.open(Path(res.out_dir) / "reconstruction.png") as im:
            png_size = list(im.size)
    attack_s = float(rec.info["seconds"])
    step = attack_s / int(rec.info["iterations"])
    fits = int(0.9 * 3600 / step)
    out = {"model": "resnet18", "input_shape": list(res.case.spec.shape), "batch": 1, "photo": photo,
           "iterations": int(rec.info["iterations"]), "attack_seconds": round(attack_s, 1),
           "wall_seconds": round(wall, 1), "step_seconds": round(step, 3),
           "projected_iterations_in_0.9_cpu_hour": fits, "cpu_hour_budget": IMAGENET_CPU_HOUR,
           "cpu_hour_budget_projected_minutes": round(IMAGENET_CPU_HOUR["max_iterations"] * step / 60, 1),
           "psnr": res.scores.psnr, "ssim": res.scores.ssim,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "run_files": files, "reconstruction_png_size": png_size}
    print(f"resnet18 224 px: {step:.2f} s/iteration -> {fits} iterations in 0.9 CPU hour; {out['iterations']} "
          f"iterations: PSNR {res.scores.psnr:.2f} dB, peak RSS {out['peak_rss_mib']} MiB", flush=True)
    return out


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet20-4, 1 photo, 20 iterations")
    ap.add_argument("--models", default="resnet20-4")
    ap.add_argument("--photos", type=int, default=2, help="photos at batch 1 (the batch-8 case uses the first 8)")
    ap.add_argument("--first-photo", type=int, default=0, help="index of the first photo at batch 1")
    ap.add_argument("--seed", type=int, default=0, help="the attack's seed (its random start); the models keep seed 0")
    ap.add_argument("--iterations", default="500")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"some of {','.join(SETTINGS)}")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"some of {','.join(CONFIGS)}")
    ap.add_argument("--local-lr", type=float, default=1e-2)
    ap.add_argument("--size", type=int, default=32, help="image side in px (photos and models; the zoo ResNets keep "
                                                         "the CIFAR stem below 128 px)")
    ap.add_argument("--truth-noise", type=float, default=None, metavar="SIGMA",
                    help="diagnostic: start every run from the truth plus N(0, SIGMA^2) noise (image space, clamped)")
    ap.add_argument("--cells", choices=("product", "reduced"), default="product",
                    help="product: --models x --settings x --configs x --iterations; reduced: the REDUCED grid "
                         "(resnet20, its own settings, configs and iterations; --photos still applies)")
    ap.add_argument("--imagenet", action="store_true", help="ResNet-18 at 224 px, batch 1 (part 4): step time, "
                                                             "projected CPU-hour budget, PSNR")
    ap.add_argument("--imagenet-iterations", type=int, default=100)
    ap.add_argument("--imagenet-photo", type=int, default=0)
    ap.add_argument("--name", default="modern", help="results name (benchmarks/results/NAME.json), for partial runs")
    args = ap.parse_args()
    if args.quick:
        args.models, args.photos, args.iterations = "resnet20-4", 1, "20"
        args.settings, args.configs = "eval-b1-fedsgd,train-b1-fedsgd", "ig,ig+bn"
    models = args.models.split(",")
    settings = args.settings.split(",")
    configs = args.configs.split(",")
    budgets = [int(n) for n in args.iterations.split(",")]
    bad = [m for m in models if m not in MODELS] + [s for s in settings if s not in SETTINGS] + \
          [c for c in configs if config_options(c) is None]
    if bad:
        ap.error(f"unknown model/setting/config {bad}; models {list(MODELS)}, settings {list(SETTINGS)}, "
                 f"configs {list(CONFIGS)}")
    if args.truth_noise is not None and not (args.truth_noise >= 0 and math.isfinite(args.truth_noise)):
        ap.error(f"--truth-noise must be a finite number >= 0, got {args.truth_noise}")
    if not 8 <= args.size <= 512:
        ap.error(f"--size must be 8 ... 512 px, got {args.size}")
    run_ = common.begin(args.name, args)
    if args.imagenet:
        common.finish(run_, {"setting": {"imagenet": True, "iterations": args.imagenet_iterations,
                                         "photo": args.imagenet_photo, "threads": 1, "protocol": "fedsgd",
                                         "bn_mode": "eval", "labels_known": True, "options": "IG defaults"},
                             "imagenet": imagenet(args.imagenet_iterations, args.imagenet_photo)})
        return
    # the 8 photos of the issue's grid; --first-photo 8 and on reach the other bundled photos (held out from
    # the choices made on the first 8; the 16-photo set starts with the same 8 images and labels)
    photos = gl.data.samples(args.size, num_images=min(16, max(8, args.first_photo + args.photos)))
    if args.cells == "reduced":
        cells = [(sn, cn, [n]) for sn, cn, n in REDUCED]
        models, settings, configs = ["resnet20"], [c[0] for c in REDUCED], sorted({x for c in REDUCED for x in c[1]})
        budgets = sorted({c[2] for c in REDUCED})
    else:
        cells = [(sn, configs, budgets) for sn in settings]
    if args.first_photo + args.photos > len(photos):
        ap.error(f"--first-photo {args.first_photo} + --photos {args.photos} exceeds the {len(photos)} photos")
    rows = run_cells(cells, models, photos, args.photos, args.local_lr, args.first_photo, args.seed, args.truth_noise)
    summary = []
    for key in sorted({(r["model"], r["setting"], r["config"], r["iterations"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["setting"], r["config"], r["iterations"]) == key]
        ps = [p for r in sel for p in r["psnr_per_image"]]
        ss = [p for r in sel for p in r["ssim_per_image"]]
        summary.append({"model": key[0], "setting": key[1], "config": key[2], "iterations": key[3],
                        "images": len(ps), "median_psnr": statistics.median(ps), "median_ssim": statistics.median(ss),
                        "seconds": sum(r["seconds"] for r in sel)})
        print(f"{key[0]:10s} {key[1]:26s} {key[2]:14s} {key[3]:5d} its: median PSNR {summary[-1]['median_psnr']:6.2f} "
              f"dB, SSIM {summary[-1]['median_ssim']:.3f} over {len(ps)} image(s)")
    common.finish(run_, {
        "setting": {"models": models, "photos_at_batch_1": args.photos,
                    "first_photo": args.first_photo, "attack_seed": args.seed, "truth_noise": args.truth_noise, "size": args.size, "iterations": budgets, "settings": settings,
                    "cells": args.cells, **({"reduced": REDUCED} if args.cells == "reduced" else {}),
                    "configs": {c: config_options(c) for c in configs}, "local_lr": args.local_lr,
                    "trained": {m: TRAINED[m] for m in models if m in TRAINED},
                    "quick": args.quick},
        "notes": ["reduced grid on a shared 2-core CPU: see setting; the issue's full grid is 8 photos, both "
                  "models, 500 and 2000 iterations"],
        "summary": summary, "rows": rows,
    })


if __name__ == "__main__":
    main()
