"""The fused Adam update of batched trials (gradleak.attacks.optimization.driver.FusedAdam): T trials' Adam /
signed-Adam programs as one stacked update per round must give every trial exactly (bit for bit) what its own
program gives when fed the same evaluations: iterates, best iterate and score, history, counts, stop reasons,
and the callbacks in the same order, including trials that stop mid-run (non-finite loss, non-finite
gradient, explosion) and per-trial projections (different boxes; one that replaces its variable).
"""

import math
import warnings

import pytest
import torch

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization.driver import (BoxProjection, DivergenceWarning, FusedAdam, evaluate,
                                                  trial_program)
from test_batched_trials import cases  # noqa: F401 (the fixture: three float64 LeNet cases)

N = 6
SHAPES = ((1, 3, 5, 7), (1, 5))  # 105 and 5 elements: not multiples of any vector width


def _objective(t: int, calls: list[int], dtype):
    """Trial t's objective (a smooth non-convex function of both variables). Trial 2's loss is NaN from its
    7th evaluation, trial 3's gradient is infinite at its 5th, trial 4's loss jumps x1000 at its 9th
    (explode_factor 100). ``calls[t]`` counts trial t's evaluations (both feeds call each trial in turn)."""
    g = torch.Generator().manual_seed(100 + t)
    c = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]

    def objective(v):
        calls[t] += 1
        k = calls[t]
        x, y = v
        if t == 3 and k == 5:
            x = x * 1.0
            x.register_hook(lambda q: q * float("inf"))
        total = ((x - c[0]) ** 2).sum() + 0.3 * torch.sin(3 * x).sum() + ((y - c[1]) ** 2 * (1 + y ** 2)).sum()
        if t == 2 and k >= 7:
            total = total * float("nan")
        if t == 4 and k == 9:
            total = total * 1000.0
        return total, (x - c[0]).abs().mean()

    return objective


def _project(t: int, boxes: str = "closures"):
    """Per-trial boxes; trial 1 replaces its variable (not in place), trial 5 has none. ``boxes``: the others
    are closures ("closures"), or BoxProjections (which the fused update clamps together where their values
    agree): "mixed": trials 0, 3 and 4 share a tensor box, trial 2 has its own (float) box; "one": every trial
    has the same tensor box (one clamp over all rows, the case the batched IG runs)."""
    lo, hi = -0.4 - 0.1 * t, 0.5 + 0.05 * t
    shared = (torch.linspace(-0.6, -0.4, 7), torch.linspace(0.3, 0.6, 7))  # per column of the (1, 3, 5, 7) x
    if boxes == "one":
        return BoxProjection(*shared)
    if t == 5:
        return None
    if t == 1:
        def replace(v):
            v[0] = v[0].clamp(lo, hi)
        return replace
    if boxes == "mixed":
        return BoxProjection(lo, hi) if t == 2 else BoxProjection(*(b.clone() for b in shared))

    def box(v):
        v[0].clamp_(lo, hi)
    return box


def _starts(dtype):
    g = torch.Generator().manual_seed(0)
    return [[2 * torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(N)]


def _logger(log, t):
    def on_step(step, total, best):
        log.append(("step", t, step, total, best))

    def on_offer(score, v):
        log.append(("offer", t, score, [x.clone() for x in v]))
    return on_step, on_offer


def _programs(settings, dtype, log, boxes="closures"):
    calls = [0] * N
    objs = [_objective(t, calls, dtype) for t in range(N)]
    out = []
    for t, start in enumerate(_starts(dtype)):
        on_step, on_offer = _logger(log, t)
        out.append(trial_program(start, **settings, project=_project(t, boxes), on_step=on_step, on_offer=on_offer,
                                 name=f"trial {t}"))
    pending = {t: next(p) for t, (_, p) in enumerate(out)}
    while pending:  # in lockstep, trial by trial (as batched.py's program loop)
        for t in list(pending):
            try:
                pending[t] = out[t][1].send(evaluate(objs[t], *pending[t]))
            except StopIteration:
                del pending[t]
    return [trial for trial, _ in out]


def _fused(settings, dtype, log, boxes="closures"):
    calls = [0] * N
    objs = [_objective(t, calls, dtype) for t in range(N)]
    trials = [trial_program(s, **settings)[0] for s in _starts(dtype)]  # fresh Trial records
    hooks = [_logger(log, t) for t in range(N)]
    f = FusedAdam(_starts(dtype), trials, projects=[_project(t, boxes) for t in range(N)],
                  on_steps=[h[0] for h in hooks], on_offers=[h[1] for h in hooks],
                  names=[f"trial {t}" for t in range(N)], **settings)
    while (req := f.request()) is not None:
        xs, need_grad = req
        res = [evaluate(objs[t], [x[r] for x in xs], need_grad) for r, t in enumerate(f.running)]
        grads = None
        if need_grad:
            grads = [torch.stack([g[j] if g is not None else torch.full_like(x[r], float("nan"))
                                  for r, (_, _, g) in enumerate(res)]) for j, x in enumerate(xs)]
        f.receive([r[0] for r in res], [r[1] for r in res], grads)
    return trials


def _same_log(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert ea[:-1] == eb[:-1] if ea[0] == "offer" else ea == eb
        if ea[0] == "offer":
            assert all(torch.equal(x, y) for x, y in zip(ea[-1], eb[-1]))


@pytest.mark.parametrize("boxes", ["closures", "mixed", "one"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("settings", [
    dict(optimizer="signed-adam", max_iterations=16, lr=0.1, explode_factor=100.0, offer_every=3),
    dict(optimizer="adam", max_iterations=13, lr=0.05, decay=False, offer_every=4, explode_factor=100.0,
         schedule=lambda step: 1.0 / (1 + step)),
])
def test_fused_adam_equals_each_trials_own_program_bit_for_bit(dtype, settings, boxes):
    log_p, log_f = [], []
    with warnings.catch_warnings(record=True) as wp:
        warnings.simplefilter("always")
        programs = _programs(settings, dtype, log_p, boxes)
    with warnings.catch_warnings(record=True) as wf:
        warnings.simplefilter("always")
        fused = _fused(settings, dtype, log_f, boxes)
    stops = [t.stop for t in programs]
    assert stops[2] == "diverged: non-finite loss" and stops[3] == "diverged: non-finite gradient"
    assert stops[4] == "diverged: exploded" and stops[0] == "budget"
    for a, b in zip(programs, fused):
        assert (a.stop, a.diverged_at, a.iterations, a.outer_steps, a.evaluations) == \
            (b.stop, b.diverged_at, b.iterations, b.outer_steps, b.evaluations)
        assert a.history == b.history and a.score == b.score and a.finite
        assert all(torch.equal(x, y) for x, y in zip(a.variables, b.variables))
    _same_log(log_p, log_f)  # every on_step / on_offer, with its values, in the same order
    assert [str(w.message) for w in wp if w.category is DivergenceWarning] == \
        [str(w.message) for w in wf if w.category is DivergenceWarning]


def test_fused_adam_rejects_what_it_does_not_run():
    start = [[torch.zeros(2)]]
    common = dict(projects=[None], on_steps=[None], on_offers=[None], names=["t"])
    with pytest.raises(ValueError, match="signed-adam"):
        FusedAdam(start, [trial_program(start[0], optimizer="lbfgs", max_iterations=1, lr=1)[0]],
                  optimizer="lbfgs", max_iterations=1, lr=1.0, **common)
    with pytest.raises(TypeError, match="unknown settings"):
        FusedAdam(start, [trial_program(start[0], optimizer="adam", max_iterations=1, lr=1)[0]],
                  optimizer="adam", max_iterations=1, lr=1.0, momentum=0.9, **common)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ig_batched_with_the_fused_update_equals_the_batched_programs_bit_for_bit(monkeypatch, cases,
                                                                                   dtype):
    """IG (signed Adam, boxed, 3 cases x 2 restarts) through reconstruct_many: the fused update and the
    per-trial programs, fed by the same batched objective, give identical reconstructions and histories."""
    cases = [c.to(dtype) for c in cases]
    attack = gl.create("ig", optimizer="signed-adam", max_iterations=12, restarts=2, tv=1e-4)
    fused = B.reconstruct_many(attack, cases, seeds=[0, 1, 2])
    monkeypatch.setattr(B, "FUSE_ADAM", False)
    programs = B.reconstruct_many(attack, cases, seeds=[0, 1, 2])
    for a, b in zip(fused, programs):
        assert a.info["batched"]["update"].startswith("fused") and "update" not in b.info["batched"]
        assert torch.equal(a.inputs, b.inputs) and a.history == b.history and a.residual == b.residual
        assert a.info["scores"] == b.info["scores"] and a.info["restarts"][0]["stop"] == "budget"


def test_a_nan_trial_in_the_fused_batch_leaves_the_others_bit_for_bit(monkeypatch, cases):
    """A trial that starts at NaN stops at step 0 in the fused batch (its rows leave it); the others equal
    the per-trial programs' run of the same batch."""
    from test_batched_trials import _setup, _starts as starts_of

    case = cases[0]
    starts = starts_of(case, 3)
    mixed = [starts[0], [torch.full_like(starts[0][0], float("nan"))], starts[1], starts[2]]
    with pytest.warns(DivergenceWarning):
        (fused, note), = B.run_setups([_setup(case, mixed)])
    monkeypatch.setattr(B, "FUSE_ADAM", False)
    with pytest.warns(DivergenceWarning):
        (programs, _), = B.run_setups([_setup(case, mixed)])
    assert note["update"].startswith("fused") and fused[1].stop == "diverged: non-finite loss"
    for a, b in zip(fused, programs):
        assert (a.stop, a.diverged_at, a.iterations, a.evaluations, a.history) == \
            (b.stop, b.diverged_at, b.iterations, b.evaluations, b.history)
        assert a.score == b.score or (math.isinf(a.score) and math.isinf(b.score))
        assert (a.variables is None and b.variables is None) or torch.equal(a.variables[0], b.variables[0])


def test_a_batched_failure_after_the_first_round_goes_on_one_by_one(monkeypatch, cases):
    """If the batched objective fails in a later round, the fused trials go on from their own objectives
    (their state kept): the results are the sequential run's, and the note says why."""
    from test_batched_trials import _compare, _setup, _starts as starts_of

    case = cases[0]
    starts = starts_of(case, 3)
    real, calls = B.BatchedObjective.stacked, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, *a, **k)

    monkeypatch.setattr(B.BatchedObjective, "stacked", failing)
    (trials, note), = B.run_setups([_setup(case, starts)])
    (seq, _), = B.run_setups([_setup(case, starts, batched=False)])
    assert len(calls) == 3 and note["batched"] is False
    assert note["reason"].startswith("vmap could not run the objective (RuntimeError: out of memory")
    _compare(trials, seq, 1e-9)
