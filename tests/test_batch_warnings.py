"""Where the batch is beyond what the attack recovers, the run says so (Attack.batch_findings): in
``rec.info['warnings']``, hence metrics.json's ``warnings``, the audit report and a ``warning:`` line on stderr."""

from __future__ import annotations

import json

import torch
from torch import nn

import gradleak as gl
from gradleak.activations import Act
from gradleak.cli import main
from gradleak.experiment import AttackRun, run_attack


def _photos(model_name, n, size=16, dtype=torch.float32, **model_opts):
    data = gl.data.samples(size, num_images=n)
    x, y = data.batch(n)
    model = gl.models.build(model_name, input_shape=data.spec.shape, num_classes=data.spec.num_classes, dtype=dtype,
                            **model_opts)
    return gl.simulate(model, x.to(dtype), y, spec=data.spec)


def test_ig_batch_of_8_on_a_small_budget_warns_with_the_residual():
    case, truth = _photos("lenet", 8, size=32)
    rec = gl.create("ig", max_iterations=20).reconstruct(case, seed=0)
    found = [w for w in rec.info.get("warnings", []) if w.startswith("inverting-gradients on a batch of 8")]
    assert len(found) == 1, rec.info.get("warnings")
    msg = found[0]
    assert f"residual {rec.residual:.3g}" in msg
    assert rec.residual > gl.create("ig").failed_residual and "stayed above 0.001 after 20 iterations" in msg
    # lenet on 32x32 photos has 15,826 parameters: 8 x 3,072 pixels are more unknowns than the update has values
    values = sum(v.numel() for v in case.observed.values())
    assert values < 8 * 3 * 32 * 32 and f"the update has {values} values for 8 x 3072 = 24576 unknown pixels" in msg
    assert "beyond what it is known to recover" in msg and "; try " in msg
    assert gl.metrics.evaluate(rec, truth).psnr < 20  # the warning is right: the batch did not come back


def test_ig_batch_of_1_that_succeeds_does_not_warn():
    case, truth = _photos("lenet", 1)
    rec = gl.create("ig", max_iterations=200).reconstruct(case, seed=0)
    assert gl.metrics.evaluate(rec, truth).psnr >= 25  # it did succeed
    assert rec.residual < gl.create("ig").failed_residual
    assert not rec.info.get("warnings"), rec.info.get("warnings")


def test_closed_form_on_an_underdetermined_system_warns_with_the_rank_fact():
    # one 3x3 stride-2 conv with 4 filters: 4 x 27 gradient + 4 x 49 weight constraints for 768 input pixels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False), Act("leaky-relu"), nn.Flatten(),
                          nn.Linear(4 * 49, 1, bias=False)).double()
    data = gl.data.samples(16, num_images=1)
    x, _ = data.batch(1)
    spec = gl.DataSpec(shape=data.spec.shape, num_classes=2, mean=data.spec.mean, std=data.spec.std)
    case, _ = gl.simulate(model, x.double(), torch.tensor([1]), spec=spec)
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "estimate" and rec.info["deficient_layers"] == ["conv1"]
    conv1 = rec.info["layers"][0].to_dict()
    found = [w for w in rec.info.get("warnings", []) if w.startswith("rgap on a batch of 1")]
    assert len(found) == 1, rec.info.get("warnings")
    assert (f"layer conv1: rank {conv1['rank']} < 768 unknowns (deficiency {768 - conv1['rank']})" in found[0]
            and conv1["rank"] < 768)
    assert "H-GAP" in found[0]


def test_results_with_their_own_claim_do_not_warn_again():
    # a determined closed form: 'exact', verified by the residual
    case, _ = _photos("cnn6", 1, dtype=torch.float64)
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "exact" and not rec.info.get("warnings")
    # a batch on a fully connected network: R-GAP returns one mixture and says so in its kind
    case, _ = _photos("mlp", 2, dtype=torch.float64, width=32, activation="leaky-relu")
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "mixture"
    assert not any("on a batch of" in w for w in rec.info.get("warnings", []))


def test_cli_and_metrics_json_carry_the_warning(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["attack", "--attack", "ig", "--model", "lenet", "--num-images", "4", "--image-size", "16",
                 "--iterations", "10", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    lines = [l for l in err if l.startswith("warning: inverting-gradients on a batch of 4: residual ")]
    assert len(lines) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert lines[0][len("warning: "):] in metrics["warnings"]


def test_the_run_result_row_carries_the_warning():
    res = run_attack(AttackRun(attack="dlg", model="lenet", num_images=3, image_size=16, iterations=10), write=False)
    row = res.to_json()
    assert any(w.startswith("dlg on a batch of 3: residual ") for w in row["warnings"])


def test_a_defended_update_is_not_judged_by_the_residual():
    data = gl.data.samples(16, num_images=1)
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=data.spec.num_classes)
    case, _ = gl.simulate(model, *data.batch(1), spec=data.spec, defense=gl.defenses.parse("noise:sigma=0.1"),
                          generator=torch.Generator().manual_seed(0))
    rec = gl.create("ig", max_iterations=20).reconstruct(case, seed=0)
    assert rec.residual > gl.create("ig").failed_residual  # noise keeps it high ...
    assert not rec.info.get("warnings")  # ... but that says nothing of a batch of 1
