"""Batched trials with a Laplacian-pyramid parametrisation (IGOptions.parametrize='laplacian-K'): the batched
objective evaluates each trial's pyramid image, back-propagates to every level, steps every level with the
fused (signed) Adam update and projects through the finest level, per trial, and must equal the trials run one
by one.

Tolerance (float64): as tests/test_batched_trials.py states for signed Adam, the batched objective sums in
another order than the sequential one, so candidates (every level, and the label logits) agree within 1e-9,
best scores and histories within 1e-9 relative. The fused update with the pyramid's projection against each
trial's own program, fed the same evaluations, is bit for bit (as tests/test_fused_adam.py for the box).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization import parametrize as Z
from gradleak.attacks.optimization import persample as PS
from gradleak.attacks.optimization.driver import BoxProjection, FusedAdam, evaluate, trial_program
from gradleak.attacks.optimization.inverting import InvertingGradients

TOL = 1e-9


# ---- the fused update with the pyramid's projection ------------------------------------------------------
def _pyramid_objective(param, t: int):
    g = torch.Generator().manual_seed(200 + t)
    c = torch.randn((1, 3, *param.size), generator=g, dtype=torch.float64)

    def objective(v):
        x = param.image(v[:param.count])
        total = ((x - c) ** 2).sum() + 0.3 * torch.sin(3 * x).sum() + (v[-1] ** 2).sum()
        return total, (x - c).abs().mean()

    return objective


@pytest.mark.parametrize("boxes", ["one", "mixed"])
def test_fused_adam_with_the_pyramid_projection_equals_each_trials_own_program_bit_for_bit(boxes):
    """5 trials of a 3-level pyramid (7 x 9 images: odd sizes) plus a logits variable: the fused update with
    BoxProjection(lo, hi, pyramid) (all rows at once; or "mixed": trials 0, 2, 4 share a box, 1 has its own,
    3 another: a subset of rows and single rows) equals each trial's program with the same projection."""
    param = Z.build("laplacian-3", (3, 7, 9))
    lo = torch.tensor([-0.5, -0.4, -0.6], dtype=torch.float64).view(1, 3, 1, 1)
    hi = torch.tensor([0.5, 0.6, 0.4], dtype=torch.float64).view(1, 3, 1, 1)

    def project(t):
        if boxes == "one" or t in (0, 2, 4):
            return BoxProjection(lo, hi, param)
        return BoxProjection(lo * (0.5 + 0.1 * t), hi * (0.5 + 0.1 * t), param)

    def starts():
        g = torch.Generator().manual_seed(7)
        out = []
        for _ in range(5):
            x = torch.randn((1, 3, 7, 9), generator=g, dtype=torch.float64)
            out.append(param.variables(x) + [torch.randn((1, 4), generator=g, dtype=torch.float64)])
        return out

    settings = dict(optimizer="signed-adam", max_iterations=9, lr=0.1, offer_every=2)
    objs = [_pyramid_objective(param, t) for t in range(5)]
    alone = []
    for t, s in enumerate(starts()):
        trial, program = trial_program(s, **settings, project=project(t))
        try:
            req = next(program)
            while True:
                req = program.send(evaluate(objs[t], *req))
        except StopIteration:
            pass
        alone.append(trial)
    trials = [trial_program(s, **settings)[0] for s in starts()]
    f = FusedAdam(starts(), trials, projects=[project(t) for t in range(5)], on_steps=[None] * 5,
                  on_offers=[None] * 5, names=[f"t{t}" for t in range(5)], **settings)
    while (req := f.request()) is not None:
        xs, need_grad = req
        res = [evaluate(objs[t], [x[r] for x in xs], need_grad) for r, t in enumerate(f.running)]
        grads = [torch.stack([g[j] for _, _, g in res]) for j in range(len(xs))] if need_grad else None
        f.receive([r[0] for r in res], [r[1] for r in res], grads)
    for a, b in zip(alone, trials):
        assert (a.stop, a.iterations, a.evaluations) == (b.stop, b.iterations, b.evaluations) == ("budget", 9, 9)
        assert a.history == b.history and a.score == b.score
        assert len(a.variables) == 4 and all(torch.equal(x, y) for x, y in zip(a.variables, b.variables))
    # the projection kept every trial's image in its box (through the finest level)
    for t, a in enumerate(alone):
        p = project(t)
        img = param.image(a.variables[:3])
        assert bool((img >= p.lo - 1e-15).all()) and bool((img <= p.hi + 1e-15).all())


def test_the_stacked_pyramid_image_and_projection_are_the_per_trial_ones_bit_for_bit():
    param = Z.build("laplacian-4", (3, 10, 12))
    g = torch.Generator().manual_seed(3)
    rows = [[torch.randn((2, 3, *s), generator=g, dtype=torch.float64) for s in param.sizes] for _ in range(3)]
    stacked = [torch.stack([r[k] for r in rows]) for k in range(4)]
    img = param.image(stacked)
    assert img.shape == (3, 2, 3, 10, 12)
    for t, r in enumerate(rows):
        assert torch.equal(img[t], param.image(r))
    lo, hi = -0.3, 0.4
    param.project(stacked, lo, hi)
    for t, r in enumerate(rows):
        param.project(r, lo, hi)
        assert all(torch.equal(stacked[k][t], r[k]) for k in range(4))


# ---- IG with a pyramid: batched == one by one ----------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Every run_setups call's trials, their variables copied as run_setups returns them (the pyramid's
    levels and the label logits, before IG turns them into the image)."""
    seen = []
    real = B.run_setups

    def recording(setups, **kw):
        out = real(setups, **kw)
        for trials, _ in out:
            seen.append([(t, None if t.variables is None else [v.clone() for v in t.variables]) for t in trials])
        return out

    monkeypatch.setattr(B, "run_setups", recording)
    return seen


def _compare(batched, sequential, tol=TOL):
    assert len(batched) == len(sequential)
    for (tb, vb), (ts, vs) in zip(batched, sequential):
        assert tb.finite and ts.finite
        assert (tb.iterations, tb.evaluations, tb.stop) == (ts.iterations, ts.evaluations, ts.stop)
        assert tb.score == pytest.approx(ts.score, rel=tol, abs=1e-300)
        assert tb.history == pytest.approx(ts.history, rel=tol)
        assert len(vb) == len(vs)
        for a, b in zip(vb, vs):
            torch.testing.assert_close(a, b, rtol=0, atol=tol)


def _flat(seen):
    return [t for per_setup in seen for t in per_setup]


def _resnet_cases(n, labels_known=True):
    photos = gl.data.samples(16, num_images=max(n, 2))
    model = gl.models.build("resnet20", input_shape=(3, 16, 16), num_classes=photos.spec.num_classes, seed=0)
    model = model.double()
    out = []
    for i in range(n):
        x, y = photos.batch(1, i)
        case, _ = gl.simulate(model, x.double(), y, spec=photos.spec, labels_known=labels_known)
        assert case.bn_mode == "eval"
        out.append(case)
    return out


@pytest.mark.parametrize("engine", ["stacked", "vmap"])
def test_ig_pyramid_restarts_joint_labels_and_group_term_batched_equal_one_by_one(spy, monkeypatch, engine):
    """resnet20 (eval BatchNorm, 16 px, float64), laplacian-4, 3 restarts, joint label logits, the group term
    (two stages): both stages run batched, every trial (levels, logits, score, history, counts) equals its
    one-by-one run, and so does the reconstruction."""
    if engine == "vmap":
        monkeypatch.setattr(PS, "problems", lambda model, names: ["forced: the vmap engine"])
    (case,) = _resnet_cases(1, labels_known=False)
    opts = dict(optimizer="signed-adam", max_iterations=8, restarts=3, parametrize="laplacian-4",
                label_strategy="joint", group_consistency=1e-2)
    rb = gl.create("ig", **opts).reconstruct(case, seed=0)
    batched = _flat(spy)
    spy.clear()
    rs = gl.create("ig", batch_trials=False, **opts).reconstruct(case, seed=0)
    sequential = _flat(spy)
    assert len(batched) == len(sequential) == 6  # 3 restarts x 2 stages
    assert [len(v) for _, v in batched] == [5] * 6  # 4 levels + the label logits
    _compare(batched, sequential)
    assert rb.info["parametrize"] == "laplacian-4"
    for note in rb.info["batched"]:
        assert note["batched"] is True and note["trials_in_batch"] == 3
        assert note["engine"] == (B.STACKED if engine == "stacked" else B.ENGINE)
        assert note["update"].startswith("fused")
    assert all(n["batched"] is False for n in rs.info["batched"])
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=TOL)
    assert torch.equal(rb.labels, rs.labels)
    assert rb.history == pytest.approx(rs.history, rel=TOL)
    assert rb.info["scores"] == pytest.approx(rs.info["scores"], rel=TOL)


def test_ig_pyramid_lbfgs_restarts_batched_equal_one_by_one(spy):
    """L-BFGS on a pyramid (LeNet, 32 px, float64, laplacian-4, 3 restarts, 20 iterations, labels known): the
    restarts share their evaluations while each keeps its own L-BFGS memory and line search over the levels;
    every trial (levels, score, history, iteration and evaluation counts) and the reconstruction equal the
    restarts run one by one, within 1e-7 (L-BFGS amplifies last-bit differences: tests/test_batched_trials.py
    states the growth; on a ResNet the strong-Wolfe line search already takes another branch within the first
    few evaluations, docs/performance.md, so the equality is checked where it holds)."""
    photos = gl.data.samples(32, num_images=1)
    model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=19, seed=0)
    case, _ = gl.simulate(model, *photos.batch(1, 0), spec=photos.spec)
    case = case.to(torch.float64)
    opts = dict(optimizer="lbfgs", max_iterations=20, restarts=3, parametrize="laplacian-4")
    rb = gl.create("ig", **opts).reconstruct(case, seed=0)
    batched = _flat(spy)
    spy.clear()
    rs = gl.create("ig", batch_trials=False, **opts).reconstruct(case, seed=0)
    sequential = _flat(spy)
    assert len(batched) == len(sequential) == 3
    assert [len(v) for _, v in batched] == [4] * 3
    assert all(t.evaluations > t.iterations for t, _ in batched)  # the line search evaluated within steps
    _compare(batched, sequential, tol=1e-7)
    note = rb.info["batched"]
    assert note["batched"] is True and note["trials_in_batch"] == 3
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=1e-7)
    assert rb.info["scores"] == pytest.approx(rs.info["scores"], rel=1e-7)


def test_the_chunk_size_counts_the_pyramid_levels():
    """A pyramid trial's optimiser keeps its copies of every level (6 levels at 32 px: 1 + 1/4 + ... = 1.333
    of the image) and its image: the per-trial estimate exceeds the pixel one by exactly that, and a limit
    that fits 5 pixel trials fits fewer pyramid trials."""
    photos = gl.data.samples(32, num_images=1)
    model = gl.models.build("resnet20", input_shape=(3, 32, 32), num_classes=photos.spec.num_classes, seed=0)
    case, _ = gl.simulate(model, *photos.batch(1, 0), spec=photos.spec)
    pixel, pyramid = (_setups(InvertingGradients(optimizer="signed-adam", max_iterations=2, parametrize=p),
                              [case])[0] for p in ("pixel", "laplacian-6"))
    assert pyramid.param.scale == pytest.approx(sum(4.0 ** -k for k in range(5)) + 1 / 1024)
    _, np_ = B.chunk_size(pixel, 8, limit=10 ** 12)
    _, nq = B.chunk_size(pyramid, 8, limit=10 ** 12)
    pixels = 3 * 32 * 32 * 4  # bytes of one float32 image
    extra = nq["memory_per_trial_estimate"] - np_["memory_per_trial_estimate"]
    assert extra == math.ceil(4 * 3 * 32 * 32 * pyramid.param.scale) * 4 - 4 * pixels + 2 * pixels
    limit = np_["memory_shared_estimate"] + 5 * np_["memory_per_trial_estimate"]
    assert B.chunk_size(pixel, 8, limit=limit)[0] == 5
    assert B.chunk_size(pyramid, 8, limit=limit)[0] == 4
    est = gl.resources.estimate_attack("resnet20", (3, 32, 32), 10, batch_size=1)
    est_pyr = gl.resources.estimate_attack("resnet20", (3, 32, 32), 10, batch_size=1,
                                           variable_scale=pyramid.param.scale)
    assert est_pyr.total - est.total == extra and est_pyr.parts["parametrised_image"] == 2 * pixels


def test_reconstruct_many_with_a_pyramid_equals_each_case_alone(spy):
    cases = _resnet_cases(3)
    opts = dict(optimizer="signed-adam", max_iterations=6, restarts=2, parametrize="laplacian-4")
    recs = B.reconstruct_many(gl.create("ig", **opts), cases, seeds=[0, 1, 2])
    batched = _flat(spy)
    spy.clear()
    alone = [gl.create("ig", batch_trials=False, **opts).reconstruct(c, seed=s) for c, s in zip(cases, (0, 1, 2))]
    _compare(batched, _flat(spy))
    for rb, rs in zip(recs, alone):
        note = rb.info["batched"]
        assert note["batched"] is True and note["setups_in_batch"] == 3 and note["trials_in_batch"] == 6
        torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=TOL)
        assert rb.history == pytest.approx(rs.history, rel=TOL)


def _setups(attack, cases):
    """The trial setup ``attack`` builds on each of ``cases`` (captured as batch_problems captures it: the
    attack runs up to its first batched call; nothing is optimised)."""
    got = []
    for c in cases:
        many = B._Many()
        token = B._MANY.set(many)
        try:
            attack.reconstruct(c, seed=0)
        except B._Captured:
            pass
        finally:
            B._MANY.reset(token)
        got.append(many.captured[0])
    return got


def test_setups_of_different_parametrisations_are_not_grouped():
    """A pixel, a laplacian-3 and a laplacian-4 setup of IG on the same model run as three batched groups
    (one setup each), each equal to that setup run alone."""
    cases = _resnet_cases(2)
    attacks = [InvertingGradients(optimizer="signed-adam", max_iterations=3, restarts=2, parametrize=p)
               for p in ("pixel", "laplacian-3", "laplacian-4")]
    setups = [s for a in attacks for s in _setups(a, cases[:1])] + _setups(attacks[1], cases[1:])
    keys = [B._group_key(s) for s in setups]
    assert len(set(keys[:3])) == 3 and keys[3] == keys[1]
    out = B.run_setups(setups)
    assert [n["setups_in_batch"] for _, n in out] == [1, 2, 1, 2]
    for s, (trials, _) in zip(setups[:3], out[:3]):
        (alone, _), = B.run_setups([_setups(InvertingGradients(
            optimizer="signed-adam", max_iterations=3, restarts=2, parametrize=s.param.name), cases[:1])[0]])
        for a, b in zip(trials, alone):
            assert len(a.variables) == s.param.count
            for x, y in zip(a.variables, b.variables):
                torch.testing.assert_close(x, y, rtol=0, atol=TOL)


# ---- the audit groups a ResNet's IG jobs again ------------------------------------------------------------
def test_a_resnet_eval_mode_audit_groups_its_pyramid_ig_jobs(tmp_path, monkeypatch):
    """resnet20 in eval mode: 'auto' gives IG a pyramid (laplacian-5 at 16 px) and the planner groups the
    jobs (batch_problems is []); the grouped audit ran the two jobs as one batch, equal to the audit run job
    by job (float64; each job alone still batches its own restarts)."""
    from gradleak.audit.plan import AuditConfig, plan

    cfg = AuditConfig(model="resnet20", image_size=16, num_images=2, attacks=["ig"])
    p = plan(cfg, tmp_path / "plan")
    assert [j.group for j in p.jobs] == ["inverting-gradients__none__b1"] * 2
    assert all(j.batch_note is None for j in p.jobs)
    monkeypatch.setitem(InvertingGradients.budgets, "quick", {"max_iterations": 6, "restarts": 2})
    kw = dict(image_size=16, num_images=2, attacks=["ig"], dtype="float64", workers=1)
    grouped = gl.audit("resnet20", out=tmp_path / "g", **kw)
    alone = gl.audit("resnet20", out=tmp_path / "a", batch=False, **kw)
    a = {j["id"]: j for j in alone.jobs}
    assert len(grouped.jobs) == 2
    for g in grouped.jobs:
        s = a[g["id"]]
        assert g["status"] == s["status"] == "done" and g["group"] == {"jobs": 2, "batched": True}
        gm = json.loads((tmp_path / "g" / g["dir"] / "metrics.json").read_text())
        sm = json.loads((tmp_path / "a" / s["dir"] / "metrics.json").read_text())
        assert gm["info"]["parametrize"] == sm["info"]["parametrize"] == "laplacian-5"
        assert gm["info"]["batched"]["batched"] is True and gm["info"]["batched"]["setups_in_batch"] == 2
        assert sm["info"]["batched"]["setups_in_batch"] == 1  # alone: the job's own restarts, batched
        x_g = load_file(str(tmp_path / "g" / g["dir"] / "reconstruction.safetensors"))["inputs"]
        x_s = load_file(str(tmp_path / "a" / s["dir"] / "reconstruction.safetensors"))["inputs"]
        torch.testing.assert_close(x_g, x_s, rtol=0, atol=TOL)
        assert g["psnr"] == pytest.approx(s["psnr"], rel=1e3 * TOL)  # as tests/test_audit_group.py allows
