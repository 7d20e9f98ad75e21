import pytest

import gradleak as gl
from gradleak.registry import Registry


def test_registry_aliases_suggestions_and_overwrite_guard():
    reg = Registry("thing")
    reg.register("inverting-gradients", aliases=("ig",))(1)
    assert reg.get("ig") == 1 and reg.get("Inverting_Gradients") == 1
    with pytest.raises(gl.UnknownNameError, match="did you mean 'inverting-gradients'"):
        reg.get("inverting-gradient")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("ig")(2)
    reg.register("ig", overwrite=True)(3)
    with pytest.raises(ValueError, match="kebab-case"):
        reg.register("Bad_Name")


def test_model_zoo_builds_for_the_data():
    import torch

    for name in ["mlp", "lenet", "convnet", "resnet20"]:
        m = gl.models.build(name, input_shape=(1, 12, 20), num_classes=7, **({"width": 4} if name == "convnet" else {}))
        assert m(torch.rand(2, 1, 12, 20)).shape == (2, 7)
    with pytest.raises(gl.ValidationError, match="unknown option"):
        gl.models.build("lenet", widht=3)
    a = gl.models.build("lenet", seed=5)
    b = gl.models.build("lenet", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert gl.models.build("resnet20", width=4).conv1.out_channels == 64
