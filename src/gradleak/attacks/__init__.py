"""Attacks: ``create(name, **options)`` builds one; ``attacks.names()`` lists them."""

from .base import Attack, Reconstruction, RunContext, attacks, create, register
from . import labels  # noqa: F401  label recovery (used by every attack)
from . import optimization  # noqa: F401  registers dlg, idlg, inverting-gradients
from . import analytic  # noqa: F401  registers fc-analytic
from . import rgap  # noqa: F401  registers rgap
from . import layerwise  # noqa: F401  registers layerwise (Chen & Campbell 2021, with the COPA correction)
from . import tensor  # noqa: F401  registers tensor (moment-tensor attack, Wang, Lee & Lei 2023)
from . import malicious  # noqa: F401  registers imprint, trap-weights (a malicious server crafts the model)

__all__ = ["Attack", "Reconstruction", "RunContext", "attacks", "create", "register"]
