"""Cost of one Inverting-Gradients step relative to one training step of the same model and batch.

One IG step = what the attack's loop does per iteration: the candidate's gradient with create_graph, the
cosine objective + TV, the gradient of that w.r.t. the input (double backward), the signed Adam update and the
box clamp (gradleak.attacks.optimization.common.run_adam with the attack's objective).
One training step = the usual ``model.zero_grad(); loss_fn(model(x), y).backward()`` on the nn.Module
("module" baseline, the stricter one), and the same through torch.func.functional_call ("functional").

Models at 3x32x32, 19 classes, untrained (zoo seed 0), BatchNorm in eval mode, batch 1 and 4, one thread.
Measurements interleave the two kinds of step in rounds and take medians, so a shared, busy machine affects
both alike. Target: ratio <= 3.

Run:  python benchmarks/bench_ig_cost.py [--quick]
Writes benchmarks/results/ig_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
import gradleak as gl
from gradleak import functional as Fn
from gradleak.attacks.optimization import common as C

MODELS = [("lenet", {}), ("convnet", {}), ("resnet20", {}), ("resnet18", {})]


def _timed(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def measure(name, opts, batch, rounds, budget):
    photos = gl.data.samples(32, num_images=max(batch, 1))
    model = gl.models.build(name, input_shape=(3, 32, 32), num_classes=19, **opts)
    x, y = photos.batch(batch)
    case, _ = gl.simulate(model, x, y, spec=photos.spec)

    # training step, nn.Module style
    net = gl.models.build(name, input_shape=(3, 32, 32), num_classes=19, **opts)
    net.eval()
    xn = photos.spec.normalize(x)
    loss_fn = case.loss_fn

    def train_module():
        net.zero_grad(set_to_none=True)
        loss_fn(net(xn), y).backward()

    params = {k: v.detach().requires_grad_(True) for k, v in case.parameters.items()}

    def train_functional():
        loss = loss_fn(Fn.forward(case.model, params, case.buffers, xn), y)
        torch.autograd.grad(loss, list(params.values()))

    # one IG step exactly as the attack runs it
    matcher = C.GradientMatcher(case)
    lo, hi = C.box(case, torch.zeros(()))

    def objective(v):
        data, cos = matcher.terms(v[0], y)
        return data + 1e-4 * C.total_variation(v[0]), cos

    def project(v):
        v[0].clamp_(lo, hi)

    x0 = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(0))

    for f in (train_module, train_functional):
        f()
    C.run_adam(objective, [x0], steps=2, lr=0.1, project=project)
    # calibrate the number of repetitions so one round of each takes ~budget seconds
    t_train = _timed(train_module, 3)
    n = max(3, int(budget / max(t_train, 1e-4)))
    n_ig = max(2, n // 3)
    rows = {"module": [], "functional": [], "ig": []}
    for _ in range(rounds):
        rows["module"].append(_timed(train_module, n))
        rows["functional"].append(_timed(train_functional, n))
        stamps = []
        C.run_adam(objective, [x0], steps=n_ig + 1, lr=0.1, project=project,
                   on_step=lambda s, a, b: stamps.append(time.perf_counter()))
        rows["ig"].append((stamps[-1] - stamps[0]) / n_ig)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "model": name, "batch": batch, "params": sum(p.numel() for p in case.parameters.values()),
        "train_module_s": med["module"], "train_functional_s": med["functional"], "ig_step_s": med["ig"],
        "ratio_vs_module": med["ig"] / med["module"], "ratio_vs_functional": med["ig"] / med["functional"],
        "rounds": rounds, "reps_per_round": n,
    }


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a rough look)")
    args = ap.parse_args()
    run_ = common.begin("ig_cost", args)
    rounds, budget = (2, 0.3) if args.quick else (5, 1.5)
    out = []
    for name, opts in MODELS:
        for batch in (1, 4):
            r = measure(name, opts, batch, rounds, budget)
            out.append(r)
            print(f"{name:10s} B={batch}  train {r['train_module_s'] * 1e3:8.2f} ms  IG step {r['ig_step_s'] * 1e3:8.2f} ms"
                  f"  ratio {r['ratio_vs_module']:.2f} (vs functional {r['ratio_vs_functional']:.2f})", flush=True)
    common.finish(run_, {
        "target": "ig_step / training_step <= 3", "results": out,
        "max_ratio_vs_module": max(r["ratio_vs_module"] for r in out),
    })


if __name__ == "__main__":
    main()
