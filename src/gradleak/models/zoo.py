"""The networks of the papers gradleak implements. Every factory takes the data's input shape and number
of classes, so grayscale, small or non-square data get a model built for them."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..activations import Act
from ..errors import ValidationError
from .registry import register_model


def _flat_dim(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        was = features.training
        features.eval()
        n = features(torch.zeros(1, *input_shape)).numel()
        features.train(was)
    return n


def _need_image(name, input_shape):
    if len(input_shape) != 3:
        raise ValidationError(f"model {name}", [f"needs image inputs (C, H, W), got shape {tuple(input_shape)}"])


class Sequential(nn.Sequential):
    """nn.Sequential with ``num_outputs`` (read by Case)."""

    def __init__(self, *layers, num_outputs: int):
        super().__init__(*layers)
        self.num_outputs = num_outputs


@register_model("mlp", description="multi-layer perceptron on the flattened input, biased layers",
                source="generic baseline")
def mlp(input_shape, num_classes, *, width: int = 1000, depth: int = 2, activation: str = "relu"):
    d = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth - 1):
        layers += [nn.Linear(d if i == 0 else width, width), Act(activation)]
    layers.append(nn.Linear(d if depth == 1 else width, num_classes))
    return Sequential(*layers, num_outputs=num_classes)


@register_model("lenet", description="DLG's LeNet: three 5x5 convs (12 channels, strides 2,2,1), sigmoid, one "
                "linear layer; weights and biases U(-0.5, 0.5)", source="Zhu, Liu, Han 2019 (DLG)")
def lenet(input_shape, num_classes, *, activation: str = "sigmoid", width: int = 12):
    _need_image("lenet", input_shape)
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, width, 5, padding=2, stride=2), Act(activation),
        nn.Conv2d(width, width, 5, padding=2, stride=2), Act(activation),
        nn.Conv2d(width, width, 5, padding=2, stride=1), Act(activation),
        nn.Flatten(),
    )
    model = Sequential(*features, nn.Linear(_flat_dim(features, input_shape), num_classes), num_outputs=num_classes)
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return model


def _rgap_cnn(input_shape, channels, activation, slope_init):
    _need_image("cnn6", input_shape)
    spec = [(input_shape[0], channels[0], 4, 2, 2), (channels[0], channels[1], 3, 2, 1),
            (channels[1], channels[2], 3, 1, 1), (channels[2], channels[3], 3, 1, 1),
            (channels[3], channels[4], 3, 2, 1), (channels[4], channels[5], 3, 1, 1)]
    layers: list[nn.Module] = []
    for cin, cout, k, s, p in spec:
        layers += [nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False), Act(activation)]
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    model = Sequential(*layers, nn.Linear(_flat_dim(features, input_shape), 1, bias=False), num_outputs=1)
    return model


@register_model("cnn6", description="R-GAP's CNN6: six bias-free convs (3-12-36-36-36-64-128), leaky ReLU 0.2, "
                "FC to ONE score (logistic loss)", source="Zhu, Blaschko 2021 (R-GAP)", single_output=True)
def cnn6(input_shape, num_classes, *, activation: str = "leaky-relu"):
    return _rgap_cnn(input_shape, (12, 36, 36, 36, 64, 128), activation, None)


@register_model("cnn6-d", description="R-GAP's CNN6-d: CNN6 with conv2 12->20 and conv3 20->36, whose conv2 "
                "system is rank-deficient (the paper's safer architecture)", source="Zhu, Blaschko 2021 (R-GAP)",
                single_output=True)
def cnn6_d(input_shape, num_classes, *, activation: str = "leaky-relu"):
    return _rgap_cnn(input_shape, (12, 20, 36, 36, 64, 128), activation, None)


@register_model("fcn3", description="R-GAP's FCN3: bias-free FC d-1000-100-1, leaky ReLU 0.2, ONE score",
                source="Zhu, Blaschko 2021 (R-GAP)", single_output=True)
def fcn3(input_shape, num_classes, *, activation: str = "leaky-relu", width: int = 1000, width2: int = 100):
    d = math.prod(input_shape)
    return Sequential(nn.Flatten(), nn.Linear(d, width, bias=False), Act(activation),
                      nn.Linear(width, width2, bias=False), Act(activation), nn.Linear(width2, 1, bias=False),
                      num_outputs=1)


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "none":
        return nn.Identity()
    raise ValidationError("model option norm", [f"expected 'bn' or 'none', got {kind!r}"])


@register_model("convnet", description="Inverting Gradients' ConvNet: 8 conv-BN-act layers of width w..4w with two "
                "3x3 max-pools, then a linear classifier", source="Geiping et al. 2020")
def convnet(input_shape, num_classes, *, width: int = 64, activation: str = "relu", norm: str = "bn"):
    _need_image("convnet", input_shape)
    c = input_shape[0]
    w = width
    chans = [(c, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w), "pool",
             (4 * w, 4 * w), (4 * w, 4 * w), "pool"]
    layers: list[nn.Module] = []
    for item in chans:
        if item == "pool":
            layers.append(nn.MaxPool2d(3) if min(input_shape[1:]) >= 9 else nn.Identity())
            continue
        cin, cout = item
        layers += [nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), Act(activation)]
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    return Sequential(*layers, nn.Linear(_flat_dim(features, input_shape), num_classes), num_outputs=num_classes)


# ---- ResNets (parameter names follow torchvision: conv1, bn1, layerN.M.conv1/bn1/conv2/bn2/downsample, fc) ----

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride, activation, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.act = Act(activation)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, activation, norm):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = _norm(norm, cout)
        self.act = Act(activation)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """CIFAR-style stem (3x3 conv, no pooling) or ImageNet-style stem (7x7 stride-2 conv + max-pool)."""

    def __init__(self, input_shape, num_classes, block, layers, base_width, stem, activation, norm):
        super().__init__()
        _need_image("resnet", input_shape)
        c = input_shape[0]
        self.num_outputs = num_classes
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(c, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(c, base_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = _norm(norm, base_width)
        self.act = Act(activation)
        cin = base_width
        for i, n in enumerate(layers):
            planes = base_width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, activation, norm))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stem(stem: str, input_shape) -> str:
    if stem == "auto":
        return "imagenet" if min(input_shape[1:]) >= 128 else "cifar"
    if stem not in ("cifar", "imagenet"):
        raise ValidationError("model option stem", [f"expected 'auto', 'cifar' or 'imagenet', got {stem!r}"])
    return stem


@register_model("resnet20", description="CIFAR ResNet-20 (3 stages x 3 basic blocks); width=4 gives Inverting "
                "Gradients' ResNet20-4", source="He et al. 2016; Geiping et al. 2020")
def resnet20(input_shape, num_classes, *, width: int = 1, activation: str = "relu", norm: str = "bn"):
    return ResNet(input_shape, num_classes, BasicBlock, [3, 3, 3], 16 * width, "cifar", activation, norm)


@register_model("resnet32", description="CIFAR ResNet-32 (3 stages x 5 basic blocks); width=10 gives ResNet32-10",
                source="He et al. 2016; Geiping et al. 2020")
def resnet32(input_shape, num_classes, *, width: int = 1, activation: str = "relu", norm: str = "bn"):
    return ResNet(input_shape, num_classes, BasicBlock, [5, 5, 5], 16 * width, "cifar", activation, norm)


def _resnet_imagenet(block, layers):
    def f(input_shape, num_classes, *, width: int = 64, stem: str = "auto", activation: str = "relu", norm: str = "bn"):
        return ResNet(input_shape, num_classes, block, layers, width, _stem(stem, input_shape), activation, norm)

    return f


for _name, _block, _layers in (("resnet18", BasicBlock, [2, 2, 2, 2]), ("resnet34", BasicBlock, [3, 4, 6, 3]),
                               ("resnet50", Bottleneck, [3, 4, 6, 3]), ("resnet152", Bottleneck, [3, 8, 36, 3])):
    register_model(_name, description=f"ResNet-{_name[6:]}: stem='cifar' (3x3, no pool) below 128 px, 'imagenet' "
                   "(7x7/2 + max-pool) from 128 px; parameter names match torchvision",
                   source="He et al. 2016")(_resnet_imagenet(_block, _layers))
