"""Image parametrisations of Inverting Gradients (gradleak.attacks.optimization.parametrize)."""

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.attacks.optimization import parametrize as Z


def test_laplacian_start_is_the_image_and_the_levels_have_the_halved_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 30, generator=g, dtype=torch.float64)
    p = Z.build("laplacian-6", (3, 32, 30))
    zs = p.variables(x)
    assert [tuple(z.shape[-2:]) for z in zs] == [(32, 30), (16, 15), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(z.dtype == torch.float64 for z in zs)
    assert torch.equal(p.image(zs), x)
    # a coarse level adds its bilinear upsampling: a constant at the 1 x 1 level
    zs[5].fill_(0.25)
    assert torch.allclose(p.image(zs), x + 0.25, atol=1e-12)
    assert zs[0].data_ptr() != x.data_ptr()  # the pyramid owns its finest level


def test_projection_puts_the_image_in_the_box_through_the_finest_level_only():
    g = torch.Generator().manual_seed(1)
    p = Z.build("laplacian-4", (3, 16, 16))
    zs = [torch.randn(1, 3, s, s, generator=g, dtype=torch.float64) * 2 for s in (16, 8, 4, 2)]
    coarse = [z.clone() for z in zs[1:]]
    lo, hi = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    before = p.image(zs)
    assert before.min() < lo and before.max() > hi  # the test needs points outside the box
    p.project(zs, lo, hi)
    after = p.image(zs)
    assert torch.allclose(after, before.clamp(-1.0, 0.5), atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(zs[1:], coarse))


def test_bad_names_and_non_image_samples_are_refused():
    for bad in ("laplacian-1", "laplacian-x", "fourier", ""):
        with pytest.raises(gl.ValidationError, match="parametrize must be 'pixel' or 'laplacian-K'"):
            gl.create("ig", parametrize=bad)
    with pytest.raises(gl.ValidationError, match="needs image samples"):
        Z.build("laplacian-3", (12,))
    torch.manual_seed(0)
    model = gl.models.zoo.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3), num_outputs=3)
    spec = gl.DataSpec(shape=(12,), num_classes=3, value_range=(-3.0, 3.0))
    case, _ = gl.simulate(model, torch.rand(1, 12), torch.tensor([1]), spec=spec)
    with pytest.raises(gl.RequirementError, match="needs image samples"):
        gl.create("ig", parametrize="laplacian-3", max_iterations=2).reconstruct(case, seed=0)
    # pixel works there
    gl.create("ig", parametrize="pixel", max_iterations=2).reconstruct(case, seed=0)


def test_ig_with_a_pyramid_moves_the_levels_and_keeps_the_box(photos32):
    x, y = photos32.batch(1, 2)
    model = gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                            seed=0)
    case, truth = gl.simulate(model, x, y, spec=photos32.spec)
    pix = gl.create("ig", max_iterations=6, parametrize="pixel").reconstruct(case, seed=0)
    lap = gl.create("ig", max_iterations=6, parametrize="laplacian-5").reconstruct(case, seed=0)
    assert lap.info["parametrize"] == "laplacian-5" and pix.info["parametrize"] == "pixel"
    assert lap.info["batched"]["reason"] == "one trial: nothing to batch"
    assert float(lap.inputs.min()) >= 0.0 and float(lap.inputs.max()) <= 1.0
    # same start (the pyramid starts at the pixel start), different steps: the results differ
    assert not torch.allclose(lap.inputs, pix.inputs)
    # one signed-Adam step of lr l on the pyramid moves the image by up to l per level (K levels: K l), more
    # than the pixel form's l
    one_p = gl.create("ig", max_iterations=1, parametrize="pixel", lr=0.01, boxed=False, lr_decay=False).reconstruct(case, seed=0)
    one_l = gl.create("ig", max_iterations=1, parametrize="laplacian-5", lr=0.01, lr_decay=False,
                      boxed=False).reconstruct(case, seed=0)
    start = gl.create("ig", max_iterations=1, lr=1e-12, boxed=False).reconstruct(case, seed=0)
    std = torch.tensor(photos32.spec.std).view(-1, 1, 1)
    dp = ((one_p.inputs - start.inputs) / std).abs().max()
    dl = ((one_l.inputs - start.inputs) / std).abs().max()
    assert dp == pytest.approx(0.01, rel=1e-3)
    assert 0.01 * 1.5 < dl <= 0.05 * (1 + 1e-3)


def test_pyramid_with_restarts_group_term_and_joint_labels_runs_in_float64(photos32):
    x, y = photos32.batch(1, 0)
    model = gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                            seed=0).double()
    case, truth = gl.simulate(model, x.double(), y, spec=photos32.spec, labels_known=False)
    rec = gl.create("ig", max_iterations=4, restarts=2, group_consistency=1e-2, parametrize="laplacian-3",
                    label_strategy="joint").reconstruct(case, seed=0)
    assert rec.inputs.dtype == torch.float64 and rec.inputs.shape == x.shape
    assert len(rec.info["batched"]) == 2 and rec.info["group_consistency"]["restarts_in_consensus"] == 2
    assert all(note["batched"] is True for note in rec.info["batched"])  # both stages (tests/test_pyramid_batched.py)
    assert rec.labels.shape == (1,)


@pytest.mark.parametrize("name,expected", [("resnet18", "laplacian-6"), ("resnet20", "laplacian-6"),
                                           ("resnet32", "laplacian-6"), ("resnet50", "laplacian-6"),
                                           ("lenet", "pixel"), ("convnet", "pixel"), ("mlp", "pixel"),
                                           ("cnn6", "pixel")])
def test_auto_parametrisation_follows_the_rule_on_the_zoo(name, expected):
    from gradleak.attacks.optimization.inverting import resolve_parametrize

    model = gl.models.build(name, input_shape=(3, 32, 32), num_classes=10)
    got, why = resolve_parametrize("auto", model, (3, 32, 32))
    assert got == expected and why.startswith(f"auto: {expected}")
    if name == "convnet":  # BatchNorm but no residual block: the rule needs both (as TV's)
        assert "no residual blocks" in why
    assert resolve_parametrize("laplacian-3", model, (3, 32, 32)) == ("laplacian-3", "given")
    if expected != "pixel":  # down to 1 x 1 at other sizes; pixel for samples that are not images, and in
        # train-mode BatchNorm (where the pyramid measured below pixel)
        got, why = resolve_parametrize("auto", model, (3, 32, 32), "train")
        assert got == "pixel" and "train mode" in why
        assert resolve_parametrize("auto", model, (3, 224, 200))[0] == "laplacian-8"
        assert resolve_parametrize("auto", model, (12,))[0] == "pixel"


def test_auto_parametrisation_is_recorded_and_the_paper_presets_pin_pixel(photos32):
    x, y = photos32.batch(1)
    for name, auto in (("resnet20", "laplacian-6"), ("lenet", "pixel")):
        model = gl.models.build(name, input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes, seed=0)
        case, _ = gl.simulate(model, x, y, spec=photos32.spec)
        assert gl.create("ig").options.parametrize == "auto"
        rec = gl.create("ig", max_iterations=2).reconstruct(case, seed=0)
        assert rec.info["parametrize"] == auto and rec.info["parametrize_choice"].startswith(f"auto: {auto}")
        given = gl.create("ig", max_iterations=2, parametrize="pixel").reconstruct(case, seed=0)
        assert given.info["parametrize"] == "pixel" and given.info["parametrize_choice"] == "given"
    train, _ = gl.simulate(gl.models.build("resnet20", input_shape=photos32.spec.shape,
                                           num_classes=photos32.spec.num_classes, seed=0),
                           x, y, spec=photos32.spec, bn_mode="train")
    rec = gl.create("ig", max_iterations=2).reconstruct(train, seed=0)
    assert rec.info["parametrize"] == "pixel" and "train mode" in rec.info["parametrize_choice"]
    for preset in ("geiping2020", "geiping2020-imagenet", "geiping2020-sweep", "gradinversion", "modern"):
        assert gl.create("ig", preset=preset).options.parametrize == "pixel"
