"""The per-layer rule: the :class:`Layer` base class every weight-layer type subclasses, and the registry
(module type -> rule) the walker reads. A new layer type is ONE registration here, ``@register_layer(MyModule)
class MyLayer(Layer)``: the class declares everything the walker, the systems, the rank / security analyses and
the attacks need (its operators and sizes, and ``dense``: whether the gradient block alone determines its input).
No other module branches on layer types."""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..activations import Activation, activations, register_module
from ..activations import resolve as resolve_activation

Shape = tuple[int, ...]


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# =====================================================================================================
# Activation modules -> registry activations (the resolver lives in gradleak.activations)
# =====================================================================================================

def register_activation_module(module_type: type):
    """Decorator: ``@register_activation_module(nn.ELU) def f(module) -> Activation`` tells the layer walker
    what an activation module computes (see :func:`gradleak.activations.register_module`)."""
    return register_module(module_type)


def activation_of(module: nn.Module) -> Activation | None:
    """The :class:`Activation` an activation module computes, or None if ``module`` is not one we know."""
    return resolve_activation(module)


# =====================================================================================================
# Layer rules
# =====================================================================================================

_LAYER_RULES: dict[type, type["Layer"]] = {}


def register_layer(*module_types: type):
    """Class decorator: ``@register_layer(nn.Conv2d) class Conv2dLayer(Layer)`` makes the walker turn modules of
    these types into that :class:`Layer` subclass (most specific type wins)."""

    def deco(cls: type["Layer"]) -> type["Layer"]:
        for t in module_types:
            _LAYER_RULES[t] = cls
        return cls

    return deco


def unregister_layer(module_type: type) -> None:
    """Remove the rule registered for ``module_type`` (tests, plug-ins that unload)."""
    _LAYER_RULES.pop(module_type, None)


def layer_rules() -> dict[type, type["Layer"]]:
    """A copy of the module type -> Layer class registry."""
    return dict(_LAYER_RULES)


def _rule_for(module: nn.Module) -> type["Layer"] | None:
    for t in type(module).__mro__:
        if t in _LAYER_RULES:
            return _LAYER_RULES[t]
    return None


class Layer:
    """One weight layer of a chain, followed by its activation.

    index: position in the chain (0 = input side); name: module path ("features.0"), also the prefix of its
    parameter names; label: "conv1", "fc3" ...; module: the torch module; in_shape / out_shape: per-sample
    shapes (C, H, W) or (D,); prev_shape: shape of the previous layer's output (or the model input) before
    any flatten, so ``x.reshape(prev_shape)`` turns this layer's input into the previous layer's output;
    activation: the :class:`Activation` after it (identity if none); activation_name: its module path or None.

    Operators act on float tensors with a leading batch dimension where stated; a subclass implements
    ``output_shape``, the four operators and the two sparse matrices (and may override the Gram blocks).
    """

    kind: ClassVar[str] = "layer"
    #: True when every weight row multiplies the WHOLE input (dL/dW = k x^T, so K(k)^T K(k) = ||k||^2 I): the
    #: gradient block alone determines the input whenever k != 0 (x = dW^T k / ||k||^2, see
    #: :func:`gradleak.layers.linalg.head_solve`); such a layer can be the head of a chain, its hidden rank is
    #: full without any computation, and a batch-averaged gradient gives a mixture in the span of the inputs.
    dense: ClassVar[bool] = False

    def __init__(self, index: int, name: str, module: nn.Module, in_shape: Shape, prev_shape: Shape):
        self.index = index
        self.name = name
        self.module = module
        self.in_shape = tuple(int(s) for s in in_shape)
        self.prev_shape = tuple(int(s) for s in prev_shape)
        self.out_shape = self.output_shape(self.in_shape)
        self.activation: Activation = activations.get("identity")
        self.activation_name: str | None = None
        self.label = name

    # ---- description ---------------------------------------------------------------------------
    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def bias_name(self) -> str | None:
        if getattr(self.module, "bias", None) is None:
            return None
        return f"{self.name}.bias" if self.name else "bias"

    @property
    def weight_shape(self) -> Shape:
        return tuple(self.module.weight.shape)

    @property
    def n_in(self) -> int:
        return _prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return _prod(self.out_shape)

    @property
    def n_weights(self) -> int:
        return _prod(self.weight_shape)

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    def describe(self) -> dict:
        """A JSON-able description (no tensors)."""
        return {"index": self.index, "name": self.name, "label": self.label, "kind": self.kind,
                "in_shape": list(self.in_shape), "out_shape": list(self.out_shape),
                "weights": self.n_weights, "bias": self.has_bias, "activation": self.activation.name}

    def problems(self) -> list[str]:
        """Settings of this layer the systems cannot represent, as sentences without the layer name ([] if none)."""
        return []

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.label} '{self.name}', {self.in_shape} -> {self.out_shape}, "
                f"activation={self.activation.name})")

    # ---- to implement ---------------------------------------------------------------------------
    def output_shape(self, in_shape: Shape) -> Shape:
        raise NotImplementedError

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x without bias: x (N, *in_shape) -> (N, *out_shape)."""
        raise NotImplementedError

    def apply_weight_T(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W^T y: y (N, *out_shape) -> (N, *in_shape)."""
        raise NotImplementedError

    def apply_grad(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """K(k) x = dL/dW for one sample: k (*out_shape), x (*in_shape) -> (*weight_shape)."""
        raise NotImplementedError

    def apply_grad_T(self, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """K(k)^T g: g (*weight_shape) -> (*in_shape)."""
        raise NotImplementedError

    def weight_matrix(self, weight: torch.Tensor) -> sp.csr_array:
        """W as a sparse (n_out, n_in) matrix, float64."""
        raise NotImplementedError

    def grad_matrix(self, k: torch.Tensor) -> sp.csr_array:
        """K(k) as a sparse (n_weights, n_in) matrix, float64."""
        raise NotImplementedError

    def bias_shape(self) -> Shape:
        """How the bias broadcasts against one output sample."""
        return self.out_shape

    # ---- derived (override for speed) -------------------------------------------------------------
    def add_bias(self, z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return z if bias is None else z + bias.reshape(self.bias_shape())

    def bias_grad(self, k: torch.Tensor) -> torch.Tensor:
        """dL/db for one sample from k (*out_shape)."""
        return k.reshape(self.out_shape)

    def gram_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W^T W, dense (n_in, n_in) float64."""
        Wm = self.weight_matrix(weight)
        return torch.from_numpy((Wm.T @ Wm).toarray())

    def gram_grad(self, k: torch.Tensor) -> torch.Tensor:
        """K(k)^T K(k), dense (n_in, n_in) float64."""
        Km = self.grad_matrix(k)
        return torch.from_numpy((Km.T @ Km).toarray())

    def add_gram_weight(self, G: torch.Tensor, weight: torch.Tensor, alpha: float) -> None:
        """G += alpha * W^T W in place (override to avoid temporaries)."""
        G.add_(self.gram_weight(weight), alpha=alpha)

    def add_gram_grad(self, G: torch.Tensor, k: torch.Tensor, alpha: float) -> None:
        """G += alpha * K(k)^T K(k) in place (override to avoid temporaries)."""
        G.add_(self.gram_grad(k), alpha=alpha)

    def weight_norm2(self, weight: torch.Tensor) -> float:
        """||W||_F^2 of the operator (not of the kernel: each kernel entry is used at many positions)."""
        return float(self.gram_weight(weight).diagonal().sum())

    def grad_norm2(self, k: torch.Tensor) -> float:
        """||K(k)||_F^2."""
        return float(self.gram_grad(k).diagonal().sum())

    @property
    def can_be_head(self) -> bool:
        """The closed-form attacks start at a dense last layer (its input from dW and k alone)."""
        return self.dense

    def gradient_solve(self, k: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The input x (in_shape) from the gradient block alone, x = (K^T K)^-1 K^T vec(dW), for a dense layer
        (K^T K = ||k||^2 I): the one head solver (:func:`gradleak.layers.linalg.head_solve`)."""
        from .linalg import head_solve

        if not self.dense:
            raise TypeError(f"{type(self).__name__} is not dense: its gradient block alone does not give the input")
        return head_solve(grad.reshape(self.n_out, self.n_in), k.reshape(-1)).reshape(self.in_shape)

    def reference_weight_matrix(self, weight: torch.Tensor) -> np.ndarray:
        """Dense W built straight from the definition with plain loops (tiny layers only; tests)."""
        raise NotImplementedError

    def reference_grad_matrix(self, k: torch.Tensor) -> np.ndarray:
        """Dense K(k) built straight from the definition with plain loops (tiny layers only; tests)."""
        raise NotImplementedError

    def dependencies(self) -> int:
        """Exact linear dependencies between the K and W blocks known from the structure (0 if none known)."""
        return 0

