"""Weights: torchvision-compatible ResNet names, state_dict / safetensors round trips, wrappers and prefixes,
and one error listing every problem when a checkpoint does not fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.errors import WeightsError
from gradleak.models import build, check_weights, load_weights, save_weights

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet18_keys() -> list[str]:
    """torchvision.models.resnet18().state_dict() keys, written out from the architecture: a 7x7 stem conv1 +
    bn1, four stages of two BasicBlocks (conv1, bn1, conv2, bn2; the first block of stages 2-4 has a
    downsample = 1x1 conv + BN), then fc."""
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in BN]
    for stage in range(1, 5):
        for block in range(2):
            pre = f"layer{stage}.{block}"
            keys += [f"{pre}.conv1.weight"] + [f"{pre}.bn1.{b}" for b in BN]
            keys += [f"{pre}.conv2.weight"] + [f"{pre}.bn2.{b}" for b in BN]
            if stage > 1 and block == 0:
                keys += [f"{pre}.downsample.0.weight"] + [f"{pre}.downsample.1.{b}" for b in BN]
    return keys + ["fc.weight", "fc.bias"]


TORCHVISION_SHAPES = {
    "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer3.1.conv2.weight": (256, 256, 3, 3), "layer4.0.downsample.1.weight": (512,),
    "layer4.1.bn2.num_batches_tracked": (), "fc.weight": (1000, 512), "fc.bias": (1000,),
}


@pytest.fixture(scope="module")
def resnet18_imagenet():
    return build("resnet18", input_shape=(3, 224, 224), num_classes=1000, seed=0)


def test_imagenet_resnet18_has_torchvision_names(resnet18_imagenet):
    sd = resnet18_imagenet.state_dict()
    expected = torchvision_resnet18_keys()
    assert len(expected) == 122 and len(sd) == 122
    assert list(sd) == expected  # same names, same order
    for k, shape in TORCHVISION_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    assert isinstance(resnet18_imagenet.maxpool, nn.MaxPool2d)
    assert sum(p.numel() for p in resnet18_imagenet.parameters()) == 11_689_512  # torchvision's count


def test_resnet18_checkpoint_round_trips_key_for_key(tmp_path, resnet18_imagenet):
    src = resnet18_imagenet
    with torch.no_grad():  # non-default running stats so buffers are checked too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    for suffix in (".pth", ".safetensors"):
        path = save_weights(src, tmp_path / f"r18{suffix}")
        fresh = build("resnet18", input_shape=(3, 224, 224), num_classes=1000, seed=1)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        loaded = load_weights(fresh, path)
        assert loaded is not fresh
        a, b = src.state_dict(), loaded.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        for k, v in fresh.state_dict().items():  # the caller's model is untouched
            assert torch.equal(v, before[k]), k
        assert loaded.weights_source == str(path)
    same = load_weights(fresh, tmp_path / "r18.pth", inplace=True)
    assert same is fresh and torch.equal(fresh.fc.weight, src.fc.weight)


def test_wrappers_and_prefixes_are_removed():
    src = build("lenet", input_shape=(1, 8, 8), num_classes=10, seed=0)
    dst = build("lenet", input_shape=(1, 8, 8), num_classes=10, seed=1)
    sd = src.state_dict()
    for ckpt in ({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
                 {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
                 {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "optimizer_states": [{}]}):
        out = load_weights(dst, ckpt)
        assert all(torch.equal(out.state_dict()[k], v) for k, v in sd.items())


def test_dtype_follows_the_model_and_old_checkpoints_without_num_batches_tracked_load():
    src = build("convnet", input_shape=(1, 8, 8), num_classes=10, width=4, seed=0)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = build("convnet", input_shape=(1, 8, 8), num_classes=10, width=4, seed=1, dtype=torch.float64)
    out = load_weights(dst, sd)
    assert out[0].weight.dtype == torch.float64
    assert torch.equal(out[0].weight, src[0].weight.double())


def test_one_error_lists_every_missing_unexpected_and_misshaped_key(tmp_path, resnet18_imagenet):
    sd = dict(resnet18_imagenet.state_dict())
    sd["fc.weight"] = torch.zeros(10, 512)
    sd["fc.bias"] = torch.zeros(10)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    sd["extra.weight"] = torch.zeros(3)
    sd["head.bias"] = torch.zeros(3)
    del sd["layer3.1.bn2.running_var"]
    del sd["layer4.0.downsample.0.weight"]
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(WeightsError) as ei:
        load_weights(resnet18_imagenet, path)
    msg = str(ei.value)
    for key in ("fc.weight", "fc.bias", "layer1.0.conv1.weight", "extra.weight", "head.bias",
                "layer3.1.bn2.running_var", "layer4.0.downsample.0.weight"):
        assert key in msg, key
    assert "2 missing key(s)" in msg and "2 unexpected key(s)" in msg
    assert "(10, 512) in the checkpoint, the model expects (1000, 512)" in msg and "num_classes=10" in msg
    assert "(64, 64, 5, 5) in the checkpoint, the model expects (64, 64, 3, 3)" in msg
    assert len(ei.value.problems) == 5 and str(path) in msg
    # strict=False tolerates missing / unexpected keys, never wrong shapes
    state, problems = check_weights(resnet18_imagenet, sd, strict=False)
    assert len(problems) == 3 and all("shape" in p for p in problems)


def test_unreadable_and_foreign_checkpoints(tmp_path):
    model = build("lenet", input_shape=(1, 8, 8), num_classes=10)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "pickled_model.pt")  # a whole pickled module
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    other = build("mlp", input_shape=(1, 8, 8), num_classes=10, width=8)
    bad_nan = {k: v.clone() for k, v in model.state_dict().items()}
    bad_nan["0.weight"][0, 0, 0, 0] = float("nan")
    cases = [
        (tmp_path / "missing.pt", "no such weights file"),
        (tmp_path / "corrupt.pt", "cannot read .*expected a PyTorch state_dict"),
        (tmp_path / "corrupt.safetensors", "cannot read .*safetensors"),
        (tmp_path / "pickled_model.pt", "save model.state_dict\\(\\) instead"),
        (tmp_path / "list.pt", "not a state_dict: the entries \\['weights'\\] are not tensors"),
        (other.state_dict(), "no key in common: is this a checkpoint of another architecture"),
        (bad_nan, "'0.weight' holds 1 NaN/inf value"),
        ({}, "not a state_dict: it is empty"),
    ]
    for src, pattern in cases:
        with pytest.raises(WeightsError, match=pattern):
            load_weights(model, src)
    assert isinstance(WeightsError("x"), gl.GradleakError)


def test_save_weights_safetensors_metadata(tmp_path):
    from safetensors import safe_open

    model = build("lenet", input_shape=(1, 8, 8), num_classes=10)
    p = save_weights(model, tmp_path / "sub" / "m.safetensors", metadata={"epoch": 3})
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    assert meta["gradleak_model"] == "lenet" and meta["input_shape"] == "1x8x8" and meta["epoch"] == "3"
