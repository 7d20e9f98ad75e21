"""BatchNorm side channels: what the running statistics a client sends back reveal about its private batch.

A client that trains with BatchNorm in TRAIN mode updates every layer's running statistics at each forward
pass, and a framework that sends the whole ``state_dict`` (Flower does) returns them with the update. With
torch's rule, per forward pass k (factor ``a_k``: the layer's ``momentum``, or ``1 / num_batches_tracked`` after
the increment when ``momentum`` is None, the cumulative average)::

    r_k = (1 - a_k) r_{k-1} + a_k s_k

where ``s_k`` is the batch statistic of the layer's INPUT over the step's mini-batch: the per-channel mean, and
for ``running_var`` the UNBIASED per-channel variance (n / (n - 1) times the biased one, n = examples x spatial
positions). The server has its own copy ``r_0`` (it sent it) and knows the momentum (it is part of the
architecture), so after K forward passes

    r_K - prod_k (1 - a_k) r_0 = sum_k w_k s_k,   w_k = a_k prod_{j > k} (1 - a_j).

- K = 1 (FedSGD, or FedAvg with one local step): ``s_1 = (r_1 - (1 - a_1) r_0) / a_1`` EXACTLY: the batch's
  per-channel feature means and unbiased variances at every BatchNorm layer (:func:`revealed_statistics`).
- K > 1 (FedAvg): only the weighted mixture ``sum_k w_k s_k / sum_k w_k`` of the K step statistics is revealed.
  Each ``s_k`` is taken on step k's mini-batch at the parameters theta_{k-1} of that step. With full-batch local
  steps and a small local learning rate all s_k are close to the batch statistic at theta_0; with smaller local
  batches the mixture weights each mini-batch by the sum of its steps' w_k. :func:`candidate_statistics`
  models this mixture at theta_0 (the drift of the parameters over the K steps is the approximation).

In EVAL mode the client does not change the running statistics: they reveal nothing about its batch (but the
model's own running statistics are known to the server and approximate the training data's feature statistics:
the "running" prior of :mod:`gradleak.attacks.optimization.priors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from .errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from .case import Case

_BN = nn.modules.batchnorm._BatchNorm
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def bn_layers(model: nn.Module) -> dict[str, _BN]:
    """The BatchNorm modules of ``model`` that track running statistics, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None}


def step_factors(module: _BN, batches_before: int, steps: int) -> list[float]:
    """The factors a_1..a_K of ``steps`` forward passes of ``module`` (see the module docstring)."""
    if module.momentum is None:
        return [1.0 / (batches_before + k) for k in range(1, steps + 1)]
    return [float(module.momentum)] * steps


def mixture_weights(factors: list[float]) -> tuple[float, list[float]]:
    """(prod_k (1 - a_k), [w_k]) for the factors of K passes: r_K = decay r_0 + sum_k w_k s_k."""
    decay, weights = 1.0, []
    for a in factors:
        weights = [w * (1.0 - a) for w in weights] + [a]
        decay *= 1.0 - a
    return decay, weights


def input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and UNBIASED variance of a BatchNorm input (B, C, *spatial), what torch's running
    statistics average; differentiable."""
    dims = [0] + list(range(2, x.ndim))
    return x.mean(dims), x.var(dims, unbiased=True)


@dataclass(frozen=True)
class LayerStatistics:
    """What one BatchNorm layer's returned running statistics reveal.

    mean, var: (C,) the revealed per-channel mean and UNBIASED variance of the layer's input: the batch's own
    (``exact``) for one forward pass, else the mixture ``sum_k weights[k] s_k`` of the K step statistics.
    weights: (K,) the mixture weights of the steps (sum 1)."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    weights: tuple[float, ...]

    @property
    def exact(self) -> bool:
        return len(self.weights) == 1


@dataclass(frozen=True)
class BatchStatistics:
    """The batch statistics revealed by a case's returned BatchNorm buffers, per layer (module name)."""

    layers: Mapping[str, LayerStatistics]
    steps: int

    @property
    def exact(self) -> bool:
        return self.steps == 1

    def describe(self) -> dict:
        what = ("each BatchNorm layer's per-channel input mean and unbiased variance over the client's batch "
                "(exact: one forward pass)" if self.exact else
                f"a weighted mixture of the {self.steps} local steps' per-channel input means and variances "
                f"at each BatchNorm layer (not each step's own)")
        return {"channel": "returned BatchNorm running statistics", "layers": len(self.layers),
                "channels": sum(int(s.mean.numel()) for s in self.layers.values()), "forward_passes": self.steps,
                "exact": self.exact, "reveals": what}


def forward_passes(case: "Case") -> int:
    """Train-mode forward passes the client made for its update: 1 for FedSGD, ``local_steps`` for FedAvg."""
    return int(getattr(case.observation, "local_steps", 1))


def revealed_statistics(case: "Case") -> BatchStatistics:
    """The batch statistics the case's returned BatchNorm buffers reveal (see the module docstring).

    Needs ``case.observed_buffers`` (the running statistics after the client's computation) and
    ``case.bn_mode == 'train'``. The server's copy before the update is ``case.buffers``. Raises
    :class:`ValidationError` listing every problem (no buffers, eval mode, a layer whose statistics did not
    move, a ``num_batches_tracked`` that advanced by another count than the protocol's forward passes)."""
    problems = []
    layers = bn_layers(case.model)
    if case.observed_buffers is None:
        problems.append("the case has no observed_buffers (the running statistics the client returned)")
    if case.bn_mode != "train":
        problems.append(f"the client ran BatchNorm in {case.bn_mode!r} mode: its running statistics do not depend "
                        "on its batch (only bn_mode='train' updates them)")
    if not layers:
        problems.append("the model has no BatchNorm layer that tracks running statistics")
    if problems:
        raise ValidationError("BatchNorm statistics", problems)
    before, after = case.buffers, case.observed_buffers
    steps = forward_passes(case)
    out: dict[str, LayerStatistics] = {}
    for name, mod in layers.items():
        key = f"{name}." if name else ""
        if f"{key}running_mean" not in after:
            continue
        nb = before.get(f"{key}num_batches_tracked")
        n0 = int(nb) if nb is not None else 0
        na = after.get(f"{key}num_batches_tracked")
        if na is not None and nb is not None and int(na) - n0 != steps:
            problems.append(f"{key}num_batches_tracked advanced by {int(na) - n0}, but the {case.protocol} "
                            f"protocol of the case makes {steps} forward pass(es)")
            continue
        decay, w = mixture_weights(step_factors(mod, n0, steps))
        total = sum(w)
        if total <= 0:
            problems.append(f"{name}: momentum {mod.momentum} gives the batch no weight")
            continue
        stats = []
        for stat in ("running_mean", "running_var"):
            old = before[f"{key}{stat}"].to(torch.float64)
            new = after[f"{key}{stat}"].to(device=old.device, dtype=torch.float64)
            stats.append(((new - decay * old) / total).to(case.dtype))
        out[name] = LayerStatistics(name, stats[0], stats[1], tuple(v / total for v in w))
    if problems:
        raise ValidationError("BatchNorm statistics", problems)
    if not out:
        raise ValidationError("BatchNorm statistics", ["observed_buffers hold no running statistics of the "
                                                       f"model's BatchNorm layers {list(layers)[:4]}"])
    return BatchStatistics(out, steps)


class FeatureStatistics:
    """Per-channel input statistics of a model's BatchNorm layers on a candidate batch, differentiable.

    Keeps a private copy of ``model`` (parameters frozen, modes as given) with forward hooks on its BatchNorm
    layers; ``__call__(x)`` runs it and returns {layer: (mean, unbiased var)}. ``chunks``: optional list of
    (slice, weight): then each layer's statistics are ``sum_j weight_j stats(x[slice_j])`` (the FedAvg mixture of
    :func:`candidate_statistics`), one forward pass per distinct slice."""

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        import copy

        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        mods = bn_layers(self.model)
        self.names = list(mods) if names is None else [n for n in names if n in mods]
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
        for n in self.names:
            mods[n].register_forward_pre_hook(self._hook(n))

    def _hook(self, name: str):
        def pre(module, args):
            stats = input_statistics(args[0])
            if self._steps is not None:
                if not self._steps or name in self._steps[-1]:
                    self._steps.append({})
                self._steps[-1][name] = stats
            self._seen[name] = stats
        return pre

    def unrolled(self, case: "Case", x: torch.Tensor, labels: torch.Tensor, weights: tuple[float, ...]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The statistics the returned buffers of a FedAvg client hold for candidate inputs ``x`` and ``labels``,
        EXACTLY: the client's K local steps are replayed (:func:`gradleak.functional.fedavg_update`, differentiable)
        and each step's statistics, on its mini-batch at its parameters theta_{k-1}(x), are mixed with
        ``weights`` (one per step, :attr:`LayerStatistics.weights`)."""
        from .functional import fedavg_update

        o = case.observation
        self._steps = []
        try:
            fedavg_update(self.model, case.parameters, case.buffers, x, labels, case.loss_fn,
                          local_steps=o.local_steps, local_lr=o.local_lr, local_batch_size=o.local_batch_size,
                          create_graph=True)
            steps = self._steps
        finally:
            self._steps = None
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for w, seen in zip(weights, steps):
            for n, (m, v) in seen.items():
                out[n] = (out[n][0] + w * m, out[n][1] + w * v) if n in out else (w * m, w * v)
        return out

    def __call__(self, x: torch.Tensor, chunks: list[tuple[slice, float]] | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if chunks is None:
            self._seen = {}
            self.model(x)
            return dict(self._seen)
        acc: dict[str, list[torch.Tensor]] = {}
        for sl, w in chunks:
            self._seen = {}
            self.model(x[sl])
            for n, (m, v) in self._seen.items():
                if n in acc:
                    acc[n] = [acc[n][0] + w * m, acc[n][1] + w * v]
                else:
                    acc[n] = [w * m, w * v]
        return {n: (a[0], a[1]) for n, a in acc.items()}


def candidate_chunks(case: "Case", stats: BatchStatistics) -> list[tuple[slice, float]] | None:
    """How a candidate batch's statistics combine into what the buffers reveal: None for one forward pass on
    the whole batch (FedSGD, or FedAvg whose every local step uses the whole batch: the mixture of identical
    batches at theta_0), else the FedAvg mini-batches (:func:`gradleak.functional.minibatch_indices` order)
    with the summed mixture weight of the steps that use each."""
    from .functional import minibatch_indices

    o = case.observation
    b = getattr(o, "local_batch_size", case.batch_size)
    if stats.steps == 1 or b >= case.batch_size:
        return None
    weights = next(iter(stats.layers.values())).weights
    acc: dict[tuple[int, int], float] = {}
    for k, w in enumerate(weights):
        sl = minibatch_indices(case.batch_size, b, k)
        acc[(sl.start, sl.stop)] = acc.get((sl.start, sl.stop), 0.0) + w
    return [(slice(a, z), w) for (a, z), w in acc.items()]


def buffers_problems(observed: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with ``observed`` as the buffers a client returned for a model whose buffers are
    ``expected`` (name -> tensor): not a dict of tensors, unknown names, wrong shapes, non-finite statistics,
    a BatchNorm layer with only one of running_mean / running_var. [] when fine (a subset is allowed)."""
    if not isinstance(observed, Mapping):
        return [f"observed_buffers must be a dict of buffer name -> tensor, got {type(observed).__name__}"]
    problems = []
    extra = [k for k in observed if k not in expected]
    if extra:
        problems.append(f"observed_buffers has unknown key(s) {extra[:6]} (expected the model's buffer names, e.g. "
                        f"{list(expected)[:4]})")
    for k, v in observed.items():
        if k not in expected:
            continue
        ref = expected[k]
        if not isinstance(v, torch.Tensor):
            problems.append(f"observed_buffers[{k!r}] must be a tensor, got {type(v).__name__}")
        elif tuple(v.shape) != tuple(ref.shape):
            problems.append(f"observed_buffers[{k!r}] has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        elif v.is_floating_point() and not torch.isfinite(v).all():
            problems.append(f"observed_buffers[{k!r}] has {int((~torch.isfinite(v)).sum())} non-finite value(s)")
        elif k.endswith("num_batches_tracked") and v.is_floating_point() and bool((v != v.round()).any()):
            problems.append(f"observed_buffers[{k!r}] must be a whole number of batches, got {float(v)}")
    for k in observed:
        for a, b in (("running_mean", "running_var"), ("running_var", "running_mean")):
            if k.endswith(a) and k[: -len(a)] + b in expected and k[: -len(a)] + b not in observed:
                problems.append(f"observed_buffers has {k!r} but not {k[: -len(a)] + b!r} (a BatchNorm layer's "
                                "statistics come together)")
    return problems


def side_channel(case: "Case") -> dict | None:
    """What the returned BatchNorm buffers of ``case`` leak, as a JSON-able dict with a one-line ``note``
    (None when the case has no observed buffers of BatchNorm layers). Checked, not assumed: in train mode the
    statistics are recovered (:func:`revealed_statistics`); in eval mode the buffers are compared with the
    server's copy (unchanged: nothing leaks; changed: the client ran train mode, and ``bn_mode`` is wrong)."""
    layers = bn_layers(case.model)
    obs = case.observed_buffers or {}
    keys = [f"{n}.running_mean" if n else "running_mean" for n in layers]
    seen = [k for k in keys if k in obs]
    if not seen:
        return None
    before = case.buffers
    moved = [k for k in seen if not torch.allclose(obs[k].to(torch.float64), before[k].to(torch.float64),
                                                   rtol=1e-6, atol=1e-9)]
    if case.bn_mode == "eval":
        if moved:
            return {"channel": "returned BatchNorm running statistics", "leaks": False, "consistent": False,
                    "note": f"{len(moved)} of {len(seen)} BatchNorm layers came back with changed running statistics, "
                            "so the client ran BatchNorm in train mode; the case says bn_mode='eval' (set "
                            "bn_mode='train' to replay the client and read its batch statistics)"}
        return {"channel": "returned BatchNorm running statistics", "leaks": False, "consistent": True,
                "note": f"running statistics of {len(seen)} BatchNorm layers came back unchanged (eval mode): "
                        "they reveal nothing of the batch"}
    try:
        stats = revealed_statistics(case)
    except ValidationError as e:
        return {"channel": "returned BatchNorm running statistics", "leaks": False, "consistent": False,
                "note": "; ".join(e.problems)}
    d = stats.describe()
    return {**d, "leaks": True, "consistent": True,
            "note": f"returned running statistics of {d['layers']} BatchNorm layers reveal {d['reveals']}"}
