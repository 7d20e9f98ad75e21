"""Real Flower simulations (Ray workers, no stubs) audited round by round, on the Message API and on the legacy
Strategy API: every client update of every round is reconstructed, PSNR is measured through the simulation-only
truth channel, and the federation ends with exactly the parameters it reaches without the audit."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("ray")  # installed by the test extra (flwr[simulation])

from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy import FedAvg as LegacyFedAvg  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from gradleak.integrations.flower import LeakageAudit, LegacyLeakageAudit, SimulationTruth  # noqa: E402
from gradleak.integrations.flower import simulation as sim  # noqa: E402

# two clients, two rounds, one digit each per round, two local SGD steps: an MLP's first layer gives the
# digit back in closed form from the FedAvg update
FED = sim.DigitsFederation(clients=2, model="mlp", model_options={"width": 32}, batch=1, local_steps=2,
                           local_lr=0.1)
ROUNDS = 2


def _audit_options(out_dir, truth):
    return dict(attack="fc-analytic", out_dir=out_dir, truth=truth, dtype=torch.float64, on_error="raise")


@pytest.fixture(scope="module")
def message_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("message")
    truth = SimulationTruth()
    audited = LeakageAudit(FedAvg(fraction_evaluate=0.0), FED.build_model(), FED.spec,
                           **_audit_options(out / "audit", truth))
    blind = LeakageAudit(FedAvg(fraction_evaluate=0.0), FED.build_model(), FED.spec,
                         **_audit_options(out / "blind", None))
    # one simulation, three federations from the same start on the same clients: plain, audited, audited
    # without the truth channel
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the ServerApp runs in a thread of this process
        finals = sim.run(FED, [FedAvg(fraction_evaluate=0.0), audited, blind], rounds=ROUNDS, truth=truth)
    yield {"finals": finals, "audited": audited, "blind": blind, "out": out / "audit",
           "printed": printed.getvalue().splitlines()}
    truth.close()


def _check_audit(audit, out):
    recs = audit.records
    assert len(recs) == 4
    assert sorted((r.server_round, r.client) for r in recs) == [(1, "client-0"), (1, "client-1"),
                                                                  (2, "client-0"), (2, "client-1")]
    for r in recs:
        assert r.error is None
        assert r.psnr >= 20, (r.server_round, r.client, r.psnr)
        assert r.replay.exact and not r.replay.assumptions  # the clients reported everything
        assert r.replay.local_steps == FED.local_steps and r.replay.examples == FED.batch
        assert r.report_dir == out / f"round-{r.server_round:03d}" / r.client
        assert (r.report_dir / "reconstruction.png").is_file()
    data = json.loads((out / "leakage.json").read_text())
    assert len(data["records"]) == 4
    for d in data["records"]:
        assert {"round", "client", "residual", "psnr", "assumptions"} <= set(d)
        assert d["psnr"] >= 20 and d["residual"] < 1e-6
    assert data["worst_round"]["round"] in (1, 2) and data["worst_round"]["by"] == "psnr"
    assert (out / "leakage.png").stat().st_size > 0 and (out / "index.html").is_file()


def test_message_api_audit_reconstructs_every_client_of_every_round(message_run):
    _check_audit(message_run["audited"], message_run["out"])


def test_message_api_audit_does_not_change_the_federation(message_run):
    plain, audited, blind = message_run["finals"]
    assert set(plain) == set(audited)
    for k in plain:
        assert np.array_equal(plain[k], audited[k]), k
        assert np.array_equal(plain[k], blind[k]), k
    # and the federation really trained: the final model is not the initial one
    init = FED.build_model().state_dict()
    assert any(not np.array_equal(plain[k], init[k].numpy()) for k in plain)


def test_without_the_truth_channel_only_the_residual_is_known(message_run):
    recs = message_run["blind"].records
    assert len(recs) == 4
    assert all(r.psnr is None and r.ssim is None for r in recs)
    assert all(r.residual < 1e-6 for r in recs)
    data = message_run["blind"].summary_dict()
    assert data["worst_round"]["by"] == "residual" and all(d["psnr"] is None for d in data["records"])


def test_one_line_per_round_is_printed_as_the_run_goes(message_run):
    lines = [ln for ln in message_run["printed"] if ln.startswith("[gradleak]")]
    rounds = [ln for ln in lines if ln.startswith("[gradleak] round ")]
    # two audited federations of two rounds each, then one closing line per federation
    assert [ln.split(":")[0] for ln in rounds] == ["[gradleak] round 1", "[gradleak] round 2"] * 2
    assert all("2 client(s)" in ln and "residual" in ln for ln in rounds)
    assert "PSNR" in rounds[0] and "no truth shared" in rounds[2]
    assert sum("leakage was worst in round" in ln for ln in lines) == 2


class _KeepFinal(LegacyFedAvg):
    """Legacy FedAvg that keeps the global parameters it aggregated last (start_simulation returns only a
    History)."""

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        self.final = parameters_to_ndarrays(params)
        return params, metrics


def _legacy_strategy():
    return _KeepFinal(fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                      on_fit_config_fn=sim.fit_config)


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("legacy")
    truth = SimulationTruth()
    plain = _legacy_strategy()
    inner = _legacy_strategy()
    audited = LegacyLeakageAudit(inner, FED.build_model(), FED.spec, **_audit_options(out, truth))
    try:
        sim.run_legacy(FED, plain, rounds=ROUNDS, truth=truth)
        sim.run_legacy(FED, audited, rounds=ROUNDS, truth=truth, keep_initialised=True)
    finally:
        ray.shutdown()
    yield {"plain": plain, "inner": inner, "audited": audited, "out": out}
    truth.close()


@pytest.mark.slow
def test_legacy_api_audit_reconstructs_and_does_not_change_the_federation(legacy_run):
    _check_audit(legacy_run["audited"], legacy_run["out"])
    plain, audited = legacy_run["plain"].final, legacy_run["inner"].final
    assert len(plain) == len(audited)
    assert all(np.array_equal(a, b) for a, b in zip(plain, audited))


@pytest.mark.slow
def test_legacy_strategy_in_a_serverapp_built_from_server_fn_is_audited(tmp_path):
    # the other legacy path: ServerApp(server_fn=...) returning ServerAppComponents, run by run_simulation
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    truth = SimulationTruth()
    audit = LegacyLeakageAudit(_legacy_strategy(), FED.build_model(), FED.spec, **_audit_options(tmp_path, truth))
    server = ServerApp(server_fn=lambda context: ServerAppComponents(strategy=audit,
                                                                     config=ServerConfig(num_rounds=ROUNDS)))
    try:
        run_simulation(server_app=server, client_app=ClientApp(client_fn=sim.legacy_client_fn(FED, truth)),
                       num_supernodes=FED.clients, backend_config=sim.backend_config())
    finally:
        truth.close()
    _check_audit(audit, tmp_path)
