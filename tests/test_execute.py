"""The audit's job executor: the same numbers in this process and on a pool of spawned workers; a job that
raises and a worker that dies are 'failed' with their message while the others finish; Ctrl-C returns with
the finished jobs done, the running ones interrupted (best so far kept) and the rest cancelled."""

import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

import gradleak as gl
from gradleak.audit.execute import Job, Outcome, death_message, run_jobs


@pytest.fixture
def dying_attack():
    """The test-only attack 'test-dies' (tests/_dying_attack.py), registered for this test only."""
    import _dying_attack

    remove = _dying_attack.registered()
    yield _dying_attack.NAME
    remove()


def ig_job(tmp_path, name, *, start=0, iterations=20, **extra) -> Job:
    cfg = gl.AttackRun(attack="ig", model="lenet", image_size=16, num_images=1, start=start, iterations=iterations,
                       out=str(tmp_path / name), **extra)
    return Job(id=name, config=cfg.to_dict())


def test_in_process_and_pool_give_identical_scores(tmp_path):
    seen = []
    outs = {}
    for workers in (1, 2):
        jobs = [ig_job(tmp_path / f"w{workers}", f"ig-{i}", start=i) for i in range(3)]
        outs[workers] = run_jobs(jobs, workers=workers, on_outcome=seen.append)
    for workers, outcomes in outs.items():
        assert [o.id for o in outcomes] == ["ig-0", "ig-1", "ig-2"]
        assert [o.status for o in outcomes] == ["done"] * 3, [o.error for o in outcomes]
        for o in outcomes:
            metrics = json.loads((Path(o.result["out"]) / "metrics.json").read_text())
            assert metrics["psnr"] == pytest.approx(o.result["psnr"])
            assert o.seconds > 0
    assert [o.result["psnr"] for o in outs[1]] == [o.result["psnr"] for o in outs[2]]
    assert [o.result["residual"] for o in outs[1]] == [o.result["residual"] for o in outs[2]]
    assert len({o.result["psnr"] for o in outs[1]}) == 3  # three different images, not one result copied
    assert sorted(o.id for o in seen) == sorted(["ig-0", "ig-1", "ig-2"] * 2)  # on_outcome: each job once


def test_a_raising_job_and_a_dying_worker_fail_alone(tmp_path, dying_attack):
    jobs = [ig_job(tmp_path, "good-0"),
            ig_job(tmp_path, "raises", model_options={"widht": 3}),
            Job("dies", dataclasses.replace(gl.AttackRun.from_dict(ig_job(tmp_path, "dies").config),
                                            attack=dying_attack, iterations=None).to_dict()),
            ig_job(tmp_path, "good-1", start=1),
            ig_job(tmp_path, "good-2", start=2)]
    out = {o.id: o for o in run_jobs(jobs, workers=2)}
    assert out["raises"].status == "failed" and out["raises"].result is None
    assert out["raises"].error == "ValidationError: model lenet: unknown option(s) ['widht']; valid options: " \
                                  "activation='sigmoid', width=12"
    assert out["dies"].status == "failed"
    assert out["dies"].error == "worker died (signal 9: SIGKILL, likely out of memory)"
    for name in ("good-0", "good-1", "good-2"):
        assert out[name].status == "done" and out[name].error is None and out[name].result["psnr"] > 0


def test_a_raising_job_fails_alone_in_process(tmp_path):
    jobs = [ig_job(tmp_path, "raises", model_options={"widht": 3}), ig_job(tmp_path, "good")]
    a, b = run_jobs(jobs, workers=1)
    assert (a.status, b.status) == ("failed", "done")
    assert a.error.startswith("ValidationError: model lenet: unknown option(s)") and "\n" not in a.error


def test_death_messages():
    assert death_message(-9) == "worker died (signal 9: SIGKILL, likely out of memory)"
    assert death_message(-11) == "worker died (signal 11: SIGSEGV)"
    assert death_message(3) == "worker died (exit code 3)"


def _interrupt_after_first(delay: float):
    """on_outcome: SIGINT to this process ``delay`` s after the first job ended (as Ctrl-C would)."""
    fired = []

    def on_outcome(o: Outcome):
        if not fired:
            fired.append(o.id)
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()

    return on_outcome


@pytest.mark.parametrize("workers", [2, 1])
def test_ctrl_c_keeps_what_finished_and_the_best_so_far(tmp_path, workers):
    long = dict(iterations=1_000_000, attack_options={"optimizer": "signed-adam"})  # no stop rule: runs till Ctrl-C
    jobs = [ig_job(tmp_path, "short", iterations=5), ig_job(tmp_path, "long-0", start=1, **long),
            ig_job(tmp_path, "long-1", start=2, **long), ig_job(tmp_path, "long-2", start=3, **long)]
    out = run_jobs(jobs, workers=workers, on_outcome=_interrupt_after_first(6.0))
    status = {o.id: o.status for o in out}
    assert status["short"] == "done"
    # pool: long-0 and long-1 ran when the signal came, long-2 never started; in-process: long-0 ran
    running = ["long-0", "long-1"] if workers == 2 else ["long-0"]
    for name in running:
        o = next(o for o in out if o.id == name)
        assert o.status == "interrupted", (o.status, o.error)
        assert o.result["interrupted"] is True and o.result["psnr"] is not None  # the best so far, scored
        assert json.loads((Path(o.result["out"]) / "metrics.json").read_text())["interrupted"] is True
    for name in {"long-0", "long-1", "long-2"} - set(running):
        assert status[name] == "cancelled"
        assert not (tmp_path / name).exists()


def test_bad_arguments_are_one_line_errors(tmp_path):
    job = ig_job(tmp_path, "a")
    for kwargs, match in (({"backend": "spark"}, "expected 'local', 'ray' or 'ray:ADDRESS'"),
                          ({"backend": "ray:"}, "needs an address"),
                          ({"workers": 0}, "workers must be an int >= 1")):
        with pytest.raises(gl.ValidationError, match=match):
            run_jobs([job], **kwargs)
    with pytest.raises(gl.ValidationError, match="job ids must be unique"):
        run_jobs([job, job])
    with pytest.raises(gl.ValidationError, match="threads must be an int"):
        run_jobs([Job("b", job.config, threads=0)])
    assert run_jobs([]) == []


def test_ray_backend_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(gl.ValidationError, match=r"pip install 'gradleak\[ray\]'"):
        run_jobs([ig_job(tmp_path, "a")], backend="ray")


def test_a_job_with_explicit_threads_runs_with_them(tmp_path):
    job = ig_job(tmp_path, "t2", iterations=2)
    (o,) = run_jobs([Job(job.id, job.config, threads=2)], workers=1)
    assert o.status == "done"
    assert json.loads((tmp_path / "t2" / "config.json").read_text())["threads"] == 2
    assert torch.get_num_threads() == 1
