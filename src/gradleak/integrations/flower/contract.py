"""The client contract: what a Flower client reports so that the server-side audit can replay its update exactly.

A FedAvg update ``theta_K - theta_0`` is replayed exactly (see :class:`gradleak.FedAvg`) when the audit knows

- ``examples``: how many distinct examples are behind the update (Flower's ``num-examples`` is a weight for
  aggregation and often counts the whole local set, not what this round trained on);
- ``local-steps``: the number of local SGD steps;
- ``local-lr``: their learning rate;
- ``local-batch-size``: the mini-batch size;
- ``batch-order``: ``"fixed"`` when step ``k`` uses chunk ``k mod floor(n / b)`` of the examples in one fixed order
  (:func:`replay_batches` yields exactly that), or ``"shuffled"`` (a fresh random order every pass; report its
  ``shuffle-seed``);
- ``optimizer``: ``"sgd"`` (plain SGD: no momentum, no weight decay) is the only one the replay models.

A client reports them with :func:`add_replay` (Message API: a ConfigRecord under :data:`REPLAY_KEY` in the reply,
next to the ArrayRecord and MetricRecord, so Flower's own metric aggregation never averages them) or
:func:`replay_metrics` (legacy ``NumPyClient.fit``: entries prefixed ``gradleak.`` in the returned metrics).
Whatever a client leaves out, the audit fills in with a stated assumption (:func:`resolve_replay`), and the
report lists it next to the client's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ...errors import ValidationError
from ...functional import minibatch_indices

REPLAY_KEY = "gradleak-replay"
"""Key of the reply's ConfigRecord that carries the replay facts (Message API)."""
LEGACY_PREFIX = "gradleak."
"""Prefix of the replay facts in a legacy client's fit metrics."""
BATCH_ORDERS = ("fixed", "shuffled")
FIELDS = ("client", "examples", "local-steps", "local-lr", "local-batch-size", "batch-order", "shuffle-seed",
          "optimizer")


def client_name(context: Any = None) -> str | None:
    """A readable, stable name for the client running under ``context`` (a Flower ``Context``):
    ``client-<partition-id>`` when the node config has a partition id (every simulation does), else None."""
    if context is None:
        return None
    cfg = getattr(context, "node_config", None) or {}
    pid = cfg.get("partition-id")
    return None if pid is None else f"client-{int(pid)}"


def replay_facts(context: Any = None, *, examples: int, local_steps: int, local_lr: float, local_batch_size: int,
                 batch_order: str = "fixed", shuffle_seed: int | None = None, optimizer: str = "sgd",
                 client: str | None = None) -> dict[str, Any]:
    """The replay facts as a flat dict (kebab-case keys, Flower's style); checked here, on the client, so a
    wrong report fails where it is made."""
    problems = []
    for name, v in (("examples", examples), ("local_steps", local_steps), ("local_batch_size", local_batch_size)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            problems.append(f"{name} must be an int >= 1, got {v!r}")
    if not (isinstance(local_lr, (int, float)) and math.isfinite(local_lr) and local_lr > 0):
        problems.append(f"local_lr must be a positive number, got {local_lr!r}")
    if batch_order not in BATCH_ORDERS:
        problems.append(f"batch_order must be one of {BATCH_ORDERS}, got {batch_order!r}")
    if shuffle_seed is not None and not isinstance(shuffle_seed, int):
        problems.append(f"shuffle_seed must be an int or None, got {shuffle_seed!r}")
    if not isinstance(optimizer, str) or not optimizer:
        problems.append(f"optimizer must be a name such as 'sgd', got {optimizer!r}")
    if problems:
        raise ValidationError("gradleak replay report", problems)
    facts: dict[str, Any] = {"examples": examples, "local-steps": local_steps, "local-lr": float(local_lr),
                             "local-batch-size": local_batch_size, "batch-order": batch_order,
                             "optimizer": optimizer.lower()}
    if shuffle_seed is not None:
        facts["shuffle-seed"] = shuffle_seed
    name = client or client_name(context)
    if name:
        facts["client"] = str(name)
    return facts


def add_replay(content, context: Any = None, **facts) -> Any:
    """Message API, client side: put the replay facts (see :func:`replay_facts`) into the reply's RecordDict
    ``content`` as a ConfigRecord under :data:`REPLAY_KEY`; returns ``content``."""
    from flwr.app import ConfigRecord

    content[REPLAY_KEY] = ConfigRecord(replay_facts(context, **facts))
    return content


def replay_metrics(context: Any = None, **facts) -> dict[str, Any]:
    """Legacy API, client side: the replay facts as fit metrics (keys prefixed :data:`LEGACY_PREFIX`), to merge
    into the dict ``NumPyClient.fit`` returns."""
    return {LEGACY_PREFIX + k: v for k, v in replay_facts(context, **facts).items()}


def replay_batches(num_examples: int, batch_size: int, local_steps: int) -> Iterator[slice]:
    """Client side: the mini-batch of each local step in the order the audit replays (``batch-order="fixed"``):
    step ``k`` uses chunk ``k mod floor(n / b)`` of the examples as stored."""
    for step in range(int(local_steps)):
        yield minibatch_indices(int(num_examples), int(batch_size), step)


@dataclass(frozen=True)
class Replay:
    """The replay settings the audit used for one client update, and the assumptions it had to make."""

    examples: int
    local_steps: int
    local_lr: float
    local_batch_size: int
    batch_order: str
    optimizer: str
    shuffle_seed: int | None
    assumptions: tuple[str, ...]
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "local_steps": self.local_steps, "local_lr": self.local_lr,
                "local_batch_size": self.local_batch_size, "batch_order": self.batch_order,
                "optimizer": self.optimizer, "shuffle_seed": self.shuffle_seed,
                "assumptions": list(self.assumptions), "exact": self.exact}


def reported_from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The replay facts a legacy client put in its fit metrics (prefix stripped)."""
    n = len(LEGACY_PREFIX)
    return {k[n:]: v for k, v in (metrics or {}).items() if isinstance(k, str) and k.startswith(LEGACY_PREFIX)}


def resolve_replay(reported: Mapping[str, Any], *, num_examples: int | None, local_steps: int, local_lr: float,
                   local_batch_size: int | None) -> Replay:
    """Combine what a client reported with the audit's defaults; every default that stands in for a missing
    report becomes an assumption, written out. ``exact`` is True only when nothing the replay depends on was
    assumed (or was reported in a form the replay cannot reproduce)."""
    unknown = sorted(set(reported) - set(FIELDS))
    problems = [f"unknown replay field(s) {unknown}; expected some of {list(FIELDS)}"] if unknown else []
    assumed: list[str] = []
    inexact = False

    def get_int(key: str) -> int | None:
        v = reported.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
            problems.append(f"reported {key}={v!r} is not an int >= 1")
            return None
        return int(v)

    examples = get_int("examples")
    if examples is None:
        if num_examples is None or num_examples < 1:
            problems.append("the client reported neither 'examples' nor a usable Flower 'num-examples'")
        else:
            examples = int(num_examples)
            assumed.append(f"examples={examples}: taken from Flower's num-examples (the client did not report "
                           "'examples', the number behind this update)")
            inexact = True
    steps = get_int("local-steps")
    if steps is None:
        steps = int(local_steps)
        assumed.append(f"local-steps={steps}: the audit's default (not reported)")
        inexact = True
    lr = reported.get("local-lr")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        problems.append(f"reported local-lr={lr!r} is not a positive number")
        lr = None
    if lr is None:
        lr = float(local_lr)
        assumed.append(f"local-lr={lr:g}: the audit's default (not reported)")
        inexact = True
    bs = get_int("local-batch-size")
    if bs is None:
        bs = int(local_batch_size) if local_batch_size else examples
        what = "the audit's default" if local_batch_size else "full-batch steps"
        assumed.append(f"local-batch-size={bs}: {what} (not reported)")
        inexact = True
    order = reported.get("batch-order")
    seed = reported.get("shuffle-seed")
    if order is None:
        order = "fixed"
        if examples is not None and bs is not None and steps > 1 and bs < examples:
            assumed.append("batch-order=fixed: chunk k mod floor(n/b) assumed (not reported)")
            inexact = True
    elif order not in BATCH_ORDERS:
        problems.append(f"reported batch-order={order!r}; expected one of {BATCH_ORDERS}")
    elif order == "shuffled" and examples is not None and bs is not None and bs < examples:
        if steps <= max(examples // bs, 1):
            assumed.append("batch-order=shuffled: one pass over a shuffled order is replayed as the fixed order of "
                           "the same examples (the same update, up to the examples' order)")
        else:
            assumed.append(f"batch-order=shuffled over {steps} steps (more than one pass): replayed in the fixed "
                           "order, which does not reproduce the client's reshuffled mini-batches")
            inexact = True
    opt = str(reported.get("optimizer", "")).lower()
    if not opt:
        opt = "sgd"
        assumed.append("optimizer=sgd: plain SGD assumed (not reported)")
        inexact = True
    elif opt != "sgd":
        assumed.append(f"optimizer={opt}: replayed as plain SGD, which does not reproduce it")
        inexact = True
    if problems:
        raise ValidationError("client replay report", problems)
    return Replay(examples=int(examples), local_steps=int(steps), local_lr=float(lr), local_batch_size=int(bs),
                  batch_order=str(order), optimizer=opt, shuffle_seed=None if seed is None else int(seed),
                  assumptions=tuple(assumed), exact=not inexact)
