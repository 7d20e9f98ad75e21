"""One Inverting-Gradients step of gradleak next to one of breaching (Geiping et al.'s library), side by side.

The peer is read from its source tree, given with ``--peer PATH`` (a checkout of
https://github.com/JonasGeiping/breaching; nothing of it is installed or copied into gradleak). Its package
``__init__`` files import hydra, torchvision and its data and model zoo, which its optimisation attack does not
use; this script therefore registers empty package objects for ``breaching``, ``breaching.attacks``,
``breaching.attacks.auxiliaries``, ``breaching.cases`` and ``breaching.cases.models`` (so that those
``__init__`` files do not run) and imports the attack's own modules from their files:
``attacks/optimization_based_attack.py`` and what it imports (``base_attack``, ``auxiliaries/{common,
objectives, regularizers, augmentations, deepinversion, make_functional}``, ``cases/models/
transformer_dictionary``). Nothing is stubbed or replaced: every function the step runs is breaching's own.

Both sides attack the same model object's weights (the zoo's CIFAR ResNet-18, 3x32x32, 19 classes, untrained,
BatchNorm in eval mode: breaching receives the parameters and the buffers, as a user that sends its buffers),
the same photo, the same observed gradient and the same start. Checked before timing:
- the two compute the same candidate gradient (breaching's ``_grad_fn_single_step`` vs gradleak's matcher):
  max |difference| <= 1e-6 (float32);
- the same cosine distance (<= 1e-6) and its input gradient (relative L2 difference reported, <= 1e-3);
- one signed-Adam step with TV and the step-size decay off (a one-iteration budget would put both libraries'
  decay milestones at step 0) changes the candidate the same way: every entry moves by the same
  +-lr (then the same box clamp), except where the two input gradients have opposite signs because they are
  rounding-level small (breaching sums the cosine in float32 in one pass, gradleak divides by the largest
  |entry| first and combines the per-layer sums in float64); the share of such entries is reported (<= 1e-3).
Known differences that remain in the timed steps: the TV terms are each library's own (breaching: a
convolution with |dx| + |dy| + eps averaged, scale 0.2 as in its invertinggradients.yaml; gradleak: its
``total_variation``, weight 1e-4); breaching scores each iterate by the objective with TV, gradleak by the
cosine alone (both keep a best-so-far copy).

Timing: interleaved adjacent rounds (breaching's ``_run_trial`` for n+1 iterations, then gradleak's IG step via
``run_adam`` for n+1), per-step time from timestamps taken at each iteration (setup excluded), one thread,
medians; each in wall time and in the thread's CPU time (``cpu``). In the same rounds, gradleak's bare double
backward (``bench_ig_cost.bare_double_backward``: torch's kernels of the update and its input gradient,
without the cosine, TV or Adam): the floor of its step, as a share of breaching's step.
Target (issue 15): gradleak's step <= 0.7 x breaching's.

Run:  python benchmarks/bench_peer_step.py --peer PATH [--peer-commit SHA] [--quick]
Writes benchmarks/results/peer_step.json. Without --peer: exit 2.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import common
import gradleak as gl
from bench_ig_cost import bare_double_backward
from gradleak.attacks.optimization import common as C

LR = 0.1
PEER_TV = 0.2       # breaching's config/attack/invertinggradients.yaml
GRADLEAK_TV = 1e-4  # gradleak's IG default (tv)
MODEL = "resnet18"
PACKAGES = [("breaching", ""), ("breaching.cases", "cases"), ("breaching.cases.models", "cases/models"),
            ("breaching.attacks", "attacks"), ("breaching.attacks.auxiliaries", "attacks/auxiliaries")]


class Cfg(dict):
    """breaching reads its hydra config by attribute and by ``**``: a dict with attribute access."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


def _cfg(d):
    return Cfg({k: _cfg(v) if isinstance(v, dict) else v for k, v in d.items()})


def load_peer(root: Path):
    """breaching's OptimizationBasedAttacker from its files (package __init__ files not run; see above)."""
    pkg = root / "breaching"
    if not (pkg / "attacks" / "optimization_based_attack.py").is_file():
        raise SystemExit(f"bench_peer_step: {root} is not a breaching checkout (no "
                         "breaching/attacks/optimization_based_attack.py)")
    for name, sub in PACKAGES:
        m = types.ModuleType(name)
        m.__path__ = [str(pkg / sub)]
        sys.modules[name] = m
    mod = importlib.import_module("breaching.attacks.optimization_based_attack")
    loaded = sorted(str(Path(m.__file__).relative_to(root)) for k, m in sys.modules.items()
                    if k.startswith("breaching") and getattr(m, "__file__", None))
    digest = hashlib.sha256(b"".join((root / f).read_bytes() for f in loaded)).hexdigest()
    return mod.OptimizationBasedAttacker, loaded, digest


def peer_config(tv: float, iterations: int, decay: bool = True):
    """breaching's invertinggradients.yaml over its _default_optimization_attack.yaml (the keys the step reads)."""
    reg = {"total_variation": {"scale": tv, "inner_exp": 1, "outer_exp": 1}} if tv > 0 else {}
    return _cfg({
        "type": "invertinggradients", "attack_type": "optimization", "label_strategy": None, "init": "randn",
        "normalize_gradients": False, "differentiable_augmentations": False, "augmentations": {},
        "objective": {"type": "cosine-similarity", "scale": 1.0, "task_regularization": 0.0},
        "restarts": {"num_trials": 1, "scoring": "cosine-similarity"},
        "optim": {"optimizer": "adam", "signed": "hard", "step_size": LR, "boxed": True,
                  "max_iterations": iterations, "step_size_decay": "step-lr" if decay else None, "langevin_noise": 0.0, "warmup": 0,
                  "grad_clip": None, "callback": 10 ** 9},
        "regularization": reg,
        "impl": {"dtype": "float", "mixed_precision": False, "JIT": None},
    })


class Peer:
    """One breaching attacker on the gradleak case's model, parameters, buffers and observed gradient."""

    def __init__(self, Attacker, case, labels, tv: float, decay: bool = True):
        self.Attacker, self.case, self.labels, self.tv, self.decay = Attacker, case, labels, tv, decay
        spec = case.spec
        model = case.model
        meta = _cfg({"shape": tuple(spec.shape), "mean": list(spec.mean), "std": list(spec.std),
                     "modality": "vision", "num_data_points": case.batch_size, "labels": labels,
                     "local_hyperparams": None})
        names = [k for k, _ in model.named_parameters()]
        self.payload = [{"parameters": [p.detach() for p in model.parameters()],
                         "buffers": [b.detach() for b in model.buffers()], "metadata": meta}]
        self.shared = [{"gradients": [case.observed[k].detach() for k in names],
                        "buffers": [b.detach() for b in model.buffers()], "metadata": meta}]
        # breaching differentiates w.r.t. model.parameters(): its copy of the model has trainable parameters
        # (gradleak's case model is frozen; the weights are the same tensors' values)
        self.model = copy.deepcopy(model).requires_grad_(True)

    def attacker(self, iterations: int):
        a = self.Attacker(self.model, torch.nn.CrossEntropyLoss(), peer_config(self.tv, iterations, self.decay),
                          setup=dict(dtype=torch.float, device=torch.device("cpu")))
        rec_models, labels, stats = a.prepare_attack(self.payload, self.shared)
        a.objective.initialize(a.loss_fn, a.cfg.impl, None)
        return a, rec_models, labels, stats

    def run(self, x0: torch.Tensor, iterations: int, stamps: list | None = None) -> torch.Tensor:
        """breaching's own trial loop from x0 for ``iterations``; its returned best candidate."""
        a, rec_models, labels, stats = self.attacker(iterations)
        if stamps is not None:
            inner = a._compute_objective

            def stamped(*args, **kw):
                stamps.append((time.perf_counter(), time.thread_time()))
                return inner(*args, **kw)

            a._compute_objective = stamped
        return a._run_trial(rec_models, self.shared, labels, stats, 0, initial_data=x0.clone())


def gradleak_side(case, labels, tv: float, decay: bool = True):
    matcher = C.GradientMatcher(case)
    lo, hi = C.box(case, torch.zeros(()))

    def objective(v):
        data, cos = matcher.terms(v[0], labels)
        return (data + tv * C.total_variation(v[0]) if tv > 0 else data), cos

    def run(x0, steps, stamps=None, after=None):
        def project(v):
            v[0].clamp_(lo, hi)
            if after is not None:
                after.append(v[0].clone())
        on_step = None if stamps is None else (lambda s, a, b: stamps.append((time.perf_counter(), time.thread_time())))
        return C.run_adam(objective, [x0.clone()], steps=steps, lr=LR, project=project, on_step=on_step,
                           decay=decay)

    return matcher, run


def _per_step(stamps) -> tuple[float, float]:
    """(wall, thread CPU) seconds per step from (perf_counter, thread_time) stamps taken at each step."""
    n = len(stamps) - 1
    return (stamps[-1][0] - stamps[0][0]) / n, (stamps[-1][1] - stamps[0][1]) / n


def checks(Attacker, case, labels, x0) -> dict:
    """Same gradients, same objective, same first step (TV off) on both sides; raises if not."""
    peer = Peer(Attacker, case, labels, tv=0.0, decay=False)
    a, rec_models, plabels, _ = peer.attacker(1)
    matcher, run = gradleak_side(case, labels, tv=0.0, decay=False)
    x = x0.clone().requires_grad_(True)
    g_peer, _ = a.objective._grad_fn_single_step(rec_models[0], x, plabels)
    g_ours = matcher.update(x, labels)
    grad_diff = max(float((p - q).detach().abs().max()) for p, q in zip(g_peer, g_ours))
    if grad_diff > 1e-6:
        raise SystemExit(f"bench_peer_step: the two models' gradients differ by {grad_diff:.3g} (> 1e-6)")
    # the cosine distance and its input gradient
    xp = x0.clone().requires_grad_(True)
    obj_peer, _ = a.objective(rec_models[0], peer.shared[0]["gradients"], xp, plabels)
    (dx_peer,) = torch.autograd.grad(obj_peer.sum(), xp)
    xo = x0.clone().requires_grad_(True)
    obj_ours, _ = matcher.terms(xo, labels)
    (dx_ours,) = torch.autograd.grad(obj_ours, xo)
    obj_diff = abs(float(obj_peer) - float(obj_ours))
    dx_rel = float((dx_peer - dx_ours).norm() / dx_ours.norm())
    if obj_diff > 1e-6 or dx_rel > 1e-3:
        raise SystemExit(f"bench_peer_step: objectives differ (cosine {obj_diff:.3g}, input gradient relative "
                         f"{dx_rel:.3g})")
    # one step each, TV off
    step_peer = peer.run(x0, 1)
    after: list = []
    run(x0, 1, after=after)
    step_ours = after[0]
    moved_same = (step_peer - step_ours).abs() <= 1e-6
    opposite = torch.sign(dx_peer) != torch.sign(dx_ours)
    unexplained = int((~moved_same & ~opposite).sum())
    share = float((~moved_same).float().mean())
    if unexplained or share > 1e-3:
        raise SystemExit(f"bench_peer_step: one step moves {share:.2%} of the entries differently "
                         f"({unexplained} not explained by opposite gradient signs)")
    small = float(dx_ours.abs()[opposite].max()) if bool(opposite.any()) else 0.0
    return {"gradient_max_abs_difference": grad_diff, "cosine_abs_difference": obj_diff,
            "input_gradient_relative_difference": dx_rel,
            "first_step_entries_moved_differently": share,
            "first_step_differences_all_at_opposite_gradient_signs": unexplained == 0,
            "largest_input_gradient_where_signs_differ": small,
            "input_gradient_max_abs": float(dx_ours.abs().max())}


def main():
    ap = common.add_arguments(argparse.ArgumentParser())
    ap.add_argument("--peer", type=Path, help="a checkout of github.com/JonasGeiping/breaching")
    ap.add_argument("--peer-commit", default="", help="the peer checkout's commit, recorded in the JSON")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a rough look)")
    args = ap.parse_args()
    if args.peer is None:
        print("bench_peer_step: needs breaching's source: git clone https://github.com/JonasGeiping/breaching "
              "and pass --peer PATH (nothing of it is installed; torchvision is not needed)", file=sys.stderr)
        raise SystemExit(2)
    run_ = common.begin("peer_step", args)
    Attacker, loaded, digest = load_peer(args.peer.resolve())
    commit = args.peer_commit
    if not commit and (args.peer / ".git").exists():
        commit = subprocess.run(["git", "-C", str(args.peer), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    rounds, steps = (3, 4) if args.quick else (7, 8)
    photos = gl.data.samples(32, num_images=1)
    model = gl.models.build(MODEL, input_shape=(3, 32, 32), num_classes=19)
    x, y = photos.batch(1)
    case, _ = gl.simulate(model, x, y, spec=photos.spec)
    x0 = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    checked = checks(Attacker, case, y, x0)
    print("checks:", checked, flush=True)

    peer = Peer(Attacker, case, y, tv=PEER_TV)
    matcher, ours = gradleak_side(case, y, tv=GRADLEAK_TV)
    floor = bare_double_backward(matcher, x0, y)  # gradleak's double backward alone (no cosine, TV, Adam)
    peer.run(x0, 2)
    ours(x0, 2)
    floor()
    rows = {"breaching": [], "gradleak": [], "floor": []}
    cpu = {"breaching": [], "gradleak": [], "floor": []}
    for r in range(rounds):
        order = ("breaching", "gradleak", "floor") if r % 2 == 0 else ("floor", "gradleak", "breaching")
        for side in order:
            stamps: list = []
            if side == "breaching":
                peer.run(x0, steps + 1, stamps)
            elif side == "gradleak":
                ours(x0, steps + 1, stamps)
            else:
                stamps.append((time.perf_counter(), time.thread_time()))
                for _ in range(steps):
                    floor()
                    stamps.append((time.perf_counter(), time.thread_time()))
            wall, thread = _per_step(stamps)
            rows[side].append(wall)
            cpu[side].append(thread)
        print(f"round {r}: breaching {rows['breaching'][-1] * 1e3:.1f} ms  gradleak {rows['gradleak'][-1] * 1e3:.1f} ms"
              f"  (its double backward alone {rows['floor'][-1] * 1e3:.1f} ms); thread CPU time "
              f"{cpu['breaching'][-1] * 1e3:.1f} / {cpu['gradleak'][-1] * 1e3:.1f} / {cpu['floor'][-1] * 1e3:.1f} ms",
              flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    ratios = [g / b for g, b in zip(rows["gradleak"], rows["breaching"])]
    cpu_ratios = [g / b for g, b in zip(cpu["gradleak"], cpu["breaching"])]
    floor_ratios = [f / b for f, b in zip(cpu["floor"], cpu["breaching"])]
    ratio = med["gradleak"] / med["breaching"]
    print(f"median step: breaching {med['breaching'] * 1e3:.1f} ms, gradleak {med['gradleak'] * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (target <= 0.7); thread CPU time: ratio {mc['gradleak'] / mc['breaching']:.3f}, "
          f"median of round ratios {statistics.median(cpu_ratios):.3f}; gradleak's double backward alone / "
          f"breaching's step {statistics.median(floor_ratios):.3f}")
    common.finish(run_, {
        "target": "gradleak IG step / breaching IG step <= 0.7 (CIFAR ResNet-18, batch 1, one thread)",
        "peer": {"source": "github.com/JonasGeiping/breaching", "commit": commit or None, "files": loaded,
                 "files_sha256": digest,
                 "how": "its attack modules imported from their files; its package __init__ files (hydra, "
                        "torchvision, data) not run; nothing stubbed"},
        "model": MODEL, "batch": 1, "tv": {"breaching": PEER_TV, "gradleak": GRADLEAK_TV},
        "checks": checked,
        "steps_per_round": steps, "rounds": rounds,
        "breaching_step_s": rows["breaching"], "gradleak_step_s": rows["gradleak"], "round_ratios": ratios,
        "median_breaching_step_s": med["breaching"], "median_gradleak_step_s": med["gradleak"],
        "ratio": ratio, "median_round_ratio": statistics.median(ratios), "target_met": ratio <= 0.7,
        # the same from this thread's CPU time (one torch thread runs in it; less disturbed by other processes)
        "cpu": {"breaching_step_s": cpu["breaching"], "gradleak_step_s": cpu["gradleak"], "round_ratios": cpu_ratios,
                "ratio": mc["gradleak"] / mc["breaching"], "median_round_ratio": statistics.median(cpu_ratios)},
        # gradleak's bare double backward (bench_ig_cost.bare_double_backward: the update with create_graph and
        # its gradient w.r.t. the input, torch's kernels only), timed in the same rounds: the floor of its step
        "double_backward_alone": {"wall_s": rows["floor"], "cpu_s": cpu["floor"],
                                  "median_cpu_s": mc["floor"],
                                  "cpu_round_ratios_to_breaching_step": floor_ratios,
                                  "median_cpu_ratio_to_breaching_step": statistics.median(floor_ratios),
                                  "share_of_gradleak_step_cpu": mc["floor"] / mc["gradleak"]},
    })


if __name__ == "__main__":
    main()
