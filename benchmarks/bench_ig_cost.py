"""Cost of one Inverting-Gradients step relative to one training step of the same model and batch.

One IG step = what the attack's loop does per iteration: the candidate's gradient with create_graph, the
cosine objective + TV, the gradient of that w.r.t. the input (double backward), the signed Adam update and the
box clamp (gradleak.attacks.optimization.common.run_adam with the attack's objective).
One training step = the usual ``model.zero_grad(); loss_fn(model(x), y).backward()`` on the nn.Module
("module" baseline, the stricter one), and the same through torch.func.functional_call ("functional").

Models at 3x32x32, 19 classes, untrained (zoo seed 0), BatchNorm in eval mode, batch 1 and 4, one thread.
Measurements interleave the kinds of step in rounds and take medians, so a shared, busy machine affects
them alike; each is timed in wall time and in the thread's CPU time (``cpu``). Target: ratio <= 3.

"bare": the double backward alone, as the IG step runs it (the update with create_graph, a fixed linear function
of it, its gradient w.r.t. the input: torch's kernels, none of the cosine / TV / Adam work): the floor of a step.

The "profile" section: torch.profiler over IG steps, bare double backwards and training steps of resnet18 at
batch 1 (one thread), the operators with the most self time per step and their share, convolutions grouped by
input shape (the weight term of torch's convolution double backward runs as a convolution of (C_in, B, H, W)
inputs).

Run:  python benchmarks/bench_ig_cost.py [--quick] [--no-profile]
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


def _both(fn, n):
    """(wall seconds, this thread's CPU seconds) per call of ``fn``."""
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n, (time.thread_time() - c) / n


def steps(name, opts, batch):
    """(case, training step (nn.Module), training step (functional), ig(n): n IG steps) of one zoo model."""
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

    def ig(n, on_step=None):
        C.run_adam(objective, [x0], steps=n, lr=0.1, project=project, on_step=on_step)

    bare = bare_double_backward(matcher, x0, y)

    return case, train_module, train_functional, ig, bare


def bare_double_backward(matcher, x0, y):
    """The double backward alone, as the IG step runs it (the matcher's model, its split convolutions): the
    update with create_graph, a fixed linear function of it (whose gradient is given, not computed), its
    gradient w.r.t. the input. None of the step's other work (cosine, TV, Adam, clamp, the driver). Returns a
    function of no arguments that runs one."""
    coef = [torch.randn(g.shape, generator=torch.Generator().manual_seed(1)) for g in matcher.update(x0, y)]

    def bare():
        xl = x0.clone().requires_grad_(True)
        torch.autograd.grad(_Linear.apply(coef, *matcher.update(xl, y)), xl)

    return bare


class _Linear(torch.autograd.Function):
    """sum_l <c_l, g_l> with the fixed c_l as its gradient (no parameter-sized work of its own)."""

    @staticmethod
    def forward(ctx, coef, *gs):
        ctx.coef = coef
        return sum(torch.dot(c.reshape(-1), g.reshape(-1)) for c, g in zip(coef, gs))

    @staticmethod
    def backward(ctx, go):
        return (None, *ctx.coef)


def measure(name, opts, batch, rounds, budget):
    case, train_module, train_functional, ig, bare = steps(name, opts, batch)
    for f in (train_module, train_functional, bare):
        f()
    ig(2)
    # calibrate the number of repetitions so one round of each takes ~budget seconds
    t_train = _both(train_module, 3)[0]
    n = max(3, int(budget / max(t_train, 1e-4)))
    n_ig = max(2, n // 3)
    rows = {"module": [], "functional": [], "bare": [], "ig": []}
    cpu = {"module": [], "bare": [], "ig": []}
    for _ in range(rounds):
        for key, fn, reps in (("module", train_module, n), ("functional", train_functional, n), ("bare", bare, n_ig)):
            wall, thread = _both(fn, reps)
            rows[key].append(wall)
            if key in cpu:
                cpu[key].append(thread)
        stamps = []
        ig(n_ig + 1, on_step=lambda s, a, b: stamps.append((time.perf_counter(), time.thread_time())))
        rows["ig"].append((stamps[-1][0] - stamps[0][0]) / n_ig)
        cpu["ig"].append((stamps[-1][1] - stamps[0][1]) / n_ig)
    med = {k: statistics.median(v) for k, v in rows.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "model": name, "batch": batch, "params": sum(p.numel() for p in case.parameters.values()),
        "train_module_s": med["module"], "train_functional_s": med["functional"], "ig_step_s": med["ig"],
        "ratio_vs_module": med["ig"] / med["module"], "ratio_vs_functional": med["ig"] / med["functional"],
        "bare_double_backward_s": med["bare"], "bare_ratio_vs_module": med["bare"] / med["module"],
        # the same from this thread's CPU time (time.thread_time: one torch thread runs in it), which the
        # other processes of a shared machine disturb far less than wall time
        "cpu": {"train_module_s": mc["module"], "ig_step_s": mc["ig"], "bare_double_backward_s": mc["bare"],
                "ratio_vs_module": mc["ig"] / mc["module"], "bare_ratio_vs_module": mc["bare"] / mc["module"]},
        "rounds": rounds, "reps_per_round": n,
    }


def _top(prof, n_steps, rows=12):
    """The operators with the most self time per step (convolutions split by input shape)."""
    ka = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in ka)
    out = []
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:rows]:
        shapes = [list(s) for s in (e.input_shapes or [])[:2] if s]
        out.append({"op": e.key, "input_shapes": shapes, "calls_per_step": e.count / n_steps,
                    "ms_per_step": e.self_cpu_time_total / 1e3 / n_steps, "share": e.self_cpu_time_total / total})
    return {"profiled_ms_per_step": total / 1e3 / n_steps, "top": out}


def profile(name="resnet18", batch=1, n=5):
    """torch.profiler over ``n`` IG steps and ``3 n`` training steps (profiler overhead included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, train_module, _, ig, bare = steps(name, {}, batch)
    train_module()
    bare()
    ig(2)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p_ig:
        ig(n)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p_bare:
        for _ in range(n):
            bare()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p_train:
        for _ in range(3 * n):
            train_module()
    return {"model": name, "batch": batch, "ig_step": _top(p_ig, n), "bare_double_backward": _top(p_bare, n),
            "training_step": _top(p_train, 3 * n)}


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a rough look)")
    ap.add_argument("--no-profile", action="store_true", help="skip the resnet18 profile")
    args = ap.parse_args()
    run_ = common.begin("ig_cost", args)
    rounds, budget = (2, 0.3) if args.quick else (5, 1.5)
    out = []
    for name, opts in MODELS:
        for batch in (1, 4):
            r = measure(name, opts, batch, rounds, budget)
            out.append(r)
            print(f"{name:10s} B={batch}  train {r['train_module_s'] * 1e3:8.2f} ms  IG step {r['ig_step_s'] * 1e3:8.2f} ms"
                  f"  ratio {r['ratio_vs_module']:.2f} (vs functional {r['ratio_vs_functional']:.2f}; the bare double"
                  f" backward {r['bare_ratio_vs_module']:.2f}); CPU time: ratio {r['cpu']['ratio_vs_module']:.2f},"
                  f" bare {r['cpu']['bare_ratio_vs_module']:.2f}", flush=True)
    sections = {"target": "ig_step / training_step <= 3", "results": out,
                "max_ratio_vs_module": max(r["ratio_vs_module"] for r in out)}
    if not args.no_profile:
        sections["profile"] = profile()
        for kind in ("ig_step", "bare_double_backward", "training_step"):
            top = sections["profile"][kind]["top"][:5]
            print(kind, "; ".join(f"{t['op']} {t['input_shapes'][:1]} {t['ms_per_step']:.1f} ms ({t['share']:.0%})"
                                  for t in top))
    common.finish(run_, sections)


if __name__ == "__main__":
    main()
