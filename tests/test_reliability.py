"""Bad input, through the CLI and the API: one clear line and exit 2 (a typed gradleak error in the API),
never an internal error, a traceback or a value silently replaced."""

import json
import time

import pytest
import torch

import gradleak as gl
from gradleak.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("hello, not a tensor\n")
    (d / "update.pt").write_text("hello, not a tensor\n")
    (d / "weights.pt").write_text("hello, not a tensor\n")
    data = gl.data.samples(16, num_images=1)
    x, y = data.batch(1)
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=data.spec.num_classes, seed=0)
    case, _ = gl.simulate(model, x, y, spec=data.spec)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in case.observed.items()}, str(d / "grad.safetensors"))
    return d


ATTACK = ["attack", "--attack", "ig", "--model", "lenet", "--image-size", "16", "--iterations", "2"]

# (argv, a phrase the one line must hold); {d} is the folder of the `files` fixture
CLI_BAD = [
    (ATTACK + ["--seed", str(2 ** 70)], "--seed: expected a seed"),
    (ATTACK + ["--seed", "-1"], "--seed: expected a seed"),
    (ATTACK + ["--labels", "a,b", "--observed", "{d}/grad.safetensors"], "--labels: expected labels"),
    (ATTACK + ["--labels", "1.5", "--observed", "{d}/grad.safetensors"], "--labels: expected labels"),
    (ATTACK + ["--labels", "3"], "give them only with observed"),
    (["train", "--model", "lenet", "--checkpoints", "x", "--out", "{d}/m.pt"], "--checkpoints: expected checkpoint"),
    (ATTACK + ["--width", "-1"], "--width: expected an int >= 1"),
    (ATTACK + ["--width", "0"], "--width: expected an int >= 1"),
    (ATTACK + ["--out", "/dev/null"], "/dev/null as a run directory"),
    (ATTACK + ["--out", "{d}/notes.txt"], "it exists and is a regular file"),
    (ATTACK + ["--out", "/proc/gradleak-run"], "cannot write the run directory"),
    (["train", "--model", "lenet", "--epochs", "1", "--out", "/dev/null"], "not a regular file"),
    (["train", "--model", "lenet", "--epochs", "1", "--out", "{d}"], "it is a directory"),
    (["train", "--model", "lenet", "--epochs", "1", "--out", "/proc/gradleak/m.pt"], "cannot write the checkpoint"),
    (ATTACK + ["--weights", "{d}/weights.pt"], "it is a text file"),
    (ATTACK + ["--weights", "{d}/notes.txt"], "it is a text file"),
    (ATTACK + ["--observed", "{d}/update.pt"], "it is a text file"),
    (ATTACK + ["--local-batch-size", "0", "--protocol", "fedavg"], "--local-batch-size: expected an int >= 1"),
    (ATTACK + ["--local-batch-size", "3", "--num-images", "2", "--protocol", "fedavg"], "must not exceed the batch"),
    (ATTACK + ["--local-batch-size", "1"], "only applies to protocol 'fedavg'"),
    (ATTACK + ["--defense", "noise:sigma=0.1", "--observed", "{d}/grad.safetensors"],
     "a defense applies to a SIMULATED update"),
    (ATTACK + ["--option", "max_iterations=5"], "--iterations 2 conflicts with --option max_iterations=5"),
    (ATTACK + ["--restarts", "2", "--option", "restarts=3"], "--restarts 2 conflicts with --option restarts=3"),
    (["attack", "--attack", "fc-analytic", "--model", "mlp", "--restarts", "2"], "--restarts does not apply"),
    (ATTACK + ["--defense", "noise:sigma=inf"], "noise defense: sigma must be finite"),
    (ATTACK + ["--defense", "noise:sigma=None"], "noise defense: option sigma='None' is not a float"),
    (ATTACK + ["--defense", "prune:ratio=nan"], "prune defense: ratio must be finite"),
    (ATTACK + ["--max-memory", "lots"], "expected a size like 8GB"),
    (ATTACK + ["--max-memory", "1KB"], "more than --max-memory"),
    (["attack", "--attack", "ig", "--model", "lenet", "--image-size", "10000"], "would need about"),
    (["train", "--model", "lenet", "--image-size", "10000", "--out", "{d}/big.pt"], "would need about"),
    (["--threads", "0", "list", "attacks"], "--threads: expected an int >= 1"),
]


@pytest.mark.parametrize("argv, expected", CLI_BAD, ids=[" ".join(a[4:] if a[0] == "attack" else a)[:60]
                                                         for a, _ in CLI_BAD])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, files, argv, expected):
    argv = [a.replace("{d}", str(files)) for a in argv]
    code, _, err = _run(capsys, *argv)
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err and "internal error" not in err


def test_refusals_come_before_any_work(capsys, files, tmp_path):
    """Output and memory are checked before the data are decoded, the model built or the attack run."""
    for argv in (ATTACK[:-2] + ["--iterations", "100000", "--out", "/dev/null"],
                 ["train", "--model", "lenet", "--epochs", "1000", "--out", "/dev/null"],
                 ["attack", "--attack", "ig", "--model", "lenet", "--image-size", "10000"]):
        t0 = time.perf_counter()
        code, _, err = _run(capsys, *argv)
        seconds = time.perf_counter() - t0
        assert code == 2, err
        # the work itself would take minutes (100,000 iterations, 1,000 epochs, a 10,000-pixel lenet)
        assert seconds < 30, (argv, seconds)


def _api_case():
    data = gl.data.samples(16, num_images=1)
    x, y = data.batch(1)
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=data.spec.num_classes, seed=0)
    case, truth = gl.simulate(model, x, y, spec=data.spec)
    return data, model, case, truth


API_BAD = [
    ("from_observed(list)", lambda d, m, c, t: gl.Case.from_observed(m, [1, 2], spec=d.spec, batch_size=1),
     gl.ValidationError, "observed must be a dict"),
    ("NaN truth (Truth)", lambda d, m, c, t: gl.Truth(torch.full_like(t.inputs, float("nan")), t.labels),
     gl.ValidationError, "NaN/inf"),
    ("NaN truth (evaluate)", lambda d, m, c, t: gl.evaluate(t.inputs, torch.full_like(t.inputs, float("nan"))),
     gl.ValidationError, "the truth holds"),
    ("float labels in Truth", lambda d, m, c, t: gl.Truth(t.inputs, torch.tensor([1.5])),
     gl.ValidationError, "floats are not truncated"),
    ("sigma=None", lambda d, m, c, t: gl.defenses.create("noise", sigma=None), gl.ValidationError, "noise defense"),
    ("Noise(sigma=inf)", lambda d, m, c, t: gl.defenses.Noise(sigma=float("inf")), gl.ValidationError,
     "noise defense: sigma must be finite"),
    ("quantize bits=2.5", lambda d, m, c, t: gl.defenses.create("quantize", bits=2.5), gl.ValidationError,
     "quantize defense"),
    ("image_size=(8, 'a')", lambda d, m, c, t: gl.data.load("samples", image_size=(8, "a")), gl.ValidationError,
     "image_size must be a positive int or (height, width) of ints"),
    ("image_size=(8, 8.5)", lambda d, m, c, t: gl.data.load("digits", image_size=(8, 8.5)), gl.ValidationError,
     "image_size"),
    ("load_tensor_dict(text)", lambda d, m, c, t: gl.load_tensor_dict(__file__), gl.DataError, "text file"),
    ("AttackRun(model=module)", lambda d, m, c, t: gl.run_attack(gl.AttackRun(attack="ig", model=m), write=False),
     gl.ValidationError, "model must be a name"),
    ("AttackRun(seed='abc')", lambda d, m, c, t: gl.run_attack(gl.AttackRun(attack="ig", model="lenet", seed="abc"),
                                                               write=False), gl.ValidationError, "seed must be an int"),
    ("AttackRun(seed=2**70)", lambda d, m, c, t: gl.run_attack(gl.AttackRun(attack="ig", model="lenet",
                                                                            seed=2 ** 70), write=False),
     gl.ValidationError, "seed must lie in"),
    ("AttackRun(labels=[1.5])", lambda d, m, c, t: gl.run_attack(gl.AttackRun(
        attack="ig", model="lenet", labels=[1.5], observed="x.safetensors"), write=False), gl.ValidationError,
     "floats are not truncated"),
    ("FedAvg local batch > batch", lambda d, m, c, t: gl.Case(
        model=m, observation=gl.FedAvg(dict(c.observed), local_steps=1, local_lr=0.1, local_batch_size=4),
        spec=d.spec, batch_size=1), gl.ValidationError, "must not exceed batch_size"),
    ("train(seed='abc')", lambda d, m, c, t: __import__("gradleak.training").training.train(
        m, d, epochs=0, seed="abc"), gl.ValidationError, "seed must be an int"),
    ("reconstruct(seed='abc')", lambda d, m, c, t: gl.create("ig", max_iterations=1).reconstruct(c, seed="abc"),
     gl.ValidationError, "seed must be an int"),
    ("reconstruct(seed=2**70)", lambda d, m, c, t: gl.create("dlg", max_iterations=1).reconstruct(c, seed=2 ** 70),
     gl.ValidationError, "seed must lie in"),
    ("max_iterations=None", lambda d, m, c, t: gl.create("ig", max_iterations=None), gl.ValidationError,
     "option 'max_iterations' must be int"),
    ("simulate(model as a string)", lambda d, m, c, t: gl.simulate("lenet", t.inputs, t.labels, spec=d.spec),
     gl.ValidationError, "model must be a torch.nn.Module"),
    ("simulate(labels out of range, unknown)", lambda d, m, c, t: gl.simulate(
        m, t.inputs, torch.tensor([99]), spec=d.spec, labels_known=False), gl.ValidationError, "labels must lie in"),
    ("simulate(local_batch_size=0)", lambda d, m, c, t: gl.simulate(
        m, t.inputs, t.labels, spec=d.spec, protocol="fedavg", local_batch_size=0), gl.ValidationError,
     "local_batch_size must be an int in [1, 1]"),
]


@pytest.fixture(scope="module")
def api_case():
    return _api_case()


@pytest.mark.parametrize("name, call, error, expected", API_BAD, ids=[a[0] for a in API_BAD])
def test_api_bad_input_is_a_typed_error(api_case, name, call, error, expected):
    with pytest.raises(error) as e:
        call(*api_case)
    assert expected in str(e.value)


def test_write_report_onto_a_file_is_an_output_error(api_case, tmp_path):
    from gradleak.errors import OutputError

    _, _, case, truth = api_case
    rec = gl.Reconstruction(inputs=truth.inputs.clone(), labels=truth.labels, attack="probe")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="it exists and is a regular file"):
        gl.write_report(f, rec)
    assert f.read_text() == "x"


def test_a_bool_option_string_is_parsed_not_truthy(monkeypatch):
    """create(..., flag='False') must give False (bool('False') is True)."""
    from dataclasses import dataclass

    from gradleak import defenses as D

    @dataclass
    class Flagged(D.Defense):
        flag: bool = True
        name = "flagged"

        def __call__(self, update, generator=None):
            return dict(update)

    monkeypatch.setitem(D.defenses._items, "flagged", Flagged)
    assert D.create("flagged", flag="False").flag is False
    assert D.parse("flagged:flag=no").flag is False
    assert D.parse("flagged:flag=true").flag is True
    with pytest.raises(gl.ValidationError, match="flagged defense: option flag='maybe' must be true or false"):
        D.parse("flagged:flag=maybe")


def test_evaluate_says_when_reconstructions_outnumber_the_truth():
    t = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    rec = torch.cat([t, torch.rand(1, 1, 8, 8, dtype=torch.float64)])
    s = gl.evaluate(rec, t)
    assert s.unmatched_reconstructions == 1 and s.unmatched_truths == 0
    assert s.psnr == 300.0 and s.order == [0, 1]
    assert any("1 more sample(s) than the truth" in n for n in s.notes)
    assert s.to_dict()["score_notes"] == s.notes
    exact = gl.evaluate(t, t)
    assert exact.unmatched_reconstructions == 0 and exact.notes == [] and "score_notes" not in exact.to_dict()


def test_warnings_an_attack_records_are_printed_and_in_metrics(tmp_path, capsys, monkeypatch):
    """Divergence and warnings in rec.info reach stderr and metrics.json."""
    from gradleak.attacks import base

    real = base.Attack.reconstruct

    def reconstruct(self, case, **kw):
        rec = real(self, case, **kw)
        rec.info["warnings"] = ["step size shrank 8 times"]
        rec.info["diverged"] = "trial 2 diverged at step 40 (loss inf)"
        return rec

    monkeypatch.setattr(base.Attack, "reconstruct", reconstruct)
    out = tmp_path / "w"
    code, stdout, err = _run(capsys, *ATTACK, "--out", out)
    assert code == 0, err
    assert "warning: step size shrank 8 times" in err and "warning: trial 2 diverged at step 40" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warnings"] == ["step size shrank 8 times", "trial 2 diverged at step 40 (loss inf)"]


def test_a_diverged_trial_is_a_warning():
    from gradleak.report import run_warnings

    info = {"trials": [{"steps": 40, "diverged_at": 40, "reason": "non-finite loss"},
                       {"steps": 100, "diverged_at": None}]}
    assert run_warnings(info) == ["trial 1 of 2 diverged at step 40 (non-finite loss)"]
    assert run_warnings({"trials": [{"diverged_at": None}]}) == []


def test_counts_are_named_for_what_they_count(tmp_path):
    from gradleak.report import metrics_of

    t = torch.rand(1, 1, 8, 8)
    lbfgs = gl.Reconstruction(inputs=t, history=[1.0] * 10, info={"outer_steps": 10, "gradient_evaluations": 200})
    m = metrics_of(lbfgs)
    assert m["outer_steps"] == 10 and m["gradient_evaluations"] == 200 and "iterations" not in m
    plain = gl.Reconstruction(inputs=t, history=[1.0] * 7)
    assert metrics_of(plain)["iterations"] == 7
