"""IG's matched-layer rule 'auto' (inverting.resolve_matched_layers): the classifier's gradient left out on an
untrained BatchNorm ResNet in eval mode, FedSGD, batch 1, images up to 32 px, with labels known or read off the
classifier; every tensor elsewhere. What ran is recorded and equals the explicit option."""

import pytest
import torch

import gradleak as gl
from gradleak.attacks.optimization.inverting import resolve_matched_layers, untrained_bn


def test_the_rule(photos32, zoo_case):
    eval_known = zoo_case("resnet20")
    items, why = resolve_matched_layers("auto", eval_known)
    assert items == ("!fc",) and why.startswith("auto: the classifier ('fc') left out") and "known" in why
    unknown = zoo_case("resnet20", labels_known=False)
    items, why = resolve_matched_layers("auto", unknown)
    assert items == ("!fc",) and "read off the classifier" in why
    # joint label logits are matched through the classifier's gradient: it stays
    items, why = resolve_matched_layers("auto", unknown, "joint")
    assert items == () and "joint" in why
    # train-mode BatchNorm, and a model that is not a BatchNorm ResNet: every tensor
    items, why = resolve_matched_layers("auto", zoo_case("resnet20", bn_mode="train"))
    assert items == () and "train mode" in why
    x, y = photos32.batch(2, 0)
    model = gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes, seed=0)
    items, why = resolve_matched_layers("auto", gl.simulate(model, x, y, spec=photos32.spec)[0])
    assert items == () and "the batch has 2 samples" in why
    items, why = resolve_matched_layers("auto", zoo_case("resnet20", protocol="fedavg", local_steps=2))
    assert items == () and "fedavg model change" in why
    # images larger than the 32 px measured (at 224 px it measured behind): every tensor
    big = gl.data.samples(40, num_images=1)
    m40 = gl.models.build("resnet20", input_shape=big.spec.shape, num_classes=big.spec.num_classes, seed=0)
    items, why = resolve_matched_layers("auto", gl.simulate(m40, *big.batch(1, 0), spec=big.spec)[0])
    assert items == () and "not images of at most 32 x 32" in why
    # a model whose BatchNorm has run on data (one train-mode pass moves its running statistics): every tensor
    trained = gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                              seed=0)
    assert untrained_bn(trained)
    with torch.no_grad():
        trained.train()(photos32.spec.normalize(photos32.batch(4, 0)[0]))
    trained.eval()
    assert not untrained_bn(trained)
    x1, y1 = photos32.batch(1, 1)
    items, why = resolve_matched_layers("auto", gl.simulate(trained, x1, y1, spec=photos32.spec)[0])
    assert items == () and "not at their initial values" in why
    assert not untrained_bn(gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=10, seed=0))
    items, why = resolve_matched_layers("auto", zoo_case("lenet"))
    assert items == () and "not a ResNet with BatchNorm" in why
    # a given selection is itself, on any case
    assert resolve_matched_layers((), eval_known) == ((), "given")
    assert resolve_matched_layers(["!fc", "conv1"], eval_known) == (("!fc", "conv1"), "given")


def test_auto_is_the_explicit_option_bit_for_bit_and_is_recorded(zoo_case):
    case = zoo_case("resnet20")
    auto = gl.create("ig", max_iterations=6).reconstruct(case, seed=0)
    every = list(case.observed)
    assert auto.info["layers"] == [n for n in every if not n.startswith("fc.")]
    assert len(auto.info["layers"]) == len(every) - 2
    assert auto.info["layers_choice"].startswith("auto: the classifier")
    given = gl.create("ig", max_iterations=6, layers=("!fc",)).reconstruct(case, seed=0)
    assert given.info["layers_choice"] == "given"
    assert torch.equal(auto.inputs, given.inputs)
    full = gl.create("ig", max_iterations=6, layers=()).reconstruct(case, seed=0)
    assert "layers" not in full.info and full.info["matched_tensors"] == "all"
    assert not torch.equal(auto.inputs, full.inputs)  # the classifier's gradient is what differs


def test_labels_are_still_read_off_the_classifier(photos32, zoo_case):
    case = zoo_case("resnet20", labels_known=False)
    x, y = photos32.batch(1, 1)
    rec = gl.create("ig", max_iterations=4).reconstruct(case, seed=0)
    assert rec.info["labels"]["source"] == "recovered"
    assert torch.equal(rec.labels.cpu(), y)
    assert "fc.weight" not in rec.info["layers"]


def test_auto_matches_every_tensor_where_the_rule_does_not_apply(zoo_case):
    for case in (zoo_case("lenet"), zoo_case("resnet20", bn_mode="train")):
        auto = gl.create("ig", max_iterations=4).reconstruct(case, seed=0)
        assert auto.info["matched_tensors"] == "all" and auto.info["layers_choice"].startswith("auto: every")
        given = gl.create("ig", max_iterations=4, layers=()).reconstruct(case, seed=0)
        assert torch.equal(auto.inputs, given.inputs)
    # the papers' presets match every tensor, as the papers do
    case = zoo_case("resnet20")
    for preset in ("geiping2020", "geiping2020-sweep", "geiping2020-imagenet", "gradinversion", "modern"):
        a = gl.create("ig", preset=preset)
        assert a.options.layers == ()
    rec = gl.create("ig", preset="geiping2020", max_iterations=2, restarts=1).reconstruct(case, seed=0)
    assert rec.info["matched_tensors"] == "all" and rec.info["layers_choice"] == "given"


def test_a_list_from_python_is_taken_as_the_tuple():
    assert gl.create("ig", layers=["!fc", "conv1"]).options.layers == ("!fc", "conv1")
    assert gl.create("ig").options.layers == "auto"


@pytest.mark.parametrize("bad", ["fc", "!fc", ("fc", 3)])
def test_a_bad_selection_is_refused_with_what_is_expected(bad):
    with pytest.raises(gl.ValidationError, match="layers must be 'auto' or a tuple of parameter names"):
        gl.create("ig", layers=bad)
