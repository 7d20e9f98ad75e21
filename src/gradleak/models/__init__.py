"""The model zoo: ``build(name, input_shape=..., num_classes=..., **options)``; ``models.names()`` lists them.
``name`` may also be a model spec ``FILE.py:NAME`` or ``module.path:NAME`` (your own model, see ``custom``);
``info(name)`` gives the :class:`ModelInfo` of either."""

from .registry import ModelInfo, build, info, models, register_model
from . import custom
from . import zoo  # noqa: F401  (registers the networks)
from . import rgap_nets  # noqa: F401  (R-GAP paper networks: lenet-rgap)
from . import two_layer  # noqa: F401  (the random two-layer network of the tensor attack)
from . import copa_nets  # noqa: F401  (layer-wise paper's test CNNs: cnn2-c1 ... cnn4-c2)
from .weights import check_weights, load_weights, read_state_dict, save_weights

custom.install_finder()  # custom models' classes import again in a spawned worker (see custom)

__all__ = ["ModelInfo", "build", "info", "custom", "models", "register_model", "load_weights", "save_weights", "check_weights",
           "read_state_dict"]
