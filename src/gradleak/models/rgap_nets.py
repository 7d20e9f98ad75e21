"""Networks of the R-GAP paper that the base zoo does not have (``cnn6``, ``cnn6-d`` and ``fcn3`` live in zoo.py)."""

from __future__ import annotations

from torch import nn

from ..activations import Act
from .registry import register_model
from .zoo import Sequential, _flat_dim, _need_image


@register_model("lenet-rgap", description="R-GAP's LeNet variant: three bias-free 5x5 convs (12 channels, strides "
                "2,2,1, padding 2), sigmoid, FC to ONE score (logistic loss); weights N(0, init_std^2)",
                source="Zhu, Blaschko 2021 (R-GAP)", single_output=True)
def lenet_rgap(input_shape, num_classes, *, activation: str = "sigmoid", width: int = 12, init_std: float = 0.01):
    """The paper writes the initialisation as N(0, 0.01); we read 0.01 as the standard deviation (pass
    ``init_std=0.1`` for the variance reading). 28x28 inputs give the paper's FC 588 -> 1."""
    _need_image("lenet-rgap", input_shape)
    c = input_shape[0]
    layers = [nn.Conv2d(c, width, 5, stride=2, padding=2, bias=False), Act(activation),
              nn.Conv2d(width, width, 5, stride=2, padding=2, bias=False), Act(activation),
              nn.Conv2d(width, width, 5, stride=1, padding=2, bias=False), Act(activation), nn.Flatten()]
    features = nn.Sequential(*layers)
    model = Sequential(*layers, nn.Linear(_flat_dim(features, input_shape), 1, bias=False), num_outputs=1)
    for p in model.parameters():
        nn.init.normal_(p, 0.0, init_std)
    return model
