"""What a defense costs: held-out accuracy of a federated training run with the defense on every client update,
beside the same run without it.

FedAvg over K simulated clients for R rounds. Every round every client takes the global parameters, draws
``local_steps * local_batch_size`` examples of its own shard (a fresh permutation each round, seeded by
(seed, round, client)), and computes its update with :meth:`gradleak.simulate.Client.send`, the code path
``simulate`` uses, so the update that is defended here is the update an attack is given there. The server
adds the mean update (server learning rate 1). Secure aggregation in the list aggregates the clients in groups
of its ``clients`` through the masking protocol. The baseline and every defended run see the same client
shards, the same batches and the same initial model; only the defense differs.

Stateful defenses (topk with error feedback) get one copy per client, carried across rounds. DP-SGD is
accounted for the run: ``rounds x local_steps`` steps at sample rate ``local_batch_size / shard size`` (the
smallest shard, i.e. the largest rate, when shards differ), and a ``target_epsilon`` is calibrated for them.
BatchNorm runs in eval mode (running statistics; they are not trained), as DP-SGD requires.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import functional as Fn
from ..case import _num_outputs
from ..errors import ValidationError
from ..losses import default_loss_for, losses
from .base import Defense, as_defense
from .secagg import secure_aggregate


@dataclass
class DefenseUtility:
    """One defended run: final held-out ``accuracy``, ``accuracy_drop`` = baseline - accuracy (points of
    accuracy in [0, 1]), ``epsilon`` (None when the defense has no accounting) and the accountant's facts."""

    defense: str
    accuracy: float
    accuracy_drop: float
    epsilon: float | None
    privacy: dict | None
    accuracy_per_round: list[float]
    seconds: float


@dataclass
class UtilityResult:
    """The baseline (no defense) and every defended run of one :func:`utility` call."""

    model: str
    dataset: str
    settings: dict
    baseline_accuracy: float
    baseline_per_round: list[float]
    defenses: list[DefenseUtility] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        rows = [f"{'defense':<48} {'accuracy':>8} {'drop':>8} {'epsilon':>8}",
                f"{'(none)':<48} {self.baseline_accuracy:>8.4f} {0.0:>8.4f} {'-':>8}"]
        for d in self.defenses:
            eps = "-" if d.epsilon is None else f"{d.epsilon:.3g}"
            rows.append(f"{d.defense[:48]:<48} {d.accuracy:>8.4f} {d.accuracy_drop:>8.4f} {eps:>8}")
        return "\n".join(rows)


def client_shards(labels: torch.Tensor, clients: int, *, iid: bool, alpha: float, seed: int) -> list[torch.Tensor]:
    """Indices of each client's examples. IID: a seeded permutation cut into ``clients`` near-equal parts.
    Non-IID: for every class, proportions drawn from Dirichlet(alpha, ..., alpha) over the clients (smaller
    alpha: more skewed); a client left empty takes one example from the largest shard."""
    n = int(labels.numel())
    g = torch.Generator().manual_seed(seed)
    if iid:
        perm = torch.randperm(n, generator=g)
        return [torch.sort(p).values for p in torch.tensor_split(perm, clients)]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)].tolist()
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
        for j, chunk in enumerate(np.split(np.array(idx, dtype=np.int64), cuts)):
            parts[j] += chunk.tolist()
    for j in range(clients):
        if not parts[j]:
            big = max(range(clients), key=lambda i: len(parts[i]))
            parts[j].append(parts[big].pop())
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def _round_batch(shard: torch.Tensor, size: int, seed: int, rnd: int, client: int) -> torch.Tensor:
    """The examples a client uses in round ``rnd``: the first ``size`` of a seeded permutation of its shard
    (repeated when the shard is smaller)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rnd) * 10_007 + client)
    reps = math.ceil(size / shard.numel())
    order = torch.cat([shard[torch.randperm(shard.numel(), generator=g)] for _ in range(reps)])
    return order[:size]


def _build_model(model, spec, seed, dtype, options) -> tuple[nn.Module, str]:
    from .. import models as models_mod

    if isinstance(model, str):
        return models_mod.build(model, input_shape=spec.shape, num_classes=spec.num_classes, seed=seed,
                                dtype=dtype, **options), model
    if options:
        raise ValidationError("utility", ["model_options apply to a zoo model name only"])
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).to(dtype), getattr(model, "zoo_name", type(model).__name__)
    if callable(model):
        m = model(spec)
        if not isinstance(m, nn.Module):
            raise ValidationError("utility", [f"the model factory must return an nn.Module, got {type(m).__name__}"])
        return m.to(dtype), getattr(m, "zoo_name", getattr(model, "__name__", type(m).__name__))
    raise ValidationError("utility", [f"model must be a zoo name, an nn.Module or a factory spec -> module, "
                                      f"got {type(model).__name__}"])


def utility(
    model: str | nn.Module | Callable,
    dataset: Any = "digits",
    defenses: Sequence[Defense | str] = (),
    *,
    rounds: int = 20,
    clients: int = 8,
    local_steps: int = 5,
    local_lr: float = 0.1,
    local_batch_size: int = 16,
    iid: bool = True,
    alpha: float = 0.5,
    holdout: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_options: dict | None = None,
    progress: bool = False,
) -> UtilityResult:
    """Held-out accuracy of FedAvg training without and with each defense (see the module docstring).

    model: a zoo name (built for the dataset's shape and classes from ``seed``, with ``model_options``), an
        nn.Module (copied) or a factory ``spec -> nn.Module``.
    dataset: a source string for :func:`gradleak.data.load` ('digits', 'cifar10:ROOT', 'folder:DIR', a path)
        or a :class:`gradleak.data.Dataset`. A stratified ``holdout`` fraction is held out for accuracy.
    defenses: Defense objects or CLI specs ('prune:ratio=0.9', 'dp-sgd:max_grad_norm=1,target_epsilon=8').
    iid: IID client shards, or (False) Dirichlet(``alpha``) label skew.
    Returns a :class:`UtilityResult` (``to_json()``: ``baseline_accuracy`` and ``defenses: [{defense,
    accuracy, accuracy_drop, epsilon, ...}]``).
    """
    from .. import data as data_mod
    from ..simulate import Client
    from ..training import accuracy_and_loss, split_holdout

    problems = []
    for name, v, lo in (("rounds", rounds, 1), ("clients", clients, 1), ("local_steps", local_steps, 1),
                        ("local_batch_size", local_batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            problems.append(f"{name} must be an int >= {lo}, got {v!r}")
    for name, v in (("local_lr", local_lr), ("alpha", alpha)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
            problems.append(f"{name} must be a finite number > 0, got {v!r}")
    if not isinstance(holdout, float) or not 0 < holdout < 1:
        problems.append(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if problems:
        raise ValidationError("utility", problems)
    ds = data_mod.load(dataset) if isinstance(dataset, str) else dataset
    if not hasattr(ds, "images") or not hasattr(ds, "spec"):
        raise ValidationError("utility", [f"dataset must be a source string or a gradleak Dataset, got "
                                          f"{type(dataset).__name__}"])
    defs = [as_defense(d) for d in defenses]
    net, model_name = _build_model(model, ds.spec, seed, dtype, dict(model_options or {}))
    outs = _num_outputs(net)
    if outs != ds.spec.num_classes:
        raise ValidationError("utility", [f"the model has {outs} outputs, the dataset {ds.spec.num_classes} classes"])
    loss_fn = losses.get(default_loss_for(outs))
    Fn.set_bn_mode(net, "eval")
    device = next(net.parameters()).device
    train_idx, hold_idx = split_holdout(ds.labels, holdout, torch.Generator().manual_seed(seed))
    x_all = ds.spec.normalize(ds.images.to(device=device, dtype=dtype))
    y_all = ds.labels.to(device)
    x_hold, y_hold = x_all[hold_idx], y_all[hold_idx]
    shards = [train_idx[s] for s in client_shards(ds.labels[train_idx], clients, iid=iid, alpha=alpha, seed=seed)]
    per_round = local_steps * local_batch_size
    sample_rate = min(1.0, local_batch_size / min(int(s.numel()) for s in shards))
    init = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    settings = {"rounds": rounds, "clients": clients, "local_steps": local_steps, "local_lr": local_lr,
                "local_batch_size": local_batch_size, "split": "iid" if iid else f"dirichlet(alpha={alpha})",
                "holdout": holdout, "train_examples": int(train_idx.numel()), "holdout_examples": int(hold_idx.numel()),
                "shard_sizes": [int(s.numel()) for s in shards], "sample_rate": sample_rate, "seed": seed,
                "protocol": "fedavg", "server_lr": 1.0, "model_options": dict(model_options or {})}

    def accuracy(params) -> float:
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(params[k])
        return float(accuracy_and_loss(net, x_hold, y_hold, loss_fn, single_output=outs == 1)[0])

    def run(defense: Defense | None, label: str) -> list[float]:
        params = {k: v.clone() for k, v in init.items()}
        aggregator = defense.parts[-1] if defense is not None and hasattr(defense, "parts") and defense.aggregates \
            else (defense if defense is not None and defense.aggregates else None)
        per_client = (getattr(defense, "per_client", None) if aggregator is not None else defense)
        if aggregator is not None and clients % aggregator.clients:
            raise ValidationError("utility", [f"{clients} clients cannot be cut into secure-aggregation groups of "
                                              f"{aggregator.clients}"])
        mine = [copy.deepcopy(per_client) for _ in range(clients)] if per_client is not None else [None] * clients
        for d in mine:
            if d is not None:
                d.reset()
        accs = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=rounds, desc=label[:40], unit="round", leave=False)
        for r in range(rounds):
            updates = []
            for j in range(clients):
                idx = _round_batch(shards[j], per_round, seed, r, j)
                c = Client(net, params, buffers, x_all[idx], y_all[idx], loss_fn, "fedavg", local_steps, local_lr,
                           local_batch_size)
                gen = torch.Generator().manual_seed((seed * 7919 + r) * 104_729 + j)
                updates.append(c.send(mine[j], gen))
            if aggregator is not None:
                k = aggregator.clients
                gen = torch.Generator().manual_seed(seed * 31 + r)
                groups = [secure_aggregate(updates[i:i + k], generator=gen, fraction_bits=aggregator.fraction_bits).mean
                          for i in range(0, clients, k)]
                mean = {n: sum(g[n] for g in groups) / len(groups) for n in params}
            else:
                mean = {n: sum(u[n] for u in updates) / clients for n in params}
            params = {n: params[n] + mean[n].to(params[n].dtype) for n in params}
            accs.append(accuracy(params))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(accuracy=f"{accs[-1]:.3f}")
        if bar is not None:
            bar.close()
        return accs

    base = run(None, "baseline")
    result = UtilityResult(model=model_name, dataset=ds.spec.name, settings=settings, baseline_accuracy=base[-1],
                           baseline_per_round=base)
    for d in defs:
        t = time.perf_counter()
        d_run = d.for_run(rounds * local_steps, sample_rate)
        accs = run(d_run, d.description)
        priv = d_run.privacy(local_steps)
        result.defenses.append(DefenseUtility(defense=d_run.description, accuracy=accs[-1],
                                              accuracy_drop=base[-1] - accs[-1],
                                              epsilon=None if priv is None else priv.get("epsilon"), privacy=priv,
                                              accuracy_per_round=accs, seconds=time.perf_counter() - t))
    return result
