"""The part of the Flower audit that does not depend on Flower's API generation: turn what the server sent and
what a client returned into a :class:`~gradleak.Case`, attack it, score it against the simulation truth when
there is one, keep an :class:`AuditRecord`, print one line per round and keep ``leakage.json``, the plot and
the page in the output directory up to date."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...attacks import Attack, Reconstruction, create
from ...batchnorm import side_channel
from ...case import Case, DataSpec
from ...errors import GradleakError, RequirementError, ValidationError
from .contract import Replay, resolve_replay
from .truth import SimulationTruth, safe_name

Arrays = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def model_with_arrays(model: nn.Module, arrays: Arrays) -> nn.Module:
    """A copy of ``model`` whose state_dict entries are ``arrays``: a mapping keyed by the state_dict names
    (what ``ArrayRecord(model.state_dict())`` sends) or a sequence in ``state_dict()`` order (the legacy
    Flower convention, and an ArrayRecord whose keys are not the model's names)."""
    sd = model.state_dict()
    if isinstance(arrays, Mapping) and set(arrays) == set(sd):
        values = [arrays[k] for k in sd]
    else:
        values = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    if len(values) != len(sd):
        raise ValidationError("Flower parameters", [f"got {len(values)} arrays, the model's state_dict has {len(sd)} "
                                                    "entries (expected one array per state_dict entry, in order, "
                                                    "or a record keyed by the state_dict names)"])
    problems = []
    new = {}
    for (k, v), a in zip(sd.items(), values):
        a = np.asarray(a)
        if tuple(a.shape) != tuple(v.shape):
            problems.append(f"array for {k!r} has shape {tuple(a.shape)}, expected {tuple(v.shape)}")
            continue
        new[k] = torch.as_tensor(a).to(dtype=v.dtype)
    if problems:
        raise ValidationError("Flower parameters", problems)
    m = copy.deepcopy(model)
    m.load_state_dict(new)
    return m


def case_from_flower(model: nn.Module, global_arrays: Arrays, client_arrays: Arrays, *, spec: DataSpec,
                     replay: Replay, labels: torch.Tensor | None = None, bn_mode: str = "eval",
                     dtype: torch.dtype | None = None) -> Case:
    """The Case the server holds after one client's local training: the model at the arrays it sent and the
    update ``client - global`` over the model's parameters (FedAvg protocol, replayed with ``replay``).
    The model's buffers are the sent ones (the server's copy); the client's returned buffers (its BatchNorm
    running statistics after local training) become ``case.observed_buffers``, and ``case.meta['side_channels']``
    says what they leak (:func:`gradleak.batchnorm.side_channel`)."""
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype=dtype)
    at_round = model_with_arrays(model, global_arrays)
    after = model_with_arrays(model, client_arrays)
    p1 = dict(after.named_parameters())
    delta = {k: (p1[k] - p0).detach() for k, p0 in at_round.named_parameters()}
    returned = {k: v.detach() for k, v in after.named_buffers()}
    case = Case.from_observed(at_round, delta, spec=spec, batch_size=replay.examples, protocol="fedavg",
                              local_steps=replay.local_steps, local_lr=replay.local_lr,
                              local_batch_size=replay.local_batch_size, labels=labels, bn_mode=bn_mode,
                              buffers=returned or None)
    case.meta["source"] = "flower"
    channel = side_channel(case)
    if channel is not None:
        case.meta["side_channels"] = [channel]
    return case


@dataclass
class AuditRecord:
    """One client's update in one round and what the attack made of it.

    client: the readable name (the one the client reported, else ``node-<k>`` in order of first appearance);
    node_id: Flower's node id. psnr / ssim / label_accuracy: None without the simulation truth.
    replay: the settings the replay used and the assumptions behind them. error: why no reconstruction.
    """

    server_round: int
    client: str
    node_id: str
    num_examples: int | None
    replay: Replay | None = None
    residual: float = float("nan")
    psnr: float | None = None
    ssim: float | None = None
    label_accuracy: float | None = None
    kind: str | None = None
    claim: str | None = None
    seconds: float = 0.0
    reconstruction: Reconstruction | None = None
    report_dir: Path | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_truth(self) -> bool:
        return self.psnr is not None

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        d = self.report_dir
        if d is not None and root is not None:
            try:
                d = d.relative_to(root)
            except ValueError:
                pass
        return {"round": self.server_round, "client": self.client, "node_id": self.node_id,
                "num_examples": self.num_examples, "residual": _num(self.residual), "psnr": _num(self.psnr),
                "ssim": _num(self.ssim), "label_accuracy": _num(self.label_accuracy), "truth": self.has_truth,
                "kind": self.kind, "claim": self.claim, "seconds": round(self.seconds, 4),
                "replay": None if self.replay is None else self.replay.to_dict(),
                "assumptions": [] if self.replay is None else list(self.replay.assumptions),
                "dir": None if d is None else str(d), "error": self.error, "notes": list(self.notes)}


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class Auditor:
    """Settings and state shared by :class:`~gradleak.integrations.flower.LeakageAudit` (Message API) and
    :class:`~gradleak.integrations.flower.LegacyLeakageAudit` (see their docstrings for the options)."""

    def __init__(self, model: nn.Module, spec: DataSpec, *, attack: str | Attack = "inverting-gradients",
                 local_steps: int = 1, local_lr: float = 0.01, local_batch_size: int | None = None,
                 labels_fn: Callable[[str, int], torch.Tensor | None] | None = None,
                 rounds: Sequence[int] | None = None, max_clients: int | None = None,
                 out_dir: str | Path | None = None, truth: SimulationTruth | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, bn_mode: str = "eval", verbose: bool = True,
                 on_error: str = "record"):
        problems = []
        if not isinstance(model, nn.Module):
            problems.append(f"model must be a torch.nn.Module (the federation's architecture), got "
                            f"{type(model).__name__}")
        if not isinstance(spec, DataSpec):
            problems.append(f"spec must be a gradleak.DataSpec, got {type(spec).__name__}")
        if not (isinstance(local_steps, int) and local_steps >= 1):
            problems.append(f"local_steps must be an int >= 1, got {local_steps!r}")
        if not (isinstance(local_lr, (int, float)) and math.isfinite(local_lr) and local_lr > 0):
            problems.append(f"local_lr must be a positive number, got {local_lr!r}")
        if local_batch_size is not None and not (isinstance(local_batch_size, int) and local_batch_size >= 1):
            problems.append(f"local_batch_size must be an int >= 1 or None, got {local_batch_size!r}")
        if max_clients is not None and not (isinstance(max_clients, int) and max_clients >= 1):
            problems.append(f"max_clients must be an int >= 1 or None, got {max_clients!r}")
        if truth is not None and not isinstance(truth, SimulationTruth):
            problems.append(f"truth must be a SimulationTruth (the simulation-only truth channel), got "
                            f"{type(truth).__name__}")
        if on_error not in ("record", "raise"):
            problems.append(f"on_error must be 'record' or 'raise', got {on_error!r}")
        if not isinstance(attack, (str, Attack)):
            problems.append(f"attack must be a registered attack name or an Attack, got {type(attack).__name__}")
        if problems:
            raise ValidationError("Flower leakage audit", problems)
        self.model = copy.deepcopy(model)
        self.spec = spec
        self.attack = create(attack) if isinstance(attack, str) else attack
        self.local_steps, self.local_lr, self.local_batch_size = local_steps, float(local_lr), local_batch_size
        self.labels_fn = labels_fn
        self.rounds = None if rounds is None else {int(r) for r in rounds}
        self.max_clients = max_clients
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.truth = truth
        self.seed = seed
        self.dtype = dtype
        self.bn_mode = bn_mode
        self.verbose = verbose
        self.on_error = on_error
        self.records: list[AuditRecord] = []
        self._names: dict[str, str] = {}
        self._check_attack()

    def _check_attack(self) -> None:
        """Fail at start, not in round 1, when the attack cannot run on this architecture at all (a probe
        update of the model's shape, one example)."""
        gen = torch.Generator().manual_seed(0)
        model = self.model if self.dtype is None else copy.deepcopy(self.model).to(self.dtype)
        probe = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in model.named_parameters()}
        case = Case.from_observed(model, probe, spec=self.spec, batch_size=1, protocol="fedavg", local_steps=1,
                                  local_lr=self.local_lr, bn_mode=self.bn_mode)
        problems = self.attack.requirements(case)
        if problems:
            raise RequirementError(f"Flower leakage audit with {self.attack.name}", problems)

    # ---- one update ---------------------------------------------------------------------------------------
    def wants(self, server_round: int) -> bool:
        return self.rounds is None or int(server_round) in self.rounds

    def name_for(self, node_id: Any, reported: Any = None) -> str:
        """The readable name of a client: the one it reported, else ``node-<k>`` (k: order of first appearance)."""
        key = str(node_id)
        if key not in self._names:
            self._names[key] = safe_name(reported) if reported else f"node-{len(self._names)}"
        return self._names[key]

    def audit_update(self, server_round: int, node_id: Any, sent: Arrays, returned: Arrays, *,
                     num_examples: int | None, reported: Mapping[str, Any]) -> AuditRecord:
        """Attack one client's update (its returned arrays against the arrays it was sent) and keep the record."""
        name = self.name_for(node_id, reported.get("client"))
        rec = AuditRecord(int(server_round), name, str(node_id), None if num_examples is None else int(num_examples))
        t0 = time.perf_counter()
        try:
            rec.replay = resolve_replay(reported, num_examples=num_examples, local_steps=self.local_steps,
                                        local_lr=self.local_lr, local_batch_size=self.local_batch_size)
            labels = self.labels_fn(name, int(server_round)) if self.labels_fn else None
            case = case_from_flower(self.model, sent, returned, spec=self.spec, replay=rec.replay, labels=labels,
                                    bn_mode=self.bn_mode, dtype=self.dtype)
            rec.notes += [c["note"] for c in case.meta.get("side_channels", [])]
            recon = self.attack.reconstruct(case, seed=self.seed)
            rec.reconstruction, rec.residual, rec.kind, rec.claim = recon, recon.residual, recon.kind, recon.claim
            truth = self.truth.get(node_id, server_round) if self.truth is not None else None
            scores = None
            if truth is not None:
                from ...metrics import evaluate

                if truth.inputs.shape[0] != rec.replay.examples:
                    rec.notes.append(f"the shared truth holds {truth.inputs.shape[0]} examples, the replay "
                                     f"{rec.replay.examples}")
                scores = evaluate(recon, truth, case.spec.value_range)
                rec.psnr, rec.ssim, rec.label_accuracy = scores.psnr, scores.ssim, scores.label_accuracy
            if self.out_dir is not None:
                from ...report import write_report

                rec.report_dir = write_report(
                    self.out_dir / f"round-{int(server_round):03d}" / name, recon, truth=truth, scores=scores,
                    case=case, config={"server_round": int(server_round), "client": name, "node_id": str(node_id),
                                       "attack": self.attack.name, "seed": self.seed,
                                       "replay": rec.replay.to_dict()})
        except GradleakError as e:
            if self.on_error == "raise":
                raise
            rec.error = f"{type(e).__name__}: {e}"
        rec.seconds = time.perf_counter() - t0
        self.records.append(rec)
        return rec

    def fail(self, server_round: int, node_id: Any, reported: Mapping[str, Any], reason: str) -> AuditRecord:
        """Keep a record for an update that cannot be audited at all (``reason`` says why)."""
        if self.on_error == "raise":
            raise ValidationError(f"Flower leakage audit, round {server_round}", [reason])
        rec = AuditRecord(int(server_round), self.name_for(node_id, reported.get("client")), str(node_id), None,
                          error=reason)
        self.records.append(rec)
        return rec

    # ---- per round and at the end --------------------------------------------------------------------------
    def end_round(self, server_round: int) -> None:
        """Print the round's line and bring the output directory up to date."""
        from .summary import round_line, write_summary

        if self.verbose:
            print(round_line(self.records, server_round), flush=True)
        if self.out_dir is not None:
            write_summary(self.out_dir, self.records, meta=self.describe())

    def finish(self) -> None:
        """Print the round at which leakage was worst (after the last round)."""
        from .summary import worst_round

        if self.verbose and self.records:
            w = worst_round(self.records)
            where = f"; report: {self.out_dir / 'index.html'}" if self.out_dir is not None else ""
            if w is not None:
                print(f"[gradleak] leakage was worst in round {w['round']} ({w['why']}){where}", flush=True)

    def describe(self) -> dict[str, Any]:
        return {"attack": self.attack.name, "model": getattr(self.model, "zoo_name", type(self.model).__name__),
                "spec": self.spec.to_dict(), "truth_channel": self.truth is not None,
                "defaults": {"local_steps": self.local_steps, "local_lr": self.local_lr,
                             "local_batch_size": self.local_batch_size}}

    def summary(self) -> dict[str, Any]:
        """What ``leakage.json`` holds."""
        from .summary import leakage_summary

        return leakage_summary(self.records, meta=self.describe(), root=self.out_dir)



class AuditedStrategy:
    """What both Flower wrappers share: the wrapped ``strategy``, the :class:`Auditor` and read access to it."""

    strategy: Any
    auditor: Auditor

    def _setup(self, strategy, model: nn.Module, spec: DataSpec, options: dict[str, Any]) -> None:
        self.strategy = strategy
        self.auditor = Auditor(model, spec, **options)
        self._sent: dict[int, dict[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r}, attack={self.auditor.attack.name})"

    @property
    def records(self) -> list[AuditRecord]:
        """Every :class:`AuditRecord` so far."""
        return self.auditor.records

    def summary_dict(self) -> dict[str, Any]:
        """What ``leakage.json`` holds."""
        return self.auditor.summary()


def check_strategy_type(strategy: Any, wrapper: str, expected: type, expected_name: str, other: type | None,
                        other_hint: str) -> None:
    """Raise a clear error unless ``strategy`` is a plain (not yet audited) instance of ``expected``; name the
    right wrapper when it is an ``other`` (the other Flower API's strategy)."""
    if isinstance(strategy, AuditedStrategy):
        raise ValidationError(wrapper, [f"the strategy is already wrapped in a {type(strategy).__name__}; wrap the "
                                        "plain strategy once"])
    if not isinstance(strategy, expected):
        hint = f" {other_hint}" if other is not None and isinstance(strategy, other) else ""
        raise ValidationError(wrapper, [f"expected {expected_name}, got "
                                        f"{type(strategy).__module__}.{type(strategy).__name__}.{hint}"])
