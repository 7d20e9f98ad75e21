"""Hermite coefficients of an activation: the one place every part of gradleak gets mu_p.

For w ~ N(0, I), Stein's identity gives E[sigma(w^T x) He_p(w)] = mu_p(|x|) x^{(x)p} with

    mu_p(s) = E_{z ~ N(0,1)}[sigma^(p)(s z)] = s^{-p} E[sigma(s z) He_p(z)]        (s > 0),

computed here numerically from sigma alone (no derivatives), so any activation - a registered
:class:`~gradleak.activations.Activation` (cached per Activation), an ``Act`` module, a registry name or a plain
callable - can be analysed. The tensor attack picks its order p from :func:`hermite_order`; the identifiability
analysis (:mod:`gradleak.risk.identifiability`) reports the coefficients.

Quadrature: Gauss-Hermite for smooth activations; kinks at 0 (ReLU family) defeat Gauss-Hermite (error O(1/n)),
so every expectation is also computed with composite Gauss-Legendre panels split at 0 on [-12, 12] (the Gaussian
mass outside is < 1e-32) and the split rule is used whenever the two disagree; the result says which.

Symmetries (:func:`activation_properties`): for an :class:`Activation` the declared ``odd``,
``positively_homogeneous`` and ``linear`` fields are used; for a plain callable they are checked numerically.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Union

import numpy as np
import torch

from ...activations import Activation
from ...errors import ValidationError

__all__ = ["hermite_coefficients", "hermite_order", "activation_properties", "ActivationLike",
           "resolve_activation_like"]

ActivationLike = Union[str, Callable[..., Any], Any]

_L = 12.0


@lru_cache(maxsize=None)
def _split_rule(panels: int = 24, nodes: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes/weights for E over N(0,1), panels on [-L, 0] and [0, L] (split at 0)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(0.0, _L, panels + 1)
    xs, ws = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        xs.append(0.5 * (hi - lo) * x + 0.5 * (hi + lo))
        ws.append(0.5 * (hi - lo) * w)
    xp, wp = np.concatenate(xs), np.concatenate(ws)
    xx = np.concatenate([-xp[::-1], xp])
    ww = np.concatenate([wp[::-1], wp]) * np.exp(-0.5 * xx ** 2) / math.sqrt(2 * math.pi)
    return xx, ww


@lru_cache(maxsize=None)
def _gh_rule(n: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss-Hermite nodes and weights normalised to E over N(0, 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


def resolve_activation_like(activation: ActivationLike) -> tuple[str, Callable[[np.ndarray], np.ndarray], Any]:
    """(name, numpy function, registry Activation or None) for a registry name, an Activation, or a callable
    (numpy or torch)."""
    from ...activations import activations

    act = None
    if isinstance(activation, str):
        act = activations.get(activation)
    elif isinstance(activation, Activation):
        act = activation
    elif hasattr(activation, "activation") and isinstance(getattr(activation, "activation"), Activation):
        act = activation.activation  # an Act module
    if act is not None:
        return act.name, _numpy_fn(act), act
    if callable(activation):
        def f(z: np.ndarray, _fn=activation) -> np.ndarray:
            try:
                out = _fn(torch.as_tensor(z, dtype=torch.float64))
                return np.asarray(out.detach().numpy() if hasattr(out, "detach") else out, dtype=np.float64)
            except Exception:
                return np.asarray(_fn(z), dtype=np.float64)

        return getattr(activation, "__name__", "callable"), f, None
    raise ValidationError("identifiability", [f"activation must be a registry name or a callable, got "
                                              f"{type(activation).__name__}"])


def _expect(f: Callable[[np.ndarray], np.ndarray], p: int, s: float, rule: str) -> float:
    x, w = _split_rule() if rule == "split" else _gh_rule()
    he = np.polynomial.hermite_e.hermeval(x, [0] * p + [1])
    vals = f(s * x)
    return float(np.sum(w * vals * he))


def _numpy_fn(act: Activation) -> Callable[[np.ndarray], np.ndarray]:
    def f(z: np.ndarray, _fn=act.fn) -> np.ndarray:
        return _fn(torch.as_tensor(z, dtype=torch.float64)).numpy()

    return f


def _coefficients(f: Callable[[np.ndarray], np.ndarray], orders: tuple[int, ...], scale: float
                  ) -> tuple[dict[int, float], str]:
    gh = {p: _expect(f, p, scale, "gh") / scale ** p for p in orders}
    sp = {p: _expect(f, p, scale, "split") / scale ** p for p in orders}
    ref = max([abs(v) for v in sp.values()] + [1e-300])
    agree = all(abs(gh[p] - sp[p]) <= 1e-9 * max(1.0, ref) for p in orders)
    out, method = (gh, "gauss-hermite") if agree else (sp, "split-gauss-legendre")
    return {p: (0.0 if abs(v) < 1e-12 * max(1.0, ref) else v) for p, v in out.items()}, method


@lru_cache(maxsize=512)
def _coefficients_of(act: Activation, orders: tuple[int, ...], scale: float) -> tuple[dict[int, float], str]:
    return _coefficients(_numpy_fn(act), orders, scale)


def hermite_coefficients(activation: ActivationLike, orders=range(0, 7), scale: float = 1.0,
                         *, return_method: bool = False):
    """mu_p(s) = E_{z~N(0,1)}[sigma^(p)(s z)] = s^{-p} E[sigma(s z) He_p(z)] for each p in ``orders``.

    activation: an :class:`~gradleak.activations.Activation` (results cached per Activation), an ``Act`` module,
    a registry name ('relu', 'tanh', ...), or any callable on a float64 tensor/array. scale: s > 0 (the norm of
    the input the neuron sees). Returns {p: mu_p}; with ``return_method`` also 'gauss-hermite' or
    'split-gauss-legendre' (used when the two quadratures disagree, i.e. sigma has a kink at 0)."""
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValidationError("hermite_coefficients", [f"scale must be a positive number, got {scale!r}"])
    _, f, act = resolve_activation_like(activation)
    orders = tuple(int(p) for p in orders)
    if any(p < 0 for p in orders):
        raise ValidationError("hermite_coefficients", [f"orders must be >= 0, got {list(orders)}"])
    out, method = _coefficients_of(act, orders, float(scale)) if act is not None else _coefficients(f, orders, scale)
    out = dict(out)
    return (out, method) if return_method else out


def activation_properties(activation: ActivationLike) -> dict[str, bool]:
    """Symmetries of sigma: odd (sigma(-z) = -sigma(z)), odd_part_linear (sigma(z) - sigma(-z) = c z, sigma not
    odd), positively_homogeneous (sigma(c z) = c sigma(z) for c > 0), constant_plus_odd (sigma - sigma(0) odd),
    linear (sigma(z) = z). For an :class:`Activation` odd / positively_homogeneous / linear are its declared
    fields (cached per Activation); otherwise, and for the other two, numerical checks on [-8, 8]."""
    _, f, act = resolve_activation_like(activation)
    if act is not None:
        return dict(_properties_of(act))
    return _properties(f, None)


@lru_cache(maxsize=512)
def _properties_of(act: Activation) -> dict[str, bool]:
    return _properties(_numpy_fn(act), act)


def _properties(f: Callable[[np.ndarray], np.ndarray], act: Activation | None) -> dict[str, bool]:
    z = np.linspace(-8, 8, 321)
    fz, fm = f(z), f(-z)
    scale = max(1.0, float(np.max(np.abs(fz))))
    tol = 1e-9 * scale
    odd = bool(np.max(np.abs(fz + fm)) <= tol)
    f0 = float(f(np.zeros(1))[0])
    const_odd = bool(np.max(np.abs((fz - f0) + (fm - f0))) <= tol)
    op = 0.5 * (fz - fm)
    c = float(np.dot(op, z) / np.dot(z, z))
    odd_lin = bool(np.max(np.abs(op - c * z)) <= tol)
    hom = bool(all(np.max(np.abs(f(k * z) - k * fz)) <= 1e-9 * max(1.0, k * scale) for k in (0.5, 2.0, 3.7)))
    linear = odd and odd_lin and hom
    if act is not None:
        odd, hom, linear = bool(act.odd), bool(act.positively_homogeneous), bool(act.linear)
    return {"odd": odd, "constant_plus_odd": const_odd, "odd_part_linear": odd_lin and not odd,
            "positively_homogeneous": hom, "linear": linear}


def hermite_order(activation: ActivationLike, scale: float | None = None, max_order: int = 4) -> int | None:
    """The tensor order p: the smallest p in 3..max_order with mu_p != 0 (checked at unit scale and at
    ``scale`` if given). None when every mu_p (3 <= p <= max_order) vanishes: the tensor method cannot work."""
    scales = [1.0] + ([float(scale)] if scale else []) + [0.5, 2.0]
    for p in range(3, max_order + 1):
        for s in scales:
            mu = hermite_coefficients(activation, range(0, max_order + 1), s)
            ref = max(abs(mu.get(1, 0.0)), abs(mu.get(2, 0.0)), 1e-12)
            if abs(mu[p]) > 1e-8 * ref:
                return p
    return None
