"""The audit picks IG's BatchNorm-statistics prior from the case and the threat model (issue 16, part 1): the
update's returned statistics where it carries them, the running statistics where the threat model grants the
data's statistics, and says which channel it used."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gradleak as gl
from gradleak.audit.plan import AuditConfig, plan
from gradleak.experiment import run_attack

IG = "inverting-gradients"


def _tracked_weights(tmp_path) -> str:
    """resnet20 weights whose running statistics tracked two batches (a model that has seen data)."""
    model = gl.models.build("resnet20", input_shape=(3, 32, 32), num_classes=19, seed=0)
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32, generator=g) * 0.5 + 0.2)
    path = tmp_path / "tracked.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _plan(tmp_path, **kw):
    cfg = AuditConfig(num_images=1, attacks=[IG], **kw)
    return plan(cfg, tmp_path / "audit")


def _ig_jobs(p):
    jobs = [j for j in p.jobs if j.attack == IG]
    assert jobs, p.skipped
    return jobs


def _run_few(job, iterations=2):
    """The planned job, a few iterations, not written: its reconstruction's info."""
    r = dataclasses.replace(job.run, attack_options={**job.run.attack_options, "max_iterations": iterations},
                            out=None)
    return run_attack(r, write=False).reconstruction.info


def test_statistical_informed_uses_the_running_statistics(tmp_path):
    p = _plan(tmp_path, model="resnet20", weights=_tracked_weights(tmp_path), threat_model="statistical-informed")
    job = _ig_jobs(p)[0]
    assert job.run.attack_options["bn_prior"] == "running"
    assert p.budget[IG]["bn_prior"] == "running"
    assert p.budget[IG]["bn_statistics"].startswith("BN statistics: granted by the threat model")
    info = _run_few(job)
    assert info["bn_prior"] == "running"
    assert any(t["prior"] == "bn-statistics" for t in info["priors"])


def test_parameter_aware_does_not_get_the_running_statistics(tmp_path):
    p = _plan(tmp_path, model="resnet20", weights=_tracked_weights(tmp_path), threat_model="parameter-aware")
    assert "bn_prior" not in _ig_jobs(p)[0].run.attack_options
    sentence = p.budget[IG]["bn_statistics"]
    assert sentence.startswith("BN statistics: not used") and "eval mode" in sentence
    assert "does not grant" in sentence


def test_untracked_running_statistics_are_not_used_even_when_granted(tmp_path):
    # the zoo's seeded resnet20 never tracked a batch: its running statistics are 0 / 1 and describe no data
    p = _plan(tmp_path, model="resnet20", threat_model="statistical-informed")
    assert "bn_prior" not in _ig_jobs(p)[0].run.attack_options
    assert "initial values" in p.budget[IG]["bn_statistics"]


def test_fedavg_train_mode_uses_the_update_under_parameter_aware(tmp_path):
    p = _plan(tmp_path, model="resnet20", threat_model="parameter-aware", protocol="fedavg", local_steps=2,
              local_lr=1e-2, bn_mode="train")
    job = _ig_jobs(p)[0]
    assert job.run.attack_options["bn_prior"] == "update"
    sentence = p.budget[IG]["bn_statistics"]
    assert sentence.startswith("BN statistics: from the update") and "mixture of the 2 local steps" in sentence
    info = _run_few(job, iterations=1)
    assert info["bn_prior"] == "update"
    assert any(t["prior"] == "bn-statistics" for t in info["priors"])


def test_fedsgd_train_mode_update_is_exact_and_wins_over_the_grant(tmp_path):
    p = _plan(tmp_path, model="resnet20", weights=_tracked_weights(tmp_path), threat_model="statistical-informed",
              bn_mode="train")
    assert _ig_jobs(p)[0].run.attack_options["bn_prior"] == "update"
    assert "exact: one forward pass" in p.budget[IG]["bn_statistics"]


@pytest.mark.parametrize("tm", ["statistical-informed", "parameter-aware"])
def test_model_without_batchnorm_says_not_used(tmp_path, tm):
    p = _plan(tmp_path, model="lenet", threat_model=tm)
    assert "bn_prior" not in _ig_jobs(p)[0].run.attack_options
    assert p.budget[IG]["bn_statistics"] == "BN statistics: not used: model has no BatchNorm"
