"""Throughput of the optimisation attacks: T independent reconstructions batched (one vmap computation per
step, gradleak.attacks.optimization.reconstruct_many) vs one after the other, at equal iterations.

Each configuration (model, T, mode) runs in a FRESH child process (so ``resource.getrusage`` max RSS is its
own peak; torch's CPU allocations are invisible to tracemalloc): it builds T single-photo FedSGD cases on one
model (photo i mod 19 of the bundled photos, seed i), times IG (signed Adam, the ConvNet/ResNet default;
TV 1e-4) on all of them, and reports reconstructions per minute, the mean PSNR, and the peak RSS above the
process's RSS after building the cases (per trial: divided by T). Batched and sequential children of one
configuration run back to back. One torch thread. Wall time is the figure (reconstructions per minute);
the process and thread CPU time of both are recorded too (``speedup_cpu_time``, the pairs' thread CPU time
ratios), and the minor page faults of the timed run: on a shared machine the wall time also counts the time
other processes held the cores. Target: batched >= 4x sequential at 16 trials on lenet,
>= 2x on convnet (width 16).

A profile of one IG step (sequential, batch 1) on resnet18 lists the top operations by self CPU time and
the autograd nodes of the double backward (which one sets the floor); a profile of one batched objective
round (16 trials, every model) lists its top operations next to the 16 sequential evaluations' time; each
batched run splits its time into the shared objective, the trials' programs (optimiser steps, stop rules)
and the setup (the attack's capture and replay passes).

Each configuration's batched/sequential pair runs ``--repeats`` times alternately (default 3 with --at-budget,
1 otherwise; on a shared machine the load drifts between the two children of one pair); the speedup
reported is the median pair's, all pairs' speedups and the load average at the end of each child are recorded.

``--parametrize`` (default 'pixel', the figures above) gives every trial IG's image parametrisation, e.g.
'laplacian-6' (the pyramid IG's 'auto' picks on eval-mode ResNets at 32 px), and ``--models`` / ``--trials`` /
``--iterations`` replace the grid (no profiles then); ``--name`` names the JSON.

Run:  python benchmarks/bench_throughput.py [--quick | --at-budget] [--repeats N]
      python benchmarks/bench_throughput.py --parametrize laplacian-6 --models resnet20 --trials 4,16
          --iterations 50 --repeats 3 --name throughput-pyramid
Writes benchmarks/results/throughput.json (--at-budget: throughput-budget.json; --name NAME: NAME.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import common

MODELS = {"lenet": {}, "convnet-16": {"width": 16}, "resnet20": {}, "resnet18": {}}
ZOO = {"lenet": "lenet", "convnet-16": "convnet", "resnet20": "resnet20", "resnet18": "resnet18"}
# iterations per model (equal for both modes) and the trial counts run: chosen so the full grid finishes in
# ~15 minutes on one core; resnet18 at 64 trials is left out (~3 minutes per mode here).
FULL = {"lenet": (40, (1, 4, 16, 64)), "convnet-16": (6, (1, 4, 16, 64)), "resnet20": (6, (1, 4, 16, 64)),
        "resnet18": (2, (1, 4, 16))}
QUICK = {"lenet": (10, (1, 4, 16)), "convnet-16": (3, (1, 4, 16))}
# --at-budget: the two target configurations at iteration counts an attack really runs (the audit's quick IG
# budget is 1,000), where the per-case setup of a batched run (capture and replay passes) is amortised;
# writes throughput-budget.json
AT_BUDGET = {"lenet": (300, (16,)), "convnet-16": (50, (16,))}
TARGETS = {"lenet": 4.0, "convnet-16": 2.0}  # the speedups asked at 16 trials


def child(model: str, trials: int, mode: str, iterations: int, parametrize: str = "pixel") -> dict:
    """One configuration, in this (fresh) process."""
    torch.set_num_threads(1)
    import gradleak as gl
    from gradleak.attacks.optimization import batched as B
    from gradleak.attacks.optimization import reconstruct_many

    photos = gl.data.samples(32)
    net = gl.models.build(ZOO[model], input_shape=(3, 32, 32), num_classes=19, seed=0, **MODELS[model])
    cases, truths = [], []
    for i in range(trials):
        x, y = photos.batch(1, i % len(photos))
        case, truth = gl.simulate(net, x, y, spec=photos.spec)
        cases.append(case)
        truths.append(truth.inputs)
    # pinned, not 'auto': the same IG on every model (on the ResNets 'auto' picks TV 1e-2 and the pyramid; this
    # benchmark measures the batched engine against the same trials run alone): 'pixel' unless --parametrize,
    # and the paper's step decay (schedule 'auto' gives a pyramid warm-up plus cosine decay)
    opts = dict(optimizer="signed-adam", max_iterations=iterations, tv=1e-4, parametrize=parametrize,
                schedule="step")
    attack = gl.create("ig", **opts)
    seeds = list(range(trials))
    # warm-up on one case (first-use costs of torch.func / the autograd engine are not throughput)
    warm = gl.create("ig", **{**opts, "max_iterations": 1})
    if mode == "batched":
        reconstruct_many(warm, cases[:2], seeds=list(range(len(cases[:2]))))
    else:
        warm.reconstruct(cases[0], seed=0)
    split = {"objective": 0.0, "round_loop": 0.0}
    if mode == "batched":  # where the batched time goes: the shared objective, the trials' programs, the rest
        _time_into(B.BatchedObjective, "stacked", split, "objective")
        _time_into(B, "_run_group", split, "round_loop")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
    if mode == "batched":
        recs = reconstruct_many(attack, cases, seeds=seeds)
    else:
        recs = [attack.reconstruct(c, seed=s) for c, s in zip(cases, seeds)]
    seconds, cpu, thread = time.perf_counter() - t, time.process_time() - c0, time.thread_time() - th0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    psnr = [float(gl.metrics.psnr(r.inputs, tr)[0]) for r, tr in zip(recs, truths)]
    note = recs[0].info.get("batched", {})
    if mode == "batched":
        split = {"objective_seconds": split["objective"],
                 "trial_programs_seconds": split["round_loop"] - split["objective"],
                 "setup_and_assembly_seconds": seconds - split["round_loop"]}
    else:
        split = None
    return {"model": model, "trials": trials, "mode": mode, "iterations": iterations,
            "parametrize": recs[0].info.get("parametrize"), "seconds": seconds,
            "cpu_seconds": cpu, "thread_cpu_seconds": thread, "minor_page_faults": faults,
            "reconstructions_per_minute": 60.0 * trials / seconds, "psnr": psnr,
            "psnr_mean": sum(psnr) / len(psnr), "rss_after_cases_bytes": base, "peak_rss_bytes": peak,
            "peak_above_base_per_trial_bytes": max(peak - base, 0) / trials, "time_split": split,
            "batched_note": {k: note.get(k) for k in ("batched", "engine", "chunk", "trials_in_batch", "reason",
                                                     "stacked_problems", "memory_per_trial_estimate",
                                                     "steady_heap")}}


def _time_into(owner, name: str, acc: dict, key: str) -> None:
    """Wrap ``owner.name`` so that its wall time adds up in ``acc[key]`` (this child process only)."""
    real = getattr(owner, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t

    setattr(owner, name, timed)


def run_child(model: str, trials: int, mode: str, iterations: int, parametrize: str = "pixel") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    src = str(common.ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--child", model, str(trials), mode, str(iterations),
                          parametrize],
                         capture_output=True, text=True, env=env, cwd=common.ROOT, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"child {model} {trials} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_resnet18(top: int = 15) -> dict:
    """Top ops (self CPU) of one sequential IG step on resnet18 at batch 1, and the autograd nodes' totals."""
    from torch.profiler import ProfilerActivity, profile

    import gradleak as gl
    from gradleak.attacks.optimization import common as C

    photos = gl.data.samples(32, num_images=1)
    net = gl.models.build("resnet18", input_shape=(3, 32, 32), num_classes=19, seed=0)
    x, y = photos.batch(1)
    case, _ = gl.simulate(net, x, y, spec=photos.spec)
    matcher = C.GradientMatcher(case)

    def step(v):
        v = v.detach().requires_grad_(True)
        data, _ = matcher.terms(v, y)
        total = data + 1e-4 * C.total_variation(v)
        return torch.autograd.grad(total, [v])[0]

    x0 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    step(x0)
    t = time.perf_counter()
    step(x0)
    seconds = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x0)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1
    ops = sorted(ev, key=lambda e: -e.self_cpu_time_total)
    rows = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in ops[:top]]
    nodes = sorted([e for e in ev if "Backward" in e.key], key=lambda e: -e.cpu_time_total)
    node_rows = [{"node": e.key, "cpu_total_ms": e.cpu_time_total / 1e3, "calls": e.count} for e in nodes[:8]]
    return {"ig_step_seconds_unprofiled": seconds, "self_cpu_total_ms": total / 1e3, "top_ops": rows,
            "autograd_nodes": node_rows}


def profile_batched_round(model: str, trials: int, top: int = 12) -> dict:
    """Top ops (self CPU) of one batched objective round (all ``trials`` trials, value and gradient)."""
    from torch.profiler import ProfilerActivity, profile

    import gradleak as gl
    from gradleak.attacks.optimization import batched as B
    from gradleak.attacks.optimization import common as C

    photos = gl.data.samples(32)
    net = gl.models.build(ZOO[model], input_shape=(3, 32, 32), num_classes=19, seed=0, **MODELS[model])
    setups = []
    for i in range(trials):
        x, y = photos.batch(1, i % len(photos))
        case, _ = gl.simulate(net, x, y, spec=photos.spec)
        m = C.GradientMatcher(case)

        def objective(v, m=m, case=case):
            data, cos = m.terms(v[0], case.labels)
            return data + 1e-4 * C.total_variation(v[0]), cos

        start = [C.randn((1, *case.spec.shape), torch.Generator().manual_seed(i), case)]
        setups.append(B.TrialSetup(case=case, matcher=m, labels=case.labels, objective=objective,
                                   starts=[start], settings=dict(optimizer="signed-adam"), tv=1e-4))
    engine = B.BatchedObjective(setups)
    requests = [(s.starts[0], True) for s in setups]
    sidx = list(range(trials))
    engine(sidx, requests)
    t = time.perf_counter()
    engine(sidx, requests)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    for s in setups:
        B.evaluate(s.objective, s.starts[0], True)
    sequential = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine(sidx, requests)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1
    ops = sorted(ev, key=lambda e: -e.self_cpu_time_total)
    rows = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in ops[:top]]
    return {"model": model, "trials": trials, "engine": engine.engine, "round_seconds_unprofiled": seconds,
            "sequential_evaluations_seconds": sequential, "self_cpu_total_ms": total / 1e3, "top_ops": rows}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, trials, mode, iterations = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        print(json.dumps(child(model, trials, mode, iterations, sys.argv[6])))
        return
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--quick", action="store_true", help="lenet and convnet-16 at 1, 4, 16 trials, few iterations")
    ap.add_argument("--at-budget", action="store_true",
                    help="lenet (300 iterations) and convnet-16 (50) at 16 trials; writes throughput-budget.json")
    ap.add_argument("--repeats", type=int, default=None,
                    help="batched/sequential pairs per configuration, run alternately (default 3 with "
                         "--at-budget, else 1); the speedup reported is the median pair's")
    ap.add_argument("--parametrize", default="pixel",
                    help="IG's image parametrisation for every trial: 'pixel' (default) or 'laplacian-K'")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}: replaces the grid")
    ap.add_argument("--trials", default=None, help="with --models: comma-separated trial counts (default the grid's)")
    ap.add_argument("--iterations", type=int, default=None, help="with --models: iterations (default the grid's)")
    ap.add_argument("--name", default=None, help="the JSON's name (default throughput, throughput-budget)")
    args = ap.parse_args()
    repeats = args.repeats if args.repeats is not None else (3 if args.at_budget else 1)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    from gradleak.attacks.optimization import parametrize as Z

    if Z.problems(args.parametrize):
        ap.error(Z.problems(args.parametrize)[0])
    grid = AT_BUDGET if args.at_budget else QUICK if args.quick else FULL
    if args.models:
        unknown = [m for m in args.models.split(",") if m not in MODELS]
        if unknown:
            ap.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
        try:
            counts = tuple(int(t) for t in args.trials.split(",")) if args.trials else None
        except ValueError:
            ap.error(f"--trials must be comma-separated ints, got {args.trials!r}")
        if (args.iterations is not None and args.iterations < 1) or (counts and min(counts) < 1):
            ap.error("--iterations and --trials must be >= 1")
        grid = {m: (args.iterations or FULL[m][0], counts or FULL[m][1]) for m in args.models.split(",")}
    elif args.trials or args.iterations:
        ap.error("--trials and --iterations go with --models")
    run_ = common.begin(args.name or ("throughput-budget" if args.at_budget else "throughput"), args)
    rows, pairs = [], []
    for model, (iterations, counts) in grid.items():
        for trials in counts:
            tries = []
            for _ in range(repeats):  # alternately: batched, sequential, batched, ... (the load drifts)
                pair = {}
                for mode in ("batched", "sequential"):
                    r = run_child(model, trials, mode, iterations, args.parametrize)
                    r["load_average_after"] = list(os.getloadavg())
                    rows.append(r)
                    pair[mode] = r
                pair["speedup"] = pair["batched"]["reconstructions_per_minute"] / pair["sequential"][
                    "reconstructions_per_minute"]
                tries.append(pair)
            pair = sorted(tries, key=lambda q: q["speedup"])[len(tries) // 2]  # the median pair
            b, s = pair["batched"], pair["sequential"]
            speedup = pair["speedup"]
            dpsnr = max(abs(x - y) for x, y in zip(b["psnr"], s["psnr"]))
            pairs.append({"model": model, "trials": trials, "iterations": iterations, "speedup": speedup,
                          "parametrize": b["parametrize"],
                          "speedups_of_all_pairs": [q["speedup"] for q in tries],
                          "speedups_cpu_time_of_all_pairs": [q["sequential"]["cpu_seconds"] /
                                                             q["batched"]["cpu_seconds"] for q in tries],
                          "speedups_thread_cpu_time_of_all_pairs": [q["sequential"]["thread_cpu_seconds"] /
                                                                    q["batched"]["thread_cpu_seconds"] for q in tries],
                          "pairs_at_target": sum(q["speedup"] >= TARGETS.get(model, 0) for q in tries),
                          "load_averages_of_all_pairs": [[q[m]["load_average_after"][0] for m in
                                                          ("batched", "sequential")] for q in tries],
                          "load_average_of_pair": b["load_average_after"],
                          "speedup_cpu_time": s["cpu_seconds"] / b["cpu_seconds"],
                          "engine": b["batched_note"].get("engine"),
                          "batched_per_minute": b["reconstructions_per_minute"],
                          "sequential_per_minute": s["reconstructions_per_minute"],
                          "psnr_batched": b["psnr_mean"], "psnr_sequential": s["psnr_mean"],
                          "psnr_max_abs_difference": dpsnr,
                          "peak_per_trial_batched_mb": b["peak_above_base_per_trial_bytes"] / 1e6,
                          "peak_per_trial_sequential_mb": s["peak_above_base_per_trial_bytes"] / 1e6,
                          "chunk": b["batched_note"].get("chunk")})
            p = pairs[-1]
            print(f"{model:10s} T={trials:3d} it={iterations:3d}  (median of {repeats}: "
                  f"{', '.join(f'{q:.2f}' for q in p['speedups_of_all_pairs'])}; thread CPU time "
                  f"{', '.join(f'{q:.2f}' for q in p['speedups_thread_cpu_time_of_all_pairs'])}; "
                  f"{p['pairs_at_target']} of {repeats} at target; load {b['load_average_after'][0]:.1f})",
                  flush=True)
            print(f"{model:10s} T={trials:3d} it={iterations:3d}  batched {p['batched_per_minute']:8.1f}/min  "
                  f"sequential {p['sequential_per_minute']:8.1f}/min  x{speedup:5.2f} (CPU time "
                  f"x{p['speedup_cpu_time']:5.2f})  PSNR {p['psnr_batched']:.2f} "
                  f"vs {p['psnr_sequential']:.2f} (max diff {dpsnr:.1e})  peak/trial {p['peak_per_trial_batched_mb']:.1f}"
                  f" vs {p['peak_per_trial_sequential_mb']:.1f} MB", flush=True)
    sections = {"targets": {"lenet_16_trials": ">= 4x", "convnet-16_16_trials": ">= 2x"},
                "parametrize": args.parametrize, "pairs": pairs, "runs": rows}
    target = {(p["model"], p["trials"]): p["speedup"] for p in pairs}
    sections["met"] = {"lenet_16_trials": target.get(("lenet", 16), 0) >= 4,
                       "convnet-16_16_trials": target.get(("convnet-16", 16), 0) >= 2}
    if not (args.quick or args.at_budget or args.models):
        torch.set_num_threads(1)
        sections["profile_resnet18_ig_step"] = profile_resnet18()
        sections["profile_batched_round"] = [profile_batched_round(m, 16) for m in MODELS]
    common.finish(run_, sections)


if __name__ == "__main__":
    main()
