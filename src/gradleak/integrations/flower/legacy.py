"""The audit on Flower's legacy Strategy API (``flwr.server.strategy``: ``start_simulation``, or a ServerApp
built from ``server_fn`` returning ``ServerAppComponents``), for as long as Flower ships it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .auditor import AuditedStrategy, check_strategy_type
from .contract import reported_from_metrics

try:  # the class must derive from Flower's legacy Strategy; without flwr the module still imports
    from flwr.server.strategy import Strategy as _Base
except ImportError:  # pragma: no cover - exercised only without the extra
    _Base = object


def check_legacy_strategy(strategy: Any, wrapper: str) -> None:
    """Raise a clear error unless ``strategy`` is a legacy Flower strategy."""
    from flwr.server.strategy import Strategy
    from flwr.serverapp.strategy import Strategy as MessageStrategy

    check_strategy_type(strategy, wrapper, Strategy, "a legacy Flower strategy (flwr.server.strategy.Strategy, e.g. "
                        "FedAvg)", MessageStrategy, "It is a Message-API strategy (flwr.serverapp.strategy): use "
                        "LeakageAudit, or gradleak.integrations.flower.wrap(), which picks the right wrapper.")


class LegacyLeakageAudit(AuditedStrategy, _Base):
    """A legacy Flower strategy that audits the strategy it wraps.

    ``configure_fit`` remembers the parameters sent to each client; ``aggregate_fit`` attacks every result
    (returned parameters minus the sent ones, in ``state_dict()`` order: the Flower convention), then hands the
    results to the wrapped strategy untouched. ``initialize_parameters``, ``configure_evaluate``,
    ``aggregate_evaluate`` and ``evaluate`` are forwarded as they are. Clients report their replay settings in
    their fit metrics with :func:`~gradleak.integrations.flower.replay_metrics`. Options: as
    :class:`~gradleak.integrations.flower.LeakageAudit`.
    """

    def __init__(self, strategy, model, spec, **options: Any):
        check_legacy_strategy(strategy, "LegacyLeakageAudit")
        self._setup(strategy, model, spec, options)

    # ---- what Flower calls ---------------------------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import parameters_to_ndarrays

        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        if self.auditor.wants(server_round):
            converted: dict[int, list[np.ndarray]] = {}
            sent = {}
            for proxy, ins in instructions:
                if id(ins.parameters) not in converted:
                    converted[id(ins.parameters)] = parameters_to_ndarrays(ins.parameters)
                sent[proxy.cid] = converted[id(ins.parameters)]
            self._sent[server_round] = sent
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        if self.auditor.wants(server_round):
            self._audit(server_round, results)
        self._sent.pop(server_round, None)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)

    # ---- the audit ---------------------------------------------------------------------------------------------
    def _audit(self, server_round: int, results) -> None:
        from flwr.common import parameters_to_ndarrays

        sent = self._sent.get(server_round, {})
        items = [(proxy, res, reported_from_metrics(res.metrics)) for proxy, res in results]
        items.sort(key=lambda t: self.auditor.name_for(t[0].cid, t[2].get("client")))
        if self.auditor.max_clients is not None:
            items = items[: self.auditor.max_clients]
        for proxy, res, reported in items:
            if proxy.cid not in sent:
                self.auditor.fail(server_round, proxy.cid, reported, "no arrays to compare: the strategy sent "
                                                                     "this client no parameters this round")
                continue
            self.auditor.audit_update(server_round, proxy.cid, sent[proxy.cid], parameters_to_ndarrays(res.parameters),
                                      num_examples=res.num_examples, reported=reported)
        self.auditor.end_round(server_round)
