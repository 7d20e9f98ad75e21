"""A single run with a defense that has accounting (dp-sgd): metrics.json and report.html show epsilon, delta
and the accounting assumptions (rounds, steps per round, sampling rate, accountant)."""

import html
import json

import pytest

import gradleak as gl
from gradleak.defenses import accountant_epsilon


def _run(tmp_path, name, defenses):
    cfg = gl.AttackRun(attack="fc-analytic", model="mlp", image_size=16, dtype="float64",
                       model_options={"width": 32}, defenses=defenses, out=str(tmp_path / name))
    gl.run_attack(cfg)
    out = tmp_path / name
    return json.loads((out / "metrics.json").read_text()), (out / "report.html").read_text()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_dp_sgd_run_shows_epsilon_delta_and_the_assumptions(tmp_path, accountant):
    spec = f"dp-sgd:max_grad_norm=1,noise_multiplier=1.1,rounds=20,sample_rate=0.01,delta=1e-6,accountant={accountant}"
    m, page = _run(tmp_path, accountant, [spec])
    p = m["privacy"]
    want = accountant_epsilon(1.1, 0.01, 20, 1e-6, accountant)  # FedSGD: one step per round
    assert p["epsilon"] == pytest.approx(want, rel=1e-12) and p["guarantee"] is True
    assert (p["delta"], p["rounds"], p["steps_per_round"], p["steps"], p["sample_rate"], p["accountant"]) == \
        (1e-6, 20, 1, 20, 0.01, accountant)
    assert m["case"]["meta"]["privacy"]["epsilon"] == p["epsilon"]
    text = html.unescape(page)
    assert f"ε = {want:.4g} at δ = 1e-06" in text
    for shown in ("20 round(s) x 1 step(s) per round", "<th>sampling rate</th><td>0.01</td>",
                  f"<th>accountant</th><td>{accountant}</td>", "Poisson sampling"):
        assert shown in text, shown


def test_no_accounting_no_privacy_section_and_sigma_zero_says_no_guarantee(tmp_path):
    m, page = _run(tmp_path, "noise", ["noise:sigma=1e-3"])
    assert "privacy" not in m and "<h2>Privacy</h2>" not in page
    m, page = _run(tmp_path, "zero", ["dp-sgd:max_grad_norm=1,noise_multiplier=0"])
    assert m["privacy"]["epsilon"] is None and m["privacy"]["guarantee"] is False
    assert "no privacy guarantee" in page and "ε =" not in html.unescape(page)
