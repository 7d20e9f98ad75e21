"""The model zoo: ``build(name, input_shape=..., num_classes=..., **options)``; ``models.names()`` lists them."""

from .registry import ModelInfo, build, models, register_model
from . import zoo  # noqa: F401  (registers the networks)
from . import rgap_nets  # noqa: F401  (R-GAP paper networks: lenet-rgap)
from . import two_layer  # noqa: F401  (the random two-layer network of the tensor attack)
from . import copa_nets  # noqa: F401  (layer-wise paper's test CNNs: cnn2-c1 ... cnn4-c2)
from .weights import check_weights, load_weights, read_state_dict, save_weights

__all__ = ["ModelInfo", "build", "models", "register_model", "load_weights", "save_weights", "check_weights",
           "read_state_dict"]
