"""A small, real Flower simulation to try the audit on: K clients, each holding a disjoint slice of
scikit-learn's digits, train a zoo model with local SGD and report what the replay needs (the client contract);
in simulation they also share their batch through :class:`~gradleak.integrations.flower.SimulationTruth`.

Both Flower APIs are covered: :func:`client_app` + :func:`run` (Message API, ``run_simulation``) and
:func:`legacy_client_fn` + :func:`run_legacy` (legacy ``start_simulation``). ``examples/flower_audit.py`` and
the tests use it; it is also the reference for writing your own clients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...case import DataSpec
from ...errors import ValidationError
from .contract import add_replay, replay_batches, replay_metrics
from .truth import SimulationTruth


@functools.lru_cache(maxsize=1)
def _digits():
    from ...data import load_digits

    return load_digits()


@dataclass(frozen=True)
class DigitsFederation:
    """The clients' side of the simulated federation.

    clients: K. Client k holds digits k, k+K, k+2K, ...; in round r it trains on the next ``batch`` of them.
    model / model_options: a zoo model (``gradleak.models.build``), the same seed on every side.
    local_steps / local_lr / local_batch_size (default: the whole batch): plain SGD on the fixed mini-batch
    order of :func:`~gradleak.integrations.flower.replay_batches`. report: whether clients report these facts
    (the client contract); without it the audit has to assume them.
    """

    clients: int = 2
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=lambda: {"width": 64})
    batch: int = 1
    local_steps: int = 1
    local_lr: float = 0.1
    local_batch_size: int | None = None
    seed: int = 0
    report: bool = True

    def __post_init__(self):
        problems = []
        for k in ("clients", "batch", "local_steps"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{k} must be an int >= 1, got {v!r}")
        if not self.local_lr > 0:
            problems.append(f"local_lr must be > 0, got {self.local_lr!r}")
        if problems:
            raise ValidationError("DigitsFederation", problems)

    @property
    def spec(self) -> DataSpec:
        return _digits().spec

    def build_model(self) -> nn.Module:
        from ...models import build

        spec = self.spec
        return build(self.model, input_shape=spec.shape, num_classes=spec.num_classes, seed=self.seed,
                     **self.model_options)

    def client_batch(self, partition: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``partition``'s examples for ``server_round`` (IMAGE space, labels)."""
        data = _digits()
        mine = torch.arange(int(partition), len(data), self.clients)
        start = ((int(server_round) - 1) * self.batch) % max(len(mine) - self.batch, 1)
        idx = mine[start:start + self.batch]
        return data.images[idx].clone(), data.labels[idx].clone()

    def local_training(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The client's local training (in place): ``local_steps`` plain SGD steps; returns the last loss."""
        bs = self.local_batch_size or x.shape[0]
        xn = self.spec.normalize(x)
        opt = torch.optim.SGD(model.parameters(), lr=self.local_lr)
        loss = torch.zeros(())
        for sl in replay_batches(x.shape[0], bs, self.local_steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xn[sl]), y[sl])
            loss.backward()
            opt.step()
        return float(loss.detach())

    def replay(self, context, n: int) -> dict[str, Any]:
        return dict(context=context, examples=n, local_steps=self.local_steps, local_lr=self.local_lr,
                    local_batch_size=self.local_batch_size or n, batch_order="fixed", optimizer="sgd")


# ---- Message API -------------------------------------------------------------------------------------------

def _train_reply(fed: DigitsFederation, truth: SimulationTruth | None, msg, context):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    model = fed.build_model()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    server_round = int(msg.content.config_records["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    x, y = fed.client_batch(partition, server_round)
    loss = fed.local_training(model, x, y)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": int(x.shape[0]), "train-loss": loss})})
    if fed.report:
        add_replay(content, **fed.replay(context, int(x.shape[0])))
    if truth is not None:
        truth.share(context, server_round, x, y)
    return Message(content, reply_to=msg)


def client_app(fed: DigitsFederation, truth: SimulationTruth | None = None):
    """The Message-API ClientApp of the federation (train only: strategies should set fraction_evaluate=0)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return _train_reply(fed, truth, msg, context)

    return app


def backend_config(num_cpus: int = 2) -> dict[str, Any]:
    """A small Ray backend: ``num_cpus`` for Ray, one CPU per client."""
    return {"init_args": {"num_cpus": int(num_cpus), "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def run(fed: DigitsFederation, strategies: Sequence, *, rounds: int, truth: SimulationTruth | None = None,
        num_cpus: int = 2) -> list[dict[str, np.ndarray]]:
    """Run one Flower simulation (``run_simulation``, Message API) in which each of ``strategies`` runs its own
    federation of ``rounds`` rounds, one after the other, from the same initial model on the same clients.
    Returns each federation's final global arrays (name -> array)."""
    from flwr.app import ArrayRecord
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    finals: list[dict[str, np.ndarray]] = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        torch.set_num_threads(1)
        for strategy in strategies:
            result = strategy.start(grid=grid, initial_arrays=ArrayRecord(fed.build_model().state_dict()),
                                    num_rounds=int(rounds))
            finals.append({k: a.numpy() for k, a in result.arrays.items()})

    run_simulation(server_app=server, client_app=client_app(fed, truth), num_supernodes=fed.clients,
                   backend_config=backend_config(num_cpus))
    if len(finals) != len(strategies):
        raise RuntimeError(f"the simulation finished {len(finals)} of {len(strategies)} federations; see Flower's "
                           "log above")
    return finals


# ---- legacy API ----------------------------------------------------------------------------------------------

def fit_config(server_round: int) -> dict[str, Any]:
    """``on_fit_config_fn`` for legacy strategies: tells the clients the round (the Message API does that)."""
    return {"server-round": int(server_round)}


def _legacy_client_class():
    from flwr.client import NumPyClient

    class DigitsClient(NumPyClient):
        def __init__(self, fed: DigitsFederation, context, truth: SimulationTruth | None):
            self.fed, self.context, self.truth = fed, context, truth

        def get_parameters(self, config):
            return [v.detach().cpu().numpy() for v in self.fed.build_model().state_dict().values()]

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = self.fed.build_model()
            model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(model.state_dict(), parameters)})
            server_round = int(config["server-round"])
            partition = int(self.context.node_config["partition-id"])
            x, y = self.fed.client_batch(partition, server_round)
            loss = self.fed.local_training(model, x, y)
            metrics = {"train-loss": loss}
            if self.fed.report:
                metrics.update(replay_metrics(**self.fed.replay(self.context, int(x.shape[0]))))
            if self.truth is not None:
                self.truth.share(self.context, server_round, x, y)
            return [v.detach().cpu().numpy() for v in model.state_dict().values()], int(x.shape[0]), metrics

    return DigitsClient


def legacy_client_fn(fed: DigitsFederation, truth: SimulationTruth | None = None):
    """The legacy ``client_fn(context)`` of the federation (a NumPyClient)."""

    def client_fn(context):
        return _legacy_client_class()(fed, context, truth).to_client()

    return client_fn


def run_legacy(fed: DigitsFederation, strategy, *, rounds: int, truth: SimulationTruth | None = None,
               num_cpus: int = 2, keep_initialised: bool = False):
    """Run the federation with the legacy ``start_simulation`` and ``strategy`` (give it
    ``on_fit_config_fn=fit_config``); returns Flower's History."""
    from flwr.server import ServerConfig
    from flwr.simulation import start_simulation

    return start_simulation(client_fn=legacy_client_fn(fed, truth), num_clients=fed.clients,
                            config=ServerConfig(num_rounds=int(rounds)), strategy=strategy,
                            ray_init_args={"num_cpus": int(num_cpus), "include_dashboard": False,
                                           "ignore_reinit_error": True},
                            client_resources={"num_cpus": 1, "num_gpus": 0.0}, keep_initialised=keep_initialised)
