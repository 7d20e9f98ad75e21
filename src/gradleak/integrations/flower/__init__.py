"""Audit a real Flower (``flwr``) federated run: what could the server reconstruct from each client's update,
round by round?

Server side, wrap the strategy you already use and run the federation as before:

- Message API (``flwr.serverapp``, Flower's current API): :class:`LeakageAudit`;
- legacy Strategy API (``flwr.server.strategy``, ``start_simulation``): :class:`LegacyLeakageAudit`;
- :func:`wrap` picks the right one and refuses anything else at once.

Client side, report what the replay needs (:mod:`.contract`: :func:`add_replay`, :func:`replay_metrics`,
:func:`replay_batches`) and, in a simulation only, share the batch with :class:`SimulationTruth` so PSNR/SSIM
are measured. Per round the audit prints one line; with ``out_dir`` it keeps ``leakage.json``, ``leakage.png``,
``index.html`` and one report per client under ``round-RRR/CLIENT``. See ``docs/flower.md`` and
``examples/flower_audit.py``. Install with ``pip install -c constraints.txt ".[fl]"``.
"""

from __future__ import annotations

from typing import Any

from ...errors import GradleakError
from .auditor import AuditRecord, Auditor, case_from_flower, model_with_arrays
from .contract import (LEGACY_PREFIX, REPLAY_KEY, Replay, add_replay, client_name, replay_batches, replay_facts,
                       replay_metrics, resolve_replay)
from .truth import SimulationTruth

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without the extra
    flwr = None

if flwr is not None:
    from .legacy import LegacyLeakageAudit
    from .message import LeakageAudit


def wrap(strategy, model, spec, **options: Any):
    """The audit wrapper for ``strategy``: :class:`LeakageAudit` for a Message-API strategy,
    :class:`LegacyLeakageAudit` for a legacy one; anything else is an error (raised here, before any round)."""
    if flwr is None:  # pragma: no cover
        raise GradleakError("the Flower integration needs flwr: pip install -c constraints.txt '.[fl]'")
    from flwr.server.strategy import Strategy as Legacy

    if isinstance(strategy, Legacy):
        return LegacyLeakageAudit(strategy, model, spec, **options)
    return LeakageAudit(strategy, model, spec, **options)


def __getattr__(name: str):  # only reached without flwr: say what to install
    if name in ("LeakageAudit", "LegacyLeakageAudit"):
        raise GradleakError("the Flower integration needs flwr: pip install -c constraints.txt '.[fl]'")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AuditRecord", "Auditor", "LEGACY_PREFIX", "LeakageAudit", "LegacyLeakageAudit", "REPLAY_KEY", "Replay",
           "SimulationTruth", "add_replay", "case_from_flower", "client_name", "model_with_arrays", "replay_batches",
           "replay_facts", "replay_metrics", "resolve_replay", "wrap"]
