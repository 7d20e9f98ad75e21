"""Activation functions as objects carrying what every method asks of them, and the one resolver from a torch
module or function to its :class:`Activation`.

What the methods read:
- the closed-form attacks (R-GAP, layer-wise): ``grad`` (sigma'), ``inverse`` and ``output_range`` (the inverse is
  taken after clamping into the open range);
- the optimisation attacks: ``smooth`` (L-BFGS needs a twice-differentiable model to beat signed Adam);
- the tensor attack and the identifiability analysis: ``odd`` (signs are identifiable only for a non-odd
  sigma) and the Hermite coefficients (computed from ``fn`` by quadrature in
  :func:`gradleak.attacks.tensor.hermite_coefficients`).

Adding an activation is ONE call: ``gradleak.activations.add(Activation(...), modules=(MyModule,),
functions=(my_fn,))``; the layer walker, R-GAP, the risk analyses and the tensor attack then recognise it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """fn: sigma(z). grad: sigma'(z). inverse: z from y = sigma(z), or None if not invertible.

    positively_homogeneous: sigma(c z) = c sigma(z) for c > 0 (ReLU family).
    smooth: twice continuously differentiable everywhere (false for ReLU / leaky ReLU).
    odd: sigma(-z) = -sigma(z) (identity, tanh): the sign of an input is then not identifiable from moments.
    output_range: (inf, sup) of sigma over the reals (the inverse is taken after clamping into it).
    """

    name: str
    fn: TensorFn
    grad: TensorFn
    inverse: Optional[TensorFn] = None
    positively_homogeneous: bool = False
    smooth: bool = True
    odd: bool = False
    output_range: tuple[float, float] = (-math.inf, math.inf)

    @property
    def invertible(self) -> bool:
        return self.inverse is not None

    @property
    def linear(self) -> bool:
        """sigma(z) = z (no non-linearity at all)."""
        return self.name == "identity"

    def clamp_to_range(self, y: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
        """``y`` clamped into the open output range, ``margin`` (relative to the range's width, or absolute
        for a half-open range) inside each finite end: the inverse of a bounded sigma is then finite."""
        lo, hi = self.output_range
        if not (math.isfinite(lo) or math.isfinite(hi)):
            return y
        span = (hi - lo) if math.isfinite(hi) and math.isfinite(lo) else 1.0
        return y.clamp(lo + margin * span if math.isfinite(lo) else None,
                       hi - margin * span if math.isfinite(hi) else None)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


activations: Registry[Activation] = Registry("activation")

#: module type -> rule(module) -> Activation | None (None: this instance is not one we know, e.g. other settings)
_MODULE_RULES: dict[type, Callable[[nn.Module], Optional[Activation]]] = {}
#: torch function -> rule(args, kwargs) -> Activation | None (for models traced by torch.fx)
_FUNCTION_RULES: dict[Any, Callable[[tuple, dict], Optional[Activation]]] = {}
#: tensor method name ('sigmoid' in x.sigmoid()) -> Activation
_METHODS: dict[str, Activation] = {}


def register_module(module_type: type, rule: Callable[[nn.Module], Optional[Activation]] | None = None):
    """Tell the resolver what a module type computes. ``rule(module)`` returns the :class:`Activation` (or None
    for settings it does not cover); usable as a decorator of the rule."""

    def deco(fn: Callable[[nn.Module], Optional[Activation]]):
        _MODULE_RULES[module_type] = fn
        return fn

    return deco(rule) if rule is not None else deco


def unregister_module(module_type: type) -> None:
    """Forget what :func:`register_module` said of ``module_type`` (no error if nothing was said)."""
    _MODULE_RULES.pop(module_type, None)


def register_function(function: Any, rule: Callable[[tuple, dict], Optional[Activation]]) -> None:
    """Tell the resolver what a torch function computes (``rule(args, kwargs)``, the call's other arguments)."""
    _FUNCTION_RULES[function] = rule


def add(act: Activation, aliases: tuple[str, ...] = (), overwrite: bool = False, *, modules: tuple[type, ...] = (),
        functions: tuple[Any, ...] = (), methods: tuple[str, ...] = ()) -> Activation:
    """Register an :class:`Activation` (usable in every model option ``activation=`` and by every analysis),
    with the module types, torch functions and tensor-method names that compute it."""
    activations.register(act.name, aliases=aliases, overwrite=overwrite)(act)
    for m in modules:
        register_module(m, lambda _module, a=act: a)
    for f in functions:
        register_function(f, lambda _args, _kwargs, a=act: a)
    for name in methods:
        _METHODS[name] = act
    return act


def resolve(target: Any, args: tuple = (), kwargs: dict | None = None) -> Activation | None:
    """The :class:`Activation` that ``target`` computes: a module instance (by its type, most derived first),
    a torch function (``args``/``kwargs``: the call's other arguments) or a tensor-method name; None if unknown."""
    if isinstance(target, nn.Module):
        for t in type(target).__mro__:
            if t in _MODULE_RULES:
                return _MODULE_RULES[t](target)
        return None
    if isinstance(target, str):
        return _METHODS.get(target)
    try:
        rule = _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable
        return None
    return None if rule is None else rule(tuple(args), dict(kwargs or {}))


def is_activation_function(target: Any) -> bool:
    """Whether ``target`` (a torch function or tensor-method name) is one the resolver knows."""
    if isinstance(target, str):
        return target in _METHODS
    try:
        return target in _FUNCTION_RULES
    except TypeError:
        return False


# ---- the built-in activations ----------------------------------------------------------------------------

LEAKY_SLOPE = 0.2


def _atanh(y: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(y.dtype).eps
    return torch.atanh(y.clamp(-1 + eps, 1 - eps))


def _logit(y: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(y.dtype).eps
    return torch.logit(y.clamp(eps, 1 - eps))


def _softplus_inv(y: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    y = (y * beta).clamp_min(torch.finfo(y.dtype).tiny)
    return (y + torch.log(-torch.expm1(-y))) / beta


def leaky_relu(slope: float) -> Activation:
    """Leaky ReLU with negative slope ``slope`` (the registered 'leaky-relu' for the default 0.2); invertible
    only for a positive slope."""
    if abs(slope - LEAKY_SLOPE) < 1e-12 and "leaky-relu" in activations:
        return activations.get("leaky-relu")
    inverse = (lambda y: torch.where(y >= 0, y, y / slope)) if slope > 0 else None
    return Activation(f"leaky-relu({slope:g})" if abs(slope - LEAKY_SLOPE) >= 1e-12 else "leaky-relu",
                      lambda z: F.leaky_relu(z, slope),
                      lambda z: torch.where(z >= 0, torch.ones_like(z), torch.full_like(z, slope)),
                      inverse, positively_homogeneous=True, smooth=False,
                      output_range=(-math.inf if slope > 0 else 0.0, math.inf))


def softplus(beta: float = 1.0) -> Activation:
    """softplus(z) = log(1 + exp(beta z)) / beta (the registered 'softplus' for beta = 1)."""
    if beta == 1.0 and "softplus" in activations:
        return activations.get("softplus")
    return Activation("softplus" if beta == 1.0 else f"softplus(beta={beta:g})", lambda z: F.softplus(z, beta),
                      lambda z: torch.sigmoid(beta * z), lambda y: _softplus_inv(y, beta),
                      output_range=(0.0, math.inf))


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


#: inf of GELU and SiLU over the reals (at z = -0.7518 and z = -1.2785)
_GELU_MIN, _SILU_MIN = -0.16997120747990958, -0.27846454276107374

add(Activation("identity", lambda z: z, torch.ones_like, lambda y: y, positively_homogeneous=True, odd=True),
    aliases=("linear",))
add(Activation("relu", F.relu, lambda z: (z > 0).to(z.dtype), None, positively_homogeneous=True, smooth=False,
               output_range=(0.0, math.inf)),
    modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu",))
add(leaky_relu(LEAKY_SLOPE), aliases=("lrelu",))
add(Activation("sigmoid", torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), _logit,
               output_range=(0.0, 1.0)),
    modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",))
add(Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, _atanh, odd=True, output_range=(-1.0, 1.0)),
    modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",))
add(softplus(1.0), functions=(F.softplus,))
add(Activation("gelu", F.gelu, _gelu_grad, output_range=(_GELU_MIN, math.inf)), functions=(F.gelu,))
add(Activation("silu", F.silu, _silu_grad, output_range=(_SILU_MIN, math.inf)), aliases=("swish",),
    modules=(nn.SiLU,), functions=(F.silu,))


@register_module(nn.LeakyReLU)
def _leaky_module(m: nn.LeakyReLU) -> Activation:
    return leaky_relu(float(m.negative_slope))


register_function(F.leaky_relu, lambda args, kwargs: leaky_relu(
    float(kwargs.get("negative_slope", args[0] if args else 0.01))))


@register_module(nn.Softplus)
def _softplus_module(m: nn.Softplus) -> Activation:
    return softplus(float(m.beta))


@register_module(nn.GELU)
def _gelu_module(m: nn.GELU) -> Activation | None:  # the tanh approximation is another function
    return activations.get("gelu") if getattr(m, "approximate", "none") == "none" else None


class Act(nn.Module):
    """An activation layer that carries its :class:`Activation` (``self.activation``), so analyses can read it."""

    def __init__(self, name: str | Activation):
        super().__init__()
        self.activation = name if isinstance(name, Activation) else activations.get(name)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation.fn(z)

    def extra_repr(self) -> str:
        return self.activation.name


register_module(Act, lambda m: m.activation)
