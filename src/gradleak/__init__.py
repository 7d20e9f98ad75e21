"""gradleak: how much of a client's private data leaks through the gradients and updates it shares."""

from .case import Case, DataSpec, FedAvg, FedSGD, Truth, load_tensor_dict
from .errors import (DataError, GradleakError, NumericalError, RequirementError, UnknownNameError,
                     ValidationError, WeightsError)
from .simulate import simulate
from . import activations, attacks, data, losses, models
from .attacks import Reconstruction, create

__version__ = "0.1.0"

__all__ = [
    "Case", "DataSpec", "FedAvg", "FedSGD", "Truth", "load_tensor_dict", "simulate",
    "DataError", "GradleakError", "NumericalError", "RequirementError", "UnknownNameError", "ValidationError",
    "WeightsError", "Reconstruction", "create", "activations", "attacks", "data", "losses", "models",
]

from . import defenses, metrics, report, risk  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .report import write_report  # noqa: E402
from .experiment import AttackRun, run_attack  # noqa: E402

__all__ += ["defenses", "metrics", "report", "risk", "evaluate", "write_report", "AttackRun", "run_attack"]

from .audit import AuditResult, audit  # noqa: E402

__all__ += ["audit", "AuditResult"]
