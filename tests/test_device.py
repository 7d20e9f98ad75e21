"""Every attack runs on the case's device (docs/guide.md "Devices").

On a CPU-only machine a device bug cannot show as an error, so :class:`DeviceTracker` finds it another way: it
tags the case's tensors (model parameters and buffers, the observed update, the labels) as "device" tensors and
every tensor a factory (torch.zeros, torch.randn, torch.tensor, ...) makes without ``device=`` as a "host" tensor,
follows the tags through every torch operation, and records each operation where a host tensor (not a 0-d
scalar, not an index) meets a device tensor: on CUDA that operation would raise. ``.cpu()`` / ``.numpy()`` make
host tensors (the allow-listed modules below do that on purpose), ``.to(device)`` clears the tag.
"""

from __future__ import annotations

import collections
import re
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import gradleak as gl
from gradleak.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "gradleak"

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.asarray,
             torch.eye, torch.arange, torch.linspace, torch.logspace, torch.randn, torch.rand, torch.randint,
             torch.randperm, torch.normal, torch.from_numpy}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.index_select}


class DeviceTracker(TorchFunctionMode):
    """Records (operation, gradleak call sites) wherever a host tensor meets one of the ``roots``' tensors."""

    def __init__(self, *roots):
        super().__init__()
        self.tags: dict[int, str] = {}
        self.roots: set[int] = set()
        self.hits: collections.Counter = collections.Counter()
        for t in tree_flatten(list(roots))[0]:
            if isinstance(t, torch.Tensor):
                self._tag(t, "device")
                self.roots.add(id(t))

    def _tag(self, t, tag):
        if id(t) not in self.tags:
            weakref.finalize(t, self.tags.pop, id(t), None)
        self.tags[id(t)] = tag

    def _is(self, t, tag) -> bool:
        return self.tags.get(id(t)) == tag

    @staticmethod
    def _where() -> str:
        sites = [f"{f.filename.split('/src/')[1]}:{f.lineno}" for f in traceback.extract_stack()[:-2]
                 if "/src/gradleak/" in f.filename]
        return " < ".join(reversed(sites[-3:])) or "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        movable = [t for t in outs if id(t) not in self.roots]
        if name in ("cpu", "numpy", "tolist", "item"):  # on an accelerator these always make a host copy
            for t in movable:
                self._tag(t, "host")
            return out
        if name in ("to", "cuda") and (kwargs.get("device") is not None
                                       or any(isinstance(a, (str, torch.device)) for a in args[1:])):
            for t in movable:  # moved to a device (the case's, presumably): no longer a host tensor
                self.tags.pop(id(t), None)
            return out
        if func in FACTORIES and not (func in (torch.as_tensor, torch.asarray) and ins):
            tag = None if kwargs.get("device") is not None else "host"
        else:
            on_device = any(self._is(t, "device") for t in ins)
            if on_device and func not in INDEXING and any(self._is(t, "host") and t.ndim > 0 for t in ins):
                self.hits[(name, self._where())] += 1
            tag = "device" if on_device else ("host" if ins and all(self._is(t, "host") for t in ins) else None)
        if tag is not None:
            for t in outs:
                if not any(t is i for i in ins):
                    self._tag(t, tag)
        return out


def test_tracker_sees_a_host_tensor_meet_a_device_tensor():
    w = torch.ones(3)
    tracker = DeviceTracker(w)
    with tracker:
        a = w * 2
        _ = a[torch.tensor([0, 1])]                        # a host index: fine on CUDA too
        _ = a + torch.zeros(3, device=a.device)            # follows the device: fine
        _ = a + torch.randn(3, generator=torch.Generator().manual_seed(0)).to(a.device)  # CPU draw, moved: fine
        _ = a + torch.zeros(3)                             # a CPU tensor meets a device tensor: caught
    assert [k[0] for k in tracker.hits] == ["add"] and sum(tracker.hits.values()) == 1


# ---- every registered attack on a case built with device="cpu" ------------------------------------------

def _photo_case(model_name, size=16, n=1, **model_opts):
    data = gl.data.samples(size, num_images=n)
    x, y = data.batch(n)
    spec = data.spec
    if gl.models.models.get(model_name).single_output:
        import dataclasses

        spec, y = dataclasses.replace(spec, num_classes=2), y % 2
    model = gl.models.build(model_name, input_shape=spec.shape, num_classes=spec.num_classes, **model_opts)
    return gl.simulate(model, x, y, spec=spec, device="cpu")


def _digits_case(model_name, n=2, **model_opts):
    data = gl.data.load("digits", num_images=n)
    x, y = data.batch(n)
    model = gl.models.build(model_name, input_shape=data.spec.shape, num_classes=data.spec.num_classes, **model_opts)
    return gl.simulate(model, x, y, spec=data.spec, device="cpu")


def _crafted_case(attack, model_name, n=2, **model_opts):
    data = gl.data.samples(16, num_images=n)
    x, y = data.batch(n)
    model = gl.models.build(model_name, input_shape=data.spec.shape, num_classes=data.spec.num_classes, **model_opts)
    crafted = gl.create(attack).craft(model, data.spec, generator=torch.Generator().manual_seed(0))
    return gl.simulate(crafted, x, y, spec=data.spec, device="cpu")


# float32 cases (a float64 case's .to(float64) would alias the case's own tensors and hide host copies)
CASES = {
    "inverting-gradients": (lambda: _photo_case("lenet", n=2), {"max_iterations": 20}),
    "dlg": (lambda: _photo_case("lenet"), {"max_iterations": 40}),
    "idlg": (lambda: _photo_case("lenet"), {"max_iterations": 40}),
    "fc-analytic": (lambda: _photo_case("mlp", width=64), {}),
    "rgap": (lambda: _photo_case("cnn6"), {}),
    "layerwise": (lambda: _photo_case("cnn2-c1", size=32), {"preset": "closed-form"}),
    "tensor": (lambda: _digits_case("two-layer", width=4000), {}),
    "imprint": (lambda: _crafted_case("imprint", "resnet18", width=4), {}),
    "trap-weights": (lambda: _crafted_case("trap-weights", "mlp", width=64), {}),
}


def test_every_registered_attack_has_a_device_case():
    assert set(CASES) == set(gl.attacks.attacks.names())


def _run(name, case):
    options = CASES[name][1]
    roots = [dict(case.observed), list(case.model.parameters()), list(case.model.buffers()), case.labels]
    tracker = DeviceTracker(*roots)
    with tracker:
        rec = gl.create(name, **options).reconstruct(case, seed=0)
    return rec, tracker


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_keeps_to_the_case_device(name):
    case, truth = CASES[name][0]()
    assert case.device == torch.device("cpu") and truth.inputs.device == case.device
    rec, tracker = _run(name, case)
    assert rec.inputs.device == case.device
    assert rec.labels is None or rec.labels.device == case.device
    assert not tracker.hits, f"{name}: a CPU tensor meets the case's tensors at {dict(tracker.hits)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_on_cuda_matches_cpu(name):
    case, truth = CASES[name][0]()
    cpu = gl.create(name, **CASES[name][1]).reconstruct(case, seed=0)
    gpu_case = case.to(device="cuda")
    gpu = gl.create(name, **CASES[name][1]).reconstruct(gpu_case, seed=0)
    assert gpu.inputs.device.type == "cuda"
    assert gpu.labels is None or gpu.labels.device.type == "cuda"
    p_cpu = gl.metrics.evaluate(cpu, truth).psnr
    p_gpu = gl.metrics.evaluate(gpu, truth).psnr
    if cpu.kind == "exact":  # a closed form: the same numbers up to rounding
        assert gpu.kind == "exact"
        assert torch.allclose(gpu.inputs.cpu(), cpu.inputs, atol=1e-4)
    else:  # an optimisation from the same (CPU-drawn) start: the same quality up to rounding's drift
        assert abs(p_gpu - p_cpu) <= 3.0, (p_cpu, p_gpu)


# ---- a device this machine lacks ----------------------------------------------------------------------

def test_unavailable_device_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["attack", "--attack", "ig", "--model", "lenet", "--device", "cuda", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["gradleak: error: cuda requested but torch.cuda.is_available() is False"]
    assert not (tmp_path / "r").exists()  # refused before any work


def test_malformed_device_is_refused(capsys):
    code = main(["compare", "--model", "lenet", "--device", "gpu0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "device must be one of cpu, cuda, mps" in err[0]


def test_api_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gl.errors.ResourceError, match=r"cuda requested but torch.cuda.is_available\(\) is False"):
        gl.experiment.run_attack(gl.experiment.AttackRun(attack="ig", model="lenet", device="cuda"), write=False)
    data = gl.data.samples(16, num_images=1)
    net = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=data.spec.num_classes)
    with pytest.raises(gl.errors.ResourceError, match="cuda requested"):
        gl.simulate(net, *data.batch(1), spec=data.spec, device="cuda")
    assert gl.experiment.AttackRun(attack="ig", model="lenet", device="tpu").problems() == [
        "device must be one of cpu, cuda, mps (or cuda:N), got 'tpu'"]


def test_attack_run_device_reaches_the_case():
    cfg = gl.experiment.AttackRun(attack="ig", model="lenet", image_size=16, device="cpu")
    case, truth, _ = gl.experiment.build_case(cfg)
    assert case.device == torch.device("cpu") and next(case.model.parameters()).device == case.device
    assert gl.experiment.AttackRun.from_dict(cfg.to_dict()).device == "cpu"


# ---- no hidden host copies in the attacks ----------------------------------------------------------------

# Modules that move tensors to the host on purpose, each with its reason (docs/guide.md "Devices").
HOST_MODULES = {
    "report/": "writes files (PNG, JSON, safetensors) from CPU copies",
    "metrics/": "scores on CPU float64 copies (SciPy's assignment for batches)",
    "data/": "decodes and resizes images with NumPy/PIL before the batch goes to the device",
    "integrations/": "Flower messages carry NumPy arrays",
    "audit/api.py": "writes the audit's truth.safetensors from CPU copies",
    "layers/": "the closed-form layer systems are solved by SciPy in float64 on the CPU",
    "risk/": "architecture analyses run on CPU float64 copies (SciPy)",
    "attacks/rgap.py": "solves its systems with gradleak.layers on the CPU; reconstruct() moves the result back",
    "attacks/layerwise.py": "as R-GAP: its layer systems are solved on the CPU",
    "attacks/malicious/crafted.py": "row masks and the Hungarian label pairing (SciPy) on the CPU",
    "attacks/malicious/imprint.py": "interval thresholds and row masks on the CPU",
    "attacks/malicious/trap.py": "row masks on the CPU",
    "attacks/malicious/outcome.py": "scores rows against the truth on CPU copies",
    "attacks/tensor/moments.py": "Jennrich's eigen-decomposition by NumPy; the result goes back to the device",
    "attacks/tensor/samples.py": "a scalar root search over the norm (SciPy) on the CPU",
    "attacks/tensor/head.py": "the Hungarian matching (SciPy) on the CPU",
    "attacks/tensor/hermite.py": "Hermite moments by NumPy quadrature of scalar functions",
}


def test_no_host_copies_outside_the_allow_list():
    pattern = re.compile(r"\.cpu\(\)|\.numpy\(\)")
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in HOST_MODULES):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "host copies outside the allow-list (keep tensors on the case's device, or add the " \
                          "module to HOST_MODULES with its reason): " + "; ".join(offenders)


def test_allow_list_names_existing_modules():
    for m in HOST_MODULES:
        assert (SRC / m).exists(), m


def test_case_to_refuses_a_missing_device(monkeypatch):
    case, _ = CASES["fc-analytic"][0]()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gl.errors.ResourceError, match="cuda requested"):
        case.to(device="cuda")
    moved = case.to(device="cpu", dtype=torch.float64)
    assert moved.device == torch.device("cpu") and moved.dtype == torch.float64


def test_mps_with_float64_is_refused_before_any_work():
    """Apple's MPS has no float64; compare defaults to float64, so asking it for mps must say so in one line
    (checked before whether this machine has MPS at all)."""
    from gradleak.errors import ValidationError
    from gradleak.experiment import AttackRun, compare
    from gradleak.validate import device_problems

    assert any("float64" in p for p in device_problems("mps", dtype="float64"))
    assert device_problems("mps", dtype="float32") == []
    assert device_problems("cpu", dtype=torch.float64) == []
    assert any("float64" in p for p in AttackRun(attack="ig", model="lenet", device="mps", dtype="float64").problems())
    with pytest.raises(ValidationError, match="no float64"):
        compare(attacks=["ig"], model="lenet", device="mps")
