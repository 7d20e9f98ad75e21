"""``gradleak attack --aggregate-clients K`` / ``AttackRun.aggregate_clients``: the server sees only the mean of K
clients' updates (secure aggregation), the attacked client's batch plus K - 1 others drawn from the same
dataset with the run's seed; attacks face one batch of K x B images."""

import json

import pytest
import torch

import gradleak as gl
from gradleak.cli import main


def _run(k, tmp_path=None, **kw):
    cfg = gl.AttackRun(**{"attack": "rgap", "model": "fcn3", "dataset": "digits", "num_images": 1,
                          "dtype": "float64", "aggregate_clients": k, **kw,
                          "out": None if tmp_path is None else str(tmp_path / f"k{k}")})
    return gl.run_attack(cfg, write=tmp_path is not None)


def test_rgap_under_secure_aggregation_is_a_mixture_and_the_run_says_so(tmp_path):
    single = _run(1)
    agg = _run(2, tmp_path)
    assert single.reconstruction.kind == "exact" and single.scores.psnr > 100
    # the server sees the mean of two clients' gradients: R-GAP can only return a mixture of the two inputs
    assert agg.case.batch_size == 2 and agg.truth.inputs.shape[0] == 2
    assert agg.to_json()["aggregate_clients"] == 2 and single.to_json()["aggregate_clients"] == 1
    assert agg.reconstruction.kind == "mixture"
    facts = agg.case.meta["secure_aggregation"]
    assert facts["clients"] == 2 and facts["target_rows"] == [0, 1]
    # the attacked client's image is the single run's (first row); the other one is a different image
    assert torch.equal(agg.truth.inputs[:1], single.truth.inputs)
    assert not torch.equal(agg.truth.inputs[1:], single.truth.inputs)
    # the observation is the mean of the two clients' plain gradients (fixed-point rounding only)
    union, _ = gl.simulate(agg.case.model, agg.truth.inputs, agg.truth.labels, spec=agg.case.spec)
    for name, v in union.observed.items():
        assert float((agg.case.observed[name] - v).abs().max()) <= facts["max_rounding"] + 1e-15
    m = json.loads((tmp_path / "k2" / "metrics.json").read_text())
    assert m["aggregate_clients"] == 2 and m["case"]["batch_size"] == 2
    assert m["case"]["meta"]["secure_aggregation"]["clients"] == 2
    assert m["target_client"]["psnr"] < single.scores.psnr - 50
    assert any("secure aggregation over 2 clients" in n for n in m["notes"])
    assert json.loads((tmp_path / "k2" / "config.json").read_text())["aggregate_clients"] == 2


def test_a_secure_aggregation_defense_is_the_same_protocol():
    a = _run(2)
    b = _run(1, defenses=["secure-aggregation:clients=2"])
    assert b.config.secure_clients() == 2 and b.case.batch_size == 2
    assert torch.equal(a.truth.inputs, b.truth.inputs)
    for name, v in a.case.observed.items():
        assert torch.equal(b.case.observed[name], v)


def test_other_clients_follow_the_seed():
    a, b, c = _run(3), _run(3), _run(3, seed=1)
    assert torch.equal(a.truth.inputs, b.truth.inputs) and a.case.batch_size == 3
    assert torch.equal(a.truth.inputs[:1], c.truth.inputs[:1]) and not torch.equal(a.truth.inputs, c.truth.inputs)


def test_cli_inverting_gradients_is_worse_under_secure_aggregation(tmp_path, capsys):
    psnr = {}
    for k in (1, 2):
        out = tmp_path / f"ig{k}"
        code = main(["attack", "--attack", "ig", "--model", "lenet", "--dataset", "digits", "--iterations", "200",
                     "--aggregate-clients", str(k), "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        m = json.loads((out / "metrics.json").read_text())
        psnr[k] = m["psnr"] if k == 1 else m["target_client"]["psnr"]
        assert m["case"]["batch_size"] == k
    assert psnr[2] < psnr[1], psnr


@pytest.mark.parametrize("kw, msg", [
    ({"aggregate_clients": 0}, "aggregate_clients must be"),
    ({"aggregate_clients": 2, "protocol": "fedavg"}, "for protocol 'fedsgd' only"),
    ({"aggregate_clients": 2, "defenses": ["secure-aggregation:clients=2"]}, "not both"),
    ({"aggregate_clients": 2, "observed": "x.safetensors"}, "attacked as it was received"),
    ({"aggregate_clients": 10 ** 4}, "over 10000 clients needs 9999 more images"),
])
def test_bad_aggregate_clients_is_one_clear_error(kw, msg):
    with pytest.raises(gl.ValidationError, match=msg):
        gl.run_attack(gl.AttackRun(attack="rgap", model="fcn3", dataset="digits", dtype="float64", **kw), write=False)


def test_accuracy_and_loss_is_the_obvious_count():
    from gradleak.training import accuracy_and_loss

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss = torch.nn.functional.cross_entropy
    acc, mean_loss = accuracy_and_loss(net, x, y, loss, single_output=False, batch_size=3)
    out = net(x)
    assert acc == int((out.argmax(1) == y).sum()) / 7
    assert mean_loss == pytest.approx(float(loss(out, y)), rel=1e-6)
