"""The package's floors (docs/architecture.md): a module imports only from its own floor and the floors below,
risk uses only public names of attacks, no file in src/ is a god-module, and nothing outside activations.py /
losses.py compares an activation or loss by name."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradleak"

#: top-level part of gradleak -> floor (docs/architecture.md, "The floors")
FLOORS = {
    "errors": 1, "registry": 1, "validate": 1, "interrupts": 1,
    "activations": 2, "losses": 2, "metrics": 2,
    "functional": 3, "models": 3, "layers": 3,
    "case": 4, "simulate": 4, "data": 4, "resources": 4, "threads": 4, "batchnorm": 4,
    "attacks": 5,
    "risk": 6,
    "training": 7, "defenses": 7, "experiment": 7, "report": 7, "integrations": 7,
    "audit": 8,
    "cli": 9, "__main__": 9, "__init__": 9,
}
MAX_LINES = 650


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        yield path, rel.parts


def _part(parts):
    return parts[0] if parts[0] != "__init__" else "__init__"


def _imports(path, parts):
    """(imported gradleak module parts, names) for every import in the file (function-level ones too)."""
    tree = ast.parse(path.read_text())
    pkg = list(parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                if not node.module:  # 'from .. import cli': each name is a module of that package
                    for a in node.names:
                        yield base + [a.name], []
                    continue
                mod = base + node.module.split(".")
            elif node.module and node.module.startswith("gradleak"):
                mod = node.module.split(".")[1:]
            else:
                continue
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gradleak."):
                    yield a.name.split(".")[1:], []


def test_every_top_level_part_has_a_floor():
    parts = {_part(p) for _, p in _modules()}
    assert parts <= set(FLOORS), f"add {sorted(parts - set(FLOORS))} to FLOORS and docs/architecture.md"


def test_imports_go_down_the_floors():
    bad = []
    for path, parts in _modules():
        me = FLOORS[_part(parts)]
        for mod, _ in _imports(path, parts):
            if not mod:  # 'from . import x' at the package root
                continue
            other = FLOORS.get(mod[0])
            if other is not None and other > me:
                bad.append(f"{'/'.join(parts)} (floor {me}) imports {'.'.join(mod)} (floor {other})")
    assert not bad, "\n".join(bad)


def test_risk_uses_only_public_names_of_attacks():
    bad = []
    for path, parts in _modules():
        if parts[0] != "risk":
            continue
        for mod, names in _imports(path, parts):
            if mod and mod[0] == "attacks":
                bad += [f"{'/'.join(parts)}: {'.'.join(mod)}.{n}" for n in names if n.startswith("_")]
                bad += [f"{'/'.join(parts)}: {'.'.join(mod)}" for p in mod if p.startswith("_") and p != "__init__"]
    assert not bad, bad


def test_no_god_modules():
    long = {"/".join(p): n for path, p in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


NAME_CHECK = re.compile(r"""(\.loss|\.name|loss|act|activation)\s*(==|!=|in|not in)\s*\(?\s*["'](relu|sigmoid|tanh|"""
                        r"""identity|softplus|gelu|silu|leaky-relu|cross-entropy|logistic|mse)["']""")


def test_no_activation_or_loss_name_comparisons_outside_their_modules():
    bad = []
    for path, parts in _modules():
        if parts[0] in ("activations", "losses"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if NAME_CHECK.search(line):
                bad.append(f"{'/'.join(parts)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("bad_line", ['if case.loss == "logistic":', "if act.name in ('relu', 'gelu'):",
                                      'x = 1 if self.loss != "mse" else 2'])
def test_the_name_check_catches_comparisons(bad_line):
    assert NAME_CHECK.search(bad_line)


def _tiny_case():
    import torch
    from torch import nn

    import gradleak as gl

    torch.manual_seed(0)
    model = gl.models.zoo.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3),
                                     num_outputs=3).double()
    spec = gl.DataSpec(shape=(12,), num_classes=3, value_range=(-3.0, 3.0))
    x = torch.rand(1, 12, dtype=torch.float64)
    return gl.simulate(model, x, torch.tensor([1]), spec=spec)


@pytest.mark.parametrize("attack, extra", [("rgap", "RGAPLayer"), ("layerwise", "LayerwiseLayer")])
def test_per_layer_reports_are_one_shared_type(attack, extra):
    """rgap and layerwise report every layer as a gradleak.layers.LayerReport (same field names for the same
    facts), their own measurements in a typed ``extra``; to_dict() gives the same shared keys for both."""
    import gradleak as gl
    from gradleak import layers as L
    from gradleak.attacks import layerwise, rgap

    case, _ = _tiny_case()
    rec = gl.create(attack, **({"preset": "closed-form"} if attack == "layerwise" else {})).reconstruct(case)
    reps = rec.info["layers"]
    assert len(reps) == 3 and all(type(r) is L.LayerReport for r in reps), [type(r) for r in reps]
    extra_type = {"RGAPLayer": rgap.RGAPLayer, "LayerwiseLayer": layerwise.LayerwiseLayer}[extra]
    assert all(isinstance(r.extra, extra_type) and isinstance(r.extra, L.LayerExtra) for r in reps)
    assert [r.head for r in reps] == [False, False, True]
    assert all(r.determined and r.residual is not None and r.residual < 1e-9 for r in reps)
    shared = set(reps[0].to_dict()) - {"extra"}
    assert {"name", "label", "kind", "unknowns", "constraints", "rank", "deficiency", "determined", "residual",
            "residual_gradient", "residual_weight", "residual_bias", "notes"} <= shared
    assert all(set(r.to_dict()) - {"extra"} == shared for r in reps)
    assert all(r.to_dict()["extra"]["attack"] == attack for r in reps)


def test_the_floor_check_sees_package_relative_and_function_level_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from .. import cli as c\n    from ..experiment import AttackRun\n")
    found = [m for m, _ in _imports(f, ("defenses", "x"))]
    assert ["cli"] in found and ["experiment"] in found
