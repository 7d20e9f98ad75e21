"""Rank analysis (the R-GAP risk metric): numerical rank per layer, counting index, verdict, JSON."""

import json

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak import risk
from gradleak.activations import Act



@pytest.fixture(scope="module")
def cnn6d_report():
    return risk.analyse(gl.models.build("cnn6-d", dtype=torch.float64), (3, 32, 32))


def test_cnn6_d_conv2_is_deficient(cnn6d_report):
    r = cnn6d_report
    conv2 = r.layer("conv2")
    # theory (exact for generic weights and k): conv2 maps 12 x 17 x 17 (3468 unknowns) by a 3 x 3 kernel, stride
    # 2, padding 1 to 20 x 9 x 9. Rows: 20 x 81 = 1620 weight rows; the gradient rows of input channel c touch only
    # x_c, and with stride 2 split by row/column parity: (even, even) pixels (81) are read only by tap (1, 1)
    # (20 rows), (even, odd) and (odd, even) (72 each) by two taps (40 rows each), (odd, odd) (64) by four taps
    # (80 rows on 64 unknowns: rank 64), so each channel's 180 gradient rows have rank 20 + 40 + 40 + 64 = 164;
    # minus the C_out^2 = 400 exact K/W dependencies. Rank = 1620 + 12 * 164 - 400 = 3188: 3468 - 3188 = 280.
    assert conv2.deficiency == 280 and conv2.rank == 3188
    assert conv2.unknowns == 12 * 17 * 17 and conv2.constraints == 20 * 12 * 9 + 20 * 9 * 9
    assert r.deficient_layers == ["conv2"]
    assert r.exact_recovery_possible is False
    assert r.verdict == f"not possible: layer conv2 ('2') is short by {conv2.deficiency}"
    # counting says 312 constraints to spare at conv2; the numerical rank says it is short
    assert conv2.ra_raw == -312
    assert all(l.deficiency == 0 for l in r.layers if l.label != "conv2")


def test_cnn6_d_report_json_table_summary(cnn6d_report):
    d = json.loads(json.dumps(cnn6d_report.to_dict()))
    for key in ("model", "layers", "ra_index", "deficient_layers", "exact_recovery_possible", "verdict", "tolerance"):
        assert key in d
    assert d["model"] == "cnn6-d" and (d["security_index"] is None or isinstance(d["security_index"], int))
    for l in d["layers"]:
        for key in ("name", "unknowns", "rank", "deficiency", "ra", "constraints", "security_deficiency"):
            assert key in l
    assert d["tolerance"]["rtol"] == pytest.approx(1e-6)
    s = cnn6d_report.summary()
    assert "\n" not in s and "short by" in s and "RA-i" in s
    table = cnn6d_report.table().splitlines()
    assert len([ln for ln in table if ln.startswith("conv")]) == 6 and any(ln.startswith("fc7") for ln in table)


def test_cnn6_has_no_deficient_layer():
    r = risk.rank_analysis(gl.models.build("cnn6", dtype=torch.float64), method="cholesky")
    assert r.exact_recovery_possible is True and r.verdict == "exact recovery possible"
    assert r.deficient_layers == [] and all(l.deficiency == 0 for l in r.layers)
    assert r.input_shape == [3, 32, 32]  # read from the zoo model


def test_svd_and_cholesky_ranks_agree_on_a_deficient_layer():
    model = nn.Sequential(nn.Conv2d(3, 6, 4, stride=2, bias=False), Act("tanh"), nn.Flatten(),
                          nn.Linear(6 * 15 * 15, 10)).double()
    a = risk.rank_analysis(model, (3, 32, 32), method="svd")
    b = risk.rank_analysis(model, (3, 32, 32), method="cholesky")
    # the layer-wise paper's cnn2-c2 layer (3 -> 6, k4, s2, no padding) is short by 1470
    assert a.layers[0].deficiency == b.layers[0].deficiency == 1470
    assert a.layers[0].method == "svd" and a.layers[0].condition is not None


def test_counting_index_with_virtual_constraints():
    # an expanding layer (n_z > n_x) with RA <= 0 adds virtual constraints on the next layer's input
    ra, virt, rav = risk.counting_index([(10, 4, 20), (20, 5, 2), (12, 3, 3)])
    assert ra == [-14, 13, 6]
    assert virt == [0, 10, 10]
    assert rav == [-14, 3, -4]


def test_from_a_case_without_any_attack():
    model = gl.models.build("lenet-rgap", input_shape=(1, 28, 28), dtype=torch.float64)
    x, _ = gl.data.samples(image_size=28, channels=1).batch(1)
    spec = gl.DataSpec(shape=(1, 28, 28), num_classes=2)
    case, _ = gl.simulate(model, x.double(), torch.tensor([1]), spec=spec)
    r = risk.analyse(case)
    assert r.source == "case" and r.model == "lenet-rgap" and r.input_shape == [1, 28, 28]
    assert r.exact_recovery_possible is True and [l.label for l in r.layers] == ["conv1", "conv2", "conv3", "fc4"]


def test_unsupported_and_non_invertible_models():
    r = risk.analyse_architecture("resnet20")
    assert r.exact_recovery_possible is False and r.verdict.startswith("not possible: R-GAP does not apply")
    assert any("skip connection" in p for p in r.problems)
    r = risk.analyse("mlp", (3, 8, 8), batch_size=4)
    assert r.exact_recovery_possible is False and "relu" in r.verdict and "not invertible" in r.verdict
    assert all(l.deficiency == 0 for l in r.layers)  # the systems are fine; the activation is not
    assert any("batch size 4" in n for n in r.notes)
    with pytest.raises(gl.ValidationError, match="input_shape"):
        risk.rank_analysis(nn.Sequential(nn.Linear(3, 1)))


def test_random_weights_and_registered_analyses_extend_the_same_report():
    calls = []

    def security(report, target, input_shape, **context):
        calls.append(context)
        report.security_index = -7
        for layer in report.layers:
            layer.security_deficiency = -1

    risk.register_analysis("test-security")(security)
    try:
        r = risk.analyse("lenet-rgap", (1, 12, 12), random_weights=True, seed=3)
    finally:
        risk.analyses._items.pop("test-security")
    assert r.weights == "random" and calls and calls[0]["seed"] == 3
    assert r.security_index == -7 and "security index -7" in r.summary()
    assert "sec d_i" in r.table() and r.to_dict()["layers"][0]["security_deficiency"] == -1
