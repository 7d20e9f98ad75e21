"""Malicious-server attacks: imprint (Robbing the Fed), trap weights, secure aggregation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.attacks.malicious import expected_share, interval_masses, outcomes
from gradleak.defenses import aggregate_cases
from gradleak.models.zoo import Sequential


def _imprint_case(model, n, bins, *, size=32, protocol="fedsgd", seed=0, **sim):
    data = gl.data.samples(size, num_images=n)
    x, y = data.batch(n)
    attack = gl.create("imprint", bins=bins)
    crafted = attack.craft(model, data.spec, generator=torch.Generator().manual_seed(seed))
    case, truth = gl.simulate(crafted, x.double(), y, spec=data.spec, protocol=protocol, **sim)
    return attack, case, truth


def contract_case(name):
    """(caller's model, case) for the attack contract table: a case whose model ``name`` crafted."""
    data = gl.data.samples(16, num_images=2)
    x, y = data.batch(2)
    if name == "imprint":
        model = gl.models.build("resnet18", input_shape=data.spec.shape, num_classes=data.spec.num_classes,
                                dtype=torch.float64, width=4)
    else:
        model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes,
                                dtype=torch.float64, width=64)
    crafted = gl.create(name).craft(model, data.spec)
    case, _ = gl.simulate(crafted, x.double(), y, spec=data.spec)
    return crafted, case


def _check_imprint_resnet18(width):
    model = gl.models.build("resnet18", input_shape=(3, 32, 32), num_classes=19, dtype=torch.float64, width=width)
    attack, case, truth = _imprint_case(model, 16, 128)
    rec = attack.reconstruct(case)
    share = rec.info["expected_share"]
    assert share == pytest.approx((1 - 1 / 128) ** 15, rel=1e-9)  # equal-mass bins
    out = outcomes(rec, truth, threshold_db=100.0)
    assert out["share_exact"] >= share, (out, share)
    # every row the attack calls one sample is an image recovered at >= 100 dB, matched to its own truth
    # (its paired label is that image's label)
    for j, st in enumerate(rec.info["row_status"]):
        if st == "single":
            i = out["rows_matched_to"][j]
            assert i >= 0 and out["psnr_matched"][j] >= 100.0
            assert int(rec.labels[j]) == int(truth.labels[i])
    assert out["every_exact_row_matched"]
    assert rec.info["rows_single"] >= out["exact"] - 0  # nothing exact goes unreported
    if rec.claim == "exact":
        assert rec.kind == "exact" and rec.residual <= gl.attacks.base.exact_tolerance(torch.float64)


def test_imprint_narrow_resnet18_bundled_photos():
    _check_imprint_resnet18(width=8)


@pytest.mark.slow
def test_imprint_cifar_resnet18_bundled_photos():
    _check_imprint_resnet18(width=64)


def test_expected_share_formula_matches_simulation():
    rng = np.random.default_rng(0)
    B, trials = 16, 20000
    for thresholds in (torch.from_numpy(np.r_[-50.0, np.sort(rng.normal(size=31))]),  # unequal masses
                       None):  # equal masses: CDF-spaced quantiles
        if thresholds is None:
            from scipy.stats import norm

            thresholds = torch.from_numpy(np.r_[-50.0, norm.ppf(np.arange(1, 32) / 32)])
        masses = interval_masses(thresholds, 0.0, 1.0)
        assert float(masses.sum()) == pytest.approx(1.0, abs=1e-12)
        m = rng.normal(size=(trials, B))
        idx = np.searchsorted(thresholds.numpy(), m) - 1  # interval of each sample
        counts = np.stack([np.bincount(r, minlength=32) for r in idx])
        alone = np.take_along_axis(counts, idx, 1) == 1
        measured = alone.mean()
        se = alone.mean(1).std() / math.sqrt(trials)
        assert abs(measured - expected_share(masses, B)) < 4 * se + 1e-12
    assert expected_share(torch.full((128,), 1 / 128), 16) == pytest.approx((127 / 128) ** 15)


def test_imprint_collisions_are_mixtures_and_never_called_single():
    model = gl.models.build("mlp", input_shape=(3, 16, 16), num_classes=19, dtype=torch.float64, width=32)
    attack, case, truth = _imprint_case(model, 12, 6, size=16)
    rec = attack.reconstruct(case)
    out = outcomes(rec, truth)
    assert rec.claim == "mixture" and rec.kind == "mixture" and rec.inputs.shape[0] < 12
    assert math.isnan(rec.residual) and "mixture" in rec.residual_note
    for j, st in enumerate(rec.info["row_status"]):
        assert st != "single" or out["psnr_matched"][j] >= 100.0
    assert out["mixture"] + out["lost"] >= 12 - rec.inputs.shape[0]


def test_imprint_fedavg_recovers_what_fedsgd_does():
    model = gl.models.build("resnet18", input_shape=(3, 16, 16), num_classes=19, dtype=torch.float64, width=4)
    attack, sgd, truth = _imprint_case(model, 8, 64, size=16)
    _, avg, _ = _imprint_case(model, 8, 64, size=16, protocol="fedavg", local_steps=4, local_lr=1e-4)
    o_sgd = outcomes(attack.reconstruct(sgd), truth)
    rec = attack.reconstruct(avg)
    o_avg = outcomes(rec, truth)
    assert o_sgd["exact"] >= 1
    assert [s == "exact" for s in o_avg["per_image"]] == [s == "exact" for s in o_sgd["per_image"]]
    assert rec.info["rows"] <= 8


def test_honest_case_is_refused_and_says_why():
    data = gl.data.samples(16, num_images=2)
    x, y = data.batch(2)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=16,
                            dtype=torch.float64)
    case, _ = gl.simulate(model, x.double(), y, spec=data.spec)
    for name in ("imprint", "trap-weights"):
        assert gl.attacks.attacks.get(name).crafts_model is True
        with pytest.raises(gl.RequirementError, match="honest-but-curious threat model does not allow"):
            gl.create(name).reconstruct(case)
    assert gl.attacks.attacks.get("inverting-gradients").crafts_model is False
    with pytest.raises(gl.RequirementError, match="does not craft a model"):
        gl.create("fc-analytic").craft(model, data.spec)
    # a model crafted by one attack is refused by the other
    crafted = gl.create("trap-weights").craft(model, data.spec)
    case, _ = gl.simulate(crafted, x.double(), y, spec=data.spec)
    with pytest.raises(gl.RequirementError, match="crafted by 'trap-weights'"):
        gl.create("imprint").reconstruct(case)


def _isolated(model, layer_in, W, b):
    act = (layer_in @ W.T + b) > 0  # (B, rows)
    alone = act & (act.sum(0, keepdim=True) == 1)
    return alone.any(1).tolist()


def _check_trap(model, spec, x, y, trap_input):
    attack = gl.create("trap-weights")
    crafted = attack.craft(model, spec)
    case, truth = gl.simulate(crafted, x, y, spec=spec)
    rec = attack.reconstruct(case)
    lin = dict(crafted.named_modules())[rec.info["layer"]]
    iso = _isolated(crafted, trap_input(crafted, spec.normalize(x)), lin.weight.detach(), lin.bias.detach())
    assert any(iso)
    out = outcomes(rec, truth)
    for i, isolated in enumerate(iso):
        if isolated:
            assert out["per_image"][i] == "exact", (i, out)
    for j, st in enumerate(rec.info["row_status"]):
        assert st != "single" or out["psnr_matched"][j] >= 100.0
    return rec, iso


def test_trap_weights_mlp_recovers_isolated_images_exactly():
    data = gl.data.samples(16, num_images=8)
    x, y = data.batch(8)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=256,
                            dtype=torch.float64)
    rec, iso = _check_trap(model, data.spec, x.double(), y, lambda m, xn: xn.flatten(1))
    assert rec.info["reads"] == "normalised"


def test_trap_weights_cnn_passes_the_image_to_the_trap_layer():
    data = gl.data.samples(16, num_images=8)
    x, y = data.batch(8)
    C = data.spec.num_classes
    torch.manual_seed(0)
    model = Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                       nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, C),
                       num_outputs=C).double()

    def trap_input(m, xn):
        with torch.no_grad():
            for layer in list(m)[:6]:
                xn = layer(xn)
        return xn

    rec, iso = _check_trap(model, data.spec, x.double(), y, trap_input)
    assert rec.info["reads"] == "image"
    lenet = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=C)
    with pytest.raises(gl.ValidationError, match="cannot pass the image through"):
        gl.create("trap-weights").craft(lenet, data.spec)


def test_secure_aggregation_is_the_union_batch_and_dilutes_the_bins():
    data = gl.data.samples(16, num_images=8)
    x, y = data.batch(8)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=16,
                            dtype=torch.float64)
    attack = gl.create("imprint", bins=64)
    crafted = attack.craft(model, data.spec)
    parts = [gl.simulate(crafted, x[i:i + 4].double(), y[i:i + 4], spec=data.spec) for i in (0, 4)]
    bits = 48  # the fixed-point precision of the masked encoding: the mean differs by <= 2^-49 per entry
    agg, truth = aggregate_cases([c for c, _ in parts], [t for _, t in parts], fraction_bits=bits,
                                 generator=torch.Generator().manual_seed(0))
    union, _ = gl.simulate(crafted, x.double(), y, spec=data.spec)
    facts = agg.meta["secure_aggregation"]
    assert agg.batch_size == 8 and facts["clients"] == 2 and facts["exact"]
    assert facts["max_rounding"] == 2 * 2.0 ** -(bits + 1) / 8  # two clients' roundings over the weight sum 8
    for k, v in union.observed.items():
        assert float((agg.observed[k] - v).abs().max()) <= facts["max_rounding"] + 1e-15
    rec = attack.reconstruct(agg)
    assert rec.info["expected_share"] == pytest.approx((63 / 64) ** 7)
    assert outcomes(rec, truth)["share_exact"] > 0
    with pytest.raises(gl.ValidationError, match="one round sends one model"):
        other = attack.craft(model, data.spec, generator=torch.Generator().manual_seed(1))
        aggregate_cases([parts[0][0], gl.simulate(other, x[:4].double(), y[:4], spec=data.spec)[0]])


def test_cli_attack_crafts_the_model(tmp_path):
    cfg = gl.AttackRun(attack="imprint", model="resnet18", num_images=4, image_size=16, dtype="float64",
                       model_options={"width": 4}, attack_options={"bins": 64}, out=str(tmp_path / "run"))
    res = gl.run_attack(cfg)
    assert any("crafted the model" in n for n in res.notes)
    assert res.case.describe()["model"].startswith("imprint+")
    assert res.scores.psnr > 100 and (tmp_path / "run" / "metrics.json").exists()


def test_trap_weights_fedavg_on_an_mlp_reads_the_same_inputs():
    data = gl.data.samples(16, num_images=8)
    x, y = data.batch(8)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=256,
                            dtype=torch.float64)
    attack = gl.create("trap-weights")
    crafted = attack.craft(model, data.spec)
    sgd, truth = gl.simulate(crafted, x.double(), y, spec=data.spec)
    avg, _ = gl.simulate(crafted, x.double(), y, spec=data.spec, protocol="fedavg", local_steps=4)
    o_sgd = outcomes(attack.reconstruct(sgd), truth)
    rec = attack.reconstruct(avg)
    o_avg = outcomes(rec, truth)
    assert o_sgd["exact"] >= 1 and o_avg["per_image"] == o_sgd["per_image"]
    assert "single" not in rec.info["row_status"]  # a row's own gradient is not observed alone under FedAvg


def test_imprint_unknown_labels_and_other_priors():
    data = gl.data.samples(16, num_images=8)
    x, y = data.batch(8)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=32,
                            dtype=torch.float64)
    attack = gl.create("imprint", bins=64)
    case, truth = gl.simulate(attack.craft(model, data.spec), x.double(), y, spec=data.spec, labels_known=False)
    rec = attack.reconstruct(case)
    out = outcomes(rec, truth)
    for j, st in enumerate(rec.info["row_status"]):
        if st == "single":  # the label whose own gradient explains the row is the image's label
            assert int(rec.labels[j]) == int(truth.labels[out["rows_matched_to"][j]])
    # the brightness measurement is the mean image-space pixel; a public batch sets the prior
    bright = gl.create("imprint", bins=16, measurement="brightness")
    blk = bright.craft(model, data.spec).imprint
    m = data.spec.normalize(x.double()).flatten(1) @ blk.bins.weight[0].detach() + blk.offset
    torch.testing.assert_close(m, x.double().flatten(1).mean(1))
    public = gl.data.samples(16).batch(19)[0][8:]
    crafted = bright.craft(model, data.spec, public=public)
    rec_prior = crafted.gradleak_crafted.facts
    assert rec_prior["prior_source"].startswith("Gaussian fitted to 11 public")
    assert rec_prior["prior_mean"] == pytest.approx(float(public.double().flatten(1).mean(1).mean()))
    with pytest.raises(gl.ValidationError, match="public must be a tensor"):
        bright.craft(model, data.spec, public=public[0])
