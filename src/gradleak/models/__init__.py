"""The model zoo: ``build(name, input_shape=..., num_classes=..., **options)``; ``models.names()`` lists them."""

from .registry import ModelInfo, build, models, register_model
from . import zoo  # noqa: F401  (registers the networks)

__all__ = ["ModelInfo", "build", "models", "register_model"]
