"""Defenses: leakage (worst-case PSNR / SSIM over attacks) against utility (accuracy drop), per defense strength.

Setting (issue 13), per model on scikit-learn digits (1x8x8, 10 classes): ``lenet`` by default; ``convnet``
(at width 16: the zoo default width 64 is ~3M parameters, too slow for FedAvg on a shared CPU) only with
``--models lenet,convnet``: from its zoo initialisation with eval-mode BatchNorm (DP-SGD needs eval mode) it
does not train under FedAvg (held-out accuracy stays at chance), so its accuracy drops say nothing.
- leakage: the first N held-out images (the utility run's stratified hold-out, seed 0; N = 8, quick 2),
  attacked one image per FedSGD update (batch 1; secure aggregation: the target and K-1 more held-out images,
  each its own client, so the attack faces one batch of K), labels known, untrained zoo model (seed 0). Attacks:
  Inverting Gradients (``ig``, ``--iterations`` budget) and every closed-form attack that applies to the
  undefended case (R-GAP, layer-wise); per image the best PSNR over attacks (the defender's worst case), then the
  mean over images = "worst-case PSNR" (and the same for SSIM).
- utility: ``gl.defenses.utility``: FedAvg, 8 IID clients, R = 20 rounds (quick 5), 5 local steps of batch 16,
  local_lr per model; accuracy drop = baseline held-out accuracy - defended (same seeds).
- defenses: noise sigma in {1e-3, 1e-2, 1e-1}; dp-sgd (C = 1) calibrated by opacus to epsilon in {1, 8, 64} at
  delta = 1e-5 for the utility run (20 rounds x 5 steps at its sample rate; the attacked update uses that same
  noise multiplier); prune {0.5, 0.9, 0.99}; quantize {8, 4, 2}; topk 0.1 with and without error feedback;
  Soteria (ratio 0.5); secure aggregation K in {2, 8}.

Run:  /work/venv/bin/python benchmarks/bench_defenses.py [--quick] [--models lenet,convnet] [--iterations N]
Writes benchmarks/results/defenses.json (its provenance says whether it was --quick) and the frontier plot
benchmarks/results/defenses-frontier.png (x: accuracy drop, y: worst-case PSNR).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak import defenses as D
from gradleak.errors import RequirementError
from gradleak.training import split_holdout

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (provenance: command, commit, clean tree)

RESULTS = common.RESULTS_DIR
MODELS = {"lenet": ({}, 1.0), "convnet": ({"width": 16}, 0.1)}  # model options, FedAvg local_lr
CLOSED_FORM = ("rgap", "layerwise")


def defense_grid(quick: bool) -> list[tuple[str, str, float | None]]:
    """(family, spec, target epsilon) rows; dp-sgd specs are completed with the calibrated sigma later."""
    rows = [("none", "", None)]
    noise = [1e-3, 1e-2, 1e-1]
    eps = [1.0, 8.0, 64.0]
    prune = [0.5, 0.9, 0.99]
    quant = [8, 4, 2]
    if quick:
        noise, eps, prune, quant = [1e-2], [8.0], [0.9], [4]
    rows += [("noise", f"noise:sigma={s}", None) for s in noise]
    rows += [("dp-sgd", "", e) for e in eps]
    rows += [("prune", f"prune:ratio={r}", None) for r in prune]
    rows += [("quantize", f"quantize:bits={b}", None) for b in quant]
    rows += [("topk", "topk:ratio=0.1", None), ("topk", "topk:ratio=0.1,error_feedback=true", None)]
    rows += [("soteria", "soteria:ratio=0.5", None)]
    rows += [("secure-aggregation", f"secure-aggregation:clients={k}", None) for k in ([2] if quick else [2, 8])]
    return rows


def attack_scores(model, data, hold, spec_str, n_images, iterations, closed_form) -> dict:
    """Worst case over attacks per image, averaged over images (PSNR, SSIM), and the per-attack means."""
    defense = D.parse(spec_str) if spec_str else None
    k = getattr(defense, "clients", 1) if defense is not None and defense.aggregates else 1
    per_attack: dict[str, list[tuple[float, float]]] = {}
    for i in range(n_images):
        x = data.images[hold[i:i + 1]]
        y = data.labels[hold[i:i + 1]]
        other = None
        if k > 1:
            pool = torch.cat([hold[n_images:], hold[:0]])
            idx = pool[(i * (k - 1)) % pool.numel():][: k - 1]
            other = (data.images[idx], data.labels[idx])
        case, truth = gl.simulate(model, x, y, spec=data.spec, defense=defense, other_clients=other,
                                  generator=torch.Generator().manual_seed(i))
        for name in ("ig", *closed_form):
            opts = {"max_iterations": iterations} if name == "ig" else {}
            try:
                rec = gl.create(name, **opts).reconstruct(case, seed=0)
            except RequirementError:
                continue
            sc = gl.evaluate(rec, truth)
            per_attack.setdefault(name, []).append((min(sc.psnr, 300.0), sc.ssim))
    complete = {a: v for a, v in per_attack.items() if len(v) == n_images}
    worst_psnr = [max(complete[a][i][0] for a in complete) for i in range(n_images)]
    worst_ssim = [max(complete[a][i][1] for a in complete) for i in range(n_images)]
    return {"worst_psnr": sum(worst_psnr) / n_images, "worst_ssim": sum(worst_ssim) / n_images,
            "worst_psnr_per_image": worst_psnr,
            "per_attack": {a: {"psnr": sum(p for p, _ in v) / len(v), "ssim": sum(s for _, s in v) / len(v)}
                           for a, v in complete.items()}}


def run_model(name: str, args) -> list[dict]:
    opts, lr = MODELS[name]
    data = gl.data.load("digits")
    rounds = 5 if args.quick else 20
    ukw = dict(rounds=rounds, clients=8, local_steps=5, local_lr=lr, local_batch_size=16, seed=0)
    steps = rounds * 5
    _, hold = split_holdout(data.labels, 0.2, torch.Generator().manual_seed(0))  # the utility run's hold-out
    model = gl.models.build(name, input_shape=data.spec.shape, num_classes=10, seed=0, **opts)

    # which closed-form attacks apply to this model (an undefended batch-1 case)
    x, y = data.images[hold[:1]], data.labels[hold[:1]]
    case, _ = gl.simulate(model, x, y, spec=data.spec)
    closed = []
    for a in CLOSED_FORM:
        try:
            gl.create(a).reconstruct(case, seed=0)
            closed.append(a)
        except RequirementError as e:
            print(f"{name}: {a} does not apply ({'; '.join(e.problems)[:100]})", flush=True)
    grid = defense_grid(args.quick)
    shards = D.client_shards(data.labels[split_holdout(data.labels, 0.2, torch.Generator().manual_seed(0))[0]],
                             8, iid=True, alpha=0.5, seed=0)
    q = min(1.0, 16 / min(int(s.numel()) for s in shards))
    specs = []
    for fam, spec, eps in grid:
        if fam == "dp-sgd":
            sigma = D.DPSGD(max_grad_norm=1.0, target_epsilon=eps).for_run(steps, q).sigma(steps, q)
            spec = f"dp-sgd:max_grad_norm=1,noise_multiplier={sigma:.6g}"
        specs.append((fam, spec, eps))
    t = time.perf_counter()
    util = D.utility(name, data, [s for _, s, _ in specs if s], **ukw, model_options=opts, progress=False)
    print(f"{name}: utility of {len(specs) - 1} defenses in {time.perf_counter() - t:.0f} s; baseline accuracy "
          f"{util.baseline_accuracy:.3f}", flush=True)
    by_spec = dict(zip([s for _, s, _ in specs if s], util.defenses))
    rows = []
    for fam, spec, eps in specs:
        t = time.perf_counter()
        leak = attack_scores(model, data, hold, spec, args.images, args.iterations, closed)
        u = by_spec.get(spec)
        row = {"model": name, "model_options": opts, "family": fam, "defense": spec or "none",
               "target_epsilon": eps, "epsilon": None if u is None else u.epsilon,
               "accuracy": util.baseline_accuracy if u is None else u.accuracy,
               "accuracy_drop": 0.0 if u is None else u.accuracy_drop, **leak,
               "seconds_attack": time.perf_counter() - t, "seconds_utility": None if u is None else u.seconds}
        rows.append(row)
        eps_s = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        print(f"{name:8s} {row['defense']:48s} drop {row['accuracy_drop']:+.3f}  eps {eps_s:>6s}  "
              f"worst PSNR {row['worst_psnr']:6.2f} dB  SSIM {row['worst_ssim']:.3f}  ({row['seconds_attack']:.0f} s)",
              flush=True)
    for r in rows:
        r["utility_settings"] = util.settings
        r["baseline_accuracy"] = util.baseline_accuracy
    return rows


def markdown(rows) -> str:
    out = ["| model | defense | epsilon | accuracy drop | worst-case PSNR (dB) | worst-case SSIM |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        out.append(f"| {r['model']} | {r['defense']} | {eps} | {r['accuracy_drop']:+.3f} | {r['worst_psnr']:.2f} | "
                   f"{r['worst_ssim']:.3f} |")
    return "\n".join(out)


def frontier(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == m]
        for fam in dict.fromkeys(r["family"] for r in sel):
            pts = sorted((r["accuracy_drop"], r["worst_psnr"], r["defense"]) for r in sel if r["family"] == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=fam)
        ax.set_xlabel("accuracy drop (held-out, FedAvg)")
        ax.set_ylabel("worst-case PSNR over attacks (dB)")
        ax.set_title(f"{m} on digits: privacy-utility frontier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = common.add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--quick", action="store_true", help="lenet, 2 images, 5 rounds, one strength per family")
    p.add_argument("--models", default=None, help="comma-separated (default: lenet)")
    p.add_argument("--iterations", type=int, default=None, help="IG budget (default 300, quick 50)")
    p.add_argument("--images", type=int, default=None, help="held-out images attacked (default 8, quick 2)")
    args = p.parse_args(argv)
    run_ = common.begin("defenses", args)
    args.iterations = args.iterations or (50 if args.quick else 300)
    args.images = args.images or (2 if args.quick else 8)
    models = (args.models or "lenet").split(",")
    t = time.perf_counter()
    rows = []
    for m in models:
        rows += run_model(m, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    frontier(rows, RESULTS / "defenses-frontier.png")
    common.finish(run_, {"settings": {"quick": args.quick, "iterations": args.iterations, "images": args.images,
                                      "models": models, "seconds": time.perf_counter() - t},
                         "rows": rows})
    print(markdown(rows))


if __name__ == "__main__":
    main()
