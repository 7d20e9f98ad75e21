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
    single_output: bool | None = False  # one output score (logistic loss), as R-GAP's networks; None: a custom
    # model, whose outputs are known once it is built (gradleak.case._num_outputs of the built model)


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


def info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a zoo name, or of a model spec ``FILE.py:NAME`` / ``module.path:NAME`` (its
    name is the spec, its options the parameters NAME takes, ``single_output`` None: known once built)."""
    from . import custom

    if not custom.is_spec(name):
        return models.get(name)
    res = custom.resolve(name)

    def factory(input_shape, num_classes, **options):
        return custom.build(name, input_shape=input_shape, num_classes=num_classes, seed=None, **options)

    opts = {k: (None if v is inspect.Parameter.empty else v) for k, v in res.options.items()}
    return ModelInfo(name, factory, res.description, res.path or res.source, opts, single_output=None)


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
    Models with one output score (``cnn6``, ``fcn3``, ...) ignore ``num_classes`` and output one logit.
    ``name`` may also be a model spec ``FILE.py:NAME`` or ``module.path:NAME`` (see :mod:`gradleak.models.custom`):
    NAME (an nn.Module class or a factory) gets ``options`` and, where it takes them, ``input_shape`` and
    ``num_classes``; it is seeded the same way."""
    from . import custom

    if custom.is_spec(name):
        if not input_shape or any(int(s) <= 0 for s in input_shape) or num_classes < 1:
            raise ValidationError(f"model {name!r}", [f"input_shape must be positive sizes and num_classes >= 1, got "
                                                      f"{input_shape} and {num_classes}"])
        return custom.build(name, input_shape=tuple(input_shape), num_classes=num_classes, seed=seed, dtype=dtype,
                            **options)
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
