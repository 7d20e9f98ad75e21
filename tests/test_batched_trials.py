"""Batched trials (gradleak.attacks.optimization.batched) against the same trials run one by one.

Tolerance (float64): the batched objective sums in another order than the sequential one (vmap's batched
convolutions, row-wise dot products), so the two agree to rounding, not bit for bit. Signed Adam (IG):
candidates within 1e-9 and best scores within 1e-9 relative after 25 steps. L-BFGS (DLG) amplifies last-bit
differences about 10x every 10 iterations (measured on one LeNet photo: 4e-16 after 1 iteration, 2e-13 after
10, 2e-12 after 20, 2e-10 after 40, up to 7e-5 on another photo after 40): compared after 20 iterations,
within 1e-7.
"""

import math

import pytest
import torch

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization import common as C


@pytest.fixture(scope="module")
def cases():
    photos = gl.data.samples(32, num_images=3)
    model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=19, seed=0)
    out = []
    for i in range(3):
        x, y = photos.batch(1, i)
        case, _ = gl.simulate(model, x, y, spec=photos.spec)
        out.append(case.to(torch.float64))
    return out


@pytest.fixture
def spy(monkeypatch):
    """Every run_setups call's trials (per setup), to compare per-trial candidates."""
    seen = []
    real = B.run_setups

    def recording(setups, **kw):
        out = real(setups, **kw)
        seen.append([trials for trials, _ in out])
        return out

    monkeypatch.setattr(B, "run_setups", recording)
    return seen


def _flat(seen):
    return [t for call in seen for per_setup in call for t in per_setup]


def _compare(batched_trials, sequential_trials, tol):
    assert len(batched_trials) == len(sequential_trials)
    for tb, ts in zip(batched_trials, sequential_trials):
        assert tb.finite and ts.finite
        assert (tb.iterations, tb.evaluations, tb.stop) == (ts.iterations, ts.evaluations, ts.stop)
        assert tb.score == pytest.approx(ts.score, rel=tol, abs=1e-300)
        for vb, vs in zip(tb.variables, ts.variables):
            torch.testing.assert_close(vb, vs, rtol=0, atol=tol)


@pytest.mark.parametrize("attack,options,tol", [
    ("ig", dict(optimizer="signed-adam", max_iterations=25, restarts=4, tv=1e-4), 1e-9),
    ("dlg", dict(max_iterations=20, restarts=4), 1e-7),
])
def test_many_cases_and_restarts_equal_one_by_one(cases, spy, attack, options, tol):
    """N = 3 cases x R = 4 restarts in one batched computation (reconstruct_many) = each case's 4 restarts
    run one by one: per-trial candidates, counts, stop reasons and best scores; the returned reconstruction,
    its residual and history."""
    recs = B.reconstruct_many(gl.create(attack, **options), cases, seeds=[0, 1, 2])
    batched = _flat(spy)
    spy.clear()
    seq = [gl.create(attack, batch_trials=False, **options).reconstruct(c, seed=s) for c, s in zip(cases, (0, 1, 2))]
    sequential = _flat(spy)
    assert len(batched) == len(sequential) == 12
    _compare(batched, sequential, tol)
    for rb, rs in zip(recs, seq):
        note = rb.info["batched"]
        assert note["batched"] is True and note["trials_in_batch"] == 12 and note["setups_in_batch"] == 3
        assert note["shared_parameters"] is True  # the cases' models have equal parameters: not copied per trial
        assert note["engine"] == B.STACKED  # LeNet: conv + linear, per-sample rules (IG; DLG's soft labels)
        assert rs.info["batched"] == {"batched": False, "reason": "batch_trials is off", "trials": 4,
                                      "seconds_all_setups": rs.info["batched"]["seconds_all_setups"]}
        torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=tol)
        assert rb.residual == pytest.approx(rs.residual, rel=1e3 * tol)
        assert rb.kind == rs.kind and len(rb.history) == len(rs.history)
        assert rb.history == pytest.approx(rs.history, rel=tol)


def _setup(case, starts, *, regularizers=(), batched=True):
    m = C.GradientMatcher(case)

    def objective(v):
        data, cos = m.terms(v[0], case.labels)
        total = data + 1e-4 * C.total_variation(v[0])
        for r in regularizers:
            total = total + r(v[0])
        return total, cos

    return B.TrialSetup(case=case, matcher=m, labels=case.labels, objective=objective, starts=starts,
                        settings=dict(optimizer="signed-adam", max_iterations=15, lr=0.1), tv=1e-4,
                        regularizers=tuple(regularizers), batched=batched)


def _starts(case, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[C.randn((1, *case.spec.shape), g, case)] for _ in range(n)]


def test_a_diverging_trial_does_not_touch_the_others(cases):
    """One trial starts at NaN: it stops at its first step with no finite iterate, batched as alone, and the
    other trials are those of the batch without it (and those of the sequential run)."""
    case = cases[0]
    starts = _starts(case, 3)
    nan = [torch.full_like(starts[0][0], float("nan"))]
    with pytest.warns(C.DivergenceWarning):
        (with_nan, note), = B.run_setups([_setup(case, [starts[0], nan, starts[1], starts[2]])])
    assert note["batched"] is True
    (clean, _), = B.run_setups([_setup(case, starts)])
    with pytest.warns(C.DivergenceWarning):
        (seq, _), = B.run_setups([_setup(case, [starts[0], nan, starts[1], starts[2]], batched=False)])
    bad = with_nan[1]
    assert bad.diverged and not bad.finite and bad.stop == "diverged: non-finite loss" and bad.diverged_at == 0
    assert (seq[1].stop, seq[1].diverged_at, seq[1].finite) == (bad.stop, 0, False)
    kept = [with_nan[0], with_nan[2], with_nan[3]]
    for a, b in zip(kept, clean):  # the same batch composition changes nothing for the others
        assert a.score == b.score
        torch.testing.assert_close(a.variables[0], b.variables[0], rtol=0, atol=1e-12)
    _compare(kept, [seq[0], seq[2], seq[3]], 1e-9)


def test_chunks_follow_the_memory_limit(cases):
    """A limit too small for two trials gives chunks of one trial (not a failure), and the same results."""
    case = cases[0]
    starts = _starts(case, 3)
    (big, nb), = B.run_setups([_setup(case, starts)], limit=10 ** 12)
    with B.memory_limit(1):
        (small, ns), = B.run_setups([_setup(case, starts)])
    assert nb["chunk"] == 3 and ns["chunk"] == 1 and ns["limit"] == 1 and ns["limit_source"] == "memory_limit"
    assert ns["memory_per_trial_estimate"] > 0
    per, shared = ns["memory_per_trial_estimate"], ns["memory_shared_estimate"]
    chunk, _ = B.chunk_size(_setup(case, starts), 64, limit=shared + 5 * per + per // 2)
    assert chunk == 5
    _compare(small, big, 1e-9)


def test_a_regulariser_vmap_cannot_run_falls_back_with_a_note(cases):
    """A regulariser that reads a Python number off its argument (.item()) cannot run under vmap: the trials
    run one by one, rec.info says why, and the result is the sequential one."""
    case = cases[0]
    starts = _starts(case, 2)

    def item_reg(x):
        return 1e-3 * x.pow(2).mean() * float(x.detach().abs().max().item() > -1)

    (trials, note), = B.run_setups([_setup(case, starts, regularizers=(item_reg,))])
    (seq, _), = B.run_setups([_setup(case, starts, regularizers=(item_reg,), batched=False)])
    assert note["batched"] is False and note["reason"].startswith("vmap could not run the objective")
    for a, b in zip(trials, seq):
        assert a.score == b.score
        torch.testing.assert_close(a.variables[0], b.variables[0], rtol=0, atol=0)


def test_a_vmap_safe_regulariser_is_batched(cases):
    case = cases[0]
    starts = _starts(case, 2)
    reg = lambda x: 1e-3 * x.pow(2).mean()  # noqa: E731
    (trials, note), = B.run_setups([_setup(case, starts, regularizers=(reg,))])
    (seq, _), = B.run_setups([_setup(case, starts, regularizers=(reg,), batched=False)])
    assert note["batched"] is True
    _compare(trials, seq, 1e-9)


def test_batchnorm_in_train_mode_runs_one_by_one():
    photos = gl.data.samples(16, num_images=1)
    model = gl.models.build("convnet", input_shape=(3, 16, 16), num_classes=19, seed=0, width=4)
    x, y = photos.batch(1, 0)
    case, _ = gl.simulate(model, x, y, spec=photos.spec, bn_mode="train")
    rec = gl.create("ig", optimizer="signed-adam", max_iterations=3, restarts=2).reconstruct(case, seed=0)
    note = rec.info["batched"]
    assert note["batched"] is False and "BatchNorm in train mode" in note["reason"]
    assert math.isfinite(rec.residual)


def test_fedavg_batched_equals_one_by_one(spy):
    """FedAvg (3 unrolled local steps, mini-batches of 1 over 2 images): restarts batched = one by one."""
    photos = gl.data.samples(32, num_images=2)
    model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=19, seed=0)
    x, y = photos.batch(2)
    case, _ = gl.simulate(model, x, y, spec=photos.spec, protocol="fedavg", local_steps=3, local_lr=0.1,
                          local_batch_size=1)
    case = case.to(torch.float64)
    opts = dict(preset="fedavg", max_iterations=12, restarts=3)
    rb = gl.create("ig", **opts).reconstruct(case, seed=0)
    rs = gl.create("ig", batch_trials=False, **opts).reconstruct(case, seed=0)
    assert rb.info["batched"]["batched"] is True
    seen = _flat(spy)
    _compare(seen[:3], seen[3:], 1e-9)
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=1e-9)


def test_reconstruct_many_rejects_mismatched_seeds(cases):
    with pytest.raises(gl.errors.ValidationError, match="2 seeds for 3 cases"):
        B.reconstruct_many(gl.create("ig", max_iterations=2), cases, seeds=[0, 1])


def test_restarts_of_a_large_model_on_a_cpu_run_one_by_one_with_the_reason(monkeypatch, cases):
    """Above CPU_BATCH_MAX_PARAMETERS an attack's own restarts are not batched (not faster on a CPU); the
    note says so; reconstruct_many (an explicit request) still batches."""
    monkeypatch.setattr(B, "CPU_BATCH_MAX_PARAMETERS", 1000)  # lenet has 22,747
    att = gl.create("ig", optimizer="signed-adam", max_iterations=2, restarts=2)
    note = att.reconstruct(cases[0], seed=0).info["batched"]
    assert note["batched"] is False and "22,747 parameters" in note["reason"] and "bench_throughput" in note["reason"]
    assert B.reconstruct_many(att, cases[:2])[0].info["batched"]["batched"] is True


def test_reconstruct_many_asks_the_thread_policy_once_per_model_structure(monkeypatch, cases):
    """The thread policy traces the model (threads.work_of, costly on large models): reconstruct_many has it
    traced once for cases of one structure, not in both passes of every case."""
    from gradleak import threads

    monkeypatch.delenv("GRADLEAK_THREADS", raising=False)  # a thread count in the environment skips the policy
    calls = []
    real = threads.work_of

    def counting(case):
        calls.append(case)
        return real(case)

    monkeypatch.setattr(threads, "work_of", counting)
    recs = B.reconstruct_many(gl.create("ig", optimizer="signed-adam", max_iterations=2), cases, seeds=[0, 1, 2])
    assert len(calls) == 1 and all(r.info["batched"]["batched"] is True for r in recs)


def test_batched_runs_fix_the_heap_thresholds_unless_told_not_to(monkeypatch, cases):
    """steady_heap sets glibc's mmap / trim thresholds once per process (where there is glibc), and says so in
    the batched note; GRADLEAK_STEADY_HEAP=0 leaves malloc alone."""
    import ctypes.util
    import sys

    monkeypatch.setattr(B, "_STEADY", [])
    monkeypatch.setenv("GRADLEAK_STEADY_HEAP", "0")
    assert B.steady_heap() is False
    assert B.reconstruct_many(gl.create("ig", max_iterations=1), cases[:2])[0].info["batched"]["steady_heap"] is False
    monkeypatch.setattr(B, "_STEADY", [])
    monkeypatch.delenv("GRADLEAK_STEADY_HEAP")
    glibc = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None
    assert B.steady_heap() is glibc
    assert B.reconstruct_many(gl.create("ig", max_iterations=1), cases[:2])[0].info["batched"]["steady_heap"] is glibc


def test_batched_signed_adam_in_float64_keeps_the_one_by_one_path_bit_for_bit(cases, spy):
    """Signed Adam steps on the gradient's signs only: in float64 (no sign differs here) the batched trials'
    iterates are the one-by-one iterates exactly, as info['batched']['paths'] says."""
    case = cases[0]
    opts = dict(optimizer="signed-adam", max_iterations=60, restarts=3, tv=1e-4, parametrize="pixel")
    rb = gl.create("ig", **opts).reconstruct(case, seed=0)
    rs = gl.create("ig", batch_trials=False, **opts).reconstruct(case, seed=0)
    assert rb.info["batched"]["batched"] is True
    assert rb.info["batched"]["paths"] == B.path_claim("signed-adam", torch.float64)
    assert rb.info["batched"]["paths"].startswith("the one-by-one path bit for bit")
    batched, seq = _flat(spy)[:3], _flat(spy)[3:]
    for tb, ts in zip(batched, seq):
        torch.testing.assert_close(tb.variables[0], ts.variables[0], rtol=0, atol=0)
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=0)


def test_batched_lbfgs_repeats_itself_and_each_trials_score_is_that_of_its_own_iterate(cases, monkeypatch):
    """L-BFGS (DLG, float32, LeNet, 3 restarts, 60 iterations), where the batched path may part from the
    one-by-one path (info['batched']['paths'] says so): the same batched run repeats bit for bit, and every
    trial's reported best score is what the one-by-one objective gives at the iterate it returns (to float32
    rounding), so a batched result's figures are those of its own image."""
    from gradleak.attacks.optimization.driver import evaluate

    seen = []
    real = B.run_setups

    def recording(setups, **kw):
        out = real(setups, **kw)
        seen.append(list(zip(setups, [trials for trials, _ in out])))
        return out

    monkeypatch.setattr(B, "run_setups", recording)
    case = cases[0].to(torch.float32)  # the fixture's float32 photo, back from float64 exactly
    opts = dict(max_iterations=60, restarts=3)
    first = gl.create("dlg", **opts).reconstruct(case, seed=0)
    again = gl.create("dlg", **opts).reconstruct(case, seed=0)
    note = first.info["batched"]
    assert note["batched"] is True and note["paths"].startswith("not the one-by-one path")
    assert "L-BFGS's line search" in note["paths"] and "batch_trials=False" in note["paths"]
    torch.testing.assert_close(first.inputs, again.inputs, rtol=0, atol=0)
    ((setup, trials),), ((_, trials2),) = seen
    assert len(trials) == 3
    for t, t2 in zip(trials, trials2):
        assert t.score == t2.score and t.evaluations == t2.evaluations
        _, score, _ = evaluate(setup.objective, t.variables, False)
        assert t.finite and score == pytest.approx(t.score, rel=1e-4)
