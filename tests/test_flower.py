"""The Flower integration without a simulation: wrong use fails at start, the wrappers survive deepcopy and
pickle, the client contract and its assumptions, the simulation-only truth channel, and the converter."""

import copy
import pickle

import numpy as np
import pytest
import torch

import flwr  # noqa: F401  (installed by the test extra)
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg, Strategy

import gradleak as gl
from gradleak.integrations.flower import (Auditor, LeakageAudit, LegacyLeakageAudit, SimulationTruth,
                                          case_from_flower, replay_batches, replay_facts, replay_metrics,
                                          resolve_replay, wrap)
from gradleak.integrations.flower.contract import reported_from_metrics
from gradleak.integrations.flower.simulation import DigitsFederation

FED = DigitsFederation(clients=2, model="mlp", model_options={"width": 16}, batch=1, local_steps=2, local_lr=0.1)


def _audit(strategy, **kw):
    return wrap(strategy, FED.build_model(), FED.spec, attack="fc-analytic", **kw)


# ---- wrong use fails at start -----------------------------------------------------------------------------

def test_wrap_picks_the_wrapper_for_each_api():
    assert type(_audit(FedAvg())) is LeakageAudit
    assert type(_audit(LegacyFedAvg())) is LegacyLeakageAudit


def test_a_strategy_the_audit_cannot_hook_is_an_error_at_start():
    with pytest.raises(gl.ValidationError, match="LegacyLeakageAudit"):
        LeakageAudit(LegacyFedAvg(), FED.build_model(), FED.spec)
    with pytest.raises(gl.ValidationError, match="use LeakageAudit"):
        LegacyLeakageAudit(FedAvg(), FED.build_model(), FED.spec)
    with pytest.raises(gl.ValidationError, match="expected a Flower Message-API strategy"):
        _audit(object())

    class OwnLoop(FedAvg):
        def start(self, grid, initial_arrays, num_rounds=3, **kw):  # bypasses configure/aggregate hooks
            return None

    with pytest.raises(gl.ValidationError, match="overrides Strategy.start"):
        _audit(OwnLoop())
    with pytest.raises(gl.ValidationError, match="already wrapped"):
        _audit(_audit(FedAvg()))


def test_every_message_strategy_flower_ships_uses_the_loop_the_audit_drives():
    import flwr.serverapp.strategy as strategies

    shipped = [c for c in vars(strategies).values() if isinstance(c, type) and issubclass(c, Strategy)
               and c is not Strategy]
    assert len(shipped) >= 10
    assert all(c.start is Strategy.start for c in shipped), [c.__name__ for c in shipped if c.start is not Strategy.start]


def test_an_attack_that_cannot_run_on_the_model_is_an_error_at_start():
    lenet = gl.models.build("lenet", input_shape=FED.spec.shape, num_classes=10)
    with pytest.raises(gl.RequirementError, match="fc-analytic"):
        LeakageAudit(FedAvg(), lenet, FED.spec, attack="fc-analytic")
    with pytest.raises(gl.ValidationError, match="local_lr"):
        LeakageAudit(FedAvg(), FED.build_model(), FED.spec, local_lr=0)


def test_the_wrappers_forward_every_method_flower_calls():
    # the Message-API loop calls these five; the audit defines each itself (no attribute fall-through)
    for name in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate", "summary",
                 "start"):
        assert name in vars(LeakageAudit), name
    for name in Strategy.__abstractmethods__:
        assert name in vars(LeakageAudit), name
    from flwr.server.strategy import Strategy as Legacy

    for name in Legacy.__abstractmethods__:
        assert name in vars(LegacyLeakageAudit), name
    assert "__getattr__" not in vars(LeakageAudit) and "__getattr__" not in vars(LegacyLeakageAudit)


def _plain_mlp():
    """An MLP of torch modules only (the zoo's activation modules hold lambdas, which only cloudpickle takes)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


@pytest.mark.parametrize("strategy", [FedAvg(fraction_evaluate=0.0), LegacyFedAvg(fraction_evaluate=0.0)],
                         ids=["message", "legacy"])
def test_the_wrapper_survives_deepcopy_and_pickle(strategy, tmp_path):
    from ray import cloudpickle  # what Ray ships objects with

    truth = SimulationTruth(tmp_path / "truth")
    plain = wrap(strategy, _plain_mlp(), FED.spec, attack="fc-analytic", out_dir=tmp_path, truth=truth)
    zoo = _audit(strategy, out_dir=tmp_path, truth=truth)
    clones = [(plain, copy.deepcopy(plain)), (plain, pickle.loads(pickle.dumps(plain))),
              (zoo, copy.deepcopy(zoo)), (zoo, cloudpickle.loads(cloudpickle.dumps(zoo)))]
    for audit, clone in clones:
        assert type(clone) is type(audit) and clone is not audit
        assert type(clone.strategy) is type(strategy) and clone.strategy.fraction_evaluate == 0.0
        assert clone.auditor.attack.name == "fc-analytic" and clone.records == []
        assert clone.auditor.truth.token == truth.token and clone.auditor.out_dir == tmp_path
        for k, v in audit.auditor.model.state_dict().items():
            assert torch.equal(clone.auditor.model.state_dict()[k], v)


# ---- the client contract ------------------------------------------------------------------------------------

def test_a_full_report_replays_exactly_without_assumptions():
    facts = replay_facts(examples=4, local_steps=3, local_lr=0.05, local_batch_size=2, client="alice")
    r = resolve_replay(facts, num_examples=100, local_steps=1, local_lr=1.0, local_batch_size=None)
    assert (r.examples, r.local_steps, r.local_lr, r.local_batch_size) == (4, 3, 0.05, 2)
    assert r.exact and r.assumptions == ()


def test_what_a_client_does_not_report_becomes_a_stated_assumption():
    r = resolve_replay({}, num_examples=8, local_steps=5, local_lr=0.01, local_batch_size=None)
    assert not r.exact
    assert (r.examples, r.local_steps, r.local_lr, r.local_batch_size) == (8, 5, 0.01, 8)
    text = " | ".join(r.assumptions)
    for word in ("num-examples", "local-steps=5", "local-lr=0.01", "local-batch-size=8", "optimizer=sgd"):
        assert word in text, word
    # a shuffled order over more than one pass cannot be replayed exactly; within one pass it can
    many = resolve_replay(replay_facts(examples=4, local_steps=6, local_lr=0.1, local_batch_size=2,
                                       batch_order="shuffled", shuffle_seed=3), num_examples=4, local_steps=1,
                          local_lr=1.0, local_batch_size=None)
    assert not many.exact and "does not reproduce" in " ".join(many.assumptions)
    one = resolve_replay(replay_facts(examples=4, local_steps=2, local_lr=0.1, local_batch_size=2,
                                      batch_order="shuffled"), num_examples=4, local_steps=1, local_lr=1.0,
                         local_batch_size=None)
    assert one.exact and "one pass" in one.assumptions[0]
    adam = resolve_replay({**replay_facts(examples=1, local_steps=1, local_lr=0.1, local_batch_size=1),
                           "optimizer": "adam"}, num_examples=1, local_steps=1, local_lr=1.0, local_batch_size=None)
    assert not adam.exact and "adam" in adam.assumptions[0]


def test_bad_reports_are_errors_that_say_what_was_expected():
    with pytest.raises(gl.ValidationError, match="local_steps must be an int >= 1"):
        replay_facts(examples=1, local_steps=0, local_lr=0.1, local_batch_size=1)
    with pytest.raises(gl.ValidationError, match="batch_order"):
        replay_facts(examples=1, local_steps=1, local_lr=0.1, local_batch_size=1, batch_order="random")
    with pytest.raises(gl.ValidationError, match="unknown replay field"):
        resolve_replay({"steps": 3}, num_examples=1, local_steps=1, local_lr=0.1, local_batch_size=None)
    with pytest.raises(gl.ValidationError, match="local-lr"):
        resolve_replay({"local-lr": -1.0}, num_examples=1, local_steps=1, local_lr=0.1, local_batch_size=None)


def test_legacy_metrics_carry_the_report_with_a_prefix():
    m = {"loss": 0.3, **replay_metrics(examples=2, local_steps=1, local_lr=0.1, local_batch_size=2, client="c-1")}
    assert all(k.startswith("gradleak.") for k in m if k != "loss")
    assert reported_from_metrics(m) == replay_facts(examples=2, local_steps=1, local_lr=0.1, local_batch_size=2,
                                                    client="c-1")


def test_replay_batches_follow_the_order_the_audit_replays():
    assert [(s.start, s.stop) for s in replay_batches(5, 2, 4)] == [(0, 2), (2, 4), (0, 2), (2, 4)]
    # the update a client trains with them is the one the Case replays
    model = FED.build_model().double()
    x, y = gl.data.load_digits(num_images=4).batch(4)
    x = x.double()
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for sl in replay_batches(4, 2, 3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(FED.spec.normalize(x[sl])), y[sl]).backward()
        opt.step()
    delta = {k: (dict(model.named_parameters())[k] - p).detach() for k, p in start.named_parameters()}
    case = gl.Case.from_observed(start, delta, spec=FED.spec, batch_size=4, protocol="fedavg", local_steps=3,
                                 local_lr=0.1, local_batch_size=2, labels=y)
    assert case.residual(x) < 1e-12


# ---- the audit core on a client update built here (what aggregate_train hands it) ----------------------------

def _client_update(model, x, y, steps=2, lr=0.1):
    trained = copy.deepcopy(model)
    DigitsFederation(clients=1, model_options={"width": 16}, local_steps=steps, local_lr=lr).local_training(
        trained, x, y)
    return ([v.numpy().copy() for v in model.state_dict().values()],
            [v.detach().numpy().copy() for v in trained.state_dict().values()])


def test_an_unreported_client_is_audited_under_stated_assumptions(tmp_path):
    model = FED.build_model()
    x, y = gl.data.load_digits(num_images=1, start=5).batch(1)
    sent, back = _client_update(model, x, y, steps=2, lr=0.1)
    truth = SimulationTruth(tmp_path / "truth")
    truth.share(12345678901234567890, 1, x, y)  # keyed by the node id
    auditor = Auditor(model, FED.spec, attack="fc-analytic", local_steps=2, local_lr=0.1, truth=truth,
                      out_dir=tmp_path / "out", dtype=torch.float64, verbose=False)
    rec = auditor.audit_update(1, 12345678901234567890, sent, back, num_examples=1, reported={})
    assert rec.client == "node-0" and rec.node_id == "12345678901234567890"
    assert not rec.replay.exact and any("local-steps=2" in a for a in rec.replay.assumptions)
    assert rec.psnr >= 20  # the defaults happen to be right here, so the reconstruction is still good
    auditor.end_round(1)
    data = auditor.summary()
    assert data["records"][0]["assumptions"] == list(rec.replay.assumptions)
    page = (tmp_path / "out" / "index.html").read_text()
    assert "local-steps=2: the audit&#x27;s default (not reported)" in page


def test_a_failed_attack_becomes_a_record_not_a_crash(tmp_path):
    model = FED.build_model()
    x, y = gl.data.load_digits(num_images=1).batch(1)
    sent, _ = _client_update(model, x, y)
    auditor = Auditor(model, FED.spec, attack="fc-analytic", verbose=False)
    rec = auditor.audit_update(1, 7, sent, sent, num_examples=1, reported={"client": "bob"})  # a zero update
    assert rec.client == "bob" and rec.error and "RequirementError" in rec.error and rec.psnr is None
    strict = Auditor(model, FED.spec, attack="fc-analytic", verbose=False, on_error="raise")
    with pytest.raises(gl.RequirementError):
        strict.audit_update(1, 7, sent, sent, num_examples=1, reported={})


# ---- the simulation-only truth channel ----------------------------------------------------------------------

def test_truth_channel_round_trip_and_refusal_outside_its_simulation(tmp_path):
    truth = SimulationTruth(tmp_path / "t")
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 1])
    class Context:  # what a ClientApp gets: the node id is the key the server also sees
        node_id = 4242

    truth.share(Context(), 2, x, y)
    got = truth.get(4242, 2)
    assert torch.equal(got.inputs, x) and torch.equal(got.labels, y)
    assert truth.get(4242, 1) is None and truth.get(4243, 2) is None
    # a copy of the registry on a machine without its directory (a real deployment) refuses to share
    remote = pickle.loads(pickle.dumps(truth))
    remote.directory = tmp_path / "elsewhere"
    with pytest.raises(gl.GradleakError, match="not on this machine"):
        remote.share(4242, 3, x, y)
    # and a registry built by someone else (another token) over the same directory is not this one
    SimulationTruth(tmp_path / "t")
    with pytest.raises(gl.GradleakError, match="not on this machine"):
        truth.share(4242, 3, x, y)


def test_truth_is_removed_on_close():
    truth = SimulationTruth()
    truth.share(1, 1, torch.rand(1, 1, 2, 2), torch.tensor([0]))
    assert truth.directory.is_dir()
    truth.close()
    assert not truth.directory.exists()


# ---- the converter -----------------------------------------------------------------------------------------

def test_case_from_flower_checks_the_arrays_and_takes_names_or_order():
    model = gl.models.build("mlp", input_shape=(1, 4, 4), num_classes=3, width=8)
    arrays = [v.numpy() for v in model.state_dict().values()]
    spec = gl.DataSpec(shape=(1, 4, 4), num_classes=3)
    replay = resolve_replay(replay_facts(examples=1, local_steps=1, local_lr=0.1, local_batch_size=1),
                            num_examples=1, local_steps=1, local_lr=0.1, local_batch_size=None)
    with pytest.raises(gl.ValidationError, match="one array per state_dict entry"):
        case_from_flower(model, arrays[:-1], arrays, spec=spec, replay=replay)
    bad = list(arrays)
    bad[0] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(gl.ValidationError, match="expected"):
        case_from_flower(model, arrays, bad, spec=spec, replay=replay)
    named = dict(zip(model.state_dict(), arrays))
    moved = {k: v + 1 for k, v in reversed(list(named.items()))}  # by name, whatever the record's order
    case = case_from_flower(model, named, moved, spec=spec, replay=replay)
    assert case.protocol == "fedavg" and all(torch.allclose(v, torch.ones_like(v)) for v in case.observed.values())
