"""The contract every registered attack honours. Registering an attack without an entry here fails."""

import copy
import math

import pytest
import torch

import gradleak as gl


def _photo_case(model_name, size=16, n=1, dtype=torch.float32, **model_opts):
    data = gl.data.samples(size, num_images=n)
    x, y = data.batch(n)
    info = gl.models.models.get(model_name)
    spec = data.spec
    if info.single_output:
        import dataclasses

        spec = dataclasses.replace(spec, num_classes=2)
        y = y % 2
    model = gl.models.build(model_name, input_shape=spec.shape, num_classes=spec.num_classes, dtype=dtype, **model_opts)
    case, truth = gl.simulate(model, x.to(dtype), y, spec=spec)
    return model, case


def _digits_case(model_name, n=2, **model_opts):
    data = gl.data.load("digits", num_images=n)
    x, y = data.batch(n)
    model = gl.models.build(model_name, input_shape=data.spec.shape, num_classes=data.spec.num_classes,
                            dtype=torch.float64, **model_opts)
    case, _ = gl.simulate(model, x.double(), y, spec=data.spec)
    return model, case


CONTRACT = {
    "inverting-gradients": (lambda: _photo_case("lenet"), {"max_iterations": 8}),
    "dlg": (lambda: _photo_case("lenet"), {"max_iterations": 3}),
    "idlg": (lambda: _photo_case("lenet"), {"max_iterations": 3}),
    "fc-analytic": (lambda: _photo_case("mlp", width=64), {}),
    "rgap": (lambda: _photo_case("cnn6", dtype=torch.float64), {}),
    "layerwise": (lambda: _photo_case("cnn2-c1", size=32, dtype=torch.float64), {"preset": "fast"}),
    "tensor": (lambda: _digits_case("two-layer", width=4000), {}),
}


def test_every_registered_attack_has_a_contract_entry():
    missing = sorted(set(gl.attacks.attacks.names()) - set(CONTRACT))
    assert not missing, f"add a CONTRACT entry for {missing}"


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_attack_contract(name):
    assert name in gl.attacks.attacks, f"{name} has a contract entry but is not registered"
    build, opts = CONTRACT[name]
    model, case = build()
    opts = dict(opts)
    preset = opts.pop("preset", None)
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_case = {k: v.clone() for k, v in case.model.state_dict().items()}
    before_obs = {k: v.clone() for k, v in case.observed.items()}

    rec = gl.create(name, preset=preset, **opts).reconstruct(case, seed=3)
    again = gl.create(name, preset=preset, **opts).reconstruct(case, seed=3)

    assert rec.inputs.shape == (case.batch_size, *case.spec.shape)
    assert rec.inputs.dtype == case.dtype and rec.inputs.device == case.device
    assert float(rec.inputs.min()) >= 0.0 and float(rec.inputs.max()) <= 1.0
    assert math.isfinite(rec.residual) and -1e-6 <= rec.residual <= 2.0
    assert rec.attack == name and rec.kind in ("exact", "estimate", "mixture")
    assert torch.equal(rec.inputs, again.inputs), "same seed must give the same result"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), f"caller's model changed at {k}"
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before_case[k]), f"case model changed at {k}"
    for k, v in case.observed.items():
        assert torch.equal(v, before_obs[k]), f"observation changed at {k}"
    assert all(p.grad is None for p in model.parameters())


def test_attacks_refuse_unknown_options_and_list_valid_ones():
    with pytest.raises(gl.ValidationError, match="valid options"):
        gl.create("ig", max_iteratons=5)
    with pytest.raises(gl.UnknownNameError, match="did you mean"):
        gl.create("inverting-gradient")


def test_reconstruct_rejects_a_non_case():
    with pytest.raises(gl.ValidationError, match="expected a gradleak.Case"):
        gl.create("ig").reconstruct({"not": "a case"})


def test_interrupt_returns_best_so_far():
    from gradleak.attacks.base import Attack, Reconstruction, register

    class _Interrupted(Attack):
        name = "interrupt-probe"
        from dataclasses import dataclass

        @dataclass
        class Options:
            steps: int = 5

        def _reconstruct(self, case, ctx):
            x = torch.full((case.batch_size, *case.spec.shape), 0.5, dtype=case.dtype)
            ctx.offer(1.0, x, case.labels)
            ctx.offer(2.0, torch.zeros_like(x), case.labels)  # worse: not kept
            raise KeyboardInterrupt

    _, case = _photo_case("lenet")
    rec = _Interrupted().reconstruct(case)
    assert rec.info["interrupted"] is True and rec.info["best_score"] == 1.0
    assert torch.allclose(rec.inputs, torch.full_like(rec.inputs, 0.5))
    assert math.isfinite(rec.residual)


def test_overriding_reconstruct_is_refused():
    from gradleak.attacks.base import Attack

    with pytest.raises(TypeError, match="must not override reconstruct"):
        type("Bad", (Attack,), {"reconstruct": lambda self, case: None})
