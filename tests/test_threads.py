"""The thread policy (gradleak.threads): workers x threads <= cores, the user's override wins, ``using``
restores torch's count, and Attack.reconstruct / run_attack apply it where the work runs."""

import types

import pytest
import torch

import gradleak as gl
from gradleak import threads


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    threads.set(None)
    yield
    threads.set(None)


def test_choose_gives_small_work_one_thread_and_shares_the_cores_among_workers():
    big = 1e6 * threads.FLOPS_PER_THREAD
    assert threads.choose(0, cores=16) == 1
    assert threads.choose(threads.FLOPS_PER_THREAD, cores=16) == 1
    assert threads.choose(2.5 * threads.FLOPS_PER_THREAD, cores=16) == 3
    assert threads.choose(big, cores=16) == 16
    for cores in (1, 2, 3, 8, 16):
        for workers in (1, 2, 3, 5, 16, 40):
            for work in (0, threads.FLOPS_PER_THREAD * 3, big):
                n = threads.choose(work, workers=workers, cores=cores)
                assert n >= 1 and (workers * n <= cores or n == 1)
    assert threads.choose(big, workers=3, cores=8) == 2
    with pytest.raises(gl.ValidationError, match="non-negative number of FLOPs"):
        threads.choose(-1)
    with pytest.raises(gl.ValidationError, match="an int >= 1"):
        threads.choose(1, workers=0)


def test_the_override_wins_set_then_environment(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose(0, cores=16) == 3 and threads.override() == 3
    threads.set(5)
    assert threads.choose(1e30, workers=4, cores=16) == 5
    threads.set(None)
    monkeypatch.setenv(threads.ENV, "two")
    with pytest.raises(gl.ValidationError, match="GRADLEAK_THREADS: expected a thread count"):
        threads.choose(0)
    with pytest.raises(gl.ValidationError, match="expected a thread count"):
        threads.set(0)


def test_a_torch_set_num_threads_after_import_counts_as_the_users_choice():
    base = torch.get_num_threads()
    assert threads.override() is None
    torch.set_num_threads(base + 1)
    try:
        assert threads.override() == base + 1 and threads.choose(0) == base + 1
    finally:
        torch.set_num_threads(base)
    assert threads.override() is None


def test_using_and_pinned_restore():
    base = torch.get_num_threads()
    with threads.using(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == base
    with pytest.raises(RuntimeError):
        with threads.using(2):
            raise RuntimeError
    assert torch.get_num_threads() == base
    with threads.using(None):
        assert torch.get_num_threads() == base
    with threads.pinned(2):
        assert torch.get_num_threads() == 2 and threads.choose(1e30, cores=16) == 2
    assert torch.get_num_threads() == base and threads.override() is None


def test_cores_follow_affinity_cgroup_quota_and_a_workers_budget(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    assert threads.cores() == 8
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: 3.5)
    assert threads.cores() == 3
    monkeypatch.setattr(threads, "_budget", 2)
    assert threads.cores() == 2 and threads.workers_for(1) == 2


def test_work_grows_with_batch_and_model():
    photos = gl.data.samples(16, num_images=4)
    cases = {}
    for name, b in (("lenet", 1), ("lenet", 4), ("resnet20", 1)):
        model = gl.models.build(name, input_shape=photos.spec.shape, num_classes=photos.spec.num_classes)
        cases[name, b] = gl.simulate(model, *photos.batch(b), spec=photos.spec)[0]
    w = {k: threads.work_of(c) for k, c in cases.items()}
    assert w["lenet", 4] == pytest.approx(4 * w["lenet", 1])
    assert w["resnet20", 1] > 10 * w["lenet", 1] > 0
    # the zoo's small models at small images get one thread, whatever the cores
    assert all(threads.choose(v, cores=64) == 1 for v in w.values())


def _spy_threads(monkeypatch):
    from gradleak.attacks.analytic import FCAnalytic

    seen = []
    real = FCAnalytic._reconstruct

    def spy(self, case, ctx):
        seen.append(torch.get_num_threads())
        return real(self, case, ctx)

    monkeypatch.setattr(FCAnalytic, "_reconstruct", spy)
    return seen


def _mlp_case():
    photos = gl.data.samples(8, num_images=1)
    model = gl.models.build("mlp", input_shape=photos.spec.shape, num_classes=photos.spec.num_classes, width=8,
                            dtype=torch.float64)
    return gl.simulate(model, *photos.batch(1), spec=photos.spec)[0].to(dtype=torch.float64)


def test_reconstruct_applies_the_policy_unless_the_user_chose(monkeypatch):
    seen = _spy_threads(monkeypatch)
    case = _mlp_case()
    base = torch.get_num_threads()
    monkeypatch.setattr(threads, "cores", lambda: 2)
    monkeypatch.setattr(threads, "FLOPS_PER_THREAD", 1.0)  # as if this tiny case were big work
    gl.create("fc-analytic").reconstruct(case)
    monkeypatch.setattr(threads, "FLOPS_PER_THREAD", 1e30)
    gl.create("fc-analytic").reconstruct(case)
    threads.set(3)
    gl.create("fc-analytic").reconstruct(case)
    assert seen == [2, 1, 3] and torch.get_num_threads() == base


def test_run_attack_runs_the_whole_job_at_the_policys_count(monkeypatch, tmp_path):
    import json

    seen = _spy_threads(monkeypatch)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    monkeypatch.setattr(threads, "FLOPS_PER_THREAD", 1.0)
    cfg = gl.AttackRun(attack="fc-analytic", model="mlp", image_size=8, dtype="float64",
                       model_options={"width": 8}, out=str(tmp_path / "run"))
    gl.run_attack(cfg)
    assert seen == [2] and json.loads((tmp_path / "run" / "config.json").read_text())["threads"] == 2
    assert torch.get_num_threads() == 1


def test_cli_threads_flag_is_the_override(tmp_path, capsys, monkeypatch):
    import json

    from gradleak.cli import main

    seen = _spy_threads(monkeypatch)
    argv = ["attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "8", "--image-size", "8",
            "--dtype", "float64"]
    assert main(["--threads", "2", *argv, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    assert seen == [2, 1]
    assert [json.loads((tmp_path / d / "config.json").read_text())["threads"] for d in "ab"] == [2, 1]
    assert torch.get_num_threads() == 1 and threads.override() is None


def test_the_work_of_a_model_structure_is_traced_once(monkeypatch):
    """work_of traces a meta-device copy of the model (0.3 s on a ResNet-20); every attack run asks, so the count
    is kept per structure: a second model of the same structure reuses it, another width is traced anew, and the
    kept count is what a fresh trace gives."""
    photos = gl.data.samples(16, num_images=1)
    x, y = photos.batch(1)

    def case(width):
        net = gl.models.build("convnet", input_shape=(3, 16, 16), num_classes=19, seed=0, width=width)
        return gl.simulate(net, x, y, spec=photos.spec)[0]

    threads._COUNTS.clear()
    copies = []
    real = threads.copy.deepcopy
    # the trace's copy of the model (threads' own `copy` name; recursion and other modules use the real one)
    monkeypatch.setattr(threads, "copy", types.SimpleNamespace(deepcopy=lambda *a, **k: copies.append(1) or real(*a, **k)))
    first = threads.work_of(case(4))
    again = threads.work_of(case(4))
    wider = threads.work_of(case(8))
    assert len(copies) == 2 and first == again and wider > first
    threads._COUNTS.clear()
    assert threads.work_of(case(4)) == first and len(copies) == 3
