"""Adding an activation is one registration: R-GAP, the risk analysis and the tensor attack then use it."""

import math

import pytest
import torch

import gradleak as gl
from gradleak.activations import Activation

HALF_PI = math.pi / 2


@pytest.fixture(scope="module")
def atan():
    act = Activation("test-atan", torch.atan, lambda z: 1 / (1 + z * z),
                     lambda y: torch.tan(y.clamp(-HALF_PI + 1e-12, HALF_PI - 1e-12)), odd=True,
                     output_range=(-HALF_PI, HALF_PI))
    return gl.activations.add(act, overwrite=True)


def test_rgap_and_risk_use_a_registered_activation(atan):
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), activation="test-atan", dtype=torch.float64,
                            init_std=0.1)
    ds = gl.data.samples(image_size=28, channels=1)
    x, _ = ds.batch(1, 2)
    spec = gl.DataSpec(shape=ds.spec.shape, num_classes=2, mean=ds.spec.mean, std=ds.spec.std)
    case, truth = gl.simulate(model, x.double(), torch.tensor([0]), spec=spec)
    rec = gl.create("rgap").reconstruct(case)
    assert [layer.activation for layer in rec.info["layers"][:-1]] == ["test-atan"] * 3
    assert float(((rec.inputs - truth.inputs) ** 2).mean()) <= 1e-12 and rec.kind == "exact"
    report = gl.risk.analyse(model, (1, 28, 28))
    acts = [getattr(layer, "activation", None) for layer in report.layers]
    assert "test-atan" in acts and not report.problems


def test_tensor_attack_uses_a_registered_activation(atan):
    d, B = 20, 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, d, generator=g, dtype=torch.float64)
    spec = gl.DataSpec(shape=(d,), num_classes=2)
    model = gl.models.build("two-layer", input_shape=(d,), num_classes=2, width=20_000, activation="test-atan",
                            num_outputs=1, dtype=torch.float64, seed=0)
    case, truth = gl.simulate(model, x, torch.tensor([0, 1]), spec=spec, loss="mse")
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert rec.info["order"] == 3  # odd: mu_4 = 0, mu_3 != 0, computed from the registered function
    assert rec.info["identifiable"]["signs"] is False
    xs, xt = rec.inputs.double().flatten(1), truth.inputs.double().flatten(1)
    cos = torch.nn.functional.cosine_similarity(xs[:, None], xt[None], dim=-1).abs().max(1).values
    assert float(cos.min()) >= 0.99
