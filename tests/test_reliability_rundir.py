"""Run directories cannot be corrupted: written atomically, refused when they hold a previous run (unless
overwrite), locked while a run writes them; the same for the API's write_report."""

import json

import pytest
import torch

import gradleak as gl
from gradleak.cli import main
from gradleak.errors import OutputError
from gradleak.report import RunDirectory
from test_reliability_signals import AttackWatcher

FAST = ["attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "16", "--image-size", "8",
        "--dtype", "float64"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _rec(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    return gl.Reconstruction(inputs=t, labels=torch.tensor([0]), attack=f"probe{seed}", history=[1.0, 0.5],
                             info={"seconds": 0.1})


def test_a_previous_run_is_refused_then_replaced_whole_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, *FAST, "--iterations", "1", "--out", out)[0] == 2  # (a closed-form attack: no budget)
    assert not out.exists()
    code, _, err = _run(capsys, "attack", "--attack", "idlg", "--model", "lenet", "--image-size", "8",
                        "--iterations", "2", "--out", out)
    assert code == 0, err
    assert (out / "history.json").is_file()
    before = (out / "metrics.json").read_text()
    code, _, err = _run(capsys, *FAST, "--out", out)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == before  # untouched
    code, _, err = _run(capsys, *FAST, "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["attack"] == "fc-analytic"
    assert not (out / "history.json").exists()  # nothing of the old run is left beside the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary, old or lock file left


def test_a_non_run_directory_is_never_replaced(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    code, _, err = _run(capsys, *FAST, "--out", d, "--overwrite")
    assert code == 2 and "holds no gradleak run" in err
    assert (d / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, *FAST, "--out", empty)[0] == 0 and (empty / "config.json").is_file()


def test_write_report_api_refuses_overwrites_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "r"
    gl.write_report(out, _rec(0))
    with pytest.raises(OutputError, match="already holds a run"):
        gl.write_report(out, _rec(1))
    assert json.loads((out / "metrics.json").read_text())["attack"] == "probe0"
    gl.write_report(out, _rec(1), overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["attack"] == "probe1"

    class Boom:  # a reconstruction whose writing fails half-way (after the tensors were written)
        inputs = torch.rand(1, 1, 8, 8)
        labels = None
        attack = "boom"
        history = []

        @property
        def info(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gl.write_report(out, Boom(), overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["attack"] == "probe1"  # the previous run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_locked_directory_is_refused_in_process(tmp_path):
    out = tmp_path / "locked"
    with RunDirectory(out):
        with pytest.raises(OutputError, match="is being written by another gradleak run"):
            RunDirectory(out)
        with pytest.raises(OutputError, match="is being written by another gradleak run"):
            gl.write_report(out, _rec())
    gl.write_report(out, _rec())  # released: free again
    assert (out / "config.json").is_file() and not (tmp_path / ".locked.lock").exists()


def test_two_runs_with_the_same_out_at_once(tmp_path, capsys):
    """A second run with the --out of a running one fails at once with one line (exit 2); the first is
    unaffected and writes a complete run directory."""
    out = tmp_path / "shared"
    first = AttackWatcher(["attack", "--attack", "ig", "--model", "lenet", "--image-size", "16", "--iterations",
                           "100000", "--out", out])
    lock = tmp_path / ".shared.lock"
    try:
        first.wait_steps(60)  # running its attack, past the first snapshot
        assert lock.exists()
        code, _, err = _run(capsys, *FAST, "--out", out, "--overwrite")
        assert code == 2
        assert err.strip().count("\n") == 0 and "being written by another gradleak run" in err
        assert f"pid {first.proc.pid}" in err
        assert not out.exists()  # the second run wrote nothing
    finally:
        first.proc.terminate()  # SIGTERM: the first run stops and writes its partial report
        _, stderr = first.finish()
    assert first.proc.returncode == 130, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"] == "inverting-gradients" and metrics["interrupted"] is True
    assert not lock.exists()
