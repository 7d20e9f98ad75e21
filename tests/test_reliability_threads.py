"""Threads and reproducibility: config.json records the thread count and the software environment, and
re-running a config.json (same threads, same machine) reproduces the reconstruction bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

import gradleak as gl
from gradleak.cli import main

ATTACK = ["attack", "--attack", "ig", "--model", "lenet", "--image-size", "16", "--iterations", "30"]


def test_config_json_records_threads_and_environment(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--threads", "2", "attack", "--attack", "ig", "--model", "lenet", "--image-size", "16",
            "--iterations", "3", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["threads"] == 2
    env = cfg["environment"]
    assert env["threads"] == 2 and env["torch_version"] == torch.__version__ and env["gradleak_version"] == \
        gl.__version__
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["python_version"].count(".") == 2
    assert env["deterministic_algorithms"] is False
    assert "git_commit" in env  # None outside a git checkout
    assert torch.get_num_threads() == 1  # the run's thread count is not left behind (conftest sets 1)


def test_a_config_json_re_runs_bit_for_bit(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ATTACK, "--seed", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    cfg = gl.AttackRun.from_json(out)
    assert cfg.threads == 1 and cfg.seed == 3 and cfg.iterations == 30
    again = gl.run_attack(cfg, write=False)
    saved = load_file(str(out / "reconstruction.safetensors"))["inputs"]
    assert torch.equal(again.reconstruction.inputs.cpu(), saved)


def test_run_attack_applies_and_restores_the_thread_count(monkeypatch):
    from gradleak.attacks import base

    seen = []
    real = base.Attack.reconstruct

    def spy(self, case, **kw):
        seen.append(torch.get_num_threads())
        return real(self, case, **kw)

    monkeypatch.setattr(base.Attack, "reconstruct", spy)
    gl.run_attack(gl.AttackRun(attack="fc-analytic", model="mlp", image_size=8, dtype="float64", threads=3,
                               model_options={"width": 8}), write=False)
    assert seen == [3] and torch.get_num_threads() == 1


def test_an_unknown_config_key_is_refused():
    with pytest.raises(gl.ValidationError, match="unknown key"):
        gl.AttackRun.from_dict({"attack": "ig", "model": "lenet", "iterationz": 3})
