"""The layer-wise security metric (the authors' "COPA index"): per-layer d_i = rank(U_i) - n_cols(U_i) and
S = sum_i round(d_i (L-1-i)/(L-1)); worked values of ALGORITHMS.md 3 and issue 4."""

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak import layers as L
from gradleak import models
from gradleak.errors import ValidationError
from gradleak.risk.security import (security_analysis, security_from_case, security_index, security_weights,
                                    system_rank)


def _check_formula(rep):
    d = rep.deficiencies
    Lw = rep.num_layers
    assert rep.index == sum(round(di * (Lw - 1 - i) / (Lw - 1)) for i, di in enumerate(d))
    assert rep.index == security_index(d, Lw)


def test_formula_and_weights():
    assert security_weights(7) == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert security_index([0, -280, 0, 0, 0, 0]) == -233  # CNN6-d
    assert security_index([0, -3965, -386]) == -2643 - 129
    assert security_index([-1470]) == -1470
    assert security_index([]) == 0
    with pytest.raises(ValidationError, match="must be <= 0"):
        security_index([0, 5])
    with pytest.raises(ValidationError, match="expected 3 deficiencies"):
        security_index([0, -1], 4)


@pytest.mark.parametrize("name, expected, ds", [
    ("cnn2-c1", 0, [0]),
    ("cnn2-c2", -1470, [-1470]),
    ("cnn6", 0, [0, 0, 0, 0, 0, 0]),
    ("cnn6-d", -233, [0, -280, 0, 0, 0, 0]),
    ("cnn3-c1", -2266, [0, -4533]),
    ("cnn4-c1", -2772, [0, -3965, -386]),
])
def test_security_index_of_the_papers_networks(name, expected, ds):
    rep = security_analysis(name)
    assert rep.deficiencies == ds
    assert rep.index == expected
    _check_formula(rep)
    assert not rep.problems
    d = rep.to_dict()
    assert d["security_index"] == expected and d["deficiencies"] == ds and "COPA" in d["definition"]


@pytest.mark.slow
def test_security_index_cnn4_c2():
    rep = security_analysis("cnn4-c2")  # conv2 has 12,544 unknowns: its rank comes from the 3,264 rows
    assert rep.deficiencies == [0, -9316, 0]
    assert rep.index == -6211
    assert rep.layers[1].side == "rows"


def test_backprop_maps_give_the_same_generic_rank(photos32):
    rep = security_analysis("cnn2-c2", maps="backprop")
    assert rep.index == -1470 and rep.maps == "backprop"
    model = models.build("cnn2-c2", dtype=torch.float64)
    x, y = photos32.batch(1, 0)
    case, _ = gl.simulate(model, x.double(), y, spec=gl.DataSpec((3, 32, 32), 10))
    rep = security_from_case(case)
    assert rep.index == -1470 and rep.input_shape == [3, 32, 32]


def test_system_rank_sides_and_methods_agree():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    # underdetermined (rows side) and overdetermined (columns side) conv layers on a small input
    for conv, shape in ((nn.Conv2d(3, 6, 4, stride=2, bias=False), (3, 12, 12)),
                        (nn.Conv2d(3, 6, 3, bias=False), (3, 12, 12))):
        model = nn.Sequential(conv.double(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(4).double())
        model(torch.zeros(1, *shape, dtype=torch.float64))
        layer = L.walk(model, shape).layers[0]
        k = torch.randn(layer.out_shape, generator=gen, dtype=torch.float64)
        system = L.LayerSystem(layer, conv.weight.detach(), k)
        ref = L.numerical_rank(system.gram(), method="svd")
        for method in ("auto", "cholesky", "svd"):
            r = system_rank(system, method=method)
            assert r.rank == ref.rank, (shape, method)
            assert r.deficiency == ref.rank - layer.n_in
        # the dense reference matrix agrees
        A = torch.from_numpy(L.reference_weight_matrix(layer, conv.weight.detach()))
        K = torch.from_numpy(L.reference_grad_matrix(layer, k))
        U = torch.cat([A / A.norm(), K / K.norm()])
        assert int(torch.linalg.matrix_rank(U, rtol=1e-9)) == ref.rank


def test_unsupported_model_lists_problems():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    rep = security_analysis(model, (3, 8, 8))
    assert rep.index is None and rep.problems
    assert "BatchNorm" in " ".join(rep.problems)
    with pytest.raises(ValidationError, match="give input_shape"):
        security_analysis(nn.Sequential(nn.Linear(4, 2)))


def test_risk_analyse_reports_the_security_metric():
    from gradleak import risk

    rep = risk.analyse_architecture("cnn2-c2")
    d = rep.to_dict()
    assert d["security_index"] == -1470
    assert d["layers"][0]["security_deficiency"] == -1470
    assert d["layers"][0]["deficiency"] == 1470  # the rank analysis of the same system, other sign convention
    assert d["layers"][-1]["security_deficiency"] is None  # the final FC is not scored
    assert d["extensions"]["security"]["index"] == -1470
    assert "security index -1470" in rep.summary()
