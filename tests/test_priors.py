"""The regulariser registry of the optimisation attacks, the BatchNorm-statistics prior, schedules and starts."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak import functional as Fn
from gradleak.attacks.optimization import common as C
from gradleak.attacks.optimization import priors as P


def _resnet(photos32, width=1):
    return gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                           seed=0, width=width).double()


def test_tv_has_one_home():
    assert C.total_variation is P.total_variation
    assert P.priors.get("tv").builder(None) is P.total_variation


def test_a_new_prior_is_one_registration_and_reaches_the_objective(photos32):
    seen = []

    @P.register_prior("test-pull", source="this test", description="pull towards a fixed image")
    def _pull(case, target=None):
        seen.append(case.batch_size)
        t = case.spec.normalize(target.to(case.dtype))
        return lambda x: (x - t).pow(2).sum()

    try:
        x, y = photos32.batch(1)
        model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
        case, truth = gl.simulate(model, x.double(), y, spec=photos32.spec)
        case = case.to(torch.float64)
        target = torch.full_like(truth.inputs, 0.25)
        rec = gl.create("ig", max_iterations=60, optimizer="adam", lr=0.05,
                        regularizers=(("test-pull", 1e3, {"target": target}),)).reconstruct(case, seed=0)
        plain = gl.create("ig", max_iterations=60, optimizer="adam", lr=0.05).reconstruct(case, seed=0)
        assert seen == [1]
        assert {"prior": "test-pull", "weight": 1e3} in rec.info["priors"]
        # the same start: the objective differs by 1e3 x the pull (the matching term is at most 2), and the
        # optimiser minimises it
        assert rec.history[0] - plain.history[0] > 1e3
        assert rec.history[-1] < 0.2 * rec.history[0]
    finally:
        P.priors._items.pop("test-pull")


def test_prior_specs_are_checked_with_every_problem_at_once():
    with pytest.raises(gl.ValidationError) as e:
        gl.create("ig", regularizers=(("no-such-prior", 1.0), ("tv", -1.0), "tv"), bn_prior="sometimes",
                  group_consistency=0.1, restarts=1, schedule="linear", start="patterned-0")
    msg = str(e.value)
    for part in ("unknown prior 'no-such-prior'", "'tv' weight must be a finite number >= 0",
                 "(name, weight) or (name, weight, options)", "bn_prior must be one of",
                 "group_consistency needs restarts >= 2", "schedule must be one of", "start must be 'randn'"):
        assert part in msg, part
    with pytest.raises(gl.ValidationError, match="bn_prior must be one of"):
        gl.create("dlg", bn_prior="yes")


def test_bn_prior_from_the_update_vanishes_at_the_true_batch_only(photos32):
    x, y = photos32.batch(2)
    x = x.double()
    model = _resnet(photos32)
    case, truth = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train")
    term = P.build(case, [("bn-statistics", 1.0, {"source": "update"})])
    at_truth = float(term.value(photos32.spec.normalize(truth.inputs), y))
    other = photos32.spec.normalize(torch.rand_like(x, dtype=torch.float64))
    assert at_truth < 1e-9
    assert float(term.value(other, y)) > 1e-2
    # differentiable in the candidate
    xv = other.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(term.value(xv, y), xv)
    assert float(g.abs().max()) > 0
    # FedAvg with one full-batch step reveals the batch's own statistics too
    avg, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train", protocol="fedavg", local_steps=1,
                         local_lr=0.1)
    assert float(P.build(avg, [("bn-statistics", 1.0, {"source": "update"})]).value(
        photos32.spec.normalize(x), y)) < 1e-9


def test_bn_prior_on_k_local_steps_replays_the_client_exactly(photos32):
    x, y = photos32.batch(4)
    x = x.double()
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train", protocol="fedavg", local_steps=4,
                          local_lr=0.05, local_batch_size=2)
    xn = photos32.spec.normalize(x)
    exact = P.build(case, [("bn-statistics", 1.0, {"source": "update"})])
    assert float(exact.value(xn, y)) < 1e-9  # the client's own steps, replayed on the candidate
    assert float(exact.value(xn[[2, 3, 0, 1]], y[[2, 3, 0, 1]])) > 1e-2
    xv = xn.clone().add_(0.1).requires_grad_(True)
    (g,) = torch.autograd.grad(exact.value(xv, y), xv)
    assert float(g.abs().max()) > 0
    # the cheap form (statistics at the sent parameters) is off by the parameters' drift, but still tells the
    # right order of the images from the wrong one at a small local learning rate
    slow, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train", protocol="fedavg", local_steps=4,
                          local_lr=1e-4, local_batch_size=2)
    approx = P.build(slow, [("bn-statistics", 1.0, {"source": "update", "fedavg": "sent-parameters"})])
    at_truth = float(approx.value(xn, y))
    swapped = float(approx.value(xn[[2, 3, 0, 1]], y))
    random = float(approx.value(photos32.spec.normalize(torch.rand_like(x)), y))
    assert 0 < at_truth < 1e-2 * random
    assert at_truth < 0.5 * swapped
    with pytest.raises(gl.ValidationError, match="fedavg must be one of"):
        P.build(slow, [("bn-statistics", 1.0, {"source": "update", "fedavg": "guess"})])


class _OneBN(nn.Module):
    """conv -> BatchNorm -> ReLU -> linear: the BatchNorm input does not depend on the BatchNorm mode."""

    num_outputs = 19

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 15 * 15, 19)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_bn_prior_from_running_statistics(photos32):
    x, y = photos32.batch(2)
    x = x.double()
    torch.manual_seed(0)
    model = _OneBN().double()
    xn = photos32.spec.normalize(x)
    # a model whose running statistics are exactly this batch's feature statistics (one pass at momentum 1)
    fitted = copy.deepcopy(model)
    Fn.set_bn_mode(fitted, "train")
    for m in fitted.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        fitted(xn)
    fitted.eval()
    case, _ = gl.simulate(fitted, x, y, spec=photos32.spec, bn_mode="eval")
    term = P.build(case, [("bn-statistics", 1.0, {"source": "running"})])
    assert float(term.value(xn, y)) < 1e-9
    assert float(term.value(photos32.spec.normalize(torch.rand_like(x)), y)) > 1e-2
    with pytest.raises(gl.ValidationError, match="needs the candidate's labels"):
        term.value(xn)
    assert P.resolve_bn_source(case, "auto") == "running"
    # the update has nothing to reveal in eval mode: the attack refuses that source and says why
    with pytest.raises(gl.RequirementError, match="'eval' mode"):
        gl.create("ig", bn_prior="update", max_iterations=2).reconstruct(case, seed=0)
    plain = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    nobn, _ = gl.simulate(plain, x, y, spec=photos32.spec)
    with pytest.raises(gl.RequirementError, match="no BatchNorm layer"):
        gl.create("dlg", bn_prior="running", max_iterations=2).reconstruct(nobn, seed=0)


def test_schedules():
    cos = C.lr_schedule("cosine", 100, warmup=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert cos(99) < 1e-2
    assert C.lr_schedule("step", 80) is None
    step = C.lr_schedule("step", 80, explicit=True)
    assert [step(t) for t in (0, 29, 30, 49, 50, 69, 70)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 1e-3])

    # the explicit step schedule is the driver's built-in one
    def objective(v):
        loss = ((v[0] - 3.0) ** 2).sum()
        return loss, loss

    v0 = [torch.zeros(5, dtype=torch.float64)]
    a = C.run_trial(objective, v0, optimizer="adam", max_iterations=40, lr=0.3, decay=True)
    b = C.run_trial(objective, v0, optimizer="adam", max_iterations=40, lr=0.3, decay=False,
                    schedule=C.lr_schedule("step", 40, explicit=True))
    assert torch.allclose(a.variables[0], b.variables[0], rtol=0, atol=1e-12)
    c = C.run_trial(objective, v0, optimizer="adam", max_iterations=40, lr=0.3, decay=False,
                    schedule=C.lr_schedule("cosine", 40, warmup=5))
    assert not torch.allclose(a.variables[0], c.variables[0])


def test_patterned_start_repeats_its_tile(photos32):
    x, y = photos32.batch(2)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    case, _ = gl.simulate(model, x, y, spec=photos32.spec)
    s = C.start_inputs(case, "patterned-4", torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, 32, 32)
    assert torch.equal(s[..., :8, :8], s[..., 8:16, 24:32]) and not torch.equal(s[0], s[1])
    r = C.start_inputs(case, "randn", torch.Generator().manual_seed(0))
    assert not torch.equal(r[..., :8, :8], r[..., 8:16, :8])


def test_group_consensus_aligns_restarts_before_averaging():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 4, 4, generator=g)
    noise = 0.01 * torch.randn(3, 1, 4, 4, generator=g)
    cons = P.group_consensus([a, (a + noise)[[2, 0, 1]], (a - noise)[[1, 2, 0]]])
    assert torch.allclose(cons, a, atol=1e-6)


def test_group_consistency_runs_the_restarts_in_two_stages(photos32):
    x, y = photos32.batch(1)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    case, _ = gl.simulate(model, x, y, spec=photos32.spec)
    rec = gl.create("ig", max_iterations=20, restarts=3, optimizer="adam", group_consistency=0.1,
                    group_start=0.25).reconstruct(case, seed=0)
    info = rec.info["group_consistency"]
    assert info == {"weight": 0.1, "consensus_at_iteration": 5, "restarts_in_consensus": 3}
    assert rec.info["iterations"] == 60 and all(r["iterations"] == 20 for r in rec.info["restarts"])
    again = gl.create("ig", max_iterations=20, restarts=3, optimizer="adam", group_consistency=0.1,
                      group_start=0.25).reconstruct(case, seed=0)
    assert torch.equal(rec.inputs, again.inputs)


def test_presets_per_paper_exist_and_validate():
    from gradleak.attacks.optimization.inverting import InvertingGradients as ig
    for name in ("gradinversion", "modern"):
        a = gl.create("ig", preset=name, max_iterations=10)
        assert a.options.bn_prior == "auto" and a.options.schedule == "cosine"
    assert ig.presets["gradinversion"]["group_consistency"] > 0
    assert ig.presets["modern"]["start"] == "patterned-4"


def test_the_gradinversion_preset_uses_what_the_case_offers(photos32):
    x, y = photos32.batch(2)
    torch.manual_seed(0)
    model = _OneBN()
    train, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train")
    rec = gl.create("ig", preset="gradinversion", max_iterations=6, restarts=2).reconstruct(train, seed=0)
    assert rec.info["bn_prior"] == "update" and rec.info["group_consistency"]["restarts_in_consensus"] == 2
    assert {"prior": "bn-statistics", "weight": 1e-2} in rec.info["priors"] and rec.info["schedule"] == "cosine"
    ev, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="eval")
    assert gl.create("ig", preset="gradinversion", max_iterations=4, restarts=2).reconstruct(
        ev, seed=0).info["bn_prior"] == "running"
    lenet = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    plain, _ = gl.simulate(lenet, x, y, spec=photos32.spec)
    rec = gl.create("ig", preset="gradinversion", max_iterations=4, restarts=2).reconstruct(plain, seed=0)
    assert rec.info["bn_prior"] == "none" and all(p["prior"] != "bn-statistics" for p in rec.info["priors"])


def _lenet_case(photos32, n=1):
    x, y = photos32.batch(n)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes, seed=0)
    case, _ = gl.simulate(model, x.double(), y, spec=photos32.spec)
    return case.to(torch.float64)


def test_priors_schedule_and_group_stage_are_batched_like_one_by_one(photos32):
    """The priors (tv, l2), the cosine schedule and the group stage run batched over restarts (one note per
    stage, both batched) and give what the restarts give one by one (float64, to the batched kernels'
    rounding: tests/test_batched_trials.py's tolerance)."""
    case = _lenet_case(photos32)
    opts = dict(max_iterations=16, restarts=3, optimizer="adam", lr=0.05, l2=1e-3, schedule="cosine", warmup=3,
                group_consistency=0.1, group_start=0.5)
    rb = gl.create("ig", **opts).reconstruct(case, seed=0)
    rs = gl.create("ig", batch_trials=False, **opts).reconstruct(case, seed=0)
    first, second = rb.info["batched"]
    assert first["batched"] is True and second["batched"] is True and second["trials_in_batch"] == 3
    assert [n["reason"] for n in rs.info["batched"]] == ["batch_trials is off"] * 2
    assert rb.info["group_consistency"] == rs.info["group_consistency"] == {
        "weight": 0.1, "consensus_at_iteration": 8, "restarts_in_consensus": 3}
    assert {"prior": "l2", "weight": 1e-3} in rb.info["priors"]
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=1e-9)
    assert rb.history == pytest.approx(rs.history, rel=1e-9)
    assert [r["score"] for r in rb.info["restarts"]] == pytest.approx([r["score"] for r in rs.info["restarts"]],
                                                                       rel=1e-9)


def test_dlg_priors_are_batched_like_one_by_one(photos32):
    case = _lenet_case(photos32)
    opts = dict(max_iterations=10, restarts=2, regularizers=(("l2", 1e-2), ("tv", 1e-3)))
    rb = gl.create("dlg", **opts).reconstruct(case, seed=0)
    rs = gl.create("dlg", batch_trials=False, **opts).reconstruct(case, seed=0)
    assert rb.info["batched"]["batched"] is True and rs.info["batched"]["batched"] is False
    torch.testing.assert_close(rb.inputs, rs.inputs, rtol=0, atol=1e-7)


def test_the_bn_statistics_prior_runs_the_restarts_one_by_one_and_says_why(photos32):
    """bn-statistics runs its own hooked forward pass: vmap over trials cannot batch it, so the restarts run
    one by one, with that reason (an eval-mode model: nothing else stops batching)."""
    x, y = photos32.batch(2)
    torch.manual_seed(0)
    case, _ = gl.simulate(_OneBN(), x, y, spec=photos32.spec, bn_mode="eval")
    rec = gl.create("ig", bn_prior="running", max_iterations=3, restarts=2, optimizer="adam").reconstruct(case, seed=0)
    note = rec.info["batched"]
    assert note["batched"] is False and note["reason"].startswith("prior 'bn-statistics': it runs its own forward")
    plain = gl.create("ig", max_iterations=3, restarts=2, optimizer="adam").reconstruct(case, seed=0)
    assert plain.info["batched"]["batched"] is True


def test_imagenet_size_runs_through_the_attack_path_with_its_preset(tmp_path):
    """ResNet-18 at 224 px, batch 1: the `imagenet-cpu-hour` preset's budget (here cut to 2 iterations) runs the
    whole CLI path and writes 224-px images (docs/batchnorm.md "ImageNet size")."""
    from PIL import Image

    from gradleak.cli import main

    ig = gl.attacks.attacks.get("ig")
    assert ig.presets["imagenet-cpu-hour"] == {"max_iterations": 2000, "restarts": 1}
    out = tmp_path / "run224"
    code = main(["attack", "--attack", "ig", "--model", "resnet18", "--image-size", "224", "--preset",
                 "imagenet-cpu-hour", "--iterations", "2", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["case"]["spec"]["shape"] == [3, 224, 224]
    assert metrics["iterations"] == 2  # --iterations overrides the preset's 2,000, as for every preset
    with Image.open(out / "reconstruction.png") as im:
        assert min(im.size) >= 224


def test_fc_features_vanishes_at_the_true_sample_and_refuses_mixtures(photos32):
    x, y = photos32.batch(1)
    x = x.double()
    model = _resnet(photos32)
    for bn_mode in ("eval", "train"):
        case, truth = gl.simulate(model, x, y, spec=photos32.spec, bn_mode=bn_mode)
        term = P.build(case, [("fc-features", 1.0)])
        xn = photos32.spec.normalize(truth.inputs)
        # the classifier's input recovered from its weight and bias gradients is the sample's own, exactly
        assert float(term.value(xn, y)) < 1e-12
        other = photos32.spec.normalize(torch.rand_like(x))
        assert float(term.value(other, y)) > 1e-4
        xv = other.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(term.value(xv, y), xv)
        assert float(g.abs().max()) > 0
        cos = P.build(case, [("fc-features", 1.0, {"distance": "cosine"})])
        assert abs(float(cos.value(xn, y))) < 1e-12 < float(cos.value(other, y))
    # the ratio is a mixture for a batch or several local steps: refused with the reason
    two, _ = gl.simulate(model, *[t.double() if t.is_floating_point() else t for t in photos32.batch(2)],
                         spec=photos32.spec)
    avg, _ = gl.simulate(model, x, y, spec=photos32.spec, protocol="fedavg", local_steps=3, local_lr=0.1)
    assert any("batch of 2" in p for p in P.spec_problems(two, [("fc-features", 1.0)]))
    assert any("not one gradient" in p for p in P.spec_problems(avg, [("fc-features", 1.0)]))
    assert any("distance must be one of" in p for p in P.spec_problems(avg, [("fc-features", 1.0, {"distance": "l1"})]))
    # IGOptions.fc_features is the shorthand for it
    assert {"prior": "fc-features", "weight": 0.5} in gl.create("ig", fc_features=0.5, max_iterations=2).reconstruct(
        gl.simulate(model, x, y, spec=photos32.spec)[0], seed=0).info["priors"]
    with pytest.raises(gl.ValidationError, match="fc_features must be a finite number >= 0"):
        gl.create("ig", fc_features=-1.0)
