"""The random two-layer network of the moment-tensor attack (Wang, Lee & Lei, AISTATS 2023).

f_k(x) = sum_{j=1..m} a_kj sigma(w_j^T x) on the flattened (normalised) input x in R^d, with rows
w_j ~ N(0, weight_std^2 I_d) i.i.d. and output weights a_kj = +-1/sqrt(m) (independent random signs). The
attack needs exactly this: Gaussian first-layer weights (Stein's identity) and known output weights.

Modules: ``flatten`` (nn.Flatten), ``hidden`` (nn.Linear(d, m), no bias unless ``bias=True``), ``act``
(:class:`gradleak.activations.Act`), ``out`` (nn.Linear(m, K, bias=False)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..activations import Act, activations
from ..errors import ValidationError
from .registry import register_model


class TwoLayer(nn.Module):
    """f(x) = out(act(hidden(flatten(x)))): the random two-layer network.

    ``W = hidden.weight`` (m, d), ``a = out.weight`` (K, m); ``num_outputs`` K; ``activation`` the registry
    :class:`~gradleak.activations.Activation`; ``mirrored`` whether neurons come in pairs (w_j, a_j),
    (w_j, -a_j) so that f = 0 at initialisation; ``weight_std`` the standard deviation of W's entries."""

    def __init__(self, d: int, width: int, num_outputs: int, activation: str, *, bias: bool = False,
                 mirrored: bool = False, weight_std: float = 1.0):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(d, width, bias=bias)
        self.act = Act(activation)
        self.out = nn.Linear(width, num_outputs, bias=False)
        self.num_outputs = num_outputs
        self.mirrored = mirrored
        self.weight_std = float(weight_std)

    @property
    def activation(self):
        return self.act.activation

    @property
    def W(self) -> torch.Tensor:
        return self.hidden.weight

    @property
    def a(self) -> torch.Tensor:
        return self.out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(self.flatten(x))))


@register_model("two-layer", description="random two-layer network f(x) = sum_j a_j sigma(w_j^T x) on the flattened "
                "input, W ~ N(0, I), a_j = +-1/sqrt(m): the setting of the tensor attack",
                source="Wang, Lee, Lei 2023 (moment-tensor attack)")
def two_layer(input_shape, num_classes, *, width: int = 10_000, activation: str = "relu", num_outputs: int = 0,
              mirrored: bool = False, bias: bool = False, weight_std: float = 1.0):
    """width m; activation (registry name); num_outputs K (0: ``num_classes``; 1: one score for the
    logistic or squared loss; K >= 2: cross-entropy); mirrored: neurons in pairs (w, a), (w, -a), so the
    network outputs 0 at initialisation and every residual is known from the label alone; bias: a Gaussian
    first-layer bias N(0, weight_std^2) (it makes norms and signs identifiable); weight_std: std of W's entries."""
    problems = []
    if not isinstance(width, int) or width < 1:
        problems.append(f"width must be an int >= 1, got {width!r}")
    elif mirrored and width % 2:
        problems.append(f"mirrored initialisation needs an even width, got {width}")
    if activation not in activations:
        problems.append(f"unknown activation {activation!r}: expected one of {activations.names()}")
    if not isinstance(num_outputs, int) or num_outputs < 0:
        problems.append(f"num_outputs must be an int >= 0 (0: one per class), got {num_outputs!r}")
    if not (isinstance(weight_std, (int, float)) and weight_std > 0):
        problems.append(f"weight_std must be positive, got {weight_std!r}")
    if problems:
        raise ValidationError("model two-layer", problems)
    d = math.prod(input_shape)
    k = num_outputs or num_classes
    model = TwoLayer(d, width, k, activation, bias=bias, mirrored=mirrored, weight_std=weight_std)
    with torch.no_grad():
        half = width // 2 if mirrored else width
        w = torch.randn(half, d) * weight_std
        signs = torch.randint(0, 2, (k, half)).to(torch.float32) * 2 - 1
        if mirrored:
            w = torch.cat([w, w])
            signs = torch.cat([signs, -signs], dim=1)
        model.hidden.weight.copy_(w)
        if bias:
            b = torch.randn(half) * weight_std
            model.hidden.bias.copy_(torch.cat([b, b]) if mirrored else b)
        model.out.weight.copy_(signs / math.sqrt(width))
    return model
