"""gl.defenses.utility: FedAvg over simulated clients, baseline and defended runs on the same seeds."""

import json

import pytest
import torch

import gradleak as gl
from gradleak import defenses as D

KW = dict(rounds=10, clients=8, local_steps=5, local_lr=1.0, local_batch_size=16, seed=0)


@pytest.fixture(scope="module")
def digits():
    return gl.data.load("digits")


def test_no_defense_run_equals_itself_and_a_null_defense(digits):
    a = D.utility("lenet", digits, ["noise:sigma=0"], **KW)
    b = D.utility("lenet", digits, [], **KW)
    assert a.baseline_per_round == b.baseline_per_round  # same seed: the same run, bit for bit
    # sigma = 0 noise adds zeros: the defended run sees the same shards, batches and model as the baseline
    assert a.defenses[0].accuracy_per_round == a.baseline_per_round
    assert a.defenses[0].accuracy_drop == 0.0
    # training did something: far above chance (0.1) after 10 rounds
    assert a.baseline_accuracy > 0.5
    c = D.utility("lenet", digits, [], **{**KW, "seed": 1})
    assert c.baseline_per_round != a.baseline_per_round


def test_strong_noise_costs_accuracy(digits):
    # measured: baseline 0.652, noise sigma=1 0.251 (drop 0.40) on these settings; asserted margin 0.2
    r = D.utility("lenet", digits, ["noise:sigma=1"], **KW)
    d = r.defenses[0]
    assert d.accuracy_drop == pytest.approx(r.baseline_accuracy - d.accuracy)
    assert d.accuracy_drop > 0.2
    assert d.epsilon is None and d.privacy is None
    out = json.loads(r.to_json())
    assert set(out) >= {"baseline_accuracy", "defenses", "settings"}
    assert set(out["defenses"][0]) >= {"defense", "accuracy", "accuracy_drop", "epsilon"}


def test_dp_sgd_epsilon_is_the_accountants_for_the_run(digits):
    from opacus.accountants import RDPAccountant

    kw = {**KW, "rounds": 2}
    r = D.utility("lenet", digits, ["dp-sgd:max_grad_norm=1,noise_multiplier=1.1"], **kw)
    d = r.defenses[0]
    shards = r.settings["shard_sizes"]
    q = 16 / min(shards)
    acc = RDPAccountant()
    for _ in range(2 * 5):  # rounds x local steps, one DP-SGD step each
        acc.step(noise_multiplier=1.1, sample_rate=q)
    assert d.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert (d.privacy["steps"], d.privacy["sample_rate"]) == (10, pytest.approx(q))
    # a target epsilon is calibrated for the run's own steps and sample rate
    t = D.utility("lenet", digits, ["dp-sgd:max_grad_norm=1,target_epsilon=4"], **kw).defenses[0]
    assert 4.0 - 0.05 < t.epsilon <= 4.0


def test_secure_aggregation_costs_only_rounding(digits):
    r = D.utility("lenet", digits, ["secure-aggregation:clients=4"], **{**KW, "rounds": 3})
    assert r.defenses[0].accuracy_per_round == pytest.approx(r.baseline_per_round, abs=1e-12)
    with pytest.raises(gl.ValidationError, match="groups of 3"):
        D.utility("lenet", digits, ["secure-aggregation:clients=3"], **{**KW, "rounds": 1})


def test_client_shards_iid_and_dirichlet():
    labels = torch.arange(1000) % 10
    for iid, alpha in ((True, 1.0), (False, 100.0), (False, 0.05)):
        shards = D.client_shards(labels, 8, iid=iid, alpha=alpha, seed=3)
        allidx = torch.cat(shards).sort().values
        assert torch.equal(allidx, torch.arange(1000))  # every example in exactly one shard
        assert all(s.numel() > 0 for s in shards)
    def skew(shards):  # mean over clients of the largest class share
        return sum(float(torch.bincount(labels[s], minlength=10).max()) / s.numel() for s in shards) / len(shards)
    iid = skew(D.client_shards(labels, 8, iid=True, alpha=1.0, seed=3))
    mild = skew(D.client_shards(labels, 8, iid=False, alpha=100.0, seed=3))
    strong = skew(D.client_shards(labels, 8, iid=False, alpha=0.05, seed=3))
    assert iid < 0.2 and mild < 0.25 and strong > 0.6


def test_bad_arguments_are_one_clear_error(digits):
    with pytest.raises(gl.ValidationError, match="utility: 2 problems"):
        D.utility("lenet", digits, [], rounds=0, local_lr=-1.0)
    with pytest.raises(gl.ValidationError, match="prune defense"):
        D.utility("lenet", digits, ["prune:ratio=2"], rounds=1)
