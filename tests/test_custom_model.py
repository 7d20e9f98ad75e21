"""Your own model wherever a zoo name is accepted: FILE.py:NAME and module.path:NAME specs (gradleak.models.custom)."""

import json
import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradleak as gl
from gradleak.cli import main
from gradleak.data.samples import SAMPLE_NAMES
from gradleak.errors import ValidationError

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN of our own."""

    def __init__(self, input_shape, num_classes, width=4):
        super().__init__()
        c, h, w = input_shape
        self.conv = nn.Conv2d(c, width, 3, padding=1)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(width * h * w, num_classes)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


class Pinned(nn.Module):
    """Ignores the data: built for 3x16x16 inputs only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


class MetaShy(nn.Module):
    """Reads a tensor value in its constructor: cannot be built on the meta device."""

    def __init__(self, num_classes):
        super().__init__()
        scale = float(torch.ones(1).sum().item())
        self.fc = nn.Linear(3 * 16 * 16, num_classes)
        self.scale = scale

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


def make(num_classes=10, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Sigmoid(), nn.Linear(hidden, num_classes))


def not_a_module(num_classes):
    return {"num_classes": num_classes}


def broken(num_classes, width=4):
    raise ValueError("width must be even")


CONST = 3
'''


BROKEN_LINE = NET.splitlines().index('    raise ValueError("width must be even")') + 1


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def netfile(tmp_path):
    p = tmp_path / "mynet.py"
    p.write_text(NET)
    return p


def _conv_net_params(c, h, w, width, classes):
    return c * width * 9 + width + width * h * w * classes + classes


def test_a_file_spec_is_attacked_through_the_cli(tmp_path, netfile, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "attack", "--attack", "ig", "--model", f"{netfile}:Net", "--model-opt", "width=3",
                             "--image-size", "16", "--iterations", "20", "--out", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["psnr"], float) and math.isfinite(metrics["psnr"])
    assert metrics["model_parameters"] == _conv_net_params(3, 16, 16, 3, len(SAMPLE_NAMES))  # the custom net, width 3
    assert metrics["case"]["model"] == f"{netfile.resolve()}:Net"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == f"{netfile.resolve()}:Net" and cfg["model_options"] == {"width": 3}


def test_a_module_factory_takes_model_options(tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "glcustom_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NET)
    monkeypatch.chdir(tmp_path)  # imported from the working directory, as `gradleak` run in a project would
    try:
        counts = []
        for hidden in (5, 7):
            out = tmp_path / f"run{hidden}"
            code, _, err = _run(capsys, "attack", "--attack", "ig", "--model", "glcustom_pkg.nets:make", "--model-opt",
                                f"hidden={hidden}", "--image-size", "8", "--iterations", "5", "--out", out)
            assert code == 0, err
            counts.append(json.loads((out / "metrics.json").read_text())["model_parameters"])
        d, classes = 3 * 8 * 8, len(SAMPLE_NAMES)
        assert counts == [d * h + h + h * classes + classes for h in (5, 7)]
        assert str(tmp_path) not in sys.path  # the working directory was on sys.path for the import only
    finally:
        for k in [k for k in sys.modules if k.startswith("glcustom_pkg")]:
            del sys.modules[k]
        while str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


def _digest(model) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def test_the_build_is_reproducible_in_a_fresh_process(tmp_path, netfile):
    spec = f"{netfile}:Net"
    a = gl.models.build(spec, input_shape=(3, 8, 8), num_classes=5, seed=3)
    b = gl.models.build(spec, input_shape=(3, 8, 8), num_classes=5, seed=3)
    c = gl.models.build(spec, input_shape=(3, 8, 8), num_classes=5, seed=4)
    assert _digest(a) == _digest(b) and _digest(a) != _digest(c)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(a))
    code = textwrap.dedent(f"""
        import json, pickle, torch
        import gradleak as gl
        m = gl.models.build({spec!r}, input_shape=(3, 8, 8), num_classes=5, seed=3)
        u = pickle.loads(open({str(tmp_path / 'model.pkl')!r}, 'rb').read())  # its class imports again by path
        print(json.dumps([[float(p.double().sum()) for p in x.parameters()] for x in (m, u)]))
    """)
    src = str(Path(gl.__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    built, unpickled = json.loads(res.stdout)
    assert built == _digest(a) and unpickled == _digest(a)


def test_the_spec_string_alone_builds_in_a_spawned_worker(netfile):
    import multiprocessing as mp

    spec = f"{netfile}:Net"
    with mp.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(_build_digest, (spec,))
    assert remote == _digest(gl.models.build(spec, input_shape=(3, 8, 8), num_classes=5, seed=3))


def _build_digest(spec):
    import gradleak as gl

    return _digest(gl.models.build(spec, input_shape=(3, 8, 8), num_classes=5, seed=3))


def test_info_lists_the_parameters_and_single_output_waits_for_the_build(netfile):
    info = gl.models.info(f"{netfile}:Net")
    assert info.options == {"width": 4} and info.single_output is None
    assert info.description == "A small CNN of our own."
    assert gl.models.info("lenet").name == "lenet"


def test_the_memory_estimate_builds_for_real_when_the_meta_device_fails(netfile):
    est = gl.resources.estimate_attack(f"{netfile}:MetaShy", (3, 16, 16), 4, batch_size=1)
    params = 3 * 16 * 16 * 4 + 4
    assert est.parts["parameters"] == 6 * params * 4  # six float32 copies of the real parameter count


def test_train_writes_a_sidecar_that_risk_and_compare_read(tmp_path, netfile, capsys):
    ckpt = tmp_path / "ck" / "net.pt"
    code, _, err = _run(capsys, "train", "--model", f"{netfile}:Net", "--model-opt", "width=2", "--dataset", "digits",
                        "--epochs", "1", "--out", ckpt)
    assert code == 0, err
    side = json.loads(ckpt.with_suffix(".json").read_text())["config"]
    assert side["model"] == f"{netfile.resolve()}:Net" and side["model_options"] == {"width": 2}
    assert side["built_for"] == {"input_shape": [1, 8, 8], "num_classes": 10} and side["dataset"] == "digits"

    code, stdout, err = _run(capsys, "risk", "--weights", tmp_path / "ck" / "net-e1.pt", "--protocol", "fedavg",
                             "--local-steps", "2", "--defense", "noise:sigma=0.01", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["input_shape"] == [1, 8, 8]  # from the sidecar's dataset, not the default photos
    dep = rep["extensions"]["deployment"]
    assert dep["parameters"] == _conv_net_params(1, 8, 8, 2, 10) and dep["protocol"] == "fedavg"
    assert dep["defenses"] == ["noise:sigma=0.01"] and dep["analyses_model_the_update"] is False
    assert any("undefended" in n for n in rep["notes"]) and any("multi-step" in n for n in rep["notes"])

    out = tmp_path / "cmp"
    code, stdout, err = _run(capsys, "compare", "--attacks", "ig", "--weights", ckpt, "--iterations", "5",
                             "--protocol", "fedavg", "--local-steps", "2", "--defense", "prune:ratio=0.5",
                             "--out", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["model"] == f"{netfile.resolve()}:Net" and math.isfinite(res["rows"][0]["psnr"])
    case = json.loads((out / "inverting-gradients" / "metrics.json").read_text())["case"]
    assert case["spec"]["shape"] == [1, 8, 8] and case["protocol"] == "fedavg" and "prune" in case["meta"]["defense"]
    # the weights really are loaded: a model whose options differ from the checkpoint's is refused
    code, _, err = _run(capsys, "compare", "--attacks", "ig", "--weights", ckpt, "--model-opt", "width=3")
    assert code == 2 and "conflicts with the width=2" in err and len(err.strip().splitlines()) == 1


def test_risk_sizes_a_custom_model_from_the_data(netfile, capsys):
    code, stdout, err = _run(capsys, "risk", "--model", f"{netfile}:Net", "--dataset", "digits", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["input_shape"] == [1, 8, 8]
    assert rep["extensions"]["deployment"]["parameters"] == _conv_net_params(1, 8, 8, 4, 10)


def test_a_sidecar_conflict_is_one_error(tmp_path, netfile, capsys):
    ckpt = tmp_path / "net.pt"
    assert _run(capsys, "train", "--model", f"{netfile}:Net", "--dataset", "digits", "--epochs", "0",
                "--out", ckpt)[0] == 0
    code, _, err = _run(capsys, "attack", "--attack", "ig", "--weights", ckpt, "--image-size", "16",
                        "--model", "lenet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--model lenet conflicts" in err and "--image-size 16 conflicts" in err


@pytest.mark.parametrize("spec, files, expected", [
    ("nosuch.py:Net", {}, "does not exist"),
    ("syn.py:Net", {"syn.py": "def f(:\n    pass\n"}, "SyntaxError: "),
    ("imp.py:Net", {"imp.py": "import torch\nimport glcustom_no_such_package\n"},
     "ModuleNotFoundError: No module named 'glcustom_no_such_package'"),
    ("glcustom_no_such_module.nets:Net", {}, "ModuleNotFoundError: No module named 'glcustom_no_such_module'"),
    ("mynet.py:Nope", {}, "defines no 'Nope'; it defines nn.Module classes: MetaShy, Net, Pinned; functions: broken, "
                          "make, not_a_module"),
    ("mynet.py:CONST", {}, "CONST is an int, expected an nn.Module class or a factory"),
    ("mynet.py:not_a_module", {}, "returned a dict, expected a torch.nn.Module"),
    ("mynet.py:broken", {}, f"raised (mynet.py line {BROKEN_LINE}): ValueError: width must be even"),
    ("mynet.py:Net --model-opt depth=2", {}, "unknown option(s) ['depth'] for Net; accepted parameters: width=4"),
    ("mynet.py:Pinned", {}, "its forward on a batch of shape (1, 1, 8, 8)"),
])
def test_every_bad_spec_is_one_line_exit_2(tmp_path, netfile, capsys, monkeypatch, spec, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    spec, *extra = spec.split()
    code, stdout, err = _run(capsys, "attack", "--attack", "ig", "--model", spec, "--dataset", "digits",
                             "--iterations", "2", "--out", tmp_path / "run", *extra)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("command", [["risk"], ["compare", "--attacks", "ig"], ["train", "--out", "ck.pt"]])
def test_the_other_commands_give_the_same_one_line_errors(tmp_path, netfile, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *command, "--model", "mynet.py:broken")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ValueError: width must be even" in err, err


def test_the_python_api_takes_specs_and_options(netfile):
    spec = f"{netfile}:Net"
    with pytest.raises(ValidationError, match="unknown option"):
        gl.models.build(spec, input_shape=(3, 8, 8), num_classes=2, depth=3)
    bad = gl.AttackRun(attack="ig", model=spec, model_options={"num_classes": 3})
    assert any("come from the data" in p for p in bad.problems())
    run = gl.AttackRun(attack="ig", model=spec, image_size=8, iterations=3, model_options={"width": 2})
    res = gl.run_attack(run, write=False)
    assert sum(p.numel() for p in res.case.model.parameters()) == _conv_net_params(3, 8, 8, 2, len(SAMPLE_NAMES))
    assert math.isfinite(res.scores.psnr)


def test_a_data_parameter_as_model_opt_is_refused(netfile, capsys):
    code, _, err = _run(capsys, "attack", "--attack", "ig", "--model", f"{netfile}:Net", "--model-opt", "num_classes=3")
    assert code == 2 and "num_classes" in err and "--num-classes" in err and len(err.strip().splitlines()) == 1


def test_without_model_the_weights_sidecar_must_name_it(tmp_path, capsys):
    code, _, err = _run(capsys, "attack", "--attack", "ig")
    assert code == 2 and "give --model NAME, FILE.py:NAME or module.path:NAME" in err
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    code, _, err = _run(capsys, "risk", "--weights", bare)
    assert code == 2 and "has no sidecar" in err and len(err.strip().splitlines()) == 1


def test_apply_sidecar_fills_only_what_is_not_given(tmp_path, netfile):
    from gradleak.models.weights import apply_sidecar
    from gradleak.training import train_from_names

    ckpt = tmp_path / "n.safetensors"
    train_from_names(f"{netfile}:Net", "digits", epochs=0, out=ckpt, model_options={"width": 2})
    same = apply_sidecar(ckpt)
    assert same["model"] == f"{netfile.resolve()}:Net" and same["model_options"] == {"width": 2}
    assert same["dataset"] == "digits" and same["image_size"] is None and same["num_classes"] is None
    other = apply_sidecar(ckpt, images=str(tmp_path))  # other data: resized to the trained size, the head's classes
    assert other["dataset"] is None and other["image_size"] == 8 and other["num_classes"] == 10
    with pytest.raises(ValidationError, match="--num-classes 3 conflicts"):
        apply_sidecar(ckpt, dataset="samples", num_classes=3)


def test_check_forward_names_a_model_built_for_other_inputs(netfile):
    model = gl.models.build(f"{netfile}:Pinned", input_shape=(3, 16, 16), num_classes=4)
    gl.models.custom.check_forward(model, (3, 16, 16))  # the shape it was built for passes
    with pytest.raises(ValidationError, match=r"its forward on a batch of shape \(1, 1, 8, 8\)"):
        gl.models.custom.check_forward(model, (1, 8, 8))
    assert model.training  # its mode is restored
