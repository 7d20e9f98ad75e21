"""A malicious server against FedSGD and FedAvg, with and without secure aggregation and other defenses.

Setting: the server crafts the model it sends with the imprint block of Robbing the Fed (Fowl et al. 2022;
``gradleak.create("imprint", bins=k).craft``), in front of a CIFAR-stem ResNet-18 (base width ``--width``,
default 4 so the full grid runs in minutes on two CPU cores; the read-out does not depend on the model behind
the block), float64, 3x32x32 inputs. Data: scikit-learn digits upscaled to 32x32 RGB (1,797 real images, so
batches of 128 per client x 4 clients exist; the 19 bundled photos are too few), labels known.

Prior of the measurement: the stated N(0, 1) (the default of the random measurement), and for FedSGD also a
Gaussian fitted to 64 public digits disjoint from the clients' (``craft(..., public=...)``): upscaled digits
share much structure, so their measurements are N(-0.77, 0.53^2) rather than N(0, 1) and the stated prior
crowds them into few bins.

Grid: per-client batch B in {8, 32, 128}, bins k in {64, 256}, FedSGD and FedAvg (4 local full-batch steps, local
lr 1e-4), alone or under secure aggregation over 4 clients (the server sees only the sample-weighted mean of the
4 updates: ``gradleak.defenses.aggregate_cases``, masked, 48 fraction bits; then 4B samples share the k bins).
Defenses at B = 32, k = 256, FedSGD, one client: pruning (``gradleak.defenses.Prune``, per layer) at 50/90/99%,
Gaussian noise on the update, and DP-SGD (per-example clipping to norm 1, noise multiplier 1e-3).

Per row: share of the images recovered at >= 100 dB (Hungarian-matched, ``outcomes``), the imprint paper's
expected share sum_i p_i (1 - p_i)^(N-1) for the N samples behind the update, the rows the attack itself proves
or verifies to be one sample, the claim and derived kind, seconds of the attack (read-out + checks + base-class
residual) and of the client's simulation; the share of images whose matched row is at >= 30 dB and the median
PSNR of the rows. "stopped" = no image recovered at >= 100 dB. The block's gain is 1e-3 (its gradient is small,
so noise of 1e-6 on the update already drowns it; a server would raise the gain).

Run:  /work/venv/bin/python benchmarks/bench_malicious.py [--quick] [--allow-dirty]
Writes benchmarks/results/malicious.json with its provenance (benchmarks/common.py: command, commit, clean tree).
"""

from __future__ import annotations

import argparse
import time

import torch

import common
import gradleak as gl
from gradleak.attacks.malicious import outcomes
from gradleak.defenses import aggregate_cases

PUBLIC = 64  # public images the server may use to fit the prior of the measurement


def one(model, data, B, bins, protocol, clients, defense=None, seed=0, public=None):
    attack = gl.create("imprint", bins=bins)
    crafted = attack.craft(model, data.spec, generator=torch.Generator().manual_seed(seed), public=public)
    kw = dict(protocol=protocol, local_steps=4, local_lr=1e-4) if protocol == "fedavg" else {}
    t0 = time.perf_counter()
    parts = []
    for c in range(clients):
        x, y = data.batch(B, start=c * B)
        parts.append(gl.simulate(crafted, x.double(), y, spec=data.spec, defense=defense,
                                 generator=torch.Generator().manual_seed(seed + c), **kw))
    if clients == 1:
        case, truth = parts[0]
    else:
        case, truth = aggregate_cases([p[0] for p in parts], [p[1] for p in parts], fraction_bits=48,
                                      generator=torch.Generator().manual_seed(seed))
    sim = time.perf_counter() - t0
    rec = attack.reconstruct(case)
    out = outcomes(rec, truth, threshold_db=100.0)
    return {"batch_per_client": B, "clients": clients, "samples": case.batch_size, "bins": bins,
            "protocol": protocol, "defense": getattr(defense, "description", None),
            "prior": "stated N(0, 1)" if public is None else f"Gaussian fitted to {public.shape[0]} public images",
            "share_recovered_100db": out["share_exact"], "recovered": out["exact"], "mixture": out["mixture"],
            "lost": out["lost"], "expected_share": rec.info["expected_share"],
            "share_recovered_30db": sum(p >= 30 for p in out["psnr_matched"] if p == p) / case.batch_size,
            "psnr_median_matched_rows": float(torch.tensor(out["psnr_matched"]).nanmedian()),
            "rows": rec.info["rows"], "rows_single_claimed": rec.info.get("rows_single"),
            "single_rows_all_exact": all(out["psnr_matched"][j] >= 100 for j, s in
                                         enumerate(rec.info.get("row_status", [])) if s == "single"),
            "claim": rec.claim, "kind": rec.kind, "residual": rec.residual,
            "seconds_attack": rec.seconds, "seconds_client_simulation": sim,
            "stopped": out["exact"] == 0}


def main():
    ap = common.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--quick", action="store_true", help="B = 8, k = 64 only; one defense row")
    ap.add_argument("--width", type=int, default=4, help="ResNet-18 base width (64 = the standard one)")
    args = ap.parse_args()
    run_ = common.begin("malicious", args)
    sizes, bins_list = ((8,), (64,)) if args.quick else ((8, 32, 128), (64, 256))
    need = max(sizes) * 4
    data = gl.data.load("digits", num_images=need + PUBLIC, image_size=32, channels=3)
    public = data.batch(PUBLIC, start=need)[0]  # disjoint from every client's images
    model = gl.models.build("resnet18", input_shape=data.spec.shape, num_classes=data.spec.num_classes,
                            dtype=torch.float64, width=args.width)
    one(model, data, 4, 16, "fedsgd", 1)  # warm-up (first calls of the autograd/forward-mode machinery), not recorded
    rows = []
    t_all = time.perf_counter()
    grid = [(p, c, pub) for p in ("fedsgd", "fedavg") for c in (1, 4) for pub in (None, public)
            if pub is None or p == "fedsgd"]
    for protocol, clients, pub in grid:
        for B in sizes:
            for k in bins_list:
                r = one(model, data, B, k, protocol, clients, public=pub)
                rows.append(r)
                print(f"{protocol:6} clients={clients} B={B:3} k={k:3} prior={'public' if pub is not None else 'stated'}:"
                      f" {100 * r['share_recovered_100db']:5.1f}% >= 100 dB (expected {100 * r['expected_share']:5.1f}%),"
                      f" {r['seconds_attack']:.2f} s", flush=True)
    d = gl.defenses
    Bd, kd = (8, 64) if args.quick else (32, 256)
    defs = [d.Prune(0.9)] if args.quick else [d.Prune(0.5), d.Prune(0.9), d.Prune(0.99), d.Noise(1e-6),
                                              d.Noise(1e-3),
                                              d.create("dp-sgd", max_grad_norm=1.0, noise_multiplier=1e-3)]
    for de in defs:
        r = one(model, data, Bd, kd, "fedsgd", 1, defense=de)
        rows.append(r)
        print(f"defense {r['defense']}: {100 * r['share_recovered_100db']:.1f}% >= 100 dB, "
              f"{100 * r['share_recovered_30db']:.1f}% >= 30 dB, stopped={r['stopped']}", flush=True)
    common.finish(run_, {
        "mode": "quick" if args.quick else "full",
        "setting": {"attack": "imprint", "gain": gl.create("imprint").options.gain,
                    "model": f"resnet18 (cifar stem, width {args.width})", "dtype": "float64",
                    "data": "digits upscaled to 3x32x32", "labels_known": True,
                    "fedavg": {"local_steps": 4, "local_lr": 1e-4, "local_batch": "full"},
                    "secure_aggregation_clients": 4, "threshold_db": 100.0, "public_images": PUBLIC},
        "seconds_grid": time.perf_counter() - t_all, "rows": rows})


if __name__ == "__main__":
    main()
