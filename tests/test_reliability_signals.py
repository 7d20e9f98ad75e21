"""SIGTERM is handled like SIGINT: a real `python -m gradleak` process interrupted mid-attack writes its
partial report and exits 130; interrupted during start-up it prints one line (no traceback) and exits 130."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gradleak as gl
from gradleak.cli import interrupt_on_signals, main

SRC = str(Path(gl.__file__).resolve().parents[1])
LONG_ATTACK = ["attack", "--attack", "ig", "--model", "lenet", "--image-size", "16", "--iterations", "100000"]


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "gradleak", *map(str, argv)], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class AttackWatcher:
    """Runs ``python -m gradleak --progress ...`` and reads its progress bar (stderr) in a thread, so a test can
    wait until the attack has taken a number of steps."""

    def __init__(self, argv):
        self.proc = _start(["--progress", *argv])
        self.text = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            chunk = self.proc.stderr.read(1)
            if not chunk:
                return
            self.text.append(chunk)

    def steps(self) -> int:
        return max((int(m) for m in re.findall(r"(\d+)/100000", "".join(self.text[-4000:]))), default=0)

    def wait_steps(self, n: int, seconds: float = 180) -> None:
        deadline = time.time() + seconds
        while self.steps() < n and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert self.steps() >= n, "".join(self.text)[-2000:]

    def finish(self, timeout=120):
        stdout = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return stdout, "".join(self.text)


def _wait_for(path: Path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_attack_writes_the_partial_report_and_exits_130(tmp_path, sig):
    out = tmp_path / "run"
    run = AttackWatcher([*LONG_ATTACK, "--out", out])
    run.wait_steps(60)  # past the first snapshot of the best result (every 25 steps)
    run.proc.send_signal(sig)
    stdout, stderr = run.finish()
    assert run.proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["attack"] == "inverting-gradients"
    assert (out / "reconstruction.safetensors").is_file() and (out / "config.json").is_file()
    assert "interrupted" in stdout  # the summary line says so
    assert not (tmp_path / ".run.lock").exists()


def test_an_interrupt_during_start_up_is_one_line_and_exit_130(tmp_path):
    """The data source is a FIFO nobody writes to: the run blocks while reading it (start-up, before any
    attack) until the signal arrives."""
    fifo = tmp_path / "images.npy"
    os.mkfifo(fifo)
    proc = _start([*LONG_ATTACK, "--images", fifo, "--out", tmp_path / "run"])
    deadline = time.time() + 120
    fd = None
    while fd is None and proc.poll() is None and time.time() < deadline:
        try:  # succeeds once the run has opened the FIFO for reading
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO
            time.sleep(0.05)
    assert fd is not None, proc.communicate()
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 130, stderr
    lines = [l for l in stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("gradleak: interrupted"), stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.lock").exists()


def test_the_cli_restores_the_previous_signal_handlers(capsys):
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGTERM) is not mine
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert main(["list", "losses"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        capsys.readouterr()
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_ignored_sigint_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_an_interrupt_before_the_first_snapshot_reports_the_start_point(tmp_path, capsys, monkeypatch):
    """An attack interrupted before it offered any candidate: the report holds its start point, marked."""
    import torch

    from gradleak.attacks import attacks

    cls = attacks.get("ig")

    def interrupted_at_once(self, case, ctx):
        ctx.start(torch.full((case.batch_size, *case.spec.shape), 0.5, dtype=case.dtype), case.labels)
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "_reconstruct", interrupted_at_once)
    out = tmp_path / "run"
    code = main(["attack", "--attack", "ig", "--model", "lenet", "--image-size", "16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["start_point_only"] is True
    assert any("START point" in n for n in metrics["notes"])
    assert "START point" in err
