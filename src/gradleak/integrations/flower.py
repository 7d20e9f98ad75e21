"""Audit a real Flower (``flwr``) federated run: what could the server reconstruct from each client's update?

:class:`LeakageAudit` wraps any Flower ``Strategy``. It remembers the global parameters it sends in
``configure_fit``, and in ``aggregate_fit`` turns every client's returned parameters into a gradleak
:class:`~gradleak.Case` (FedAvg protocol: ``theta_K - theta_0``, local steps / lr / batch size from the client's
fit metrics or the defaults given here), runs an attack on it, records an :class:`AuditRecord` and optionally
writes a report per client; then it hands the results to the wrapped strategy unchanged.

:func:`case_from_flower` is the converter on its own. Flower sends parameters as a list of numpy arrays in
``model.state_dict()`` order (the Flower convention); buffers such as BatchNorm running statistics are in that
list too and are taken as the model's state for the round.

Install with ``pip install -c constraints.txt ".[fl]"``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..attacks import Attack, Reconstruction, create
from ..case import Case, DataSpec
from ..errors import GradleakError, ValidationError


def _require_flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise GradleakError("the Flower integration needs flwr: pip install -c constraints.txt '.[fl]'") from None


def model_with_arrays(model: nn.Module, arrays: list[np.ndarray]) -> nn.Module:
    """A copy of ``model`` whose state_dict entries are ``arrays`` (Flower order: ``state_dict()`` order)."""
    sd = model.state_dict()
    if len(arrays) != len(sd):
        raise ValidationError("Flower parameters", [f"got {len(arrays)} arrays, the model's state_dict has {len(sd)} "
                                                    "entries (expected one array per state_dict entry, in order)"])
    problems = []
    new = {}
    for (k, v), a in zip(sd.items(), arrays):
        if tuple(a.shape) != tuple(v.shape):
            problems.append(f"array for {k!r} has shape {tuple(a.shape)}, expected {tuple(v.shape)}")
            continue
        new[k] = torch.as_tensor(np.asarray(a)).to(dtype=v.dtype)
    if problems:
        raise ValidationError("Flower parameters", problems)
    m = copy.deepcopy(model)
    m.load_state_dict(new)
    return m


def case_from_flower(
    model: nn.Module,
    global_arrays: list[np.ndarray],
    client_arrays: list[np.ndarray],
    *,
    spec: DataSpec,
    num_examples: int,
    local_steps: int,
    local_lr: float,
    local_batch_size: int | None = None,
    labels: torch.Tensor | None = None,
    bn_mode: str = "eval",
    dtype: torch.dtype | None = None,
) -> Case:
    """The Case the server holds after one client's fit: the model at the global parameters and the update
    ``client - global`` over the model's parameters (FedAvg protocol)."""
    at_round = model_with_arrays(model, global_arrays)
    after = model_with_arrays(model, client_arrays)
    p0 = dict(at_round.named_parameters())
    p1 = dict(after.named_parameters())
    delta = {k: (p1[k] - p0[k]).detach() for k in p0}
    case = Case.from_observed(at_round, delta, spec=spec, batch_size=int(num_examples), protocol="fedavg",
                              local_steps=int(local_steps), local_lr=float(local_lr),
                              local_batch_size=int(local_batch_size or num_examples), labels=labels, bn_mode=bn_mode)
    case.meta["source"] = "flower"
    return case.to(dtype=dtype) if dtype is not None else case


@dataclass
class AuditRecord:
    """One client's update in one round and what the attack made of it."""

    server_round: int
    client: str
    num_examples: int
    residual: float
    reconstruction: Reconstruction
    report_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class LeakageAudit:
    """A Flower strategy wrapper that attacks every client update it aggregates (see the module docstring).

    strategy: the Flower strategy that really runs the federation (FedAvg, FedProx, ...).
    model: the architecture (any parameters; the round's global parameters are loaded into a copy).
    spec: the clients' data spec. attack: a name or an Attack (default ``inverting-gradients``).
    local_steps / local_lr / local_batch_size: what the clients do, unless a client reports them in its fit
        metrics under the same names. labels_fn(client_id, fit_res) -> labels or None (labels known to the server).
    rounds: which rounds to audit (default every round); max_clients: at most this many clients per round.
    out_dir: if given, a report per client is written to out_dir/round-R/CLIENT.
    """

    def __init__(self, strategy, model: nn.Module, spec: DataSpec, *, attack: str | Attack = "inverting-gradients",
                 local_steps: int = 1, local_lr: float = 0.01, local_batch_size: int | None = None,
                 labels_fn: Callable[[str, Any], torch.Tensor | None] | None = None, rounds: set[int] | None = None,
                 max_clients: int | None = None, out_dir: str | Path | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _require_flwr()
        self.strategy = strategy
        self.model = copy.deepcopy(model)
        self.spec = spec
        self.attack = create(attack) if isinstance(attack, str) else attack
        self.local_steps, self.local_lr, self.local_batch_size = local_steps, local_lr, local_batch_size
        self.labels_fn = labels_fn
        self.rounds = rounds
        self.max_clients = max_clients
        self.out_dir = Path(out_dir) if out_dir else None
        self.seed = seed
        self.dtype = dtype
        self.records: list[AuditRecord] = []
        self._global: dict[int, list[np.ndarray]] = {}

    # Everything the wrapper does not intercept goes to the wrapped strategy.
    def __getattr__(self, name):
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"LeakageAudit({self.strategy!r}, attack={self.attack.name})"

    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import parameters_to_ndarrays

        self._global[server_round] = [a.copy() for a in parameters_to_ndarrays(parameters)]
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        if (self.rounds is None or server_round in self.rounds) and server_round in self._global:
            self.audit_round(server_round, results)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)

    def audit_round(self, server_round: int, results) -> list[AuditRecord]:
        """Attack every (client, FitRes) of a round; returns (and keeps) the records."""
        from flwr.common import parameters_to_ndarrays

        from ..report import write_report

        new = []
        for i, (client, fit_res) in enumerate(results):
            if self.max_clients is not None and i >= self.max_clients:
                break
            cid = str(getattr(client, "cid", i))
            m = dict(fit_res.metrics or {})
            labels = self.labels_fn(cid, fit_res) if self.labels_fn else None
            case = case_from_flower(self.model, self._global[server_round], parameters_to_ndarrays(fit_res.parameters),
                                    spec=self.spec, num_examples=fit_res.num_examples,
                                    local_steps=int(m.get("local_steps", self.local_steps)),
                                    local_lr=float(m.get("local_lr", self.local_lr)),
                                    local_batch_size=int(m.get("local_batch_size", self.local_batch_size or fit_res.num_examples)),
                                    labels=labels, dtype=self.dtype)
            rec = self.attack.reconstruct(case, seed=self.seed)
            out = None
            if self.out_dir is not None:
                out = write_report(self.out_dir / f"round-{server_round}" / cid, rec, case=case,
                                   config={"server_round": server_round, "client": cid, "attack": self.attack.name})
            new.append(AuditRecord(server_round, cid, fit_res.num_examples, rec.residual, rec, out, m))
        self.records.extend(new)
        return new
