"""Optimisation attacks at full strength: gradleak's iDLG / IG against a plain reference loop.

1. iDLG, labels known, DLG's sigmoid LeNet (untrained, seed 0), one image per seed (image i = seed i, init seed
   i), default budget (6,000 L-BFGS iterations = DLG's 300 outer steps of 20), on scikit-learn digits
   (8x8 upscaled to 32x32 RGB) and on bundled photos. Reference: torch.optim.LBFGS, lr 1, 300 outer steps of
   20 iterations, no early stop, uniform [0, 1] init, squared-L2 gradient distance (the loop in issue 9).
2. FedAvg: IG defaults, 2 bundled photos, 3 local steps, lr 0.01, 1,000 iterations. Reference: the same
   torch.optim.LBFGS loop on squared L2 (relative to the observed norm) + TV 1e-4, 50 outer steps of 20.
3. Batches: IG defaults (1,000 iterations) on B = 1, 2, 4, 8 bundled photos. Reference: as in 2 (FedSGD).

Seeds 0-4 for 1, 0-2 for 2 and 3 by default (--seeds / --seeds23 change them: CPU time). PSNR (peak 1, per image; a batch: mean over its images), then
median / mean over seeds; seconds per run (one thread). Writes benchmarks/results/optim.json with the git
commit and whether the tree was clean (benchmarks/common.py).

    python benchmarks/bench_optim.py [--quick] [--allow-dirty]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py: provenance)

import gradleak as gl  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def plain_loop(case, seed: int, *, outer: int, inner: int = 20, relative: bool = False, tv: float = 0.0):
    """The reference: torch.optim.LBFGS (lr 1, no line search, no early stop) from a uniform [0, 1] start on
    the squared-L2 distance between the candidate's update (the protocol's, via Case.update) and the observed
    one (optionally divided by the observed squared norm), plus tv x anisotropic TV."""
    g = torch.Generator().manual_seed(seed)
    x = case.spec.normalize(torch.rand((case.batch_size, *case.spec.shape), generator=g)).requires_grad_(True)
    target = {k: v.detach() for k, v in case.observed.items()}
    norm2 = sum(float(v.double().pow(2).sum()) for v in target.values()) if relative else 1.0
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=inner, history_size=100, tolerance_grad=0.0,
                            tolerance_change=0.0)
    evals = [0]

    def closure():
        opt.zero_grad()
        upd = case.update(x, case.labels, create_graph=True)
        loss = sum(((upd[k] - target[k]) ** 2).sum() for k in target) / norm2
        if tv > 0:
            loss = loss + tv * ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())
        loss.backward()
        evals[0] += 1
        return loss

    t0 = time.perf_counter()
    for _ in range(outer):
        opt.step(closure)
    out = case.spec.denormalize(x.detach())
    if not torch.isfinite(out).all():  # a NaN iterate: the reference reports the start's quality, marked
        return None, time.perf_counter() - t0, evals[0]
    return out, time.perf_counter() - t0, evals[0]


def digits(n):
    return gl.data.load_digits(num_images=n, image_size=32, channels=3)


def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "mean": None}
    return {"median": round(statistics.median(vals), 2), "mean": round(statistics.mean(vals), 2)}


def run_one(rows, section, case, truth, make_attack, seed, plain_kw):
    t0 = time.perf_counter()
    rec = make_attack().reconstruct(case, seed=seed)
    gsec = time.perf_counter() - t0
    trials = rec.info.get("trials") or rec.info.get("restarts")
    xr, psec, pevals = plain_loop(case, seed, **plain_kw)
    row = {"section": section, "seed": seed, "gradleak_psnr": round(psnr(rec.inputs, truth.inputs), 2),
           "gradleak_seconds": round(gsec, 1), "gradleak_iterations": rec.info["iterations"],
           "gradleak_gradient_evaluations": rec.info["gradient_evaluations"],
           "gradleak_stop": [t["stop"] for t in trials],
           "plain_psnr": None if xr is None else round(psnr(xr, truth.inputs), 2),
           "plain_seconds": round(psec, 1), "plain_gradient_evaluations": pevals}
    rows.append(row)
    print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seeds 0-1 and smaller budgets (a smoke run)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for section 1 (default 5)")
    ap.add_argument("--seeds23", type=int, default=3, help="seeds 0..N-1 for sections 2 and 3 (default 3)")
    common.add_arguments(ap)
    args = ap.parse_args(argv)
    run = common.begin("optim", args)
    seeds1 = [0, 1] if args.quick else list(range(args.seeds))
    seeds23 = [0, 1] if args.quick else list(range(args.seeds23))
    outer = 30 if args.quick else 300
    rows: list[dict] = []
    photos = gl.data.samples(32, num_images=8)
    for name, ds in (("idlg-digits", digits(5)), ("idlg-photos", gl.data.samples(32, num_images=5))):
        model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=ds.spec.num_classes, seed=0)
        for s in seeds1:
            x, y = ds.batch(1, s)
            case, truth = gl.simulate(model, x, y, spec=ds.spec)
            run_one(rows, name, case, truth, lambda: gl.create("idlg", max_iterations=outer * 20), s,
                    dict(outer=outer))
    lenet = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=19, seed=0)
    budget = 200 if args.quick else 1000
    ref = dict(outer=budget // 20, relative=True, tv=1e-4)
    x, y = photos.batch(2, 0)
    case, truth = gl.simulate(lenet, x, y, spec=photos.spec, protocol="fedavg", local_steps=3, local_lr=0.01)
    for s in seeds23:
        run_one(rows, "ig-fedavg-2", case, truth, lambda: gl.create("ig", max_iterations=budget), s, ref)
    for b in (1, 2, 4, 8):
        x, y = photos.batch(b, 0)
        case, truth = gl.simulate(lenet, x, y, spec=photos.spec)
        for s in seeds23:
            run_one(rows, f"ig-batch-{b}", case, truth, lambda: gl.create("ig", max_iterations=budget), s, ref)
    sections = {}
    for r in rows:
        sections.setdefault(r["section"], []).append(r)
    out = {
        "quick": args.quick,
        "summary": {k: {"gradleak_psnr": summary([r["gradleak_psnr"] for r in v]),
                        "plain_psnr": summary([r["plain_psnr"] for r in v]),
                        "gradleak_seconds_mean": round(statistics.mean(r["gradleak_seconds"] for r in v), 1),
                        "plain_seconds_mean": round(statistics.mean(r["plain_seconds"] for r in v), 1),
                        "seeds": [r["seed"] for r in v]} for k, v in sections.items()},
        "rows": rows,
    }
    print(json.dumps(out["summary"], indent=1))
    common.finish(run, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
