"""The small test CNNs of the layer-wise paper (Chen, Campbell 2021, arXiv 2111.10178) and its follow-up code.

Every network: input (3, 32, 32), bias-free convolutions given as (in, out, kernel, stride, padding), tanh after
every convolution, then one linear layer WITH bias to the classes (cross-entropy). The last layer's bias is what
lets the layer-wise attack start (x_d = dW[j, :] / db[j]). With random weights their per-layer rank deficiencies
of the layer-wise system are (input side first, see :func:`gradleak.risk.security.security_analysis`):

    cnn2-c1 [0]; cnn2-c2 [-1470]; cnn3-c1 [0, -4533]; cnn4-c1 [0, -3965, -386]; cnn4-c2 [0, -9316, 0].
"""

from __future__ import annotations

from torch import nn

from ..activations import Act
from .registry import register_model
from .zoo import Sequential, _flat_dim, _need_image

#: name -> conv layers (in, out, kernel, stride, padding), for 3-channel 32x32 inputs
COPA_CONVS: dict[str, list[tuple[int, int, int, int, int]]] = {
    "cnn2-c1": [(3, 6, 3, 1, 0)],
    "cnn2-c2": [(3, 6, 4, 2, 0)],
    "cnn3-c1": [(3, 6, 3, 1, 0), (6, 3, 4, 2, 0)],
    "cnn4-c1": [(3, 6, 3, 1, 0), (6, 5, 4, 2, 0), (5, 3, 4, 1, 0)],
    "cnn4-c2": [(3, 16, 5, 1, 0), (16, 6, 5, 2, 0), (6, 32, 5, 1, 2)],
}

_DEFICIENCIES = {"cnn2-c1": "[0]", "cnn2-c2": "[-1470]", "cnn3-c1": "[0, -4533]", "cnn4-c1": "[0, -3965, -386]",
                 "cnn4-c2": "[0, -9316, 0]"}


def copa_cnn(name: str, input_shape, num_classes: int, activation: str = "tanh") -> Sequential:
    """Build one of :data:`COPA_CONVS`: its bias-free convs, ``activation`` after each, Flatten, Linear(+bias).

    The first conv's input channels follow ``input_shape[0]`` (the paper's networks take 3 channels); other
    image sizes work as long as every conv output stays non-empty. Weights: PyTorch's default initialisation.
    """
    _need_image(name, input_shape)
    layers: list[nn.Module] = []
    for i, (cin, cout, k, s, p) in enumerate(COPA_CONVS[name]):
        cin = input_shape[0] if i == 0 else cin
        layers += [nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False), Act(activation)]
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    return Sequential(*layers, nn.Linear(_flat_dim(features, input_shape), num_classes, bias=True),
                      num_outputs=num_classes)


def _register(name: str) -> None:
    convs = ", ".join(f"({a},{b},k{k},s{s},p{p})" for a, b, k, s, p in COPA_CONVS[name])
    depth = len(COPA_CONVS[name]) + 1

    @register_model(name, description=f"layer-wise paper's {depth}-layer test CNN: bias-free convs {convs}, tanh, "
                    f"linear head with bias; per-layer rank deficiencies {_DEFICIENCIES[name]}",
                    source="Chen, Campbell 2021 (layer-wise leakage / COPA)")
    def factory(input_shape, num_classes, *, activation: str = "tanh"):
        return copa_cnn(name, input_shape, num_classes, activation)

    factory.__name__ = name.replace("-", "_")


for _name in COPA_CONVS:
    _register(_name)
