"""R-GAP: exactness in float64 on the paper's networks, the logistic root finder, honest failure, batches."""

import math

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak import activations
from gradleak.activations import Act, Activation
from gradleak.attacks.rgap import LOGISTIC_MU_STAR, LOGISTIC_S_MIN, logistic_mu_roots, logistic_score
from gradleak.errors import RequirementError



def _case(model, image_size, channels=3, *, start=0, batch=1, labels=None, labels_known=True, **kw):
    """A case from the bundled photos for ``model`` (float64), one score -> labels 0/1."""
    ds = gl.data.samples(image_size=image_size, channels=channels)
    x, _ = ds.batch(batch, start)
    single = getattr(model, "num_outputs", 2) == 1
    classes = 2 if single else model.num_outputs
    spec = gl.DataSpec(shape=ds.spec.shape, num_classes=classes, mean=ds.spec.mean, std=ds.spec.std)
    y = torch.as_tensor(labels if labels is not None else [(start + i) % classes for i in range(batch)])
    dtype = next(model.parameters()).dtype
    return gl.simulate(model, x.to(dtype), y, spec=spec, labels_known=labels_known, **kw)


def _mse(rec, truth):
    return float(((rec.inputs.double() - truth.inputs.double()) ** 2).mean())


# ---- the logistic head ---------------------------------------------------------------------------------

def test_mu_root_finder_three_regimes():
    assert LOGISTIC_MU_STAR == pytest.approx(1.2784645, abs=1e-6)
    assert LOGISTIC_S_MIN == pytest.approx(-0.2784645, abs=1e-6)
    # s > 0: one negative root (misclassified sample)
    for s in (1e-9, 0.01, 0.3, 5.0, 400.0):
        roots = logistic_mu_roots(s)
        assert len(roots) == 1 and roots[0] < 0
        assert logistic_score(roots[0]) == pytest.approx(s, rel=1e-12)
    # s in (s_min, 0): two positive roots on both sides of mu*
    for s in (-1e-6, -0.05, -0.2, -0.2784):
        r1, r2 = logistic_mu_roots(s)
        assert 0 < r1 < LOGISTIC_MU_STAR < r2
        assert logistic_score(r1) == pytest.approx(s, rel=1e-9) and logistic_score(r2) == pytest.approx(s, rel=1e-9)
    # s < s_min: impossible
    assert logistic_mu_roots(-0.3) == [] and logistic_mu_roots(-5.0) == []
    assert logistic_mu_roots(0.0) == [0.0]
    assert logistic_mu_roots(LOGISTIC_S_MIN) == [LOGISTIC_MU_STAR]
    assert logistic_mu_roots(float("nan")) == []


# ---- exactness in float64 (the required tests) ---------------------------------------------------

@pytest.fixture(scope="module")
def cnn6_result():
    model = gl.models.build("cnn6", input_shape=(3, 32, 32), dtype=torch.float64)
    case, truth = _case(model, 32, labels=[1])
    return case, truth, gl.create("rgap").reconstruct(case)


def test_cnn6_exact_float64(cnn6_result):
    case, truth, rec = cnn6_result
    assert _mse(rec, truth) <= 1e-12
    assert rec.kind == "exact" and rec.info["deficient_layers"] == []
    assert rec.inputs.shape == (1, 3, 32, 32) and rec.inputs.dtype == torch.float64
    assert rec.residual < 1e-10
    layers = rec.info["layers"]
    assert [l.label for l in layers] == [f"conv{i}" for i in range(1, 7)] + ["fc7"]
    assert [l.head for l in layers] == [False] * 6 + [True]
    for l in layers:
        assert l.rank == l.unknowns and l.determined and l.residual < 1e-9 and l.extra.clipped == 0
    assert all(l.condition > 1 for l in layers[:-1])
    assert rec.info["head"]["type"] == "logistic" and rec.info["head"]["status"] == "ok"


def test_lenet_sigmoid_variant_28_exact_float64():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), dtype=torch.float64)
    case, truth = _case(model, 28, channels=1, start=2, labels=[0])
    rec = gl.create("rgap").reconstruct(case)
    assert _mse(rec, truth) <= 1e-12
    assert rec.kind == "exact"
    assert [l.activation for l in rec.info["layers"][:-1]] == ["sigmoid"] * 3


def test_fcn3_28_exact_float64():
    model = gl.models.build("fcn3", input_shape=(1, 28, 28), dtype=torch.float64)
    case, truth = _case(model, 28, channels=1, start=0, labels=[1])
    rec = gl.create("rgap").reconstruct(case)
    assert _mse(rec, truth) <= 1e-12
    assert rec.kind == "exact"
    head = rec.info["head"]
    # this photo is classified correctly: two roots; the bias-free leaky-ReLU network maps them to inputs that
    # differ by a scale and give the SAME gradient; the image range picks the right one
    assert len(head["roots"]) == 2 and head["consistent_starts"] == 2 and head["chosen_by"] == "image range"


def test_biased_multiclass_lenet_head_uses_the_bias_and_recovers_the_label():
    model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=10, dtype=torch.float64)
    case, truth = _case(model, 32, start=3, labels=[3], labels_known=False)
    rec = gl.create("rgap").reconstruct(case)
    assert _mse(rec, truth) <= 1e-12
    assert rec.info["head"]["type"] == "bias" and rec.labels.tolist() == [3]
    assert all(l.residual_bias is not None and l.residual_bias < 1e-8 for l in rec.info["layers"][:-1])


def test_nonsquare_strides_padding_biases_and_a_user_activation():
    name = "test-asinh"
    if name not in activations.activations:
        activations.add(Activation(name, torch.asinh, lambda z: 1 / torch.sqrt(1 + z * z), torch.sinh))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, (3, 5), stride=(1, 2), padding=(1, 2)), Act(name),
                          nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.1),
                          nn.Flatten(), nn.Linear(10 * 5 * 4, 5)).double()
    model.num_outputs = 5
    case, truth = _case(model, (10, 14), start=4, labels=[2])
    rec = gl.create("rgap").reconstruct(case)
    assert rec.inputs.shape == (1, 3, 10, 14)
    assert _mse(rec, truth) <= 1e-12 and rec.kind == "exact"
    assert [l.activation for l in rec.info["layers"][:-1]] == [name, "leaky-relu(0.1)"]


@pytest.mark.parametrize("loss,known", [("cross-entropy", False), ("mse", True)])
def test_bias_free_multiclass_head_solves_the_rank_one_scale(loss, known):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), Act("tanh"), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5, bias=False)).double()
    model.num_outputs = 5
    case, truth = _case(model, 8, start=2, labels=[3], loss=loss, labels_known=known)
    rec = gl.create("rgap").reconstruct(case)
    assert rec.info["head"]["type"] == "rank-one" and rec.info["head"]["scale_mismatch"] < 1e-12
    assert _mse(rec, truth) <= 1e-12 and rec.kind == "exact" and rec.labels.tolist() == [3]


def test_unknown_label_on_the_logistic_head_tries_both_signs():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), dtype=torch.float64)
    case, truth = _case(model, 28, channels=1, start=5, labels=[1], labels_known=False)
    rec = gl.create("rgap").reconstruct(case)
    assert _mse(rec, truth) <= 1e-12
    head = rec.info["head"]
    assert head["label_source"] == "both signs tried" and head["starts"] >= 2
    assert rec.labels.tolist() == [1]


def test_fedavg_single_step_is_a_gradient_and_multistep_is_refused():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), dtype=torch.float64)
    case, truth = _case(model, 28, channels=1, labels=[1], protocol="fedavg", local_steps=1, local_lr=0.1)
    rec = gl.create("rgap").reconstruct(case)
    assert _mse(rec, truth) <= 1e-12
    case3, _ = _case(model, 28, channels=1, labels=[1], protocol="fedavg", local_steps=3)
    with pytest.raises(RequirementError, match="ONE local step"):
        gl.create("rgap").reconstruct(case3)


def test_float32_case_works_in_its_dtype_and_says_estimate():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28))
    case, truth = _case(model, 28, channels=1, labels=[0])
    rec = gl.create("rgap").reconstruct(case)
    assert rec.inputs.dtype == torch.float32
    assert 10 * math.log10(1 / _mse(rec, truth)) > 40
    assert rec.kind == "estimate" and any("float32" in n for n in rec.info["notes"])


# ---- honest failure --------------------------------------------------------------------------------------

def test_cnn6_d_conv2_reported_rank_deficient():
    model = gl.models.build("cnn6-d", input_shape=(3, 32, 32), dtype=torch.float64)
    case, truth = _case(model, 32, labels=[1])
    rec = gl.create("rgap").reconstruct(case)
    conv2 = rec.info["layers"][1]
    # 280 short: the count is derived in tests/test_risk.py::test_cnn6_d_conv2_is_deficient (with the actual,
    # leaky-ReLU k it is the generic count)
    assert conv2.label == "conv2" and not conv2.determined and conv2.deficiency == 280
    assert conv2.rank == 3188 and conv2.unknowns == 3468
    assert rec.info["deficient_layers"] == ["conv2"]
    assert rec.kind == "estimate"
    assert any("rank-deficient" in n for n in rec.info["notes"])
    assert _mse(rec, truth) > 1e-3  # the minimum-norm answer is not the input
    assert all(l.determined for i, l in enumerate(rec.info["layers"]) if i != 1)


def test_impossible_logistic_score_is_reported():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), dtype=torch.float64)
    case, _ = _case(model, 28, channels=1, labels=[1])
    head = "7.weight"
    W = case.parameters[head]
    g = dict(case.observed)
    # make s = <W, dL/dW> = -1 < s_min: no single sample under the logistic loss gives it
    g[head] = -W / float((W * W).sum())
    bad = case.with_observation(g)
    rec = gl.create("rgap").reconstruct(bad)
    assert rec.info["head"]["status"] == "impossible" and rec.info["head"]["s"] == pytest.approx(-1.0)
    assert rec.kind == "estimate"


def test_unsupported_layers_raise_before_any_work_naming_each():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 7 * 7, 1, bias=False)).double()
    model.num_outputs = 1
    case, _ = _case(model, 16, labels=[1])
    with pytest.raises(RequirementError) as e:
        gl.create("rgap").reconstruct(case)
    msg = str(e.value)
    assert "BatchNorm2d" in msg and "MaxPool2d" in msg and "relu" in msg and len(e.value.problems) == 3


def test_resnet_skip_connections_refused():
    model = gl.models.build("resnet20", dtype=torch.float64)
    case, _ = _case(model, 32)
    with pytest.raises(RequirementError, match="skip connection"):
        gl.create("rgap").reconstruct(case)


# ---- batches ---------------------------------------------------------------------------------------------

def test_batch_on_fcn3_gives_one_mixture_in_the_span():
    model = gl.models.build("fcn3", input_shape=(1, 28, 28), dtype=torch.float64)
    case, truth = _case(model, 28, channels=1, batch=2, labels=[1, 1])
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "mixture" and rec.inputs.shape == (1, 1, 28, 28)
    assert rec.info["mixture"]["batch_size"] == 2 and rec.info["mixture"]["span_rank"] == 2
    # the combination lies in span{x_1, x_2, 1} (image space; pixels the [0, 1] clamp did not touch)
    y = rec.inputs.reshape(-1)
    keep = (y > 1e-9) & (y < 1 - 1e-9)
    assert int(keep.sum()) > 100
    basis = torch.stack([truth.inputs[0].reshape(-1), truth.inputs[1].reshape(-1), torch.ones(784, dtype=y.dtype)], 1)
    coef = torch.linalg.lstsq(basis[keep], y[keep, None]).solution
    assert float((basis[keep] @ coef - y[keep, None]).norm() / y[keep].norm()) < 1e-8


def test_batch_on_a_conv_network_is_refused():
    model = gl.models.build("cnn6", input_shape=(3, 32, 32), dtype=torch.float64)
    case, _ = _case(model, 32, batch=2, labels=[1, 0])
    with pytest.raises(RequirementError, match="batch size 2"):
        gl.create("rgap").reconstruct(case)


# ---- hybrid (H-GAP) ----------------------------------------------------------------------------------------

def test_hybrid_rgap_then_inverting_gradients_improves_a_deficient_case():
    # conv2 is rank-deficient: R-GAP's minimum-norm x_2 is wrong, so x_1 no longer reproduces the gradient;
    # gradient matching started from the R-GAP output fixes it (the paper's H-GAP)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), Act("tanh"),
                          nn.Conv2d(8, 2, 4, stride=2, bias=False), Act("tanh"), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 4)).double()
    model.num_outputs = 4
    case, truth = _case(model, 10, start=1, labels=[1])
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "estimate" and rec.info["deficient_layers"] == ["conv2"]
    assert rec.residual > 1e-3
    refined = gl.create("inverting-gradients", init=rec, max_iterations=100, optimizer="lbfgs", lr=1.0,
                        distance="l2", tv=0.0).reconstruct(case)
    assert refined.residual < 1e-2 * rec.residual
    assert _mse(refined, truth) < 0.5 * _mse(rec, truth)
