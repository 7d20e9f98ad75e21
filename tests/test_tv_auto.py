"""IG's TV weight 'auto' (the default): the measured rule of resolve_tv, and an explicit value overrides it."""

import pytest

import gradleak as gl
from gradleak.attacks.optimization.inverting import TV_BN_RESNET, TV_PAPER, resolve_tv


@pytest.mark.parametrize("name,expected", [("resnet18", TV_BN_RESNET), ("resnet20", TV_BN_RESNET),
                                           ("resnet32", TV_BN_RESNET), ("resnet50", TV_BN_RESNET),
                                           ("lenet", TV_PAPER), ("convnet", TV_PAPER), ("mlp", TV_PAPER),
                                           ("cnn6", TV_PAPER)])
def test_auto_tv_follows_the_rule_on_the_zoo(name, expected):
    model = gl.models.build(name, input_shape=(3, 32, 32), num_classes=10)
    weight, why = resolve_tv("auto", model)
    assert weight == expected
    assert why.startswith(f"auto: {expected:g}")
    # convnet has BatchNorm but no residual block: the rule needs both
    if name == "convnet":
        assert "no residual blocks" in why
    assert resolve_tv(3e-3, model) == (3e-3, "given")


def test_auto_tv_is_recorded_and_an_explicit_value_overrides_it(photos32):
    x, y = photos32.batch(1)
    for name, auto in (("resnet20", TV_BN_RESNET), ("lenet", TV_PAPER)):
        model = gl.models.build(name, input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes, seed=0)
        case, _ = gl.simulate(model, x, y, spec=photos32.spec)
        assert gl.create("ig").options.tv == "auto"
        rec = gl.create("ig", max_iterations=2).reconstruct(case, seed=0)
        assert rec.info["tv"] == auto and rec.info["tv_choice"].startswith(f"auto: {auto:g}")
        assert {"prior": "tv", "weight": auto} in rec.info["priors"]
        given = gl.create("ig", max_iterations=2, tv=1e-3).reconstruct(case, seed=0)
        assert given.info["tv"] == 1e-3 and given.info["tv_choice"] == "given"
    # the batch scaling applies to the resolved weight: x4 at batch 2
    x2, y2 = photos32.batch(2)
    model = gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    case2, _ = gl.simulate(model, x2, y2, spec=photos32.spec)
    assert gl.create("ig", max_iterations=1).reconstruct(case2, seed=0).info["tv"] == pytest.approx(4 * TV_BN_RESNET)


def test_tv_must_be_auto_or_a_number():
    with pytest.raises(gl.ValidationError, match="tv must be 'auto' or a number >= 0"):
        gl.create("ig", tv="high")
    with pytest.raises(gl.ValidationError, match="option 'tv' must be float or str"):
        gl.create("ig", tv=[1e-2])
    with pytest.raises(gl.ValidationError, match="tv must be 'auto' or a number >= 0"):
        gl.create("ig", tv=-1.0)
    for flag in (True, False):  # a bool is an int to Python, not a TV weight (True would run TV 1.0)
        with pytest.raises(gl.ValidationError, match="tv must be 'auto' or a number >= 0|option 'tv' must be"):
            gl.create("ig", tv=flag)
