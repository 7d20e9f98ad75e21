import json

import pytest

from gradleak.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_attack_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "32",
                             "--image-size", "16", "--dtype", "float64", "--out", str(out))
    assert code == 0, err
    for f in ("reconstruction.png", "metrics.json", "reconstruction.safetensors", "config.json", "report.html"):
        assert (out / f).is_file(), f
    assert "PSNR" in stdout and "SSIM" in stdout and str(out) in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"] > 100 and metrics["attack"] == "fc-analytic"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attack"] == "fc-analytic" and cfg["model_options"] == {"width": 32} and cfg["image_size"] == 16


def test_attack_json_output(tmp_path, capsys):
    code, stdout, err = _run(capsys, "attack", "--attack", "idlg", "--model", "lenet", "--image-size", "16",
                             "--iterations", "5", "--json", "--out", str(tmp_path / "j"))
    assert code == 0, err
    obj = json.loads(stdout)
    for key in ("attack", "model", "num_images", "psnr", "psnr_per_image", "ssim", "mse", "label_accuracy",
                "residual", "seconds", "iterations", "outer_steps", "gradient_evaluations", "kind"):
        assert key in obj, key
    assert obj["attack"] == "idlg" and obj["num_images"] == 1 and obj["label_accuracy"] == 1.0
    # --iterations counts optimiser iterations; L-BFGS groups them into outer steps, each needs >= 1 evaluation
    assert obj["iterations"] <= 5 and obj["outer_steps"] <= obj["iterations"] <= obj["gradient_evaluations"]
    assert len(obj["psnr_per_image"]) == 1


def test_fedavg_and_defense_flags_reach_the_case(tmp_path, capsys):
    code, stdout, err = _run(capsys, "attack", "--attack", "ig", "--model", "lenet", "--image-size", "16",
                             "--iterations", "5", "--protocol", "fedavg", "--local-steps", "2", "--local-lr", "0.01",
                             "--num-images", "2", "--defense", "prune:ratio=0.5", "--out", str(tmp_path / "f"))
    assert code == 0, err
    case = json.loads((tmp_path / "f" / "metrics.json").read_text())["case"]
    assert case["protocol"] == "fedavg" and case["local_steps"] == 2 and "prune" in case["meta"]["defense"]


@pytest.mark.parametrize("argv, expected", [
    (["attack", "--attack", "nope", "--model", "lenet"], "unknown attack"),
    (["attack", "--attack", "ig", "--model", "lenett"], "did you mean 'lenet'"),
    (["attack", "--attack", "ig", "--model", "lenet", "--images", "/no/such/dir"], "/no/such/dir"),
    (["attack", "--attack", "fc-analytic", "--model", "mlp", "--iterations", "5"], "--iterations does not apply"),
    (["attack", "--attack", "ig", "--model", "lenet", "--dtype", "float16"], "invalid choice"),
    (["attack", "--attack", "ig", "--model", "lenet", "--num-images", "0"], "num_images must be an int >= 1"),
    (["attack", "--attack", "ig", "--model", "lenet", "--option", "max_iteratons=3"], "unknown option"),
    (["attack", "--attack", "ig", "--model", "lenet", "--defense", "noise:sigma"], "key=value"),
    (["attack", "--attack", "ig", "--model", "lenet", "--width", "x"], "expected an int >= 1"),
    (["attack", "--attack", "rgap", "--model", "convnet", "--width", "4", "--out", "/tmp/gl-never"], "rgap cannot run"),
    (["list", "things"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, expected):
    code, stdout, err = _run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err


def test_list_commands(capsys):
    for what in ("attacks", "models", "datasets", "defenses", "losses", "activations"):
        code, stdout, _ = _run(capsys, "list", what)
        assert code == 0 and stdout.strip()
    code, stdout, _ = _run(capsys, "list", "attacks", "--json")
    names = {d["name"].split(" ")[0] for d in json.loads(stdout)}
    assert {"inverting-gradients", "dlg", "idlg", "fc-analytic"} <= names


def test_risk_json_has_the_promised_fields(capsys):
    code, stdout, err = _run(capsys, "risk", "--model", "cnn2-c2", "--json")
    assert code == 0, err
    obj = json.loads(stdout)
    for key in ("model", "layers", "ra_index", "deficient_layers", "exact_recovery_possible", "security_index"):
        assert key in obj, key
    conv = obj["layers"][0]
    for key in ("name", "unknowns", "rank", "deficiency", "ra", "security_deficiency"):
        assert key in conv, key
    assert obj["exact_recovery_possible"] is False and conv["deficiency"] > 1000
    assert obj["security_index"] < -1000


def test_risk_table_says_the_verdict(capsys):
    code, stdout, err = _run(capsys, "risk", "--model", "cnn2-c1")
    assert code == 0, err
    assert "exact recovery possible" in stdout.splitlines()[-1]


def test_compare_tabulates_attacks_and_explains_refusals(tmp_path, capsys):
    code, stdout, err = _run(capsys, "compare", "--model", "mlp", "--width", "32", "--image-size", "8",
                             "--attacks", "fc-analytic,rgap", "--json", "--out", str(tmp_path / "c"))
    assert code == 0, err
    rows = {r["attack"]: r for r in json.loads(stdout)["rows"]}
    assert rows["fc-analytic"]["psnr"] > 100
    assert "not invertible" in rows["rgap"]["error"]
    assert (tmp_path / "c" / "comparison.json").is_file() and (tmp_path / "c" / "fc-analytic" / "metrics.json").is_file()


def test_train_then_attack_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "lenet.pt"
    code, stdout, err = _run(capsys, "train", "--model", "lenet", "--dataset", "digits", "--epochs", "2",
                             "--checkpoints", "1,2", "--out", str(ckpt), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["accuracy"][-1] > 0.3  # chance is 0.1
    assert (tmp_path / "lenet-e1.pt").is_file() and (tmp_path / "lenet-e2.pt").is_file()
    code, stdout, err = _run(capsys, "attack", "--attack", "idlg", "--model", "lenet", "--dataset", "digits",
                             "--iterations", "3", "--weights", str(tmp_path / "lenet-e1.pt"), "--json",
                             "--out", str(tmp_path / "a"))
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["weights"].endswith("lenet-e1.pt")
    code, stdout, err = _run(capsys, "attack", "--attack", "idlg", "--model", "lenet", "--width", "6",
                             "--dataset", "digits", "--weights", str(ckpt), "--out", str(tmp_path / "b"))
    assert code == 2 and "shape" in err and len(err.strip().splitlines()) == 1


def test_attack_an_observed_gradient_file(tmp_path, capsys):
    from safetensors.torch import save_file

    import gradleak as gl

    data = gl.data.samples(16, num_images=1)
    x, y = data.batch(1)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=32, seed=0)
    case, _ = gl.simulate(model, x, y, spec=data.spec)
    grad = tmp_path / "grad.safetensors"
    save_file({k: v.contiguous() for k, v in case.observed.items()}, str(grad))
    code, stdout, err = _run(capsys, "attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "32",
                             "--image-size", "16", "--observed", str(grad), "--json", "--out", str(tmp_path / "o"))
    assert code == 0, err
    obj = json.loads(stdout)
    assert obj["psnr"] is None and obj["residual"] < 1e-6 and any("no ground truth" in n for n in obj["notes"])
    rec = gl.load_tensor_dict(tmp_path / "o" / "reconstruction.safetensors")["inputs"]
    assert float((rec - x).abs().max()) < 1e-4
    code, _, err = _run(capsys, "attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "16",
                        "--image-size", "16", "--observed", str(grad))
    assert code == 2 and "shape" in err


def test_utility_json_puts_each_defense_beside_the_same_seeded_baseline(capsys):
    code, stdout, err = _run(capsys, "utility", "--model", "mlp", "--width", "32", "--defense", "noise:sigma=0",
                             "--defense", "noise:sigma=3", "--rounds", "3", "--clients", "2", "--local-lr", "1.0",
                             "--json")
    assert code == 0, err
    obj = json.loads(stdout)
    assert obj["baseline_accuracy"] > 0.3  # digits, 10 classes: well above chance after 3 rounds
    zero, loud = obj["defenses"]
    # sigma = 0 is the baseline run itself (same shards, batches, seeds); strong noise costs accuracy
    assert zero["accuracy"] == obj["baseline_accuracy"] and zero["accuracy_drop"] == 0.0 and zero["epsilon"] is None
    assert loud["accuracy_drop"] > 0.1 and loud["accuracy_drop"] == pytest.approx(
        obj["baseline_accuracy"] - loud["accuracy"])


@pytest.mark.parametrize("argv, expected", [
    (["utility", "--model", "lenet"], "give at least one --defense"),
    (["utility", "--model", "lenet", "--defense", "bogus:x=1"], "unknown defense 'bogus'"),
    (["utility", "--model", "lenet", "--defense", "prune:ratio=1.5"], "prune"),
    (["utility", "--model", "lenet", "--defense", "noise:sigma=0", "--rounds", "0"], "--rounds"),
])
def test_utility_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, stdout, err = _run(capsys, *argv)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
