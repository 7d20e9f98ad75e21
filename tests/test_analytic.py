"""fc-analytic: closed-form recovery of a biased linear layer's input (exact in float64 for one sample)."""

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.attacks.analytic import biased_linear_layers, reads_input, recover_linear_input


def _psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def photos():
    return gl.data.samples(32, num_images=8)


@pytest.mark.parametrize("index", [0, 5])
def test_fc_analytic_exact_float64(photos, index):
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, width=128, dtype=torch.float64, seed=3)
    x, y = photos.batch(1, index)
    case, truth = gl.simulate(model, x.double(), y, spec=photos.spec)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.kind == "exact"
    assert rec.inputs.dtype == torch.float64 and rec.inputs.shape == (1, 3, 32, 32)
    assert float((rec.inputs - truth.inputs).abs().max()) < 1e-10
    assert rec.info["row_spread"] < 1e-10
    assert rec.residual < 1e-10


def test_fc_analytic_exact_under_fedavg(photos):
    """The input does not change between local steps, so dW/db stays exact for one sample."""
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, width=64, dtype=torch.float64)
    x, y = photos.batch(1, 2)
    case, truth = gl.simulate(model, x.double(), y, spec=photos.spec, protocol="fedavg", local_steps=3,
                              local_lr=0.05)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.kind == "exact"
    assert float((rec.inputs - truth.inputs).abs().max()) < 1e-10


def test_fc_analytic_recovers_the_label_when_unknown(photos):
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, width=64, dtype=torch.float64)
    x, _ = photos.batch(1, 4)
    case, truth = gl.simulate(model, x.double(), torch.tensor([11]), spec=photos.spec, labels_known=False)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.labels.tolist() == [11] and rec.info["labels"]["method"] == "idlg-bias"
    assert rec.residual < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fc_analytic_batch_hidden_layer_groups_pure_rows(photos, dtype, tol):
    """B = 4 through a ReLU hidden layer: rows active for one sample only are exact; they are grouped."""
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, width=600, dtype=dtype)
    x, y = photos.batch(4, 2)
    case, truth = gl.simulate(model, x.to(dtype), y, spec=photos.spec, labels_known=False)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.kind == "mixture" and rec.info["method"] == "grouped rows"
    assert rec.inputs.shape == (4, 3, 32, 32)
    pure = rec.info["likely_pure"]
    assert sum(pure) >= 3
    matched = set()
    for i in range(4):
        err = (rec.inputs[i] - truth.inputs.to(dtype)).abs().flatten(1).max(1).values
        if pure[i]:
            assert float(err.min()) < tol, f"output {i} marked pure but is off by {float(err.min())}"
            matched.add(int(err.argmin()))
    assert len(matched) == sum(pure)  # distinct samples


def test_fc_analytic_batch_classifier_label_rows(photos):
    """A classifier reading the input: one row per label, dominated by that label's sample (a mixture)."""
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, depth=1, dtype=torch.float64)
    x, y = photos.batch(4, 0)
    case, truth = gl.simulate(model, x.double(), y, spec=photos.spec)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.kind == "mixture" and rec.info["method"] == "label rows"
    for i in range(4):
        scores = [_psnr(rec.inputs[i], truth.inputs[j]) for j in range(4)]
        assert max(range(4), key=lambda j: scores[j]) == i
        assert scores[i] > 18.0
    assert "mixture" in rec.info["note"]


def test_recover_linear_input_gives_features_of_a_deeper_layer():
    """On LeNet the only biased linear layer reads features: recover_linear_input returns them exactly."""
    model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 3, 16, 16), generator=g, dtype=torch.float64)
    case, _ = gl.simulate(model, x, torch.tensor([2]))
    layer = biased_linear_layers(case)[-1]
    assert not reads_input(case, layer)
    seen = []
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    model(x)
    h.remove()
    out = recover_linear_input(case, layer)
    assert torch.allclose(out.least_squares, seen[0].reshape(-1), atol=1e-10, rtol=0)
    assert torch.allclose(out.candidates[0], seen[0].reshape(-1), atol=1e-10, rtol=0)


def test_fc_analytic_requirements_are_explained():
    x = torch.rand(1, 3, 16, 16)
    lenet_case, _ = gl.simulate(gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=5), x,
                                torch.tensor([1]))
    with pytest.raises(gl.RequirementError, match="intermediate features.*recover_linear_input"):
        gl.create("fc-analytic").reconstruct(lenet_case)

    cnn_case, _ = gl.simulate(gl.models.build("cnn6", input_shape=(3, 16, 16)), x, torch.tensor([1]))
    with pytest.raises(gl.RequirementError, match="nn.Linear.*bias"):
        gl.create("fc-analytic").reconstruct(cnn_case)

    mlp_case, _ = gl.simulate(gl.models.build("mlp", input_shape=(3, 16, 16), num_classes=5, width=8), x,
                              torch.tensor([1]))
    with pytest.raises(gl.RequirementError, match="'nope' is not a module"):
        gl.create("fc-analytic", layer="nope").reconstruct(mlp_case)
    with pytest.raises(gl.RequirementError, match="is a ReLU|is a Act"):
        gl.create("fc-analytic", layer="2").reconstruct(mlp_case)

    # a zero bias gradient: nothing to divide by
    zero = {k: (torch.zeros_like(v) if k.endswith("bias") else v) for k, v in mlp_case.observed.items()}
    with pytest.raises(gl.RequirementError, match="bias gradient .* is zero"):
        gl.create("fc-analytic").reconstruct(mlp_case.with_observation(zero))


def test_fc_analytic_bias_free_first_layer_is_rejected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    case, _ = gl.simulate(model, torch.rand(1, 12), torch.tensor([0]))
    with pytest.raises(gl.RequirementError, match="intermediate features"):
        gl.create("fc-analytic").reconstruct(case)
    with pytest.raises(gl.RequirementError, match="has no bias"):
        gl.create("fc-analytic", layer="1").reconstruct(case)
