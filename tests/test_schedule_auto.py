"""IG's step-size schedule 'auto' (inverting.resolve_schedule): warm-up plus cosine decay on a pyramid, the
paper's step decay elsewhere; what ran is recorded and equals the explicit options."""

import pytest
import torch

import gradleak as gl
from gradleak.attacks.optimization.inverting import AUTO_WARMUP_FRACTION, resolve_schedule


def test_the_rule():
    assert resolve_schedule("auto", 0, "laplacian-6", 500)[:2] == ("cosine", 50)
    assert round(AUTO_WARMUP_FRACTION * 500) == 50
    assert resolve_schedule("auto", 0, "laplacian-6", 20)[:2] == ("cosine", 2)  # scales with the budget
    assert resolve_schedule("auto", 0, "laplacian-3", 3)[:2] == ("cosine", 1)
    assert resolve_schedule("auto", 7, "laplacian-6", 500)[:2] == ("cosine", 7)  # a given warm-up is kept
    name, warm, why = resolve_schedule("auto", 0, "pixel", 500)
    assert (name, warm) == ("step", 0) and why.startswith("auto: step")
    assert resolve_schedule("auto", 0, "laplacian-6", 500, lr_decay=False)[0] == "constant"
    # given names are themselves ('step' without decay is constant, as before the rule)
    assert resolve_schedule("step", 0, "laplacian-6", 500) == ("step", 0, "given")
    assert resolve_schedule("step", 0, "pixel", 500, lr_decay=False)[0] == "constant"
    assert resolve_schedule("cosine", 10, "pixel", 500) == ("cosine", 10, "given")


def test_bad_schedule_is_refused_with_the_choices():
    with pytest.raises(gl.ValidationError, match="schedule must be one of .*'auto'.*'cosine'"):
        gl.create("ig", schedule="linear")


def test_auto_runs_cosine_on_a_pyramid_exactly_as_the_explicit_options(zoo_case):
    case = zoo_case("resnet20")
    auto = gl.create("ig", max_iterations=10).reconstruct(case, seed=0)
    assert auto.info["parametrize"] == "laplacian-6"
    assert auto.info["schedule"] == "cosine" and auto.info["warmup"] == 1
    assert auto.info["schedule_choice"].startswith("auto: cosine")
    given = gl.create("ig", max_iterations=10, parametrize="laplacian-6", schedule="cosine",
                      warmup=1).reconstruct(case, seed=0)
    assert given.info["schedule_choice"] == "given"
    assert torch.equal(auto.inputs, given.inputs)
    step = gl.create("ig", max_iterations=10, parametrize="laplacian-6", schedule="step").reconstruct(case, seed=0)
    assert step.info["schedule"] == "step" and "warmup" not in step.info
    assert not torch.equal(auto.inputs, step.inputs)  # the schedule is what differs


def test_auto_keeps_the_papers_step_decay_where_the_image_is_not_a_pyramid(zoo_case):
    for case in (zoo_case("lenet"), zoo_case("resnet20", bn_mode="train")):
        auto = gl.create("ig", max_iterations=6).reconstruct(case, seed=0)
        assert auto.info["parametrize"] == "pixel"
        assert auto.info["schedule"] == "step" and auto.info["schedule_choice"].startswith("auto: step")
        given = gl.create("ig", max_iterations=6, schedule="step").reconstruct(case, seed=0)
        assert torch.equal(auto.inputs, given.inputs)
    # the papers' presets pin the pixel form, so they run the paper's step decay
    for preset in ("geiping2020", "geiping2020-sweep"):
        a = gl.create("ig", preset=preset, max_iterations=4)
        assert a.options.parametrize == "pixel"
        assert a.reconstruct(zoo_case("resnet20"), seed=0).info["schedule"] == "step"
