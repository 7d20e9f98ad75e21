"""The audit's batched groups (issue 15 part 1): jobs of one optimisation attack, defense and batch size on one
model run as one ``reconstruct_many`` unit and still write each job's own directory and outcome.

Tolerance: the grouped run sums in another order than the jobs run alone (vmap over the cases), so the two
agree to the tolerance tests/test_batched_trials.py states in float64: reconstructions within 1e-9 for signed
Adam (IG, 25 steps) and 1e-7 for L-BFGS (DLG, 20 iterations); PSNR, a smooth function of the reconstruction,
within that relative tolerance x 1e3 (as that test allows the residual).
"""

from __future__ import annotations

import html
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gradleak as gl
from gradleak import experiment
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization.dlg import DLG
from gradleak.attacks.optimization.inverting import InvertingGradients
from gradleak.audit.execute import INTERRUPTED_BATCH, Job, Outcome, plan_units, run_jobs
from gradleak.audit.plan import AuditConfig, plan
from gradleak.cli import build_parser

TOL = {"inverting-gradients": 1e-9, "dlg": 1e-7}


@pytest.fixture
def small_budget(monkeypatch):
    """The quick budget cut to a few steps (the audit runs in this process: workers=1)."""
    monkeypatch.setitem(InvertingGradients.budgets, "quick", {"max_iterations": 25, "restarts": 2})
    monkeypatch.setitem(DLG.budgets, "quick", {"max_iterations": 20})


@pytest.fixture
def batched_calls(monkeypatch):
    """The starts of every job list given to run_attacks_batched (the grouped units that ran)."""
    seen = []
    real = experiment.run_attacks_batched

    def spy(cfgs, **kw):
        seen.append([c.start for c in cfgs])
        return real(cfgs, **kw)

    monkeypatch.setattr(experiment, "run_attacks_batched", spy)
    return seen


AUDIT = dict(num_images=3, attacks=["ig", "dlg"], dtype="float64", workers=1)


def test_grouped_audit_equals_the_jobs_run_alone(tmp_path, small_budget, batched_calls):
    # labels known, as in the batched tests' L-BFGS tolerance (with label logits optimised too, L-BFGS on photo
    # 2 drifts 4e-5 apart after 5 iterations: that chaos is DLG's, not the grouping's)
    kw = {**AUDIT, "threat_model": "statistical-informed"}
    grouped = gl.audit("lenet", out=tmp_path / "g", **kw)
    assert batched_calls == [[0, 1, 2], [0, 1, 2]]  # one unit per attack, all three images in it
    batched_calls.clear()
    alone = gl.audit("lenet", out=tmp_path / "a", batch=False, **kw)
    assert batched_calls == []
    assert grouped.data["batch"]["enabled"] is True and alone.data["batch"] == {"enabled": False, "group_size": 16,
                                                                            "not_batched": []}
    assert "--no-batch" in alone.data["command"] and "--no-batch" not in grouped.data["command"]
    a = {j["id"]: j for j in alone.jobs}
    assert len(grouped.jobs) == len(a) == 6
    for g in grouped.jobs:
        s = a[g["id"]]
        assert g["status"] == s["status"] == "done"
        assert g["group"] == {"jobs": 3, "batched": True} and s["group"] is None
        gdir, sdir = tmp_path / "g" / g["dir"], tmp_path / "a" / s["dir"]
        assert sorted(p.name for p in gdir.iterdir()) == sorted(p.name for p in sdir.iterdir())
        gm, sm = (json.loads((d / "metrics.json").read_text()) for d in (gdir, sdir))
        assert set(gm) == set(sm)
        note = gm["info"]["batched"]
        note = note[0] if isinstance(note, list) else note
        assert note["batched"] is True and note["setups_in_batch"] == 3
        assert g["batched_paths"] == note["paths"]
        tol = TOL[g["attack"]]
        x_g = load_file(str(gdir / "reconstruction.safetensors"))["inputs"]
        x_s = load_file(str(sdir / "reconstruction.safetensors"))["inputs"]
        torch.testing.assert_close(x_g, x_s, rtol=0, atol=tol)
        assert g["psnr"] == pytest.approx(s["psnr"], rel=1e3 * tol)
        assert g["psnr_per_image"] == pytest.approx(s["psnr_per_image"], rel=1e3 * tol)
    assert [v["status"] for v in grouped.verdict] == [v["status"] for v in alone.verdict]
    html_g, html_a = grouped.report.read_text(), alone.report.read_text()
    assert "6 of 6 jobs ran in batched groups" in html_g and "ran in batched groups" not in html_a
    for g in grouped.jobs:  # each attack's claim, as its jobs' metrics state it
        assert f"<i>{g['attack']}</i>: {html.escape(g['batched_paths'])}." in html_g


def ig_job(tmp_path, name, *, start=0, group="ig", iterations=20, **extra) -> Job:
    cfg = gl.AttackRun(attack="ig", model="lenet", image_size=16, num_images=1, start=start, iterations=iterations,
                       dtype="float64", out=str(tmp_path / name), **extra)
    return Job(id=name, config=cfg.to_dict(), group=group)


def test_a_failing_case_does_not_lose_its_group(tmp_path):
    """Image 50 of 19: the group's batched run raises, its jobs run one by one, only that job fails and the
    others are exactly what they give alone."""
    jobs = [ig_job(tmp_path, "good-0"), ig_job(tmp_path, "bad", start=50), ig_job(tmp_path, "good-1", start=1)]
    out = {o.id: o for o in run_jobs(jobs, workers=1)}
    alone = {o.id: o for o in run_jobs([ig_job(tmp_path / "alone", "good-0", group=None),
                                        ig_job(tmp_path / "alone", "good-1", start=1, group=None)], workers=1)}
    bad = out["bad"]
    assert bad.status == "failed" and bad.result is None and "\n" not in bad.error
    assert bad.group["batched"] is False and bad.group["jobs"] == 3
    assert bad.group["fallback"] == bad.error  # the group failed on that job's own error
    for name in ("good-0", "good-1"):
        o = out[name]
        assert o.status == "done" and o.group == bad.group
        assert o.result["psnr"] == alone[name].result["psnr"]  # one by one: the same run as alone
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["psnr"] == pytest.approx(o.result["psnr"])


def test_a_failed_group_is_a_warning_in_the_audit(tmp_path, small_budget, monkeypatch):
    def broken(cfgs, **kw):
        raise RuntimeError("the batched run broke")

    monkeypatch.setattr(experiment, "run_attacks_batched", broken)
    res = gl.audit("lenet", out=tmp_path / "w", **{**AUDIT, "attacks": ["ig"], "num_images": 2})
    assert [j["status"] for j in res.jobs] == ["done", "done"]
    assert all(j["group"] == {"jobs": 2, "batched": False, "fallback": "RuntimeError: the batched run broke"}
               for j in res.jobs)
    assert sum("ran one by one" in w and "the batched run broke" in w for w in res.data["warnings"]) == 2


def test_resume_runs_only_the_unfinished_jobs_of_a_group(tmp_path, small_budget, batched_calls):
    out = tmp_path / "r"
    kw = {**AUDIT, "attacks": ["ig"], "num_images": 4}
    first = gl.audit("lenet", out=out, **kw)
    assert batched_calls == [[0, 1, 2, 3]]
    dirs = [out / j["dir"] for j in first.jobs]
    stamps = [(d / "config.json").stat().st_mtime_ns for d in dirs]
    m = json.loads((dirs[0] / "metrics.json").read_text())
    m["interrupted"] = True
    (dirs[0] / "metrics.json").write_text(json.dumps(m))
    import shutil

    shutil.rmtree(dirs[2])
    batched_calls.clear()
    again = gl.audit("lenet", out=out, **kw)
    assert batched_calls == [[0, 2]]  # only the unfinished jobs, still as one group
    assert [j["status"] for j in again.jobs] == ["done", "resumed", "done", "resumed"]
    assert [(d / "config.json").stat().st_mtime_ns for d in dirs[1::2]] == stamps[1::2]
    assert again.jobs[0]["group"] == {"jobs": 2, "batched": True}


def test_units_keep_workers_busy_and_respect_the_size_limit():
    def jobs(groups, threads=None):
        return [Job(f"j{i}", {}, threads, g) for i, g in enumerate(groups)]

    ten = jobs(["a"] * 10)
    assert plan_units(ten, 1) == [list(range(10))]
    assert plan_units(ten, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert plan_units(ten, 1, group_size=4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan_units(ten, 4, group_size=None) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert plan_units(jobs(["a", "a"]), 8) == [[0], [1]]  # more workers than jobs: one job each
    # jobs without a group stay alone; groups never mix, nor do thread counts
    mixed = jobs([None, "a", "b", "a", None, "b"])
    assert plan_units(mixed, 1) == [[0], [1, 3], [2, 5], [4]]
    assert plan_units(jobs(["a", "a"]) + [Job("t", {}, 2, "a")], 1) == [[0, 1], [2]]
    with pytest.raises(gl.ValidationError, match="group_size must be an int >= 1"):
        run_jobs(ten, group_size=0)


def test_only_optimisation_attacks_that_pay_are_grouped(tmp_path, monkeypatch):
    cfg = AuditConfig(model="lenet", num_images=2, attacks=["ig", "dlg", "rgap", "layerwise"])
    p = plan(cfg, tmp_path)
    by = {j.attack: j for j in p.jobs}
    assert by["inverting-gradients"].group == "inverting-gradients__none__b1" and by["dlg"].group == "dlg__none__b1"
    for name in ("rgap", "layerwise"):
        assert by[name].group is None and "not an optimisation attack" in by[name].batch_note
    monkeypatch.setattr(B, "CPU_BATCH_MAX_PARAMETERS", 1000)  # as if lenet were a large model on this CPU
    p = plan(cfg, tmp_path)
    ig = next(j for j in p.jobs if j.attack == "inverting-gradients")
    assert ig.group is None and "parameters" in ig.batch_note


def test_the_user_option(tmp_path):
    assert build_parser().parse_args(["audit", "--model", "lenet", "--no-batch"]).batch is False
    assert build_parser().parse_args(["audit", "--model", "lenet"]).batch is True
    with pytest.raises(gl.ValidationError, match="batch must be True or False"):
        gl.audit("lenet", out=tmp_path / "x", batch="no")
    with pytest.raises(gl.ValidationError, match="group_size must be an int >= 1"):
        gl.audit("lenet", out=tmp_path / "x", group_size=0)


def test_a_pool_of_groups_equals_the_jobs_run_alone(tmp_path):
    jobs = [ig_job(tmp_path / "g", f"ig-{i}", start=i) for i in range(4)]
    grouped = run_jobs(jobs, workers=2)  # two units of two jobs, one per worker
    alone = run_jobs([Job(j.id, {**j.config, "out": str(tmp_path / "a" / j.id)}) for j in jobs], workers=1)
    for g, a in zip(grouped, alone):
        assert g.status == a.status == "done" and g.group == {"jobs": 2, "batched": True} and a.group is None
        assert g.result["psnr"] == pytest.approx(a.result["psnr"], rel=1e3 * TOL["inverting-gradients"])
    assert len({o.result["psnr"] for o in grouped}) == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_keeps_the_finished_group_and_interrupts_the_running_one(tmp_path, workers):
    """In this process (1) and on a pool (2: the parent forwards the SIGINT to the worker running the group)."""
    long = dict(iterations=1_000_000, attack_options={"optimizer": "signed-adam"})  # runs till Ctrl-C
    jobs = [ig_job(tmp_path, "short-0", group="s", iterations=5), ig_job(tmp_path, "short-1", start=1, group="s",
                                                                          iterations=5),
            ig_job(tmp_path, "long-0", start=2, group="l", **long), ig_job(tmp_path, "long-1", start=3, group="l",
                                                                           **long)]
    fired = []

    def ctrl_c_once_the_long_group_runs():  # (its run directories are locked: the batched run has started)
        started = Path(tmp_path) / ".long-1.lock"  # RunDirectory.lock_path of the job's directory
        deadline = time.monotonic() + 600
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        os.kill(os.getpid(), signal.SIGINT)

    def on_outcome(o: Outcome):
        if not fired:
            fired.append(o.id)
            threading.Thread(target=ctrl_c_once_the_long_group_runs, daemon=True).start()

    out = {o.id: o for o in run_jobs(jobs, workers=workers, on_outcome=on_outcome)}
    assert out["short-0"].status == out["short-1"].status == "done"
    for name in ("long-0", "long-1"):  # each job of the running group keeps its best so far, as a job alone does
        o = out[name]
        assert o.status == "interrupted" and o.error is None and o.group == {"jobs": 2, "batched": True}
        assert o.result["interrupted"] is True and o.result["psnr"] is not None
        m = json.loads((Path(tmp_path) / name / "metrics.json").read_text())
        assert m["interrupted"] is True and m["psnr"] == pytest.approx(o.result["psnr"])  # a resume reruns it


# ---- what the planner groups: only jobs the batched engines can batch (batch_problems) --------------------
def _ig_plan(tmp_path, **kw):
    cfg = AuditConfig(model="convnet", model_options={"width": 4}, image_size=16, num_images=2, attacks=["ig"], **kw)
    return plan(cfg, tmp_path)


def test_train_mode_batchnorm_jobs_are_planned_one_by_one_with_the_reason(tmp_path):
    from gradleak.audit.api import _batch_entry

    p = _ig_plan(tmp_path, bn_mode="train")  # FedSGD in train mode: IG also matches the update's BN statistics
    assert len(p.jobs) == 2 and all(j.group is None for j in p.jobs)
    why = p.jobs[0].batch_note
    assert "BatchNorm in train mode" in why and "prior 'bn-statistics'" in why
    assert _batch_entry(p, True, 16)["not_batched"] == [{"attack": "inverting-gradients", "defense": "none",
                                                         "batch_size": 1, "reason": why}]
    # the reason is what the batched run itself says on these jobs' cases
    cases = [experiment.build_case(j.run)[0] for j in p.jobs]
    attack = gl.attacks.create("ig", **{**p.jobs[0].run.attack_options, "max_iterations": 2})
    recs = B.reconstruct_many(attack, cases)
    assert [r.info["batched"] for r in recs] == [{"batched": False, "reason": why, "trials": 1,
                                                  "seconds_all_setups": r.info["batched"]["seconds_all_setups"]}
                                                 for r in recs]
    e = _ig_plan(tmp_path, bn_mode="eval")  # the same model in eval mode (no statistics granted): one group
    assert [j.group for j in e.jobs] == ["inverting-gradients__none__b1"] * 2 and e.jobs[0].batch_note is None
    assert _batch_entry(e, True, 16)["not_batched"] == []


def test_the_batchnorm_statistics_prior_is_planned_one_by_one(tmp_path):
    p = _ig_plan(tmp_path, bn_mode="eval", threat_model="statistical-informed",
                 weights=_tracked_convnet(tmp_path))  # running statistics granted: IG adds the BN prior
    assert all(j.run.attack_options.get("bn_prior") == "running" for j in p.jobs)
    assert all(j.group is None and j.batch_note.startswith("prior 'bn-statistics'") for j in p.jobs)


def _tracked_convnet(tmp_path) -> str:
    """convnet-4 weights whose running statistics tracked a batch (so the threat model's grant is used)."""
    model = gl.models.build("convnet", input_shape=(3, 16, 16), num_classes=19, seed=0, width=4)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    path = tmp_path / "tracked.pt"
    torch.save(model.state_dict(), path)
    return str(path)


# ---- Ctrl-C of `gradleak audit` while a group runs (a real signal to a real CLI process) ------------------
_CHILD = """
import pathlib, sys
from gradleak.attacks.optimization.batched_objective import BatchedObjective
from gradleak.attacks.optimization.inverting import InvertingGradients
from gradleak.cli import main

InvertingGradients.budgets["quick"] = {"max_iterations": 1_000_000, "offer_every": 5}  # runs till Ctrl-C
rounds, depth, mark = [0], [0], pathlib.Path(sys.argv[1])

def counted(real):  # says when the group has run 40 batched rounds (an engine entry called by another: once)
    def call(self, *a, **kw):
        if depth[0] == 0:
            rounds[0] += 1
            if rounds[0] == 40:
                mark.write_text("40")
        depth[0] += 1
        try:
            return real(self, *a, **kw)
        finally:
            depth[0] -= 1
    return call

for name in ("__call__", "stacked"):
    if hasattr(BatchedObjective, name):
        setattr(BatchedObjective, name, counted(getattr(BatchedObjective, name)))
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_of_the_cli_keeps_each_group_jobs_best_so_far_and_resume_finishes(tmp_path, monkeypatch,
                                                                                 batched_calls):
    import subprocess
    import sys
    import time

    out, mark = tmp_path / "audit", tmp_path / "running"
    env = {**os.environ, "PYTHONPATH": str(Path(gl.__file__).resolve().parents[1])}
    settings = ["--model", "lenet", "--image-size", "16", "--num-images", "3", "--attacks", "rgap,ig",
                "--workers", "1", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(mark), "audit", *settings],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not mark.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert mark.exists(), p.communicate(timeout=60)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    doc = json.loads((out / "audit.json").read_text())
    assert doc["interrupted"] is True and (out / "report.html").is_file()
    by = {j["attack"]: [] for j in doc["jobs"]}
    for j in doc["jobs"]:
        by[j["attack"]].append(j)
    assert [j["status"] for j in by["rgap"]] == ["done"] * 3  # finished before the group: kept
    for j in by["inverting-gradients"]:  # the running group: each job written with its best so far
        assert j["status"] == "interrupted" and j["error"] is None and j["psnr"] is not None, j
        assert j["group"] == {"jobs": 3, "batched": True}
        m = json.loads((out / j["dir"] / "metrics.json").read_text())
        assert m["interrupted"] is True and "start_point_only" not in m["info"] and m["info"]["best_score"] > 0
        assert (out / j["dir"] / "reconstruction.safetensors").is_file()
    stamps = {j["id"]: (out / j["dir"] / "config.json").stat().st_mtime_ns for j in by["rgap"]}
    # the rerun with the same settings (a shorter IG budget here) runs the interrupted jobs again, as one group
    monkeypatch.setitem(InvertingGradients.budgets, "quick", {"max_iterations": 20})
    again = gl.audit("lenet", out=out, image_size=16, num_images=3, attacks=["rgap", "ig"], workers=1)
    assert batched_calls == [[0, 1, 2]]
    status = {j["id"]: j["status"] for j in again.jobs}
    assert all(status[i] == "resumed" for i in stamps) and again.data["interrupted"] is False
    assert [status[j["id"]] for j in by["inverting-gradients"]] == ["done"] * 3
    assert {j["id"]: (out / j["dir"] / "config.json").stat().st_mtime_ns for j in by["rgap"]} == stamps
    for j in by["inverting-gradients"]:
        assert json.loads((out / j["dir"] / "metrics.json").read_text())["interrupted"] is False


def test_an_attack_failing_in_its_setup_is_planned_alone_not_a_failed_plan(tmp_path, monkeypatch):
    def broken(attack, case, **kw):
        raise RuntimeError("setup broke")

    monkeypatch.setattr(B, "batch_problems", broken)
    p = plan(AuditConfig(model="lenet", num_images=2, attacks=["ig"]), tmp_path)
    assert len(p.jobs) == 2 and all(j.group is None for j in p.jobs)
    assert p.jobs[0].batch_note == ("the attack's trial setup failed on the plan's probe case (RuntimeError: setup "
                                    "broke)")


def test_ctrl_c_while_a_group_is_written_keeps_the_jobs_written(tmp_path, monkeypatch):
    real = experiment._Prepared.finish
    written = []

    def finish(self, rec):
        if len(written) == 1:  # Ctrl-C while the second job's directory would be written
            written.append(None)
            raise KeyboardInterrupt
        written.append(self.cfg.out)
        return real(self, rec)

    monkeypatch.setattr(experiment._Prepared, "finish", finish)
    jobs = [ig_job(tmp_path, f"ig-{i}", start=i, iterations=5) for i in range(3)]
    out = run_jobs(jobs, workers=1)
    assert [o.status for o in out] == ["done", "interrupted", "interrupted"]
    assert out[0].result["psnr"] is not None and (tmp_path / "ig-0" / "metrics.json").is_file()
    for o in out[1:]:
        assert o.result is None and o.error == INTERRUPTED_BATCH and o.group == {"jobs": 3, "batched": True}
        assert not (tmp_path / o.id / "metrics.json").exists()
