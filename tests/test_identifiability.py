"""Identifiability of a batch from one gradient of a random two-layer network: Hermite coefficients by
quadrature, the tensor order, what is identifiable, and the rough width estimate."""

import json
import math

import pytest

import gradleak as gl
from gradleak.errors import ValidationError
from gradleak.risk.identifiability import (activation_properties, hermite_coefficients, hermite_order,
                                           identifiability, identifiability_of_model, width_needed)

PHI0 = 1 / math.sqrt(2 * math.pi)


def test_relu_mu3_zero_and_order_4():
    mu, method = hermite_coefficients("relu", range(0, 7), return_method=True)
    assert mu[3] == 0.0 and mu[5] == 0.0
    # closed forms at unit scale: E relu = phi(0), E relu' = 1/2, E relu'' = phi(0), E relu'''' = phi''(0) = -phi(0)
    assert mu[0] == pytest.approx(PHI0, abs=1e-10)
    assert mu[1] == pytest.approx(0.5, abs=1e-10)
    assert mu[2] == pytest.approx(PHI0, abs=1e-10)
    assert mu[4] == pytest.approx(-PHI0, abs=1e-10)
    assert method == "split-gauss-legendre"  # the kink at 0 defeats plain Gauss-Hermite
    assert hermite_order("relu") == 4


def test_tanh_order_3_and_sigmoid_gelu():
    mu, method = hermite_coefficients("tanh", range(0, 5), return_method=True)
    assert method == "gauss-hermite"
    assert mu[4] == 0.0 and mu[2] == 0.0
    assert mu[3] == pytest.approx(-0.3636, abs=1e-4)
    assert hermite_order("tanh") == 3
    assert hermite_order("sigmoid") == 3
    assert hermite_coefficients("sigmoid", [3])[3] == pytest.approx(-0.0624, abs=1e-4)
    for act in ("gelu", "leaky-relu", "softplus", "silu"):
        assert hermite_coefficients(act, [3])[3] == 0.0, act
        assert hermite_order(act) == 4, act


def test_scaling_of_homogeneous_activation_and_callables():
    # ReLU is positively homogeneous: mu_p(s) = s^(1-p) mu_p(1)
    for s in (0.5, 3.0):
        assert hermite_coefficients("relu", [4], s)[4] == pytest.approx(-PHI0 * s ** -3, rel=1e-8)
    # any callable (numpy or torch): a cubic has mu_3 = 6, mu_4 = 0
    assert hermite_coefficients(lambda z: z ** 3, [3, 4]) == pytest.approx({3: 6.0, 4: 0.0}, abs=1e-9)
    assert hermite_order(lambda z: z ** 3) == 3
    # a quadratic and a linear map: mu_3 = mu_4 = 0, the tensor method cannot work
    assert hermite_order(lambda z: z ** 2) is None
    assert hermite_order("identity") is None
    with pytest.raises(ValidationError, match="scale must be a positive"):
        hermite_coefficients("relu", [1], scale=0.0)
    with pytest.raises(ValidationError, match="registry name or a callable"):
        identifiability(3)


def test_what_is_identifiable():
    relu = identifiability("relu")
    assert (relu.directions, relu.signs, relu.norms) == (True, True, False)
    assert any("positively homogeneous" in n for n in relu.notes)
    tanh = identifiability("tanh")
    assert (tanh.directions, tanh.signs, tanh.norms) == (True, False, True)
    assert any("sign" in n and "odd" in n for n in tanh.notes)
    sig = identifiability("sigmoid")
    assert (sig.directions, sig.signs, sig.norms) == (True, True, True)
    lin = identifiability("identity")
    assert lin.order is None and not lin.directions
    assert "cannot identify" in lin.summary()
    props = activation_properties("gelu")
    assert props["odd_part_linear"] and not props["positively_homogeneous"]


def test_batch_larger_than_d_and_report_json():
    rep = identifiability("relu", d=10, batch_size=12)
    assert rep.batch_ok is False and rep.width is None
    assert any("B = 12 > d = 10" in n for n in rep.notes)
    json.dumps(rep.to_dict())
    with pytest.raises(ValidationError, match="batch_size must be a positive int"):
        identifiability("relu", d=10, batch_size=0)


def test_width_estimate():
    rep = identifiability("relu", d=768, batch_size=4, seed=0)
    w = rep.width
    assert w["order"] == 4 and w["batch_size"] == 4
    assert len(w["tensor_errors"]) == len(w["widths"]) == 3
    assert w["tensor_errors"][0] > w["tensor_errors"][-1]  # the tensor step improves with width
    assert 1_000 <= w["width"] <= 10_000_000
    # the full solver (tensor + pattern fit) reaches 1% with far fewer neurons on exact gradients
    assert w["attack_width"] is not None and w["attack_width"] <= w["width"]
    d = rep.to_dict()
    json.dumps(d)
    assert d["mu"]["4"] == pytest.approx(-PHI0, abs=1e-10)
    assert "width m ~" in rep.summary()
    none = width_needed(lambda z: z ** 2, 10, 3)
    assert none["width"] is None


def test_identifiability_of_model():
    m = gl.models.build("two-layer", input_shape=(1, 8, 8), num_classes=10, width=100, activation="tanh",
                        mirrored=True, bias=True)
    rep = identifiability_of_model(m, batch_size=4, estimate_width=False)
    assert rep.d == 64 and rep.order == 3
    assert rep.signs and rep.norms  # the Gaussian bias identifies both
    assert any("mirrored" in n for n in rep.notes) and any("bias" in n for n in rep.notes)
    with pytest.raises(ValidationError):
        identifiability_of_model(gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=4))


def test_risk_report_extension():
    from gradleak.risk import analyse_architecture

    rep = analyse_architecture("two-layer", input_shape=(1, 8, 8), num_classes=10, batch_size=3, width=500)
    ext = rep.extensions["identifiability"]
    assert ext["applies_to"] == "inputs" and ext["order"] == 4 and ext["gaussian_first_layer"] is True
    assert ext["width"]["batch_size"] == 3
    json.dumps(rep.to_dict())
    mlp = analyse_architecture("mlp", input_shape=(1, 8, 8), num_classes=10, width=50)
    assert mlp.extensions["identifiability"]["gaussian_first_layer"] is False  # PyTorch's uniform init
    assert "identifiability" not in analyse_architecture("lenet", input_shape=(3, 16, 16), num_classes=4).extensions


def test_summary_without_width_estimate_and_batch_larger_than_d():
    """A report without a width estimate (estimate_width=False) or with B > d states so in its summary, and the
    risk analysis of such a model records the identifiability entry, not an error."""
    from gradleak.risk import analyse_architecture

    m = gl.models.build("two-layer", input_shape=(6,), num_classes=3, width=500)
    rep = identifiability_of_model(m, batch_size=4, estimate_width=False)
    assert rep.width is None and rep.summary().endswith("width not estimated")
    big = identifiability_of_model(m, batch_size=8)
    assert big.batch_ok is False and big.width is None
    assert "B = 8 > d = 6" in big.summary() and "not identifiable" in big.summary()
    risk = analyse_architecture("two-layer", input_shape=(6,), num_classes=3, batch_size=8, width=500)
    ext = risk.extensions["identifiability"]
    assert "error" not in ext, ext.get("error")
    assert ext["batch_ok"] is False and ext["applies_to"] == "inputs"
    assert any("not identifiable at any width" in n for n in risk.notes)
    json.dumps(risk.to_dict())


def test_hermite_coefficients_come_from_the_activation_object():
    """One way to mu_p: an Activation (cached per object), its Act module and its registry name agree, and the
    symmetries are the Activation's declared fields."""
    from gradleak.activations import Act, activations

    tanh = activations.get("tanh")
    by_obj = hermite_coefficients(tanh, range(0, 6), 1.3)
    assert by_obj == hermite_coefficients("tanh", range(0, 6), 1.3) == hermite_coefficients(Act("tanh"), range(0, 6), 1.3)
    by_obj[3] = 123.0  # the cache hands out copies
    assert hermite_coefficients(tanh, range(0, 6), 1.3)[3] != 123.0
    props = activation_properties(tanh)
    assert props["odd"] is tanh.odd is True and props["linear"] is False
    assert activation_properties("identity")["linear"] is True
