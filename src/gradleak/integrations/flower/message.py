"""The audit on Flower's current Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ...errors import ValidationError
from .auditor import AuditedStrategy, check_strategy_type
from .contract import REPLAY_KEY


def _message_strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


def _legacy_strategy_base():
    from flwr.server.strategy import Strategy

    return Strategy


try:  # the class must derive from Flower's Strategy; without flwr the module still imports
    _Base = _message_strategy_base()
except ImportError:  # pragma: no cover - exercised only without the extra
    _Base = object


def check_message_strategy(strategy: Any, wrapper: str) -> None:
    """Raise a clear error unless ``strategy`` is a Message-API strategy whose round loop the audit drives."""
    Strategy = _message_strategy_base()
    check_strategy_type(strategy, wrapper, Strategy, "a Flower Message-API strategy (flwr.serverapp.strategy."
                        "Strategy, e.g. FedAvg)", _legacy_strategy_base(), "It is a legacy flwr.server.strategy."
                        "Strategy: use LegacyLeakageAudit, or gradleak.integrations.flower.wrap(), which picks the "
                        "right wrapper.")
    if type(strategy).start is not Strategy.start:
        raise ValidationError(wrapper, [f"{type(strategy).__name__} overrides Strategy.start(): its own round loop "
                                        "would call its configure_train/aggregate_train directly and the audit would "
                                        "see nothing. Supported: strategies that use Flower's Strategy.start loop "
                                        "(every strategy Flower ships)"])


class LeakageAudit(AuditedStrategy, _Base):
    """A Flower Message-API strategy that audits the strategy it wraps (FedAvg, FedProx, FedAdam, ...).

    ``configure_train`` remembers the ArrayRecord sent to each node; ``aggregate_train`` attacks every valid
    reply (the client's returned arrays minus the ones it was sent: a FedAvg update), keeps an
    :class:`~gradleak.integrations.flower.AuditRecord`, then hands the replies to the wrapped strategy
    untouched. ``configure_evaluate``, ``aggregate_evaluate`` and ``summary`` are forwarded as they are;
    ``start`` is Flower's own loop (so every call goes through the audit) and prints the worst round at the
    end. Use it where you used the strategy: ``LeakageAudit(FedAvg(...), model, spec, ...).start(grid=...,
    initial_arrays=..., num_rounds=...)``.

    strategy: the Message-API strategy that really runs the federation.
    model: the architecture (any parameters: each round's sent arrays are loaded into a copy).
    spec: the clients' :class:`~gradleak.DataSpec`. attack: a name or an Attack (default inverting-gradients);
        checked against the model at construction.
    local_steps / local_lr / local_batch_size: what to assume where a client does not report them (see
        :mod:`~gradleak.integrations.flower.contract`); every assumption is recorded.
    labels_fn(client, round) -> labels or None: labels the server knows. rounds: the rounds to audit (default
        all); max_clients: at most this many clients per round. out_dir: per-record reports under
        ``out_dir/round-RRR/CLIENT`` and ``leakage.json``, ``leakage.png``, ``index.html`` updated every round.
    truth: a :class:`~gradleak.integrations.flower.SimulationTruth` (simulation only) to measure PSNR/SSIM.
    dtype: run the attack in this dtype (e.g. torch.float64). on_error: 'record' (a failed attack becomes a
        record with its error; the federation goes on) or 'raise'. verbose: print one line per round.
    """

    def __init__(self, strategy, model, spec, **options: Any):
        check_message_strategy(strategy, "LeakageAudit")
        self._setup(strategy, model, spec, options)

    # ---- what Flower calls ---------------------------------------------------------------------------------
    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid) -> Iterable:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.auditor.wants(server_round):
            converted: dict[int, dict[str, np.ndarray]] = {}
            sent = {}
            for msg in messages:
                record = self._array_record(msg.content)
                if record is None:
                    continue
                if id(record) not in converted:  # one conversion for a record shared by every message
                    converted[id(record)] = {k: a.numpy() for k, a in record.items()}
                sent[msg.metadata.dst_node_id] = converted[id(record)]
            self._sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.auditor.wants(server_round):
            self._audit(server_round, replies)
        self._sent.pop(server_round, None)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, grid, initial_arrays, num_rounds: int = 3, timeout: float = 3600, train_config=None,
              evaluate_config=None, evaluate_fn=None):
        """Flower's round loop (``Strategy.start``) over this audited strategy; prints the worst round."""
        result = _message_strategy_base().start(self, grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                                train_config=train_config, evaluate_config=evaluate_config,
                                                evaluate_fn=evaluate_fn)
        self.auditor.finish()
        return result

    # ---- the audit ---------------------------------------------------------------------------------------------
    def _array_record(self, content):
        records = content.array_records
        if len(records) == 1:
            return next(iter(records.values()))
        key = getattr(self.strategy, "arrayrecord_key", None)
        return records.get(key) if key is not None else None

    def _audit(self, server_round: int, replies: list) -> None:
        sent = self._sent.get(server_round, {})
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        ok = [m for m in replies if not m.has_error()]
        ok.sort(key=lambda m: self.auditor.name_for(m.metadata.src_node_id, self._reported(m).get("client")))
        if self.auditor.max_clients is not None:
            ok = ok[: self.auditor.max_clients]
        for msg in ok:
            node = msg.metadata.src_node_id
            reported = self._reported(msg)
            record = self._array_record(msg.content)
            if node not in sent or record is None:
                self.auditor.fail(server_round, node, reported, "no arrays to compare: " + (
                    "the strategy sent this node no ArrayRecord" if node not in sent else
                    "the reply holds no ArrayRecord"))
                continue
            num = None
            for mr in msg.content.metric_records.values():
                if weight_key in mr:
                    num = mr[weight_key]
                    break
            self.auditor.audit_update(server_round, node, sent[node], {k: a.numpy() for k, a in record.items()},
                                      num_examples=None if num is None else int(num), reported=reported)
        self.auditor.end_round(server_round)

    @staticmethod
    def _reported(msg) -> dict:
        rec = msg.content.config_records.get(REPLAY_KEY)
        return dict(rec) if rec is not None else {}
