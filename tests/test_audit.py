"""The audit (issue 12): planning, threat models, verdicts, resume, bad input, the CLI, custom models."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.audit import threat
from gradleak.audit.plan import AuditConfig, plan
from gradleak.cli import main


def _cli(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- the main test of the issue ----------------------------------------------------------------------
def test_audit_lenet_no_defense_leaks_and_pruning_stops_ig(tmp_path, capsys):
    out = tmp_path / "audit"
    code, stdout, _ = _cli(["audit", "--model", "lenet", "--num-images", "2", "--defense", "none",
                            "--defense", "prune:ratio=0.99", "--attacks", "ig", "--budget", "quick",
                            "--workers", "1", "--out", str(out), "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["threat_model"] == threat.DEFAULT
    doc = json.loads((out / "audit.json").read_text())
    assert doc["schema"] == "gradleak.audit" and doc["schema_version"] >= 1
    ig = [j for j in doc["jobs"] if j["attack"] == "inverting-gradients" and j["defense"] == "none"]
    assert len(ig) == 2 and all(j["status"] == "done" for j in ig)
    assert min(j["psnr"] for j in ig) >= 25.0  # both photos recognisable without a defense
    by_defense = {v["defense"]: v for v in doc["verdict"]}
    assert by_defense["none"]["status"] == "leaks" and by_defense["none"]["recognisable"] == 2
    pruned = by_defense["prune:ratio=0.99"]
    assert pruned["status"] == "no recognisable image" and pruned["recognisable"] == 0
    assert pruned["worst_psnr"] < doc["thresholds"]["recognisable_psnr_db"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # embedded images
    assert threat.get(threat.DEFAULT).title in html or threat.DEFAULT in html
    # one job directory per attack x defense x batch, with the files `gradleak attack` writes
    for j in doc["jobs"]:
        assert (out / j["dir"] / "metrics.json").is_file() and (out / j["dir"] / "reconstruction.png").is_file()
    assert doc["command"].startswith("gradleak audit") and "--defense prune:ratio=0.99" in doc["command"]


@pytest.mark.slow
def test_audit_auto_attacks_quick_budget(tmp_path):
    res = gl.audit("lenet", num_images=2, defenses=["none", "prune:ratio=0.99"], budget="quick", out=tmp_path / "a")
    doc = res.data
    names = set(doc["attacks"]["planned"])
    assert {"inverting-gradients", "rgap", "layerwise", "dlg", "idlg"} <= names
    skipped = {s["attack"]: s["reason"] for s in doc["attacks"]["skipped"]}
    assert "tensor" in skipped and "two-layer" in skipped["tensor"]
    assert "malicious server" in skipped["imprint"]
    ig = [j for j in doc["jobs"] if j["attack"] == "inverting-gradients" and j["defense"] == "none"]
    assert min(j["psnr"] for j in ig) >= 25.0
    v = {x["defense"]: x for x in doc["verdict"]}
    assert v["none"]["status"] == "leaks" and v["prune:ratio=0.99"]["status"] == "no recognisable image"


# ---- planning: applicability and threat models ---------------------------------------------------------
def test_plan_skips_with_reasons_and_honest_server_never_runs_crafting_attacks(tmp_path):
    cfg = AuditConfig(model="lenet", num_images=2, batch_sizes=[1, 2], attacks="auto")
    p = plan(cfg, tmp_path)
    ran = {(j.attack, j.batch_size) for j in p.jobs}
    assert ("inverting-gradients", 1) in ran and ("inverting-gradients", 2) in ran
    assert ("layerwise", 2) not in ran and ("layerwise", 1) in ran  # the layer systems are per sample
    reasons = {(s["attack"], s["batch_size"]): s["reason"] for s in p.skipped}
    assert "batch size 1" in reasons[("layerwise", 2)]
    for name in ("imprint", "trap-weights"):
        assert all(j.attack != name for j in p.jobs)
        assert "active-manipulator" in reasons[(name, 1)]
    # every image is in exactly one job per (attack, defense, batch size)
    ig2 = [j for j in p.jobs if j.attack == "inverting-gradients" and j.batch_size == 2]
    assert [j.images for j in ig2] == [[0, 1]]


def test_malicious_threat_model_runs_imprint(tmp_path):
    res = gl.audit("lenet", num_images=2, batch_sizes=[2], attacks=["imprint"], threat_model="active-manipulator",
                   dtype="float64", out=tmp_path / "m", workers=1)
    (job,) = res.jobs
    assert job["status"] == "done" and job["attack"] == "imprint"
    assert res.data["threat_model"]["may_modify_model"] is True
    assert res.verdict[0]["status"] == "leaks"
    honest = gl.audit("lenet", num_images=2, batch_sizes=[2], attacks=["imprint"], out=tmp_path / "h", workers=1)
    assert honest.jobs == [] and "malicious server" in honest.data["attacks"]["skipped"][0]["reason"]
    assert honest.verdict[0]["status"] == "incomplete"  # nothing ran: no conclusion, not "safe"


def test_threat_models_map_to_case_facts():
    assert threat.get("honest-but-curious").name == "parameter-aware"
    assert threat.get("c").labels_known is False and threat.get("e").labels_known is True
    assert threat.get("malicious").may_modify_model and not threat.get("parameter-aware").may_modify_model
    for name in threat.threat_models.names():
        tm = threat.get(name)
        d = tm.to_dict()
        assert set(d["server_knows"]) == {"parameters", "labels", "batch_size", "bn_statistics",
                                          "local_hyperparameters"}
        # a preset that denies a fact the attacks use says so
        if not tm.batch_size:
            assert any("batch size" in s for s in tm.optimistic_for_attacker)


def test_labels_follow_the_threat_model(tmp_path):
    from gradleak.audit.plan import base_run

    cfg = AuditConfig(model="lenet")
    assert base_run(cfg, threat.get("parameter-aware")).labels_known is False
    assert base_run(cfg, threat.get("statistical-informed")).labels_known is True


def test_budgets_are_declared_by_attacks():
    ig = gl.attacks.attacks.get("inverting-gradients")
    q, s = ig.budget("quick")[1], ig.budget("thorough")[1]
    assert q["max_iterations"] < s["max_iterations"]
    assert gl.attacks.attacks.get("layerwise").budget("thorough")[0] == "paper"
    assert gl.attacks.attacks.get("rgap").budget("thorough") == (None, {})
    with pytest.raises(gl.ValidationError, match="quick, standard, thorough"):
        ig.budget("fast")


# ---- resume --------------------------------------------------------------------------------------------
def test_resume_skips_finished_jobs_and_reruns_the_rest(tmp_path):
    out = tmp_path / "r"
    kw = dict(num_images=3, attacks=["rgap"], out=out, workers=1)
    first = gl.audit("lenet", **kw)
    assert [j["status"] for j in first.jobs] == ["done"] * 3
    dirs = [out / j["dir"] for j in first.jobs]
    stamps = [(d / "config.json").stat().st_mtime_ns for d in dirs]
    # job 0 interrupted (metrics say so), job 1 never written: both must run again; job 2 is kept
    m = json.loads((dirs[0] / "metrics.json").read_text())
    m["interrupted"] = True
    (dirs[0] / "metrics.json").write_text(json.dumps(m))
    import shutil

    shutil.rmtree(dirs[1])
    again = gl.audit("lenet", **kw)
    status = [j["status"] for j in again.jobs]
    assert status == ["done", "done", "resumed"]
    assert (dirs[2] / "config.json").stat().st_mtime_ns == stamps[2]
    assert again.jobs[2]["psnr"] == first.jobs[2]["psnr"]
    # other settings in the same directory are refused, not mixed
    with pytest.raises(gl.GradleakError, match="other settings"):
        gl.audit("lenet", **{**kw, "num_images": 2})


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--threat-model", "insider"], "unknown threat model"),
    (["--budget", "huge"], "unknown budget"),
    (["--backend", "spark"], "--backend"),
    (["--defense", "prune:ratio=1.5"], "ratio"),
    (["--attacks", "ig,nosuch"], "unknown attack"),
    (["--batch-sizes", "8", "--num-images", "2"], "exceeds num_images"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    code, _, err = _cli(["audit", "--model", "lenet", "--out", str(tmp_path / "x"), *flags], capsys)
    assert code == 2
    assert needle in _one_line_error(err)
    assert not (tmp_path / "x").exists()  # refused before any work


# ---- your own model --------------------------------------------------------------------------------------
_NET = textwrap.dedent("""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self, input_shape=(3, 32, 32), num_classes=10, hidden=24):
            super().__init__()
            c, h, w = input_shape
            self.body = nn.Sequential(nn.Conv2d(c, 6, 5, stride=2, padding=2), nn.Sigmoid(), nn.Flatten(),
                                      nn.Linear(6 * (h // 2) * (w // 2), hidden), nn.Sigmoid(),
                                      nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.body(x)

    class Broken(nn.Module):
        def __init__(self, input_shape=(3, 32, 32), num_classes=10):
            super().__init__()
            self.fc = nn.Linear(7, num_classes)

        def forward(self, x):
            return self.fc(x)  # wrong input size: crashes on the data
""")


def test_custom_model_file_through_the_cli(tmp_path, capsys):
    f = tmp_path / "mynet.py"
    f.write_text(_NET)
    out = tmp_path / "c"
    code, stdout, err = _cli(["audit", "--model", f"{f}:TinyNet", "--model-opt", "hidden=16", "--num-images", "1",
                              "--attacks", "rgap", "--workers", "1", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads((out / "audit.json").read_text())
    hidden, classes = 16, doc["model"]["num_classes"]  # the classes come from the data (the bundled photos')
    assert classes == gl.data.samples().spec.num_classes
    expected = (3 * 6 * 25 + 6) + (6 * 16 * 16 * hidden + hidden) + (hidden * classes + classes)
    assert doc["model"]["parameters"] == expected
    assert doc["jobs"][0]["status"] == "done" and doc["jobs"][0]["psnr"] is not None


def test_crashing_custom_model_is_exit_2(tmp_path, capsys):
    f = tmp_path / "mynet.py"
    f.write_text(_NET)
    code, _, err = _cli(["audit", "--model", f"{f}:Broken", "--num-images", "1", "--attacks", "ig",
                         "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    line = _one_line_error(err)
    assert "Broken" in line or "mat1" in line or "shape" in line


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.Sigmoid(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def test_gl_audit_takes_a_module_and_tensors(tmp_path):
    torch.manual_seed(0)
    model = _Small()
    x = gl.data.samples(num_images=2).images
    y = torch.tensor([3, 5])
    res = gl.audit(model, (x, y), num_images=2, attacks=["fc-analytic"], dtype="float64", out=tmp_path / "t",
                   workers=1)
    assert res.data["data"]["labels"] == [3, 5]
    jobs = [j for j in res.jobs if j["status"] == "done"]
    assert len(jobs) == 2 and min(j["psnr"] for j in jobs) > 100  # the analytic read-out is exact in float64


def test_report_names_skipped_attacks_and_risk_never_reads_safe(tmp_path):
    res = gl.audit("resnet20", num_images=1, attacks=["rgap", "layerwise"], out=tmp_path / "s", workers=1)
    risk = {r["analysis"]: r for r in res.data["risk"]}
    assert risk["rgap-rank"]["applies"] is False and "BatchNorm" in risk["rgap-rank"]["reason"]
    assert res.jobs == [] and len(res.data["attacks"]["skipped"]) == 2
    assert res.verdict[0]["status"] == "incomplete"
    html = (tmp_path / "s" / "report.html").read_text()
    assert not re.search(r"\bsafe\b", html.lower().replace("unsafe", ""))


def test_a_requirement_found_at_run_time_is_not_applicable_not_a_failure(tmp_path):
    """Under noise layer-wise cannot read the label from the bias gradient: its own check says so when it runs
    (the plan's probe is undefended). That job is 'not applicable' with the reason, listed with the skipped
    attacks, and the defense's verdict says no attack applied, not that a job failed."""
    res = gl.audit("lenet", num_images=1, attacks=["layerwise"], defenses=["none", "noise:sigma=0.01"],
                   out=tmp_path / "na", workers=1)
    by_defense = {j["defense"]: j for j in res.jobs}
    assert by_defense["none"]["status"] == "done"
    noisy = by_defense["noise:sigma=0.01"]
    assert noisy["status"] == "not applicable" and "label cannot be read" in noisy["error"]
    verdict = {v["defense"]: v for v in res.verdict}
    assert verdict["noise:sigma=0.01"]["status"] == "incomplete"
    assert "no attack applies" in verdict["noise:sigma=0.01"]["statement"]
    assert verdict["noise:sigma=0.01"]["jobs_failed"] == 0 and "failed" not in verdict["noise:sigma=0.01"]["statement"]
    html = (tmp_path / "na" / "report.html").read_text()
    skipped = html[html.index('id="skipped"'):html.index('id="failed"')]
    start = html.index('id="failed"')
    failed = html[start:html.index("<h2", start)]  # the failed-jobs section alone
    assert "not applicable when it ran" in skipped and "label cannot be read" in skipped
    assert "label cannot be read" not in failed


# ---- execution: Ctrl-C and Ray --------------------------------------------------------------------------
def test_ctrl_c_writes_the_report_of_what_finished(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "i"
    env = {**os.environ, "PYTHONPATH": str(Path(gl.__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "gradleak.cli", "audit", "--model", "lenet", "--num-images", "4",
                          "--attacks", "rgap", "--workers", "1", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the first job has finished
        try:
            doc = json.loads((out / "audit.json").read_text())
            if any(j["status"] == "done" for j in doc["jobs"]):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    doc = json.loads((out / "audit.json").read_text())
    assert doc["interrupted"] is True
    done = [j for j in doc["jobs"] if j["status"] == "done"]
    assert 1 <= len(done) < 4
    assert (out / "report.html").is_file()
    # the rerun finishes the rest without redoing the finished ones
    again = gl.audit("lenet", num_images=4, attacks=["rgap"], out=out, workers=1)
    kept = {j["id"] for j in again.jobs if j["status"] == "resumed"}
    assert {j["id"] for j in done} <= kept and all(j["status"] in ("done", "resumed") for j in again.jobs)


@pytest.mark.slow
def test_ray_and_local_backends_give_the_same_scores(tmp_path):
    kw = dict(num_images=2, attacks=["ig", "rgap"], defenses=["none", "noise:sigma=0.01"])
    local = gl.audit("lenet", out=tmp_path / "local", workers=2, **kw)
    ray = gl.audit("lenet", out=tmp_path / "ray", backend="ray", workers=2, **kw)
    a = {j["id"]: j["psnr"] for j in local.jobs}
    b = {j["id"]: j["psnr"] for j in ray.jobs}
    assert a == b and len(a) == 8 and all(v is not None for v in a.values())
    assert [v["status"] for v in local.verdict] == [v["status"] for v in ray.verdict]
