"""The model registry: kebab-case names -> factories with documented options."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ValidationError
from ..registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """name, factory(input_shape, num_classes, **options) -> nn.Module, its options with defaults,
    a one-line description and where it comes from."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    single_output: bool = False  # one output score (logistic loss), as R-GAP's networks


models: Registry[ModelInfo] = Registry("model")


def register_model(name: str, *, description: str, source: str = "", aliases: tuple[str, ...] = (),
                   single_output: bool = False):
    """Decorator for a factory ``f(input_shape, num_classes, *, option=default, ...) -> nn.Module``."""

    def deco(fn):
        sig = inspect.signature(fn)
        opts = {k: p.default for k, p in sig.parameters.items()
                if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
        models.register(name, aliases=aliases)(ModelInfo(name, fn, description, source, opts, single_output))
        return fn

    return deco


def build(
    name: str,
    *,
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> nn.Module:
    """Build a zoo model for inputs of ``input_shape`` (C, H, W) (or (D,)) and ``num_classes`` classes,
    initialised from ``seed`` (None: torch's global RNG). Unknown options are an error.
    Models with one output score (``cnn6``, ``fcn3``, ...) ignore ``num_classes`` and output one logit."""
    info = models.get(name)
    bad = [k for k in options if k not in info.options]
    if bad:
        valid = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "none"
        raise ValidationError(f"model {info.name}", [f"unknown option(s) {bad}; valid options: {valid}"])
    problems = []
    if not input_shape or any(int(s) <= 0 for s in input_shape):
        problems.append(f"input_shape must be positive sizes like (3, 32, 32), got {input_shape}")
    if num_classes < 1:
        problems.append(f"num_classes must be >= 1, got {num_classes}")
    if problems:
        raise ValidationError(f"model {info.name}", problems)
    input_shape = tuple(int(s) for s in input_shape)
    if seed is None:
        model = info.factory(input_shape, num_classes, **options)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = info.factory(input_shape, num_classes, **options)
    model.zoo_name = info.name
    model.input_shape = input_shape
    return model.to(dtype)
