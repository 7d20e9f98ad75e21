"""Secure aggregation: the server learns only the sum (and so the mean) of K clients' updates.

This module is the one home of secure aggregation: :func:`secure_aggregate` (update dicts -> what the server
decodes), :func:`aggregate_cases` (K clients' Cases -> the one Case the server sees, e.g. for the malicious-server
attacks, which craft the model all clients train) and the ``secure-aggregation`` defense (``simulate`` and
``utility``).

The protocol simulated is pairwise additive masking (Bonawitz et al., CCS 2017, without the dropout
recovery): every update is encoded in fixed point (``fraction_bits`` bits after the point) as integers modulo
M = 2^62; every pair of clients (i < j) shares a random mask m_ij (in the real protocol from a key agreement;
here drawn from the generator); client i sends q_i + sum_{j>i} m_ij - sum_{j<i} m_ji (mod M). Each message
alone is uniformly distributed; the masks cancel in the sum, which the server decodes. The decoded mean
differs from the float mean only by the fixed-point rounding, at most 2^-(fraction_bits+1) per entry.
Weighted means (FedAvg's sample-count weighting; the counts are public): client i encodes w_i u_i, the server
divides the decoded sum by sum w_i (rounding at most K 2^-(fraction_bits+1) / sum w_i per entry).

An attack then faces the mean update of K*B images (``simulate(..., other_clients=...)``), i.e. one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping, Sequence

import torch

from ..case import Case, FedAvg, Truth
from ..errors import NumericalError, ValidationError
from .base import Defense, defenses, option

MODULUS = 2 ** 62


@dataclass
class Aggregate:
    """What secure aggregation produced: ``mean`` and ``total`` (decoded, float: sum_i w_i u_i and its division
    by sum_i w_i), ``messages`` (what each client sent: masked fixed-point integers mod 2^62, one dict per
    client), the fixed-point resolution, the weights and ``max_rounding`` (the bound on |mean - float mean|)."""

    mean: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    messages: list[dict[str, torch.Tensor]]
    fraction_bits: int
    weights: list[float]
    max_rounding: float


def secure_aggregate(updates: Sequence[Mapping[str, torch.Tensor]], *, generator: torch.Generator | None = None,
                     fraction_bits: int = 32, weights: Sequence[float] | None = None) -> Aggregate:
    """Run pairwise-masked secure aggregation over ``updates`` (one dict per client, same keys and shapes).
    ``weights`` (public, >= 1 each, e.g. the clients' sample counts; default all 1): the mean is
    sum w_i u_i / sum w_i."""
    k = len(updates)
    if k < 2:
        raise ValidationError("secure aggregation", [f"needs at least 2 clients, got {k}"])
    w = [1.0] * k if weights is None else [float(v) for v in weights]
    if len(w) != k or not all(v >= 1 and v < float("inf") for v in w):
        raise ValidationError("secure aggregation", [f"weights must be {k} finite numbers >= 1, got {weights!r}"])
    if not 8 <= int(fraction_bits) <= 56:
        raise ValidationError("secure aggregation", [f"fraction_bits must be in [8, 56], got {fraction_bits}"])
    keys = list(updates[0])
    bad = [i for i, u in enumerate(updates) if list(u) != keys or any(u[n].shape != updates[0][n].shape for n in keys)]
    if bad:
        raise ValidationError("secure aggregation", [f"client(s) {bad} send other tensors than client 0"])
    scale = float(2 ** fraction_bits)
    limit = MODULUS / (4 * k * scale)
    biggest = max(wi * float(u[n].detach().abs().max()) for wi, u in zip(w, updates) for n in keys)
    if not biggest < limit:
        raise NumericalError(f"secure aggregation: an update entry {biggest:.3g} does not fit the fixed-point "
                             f"range {limit:.3g} of {fraction_bits} fraction bits over {k} clients")
    seeds = torch.randint(0, 2 ** 62, (k, k), generator=generator, dtype=torch.int64)
    messages = []
    for i, u in enumerate(updates):
        msg = {}
        for t, n in enumerate(keys):
            v = u[n].detach().to("cpu", torch.float64) * w[i]
            q = torch.round(v * scale).to(torch.int64) % MODULUS
            for j in range(k):
                if j == i:
                    continue
                a, b = min(i, j), max(i, j)
                g = torch.Generator().manual_seed(int(seeds[a, b]) + t)  # one mask stream per pair and tensor
                m = torch.randint(0, MODULUS, v.shape, generator=g, dtype=torch.int64)
                q = (q + m) % MODULUS if i == a else (q - m) % MODULUS
            msg[n] = q
        messages.append(msg)
    total, mean = {}, {}
    for n in keys:
        s = torch.zeros_like(messages[0][n])
        for msg in messages:
            s = (s + msg[n]) % MODULUS
        s = torch.where(s >= MODULUS // 2, s - MODULUS, s)  # centred: negative sums
        ref = updates[0][n]
        total[n] = (s.to(torch.float64) / scale).to(device=ref.device, dtype=ref.dtype)
        mean[n] = (s.to(torch.float64) / scale / sum(w)).to(device=ref.device, dtype=ref.dtype)
    return Aggregate(mean, total, messages, fraction_bits, w, k * 2.0 ** -(fraction_bits + 1) / sum(w))


def aggregate_cases(cases: Sequence[Case], truths: Sequence[Truth] | None = None, *,
                    generator: torch.Generator | None = None, fraction_bits: int = 32) -> tuple[Case, Truth | None]:
    """What a server sees when K clients of one round send their updates through secure aggregation: the
    sample-weighted mean sum_k (B_k / N) u_k (N = sum B_k; batch sizes are public, as in FedAvg weighting),
    decoded from the masked messages (:func:`secure_aggregate`), nothing per client.

    For FedSGD this is the gradient of the union batch of N samples (up to the fixed-point rounding), so the
    result is a Case of batch size N on the same (possibly crafted) model. For FedAvg it is the weighted mean of
    the clients' local deltas, which is not one client's run on the union (``meta['secure_aggregation']['exact']``
    says which). Labels: the union's if every client's are known. ``truths`` (kept apart from the cases) are
    concatenated in the same order. Returns ``(case, truth or None)``."""
    cases = list(cases)
    problems = []
    if len(cases) < 2 or not all(isinstance(c, Case) for c in cases):
        raise ValidationError("secure aggregation", ["expected a sequence of at least 2 gradleak.Case"])
    first = cases[0]
    keys = list(first.observed)
    ref = first.parameters
    for i, c in enumerate(cases[1:], 1):
        if type(c.observation) is not type(first.observation) or c.observation.describe() != first.observation.describe():
            problems.append(f"client {i} used protocol {c.observation.describe()}, client 0 "
                            f"{first.observation.describe()}: clients of one round share the protocol")
        if list(c.observed) != keys:
            problems.append(f"client {i}'s update has other parameters than client 0's")
            continue
        if any(not torch.equal(c.parameters[k], ref[k]) for k in ref):
            problems.append(f"client {i} trained another model than client 0: one round sends one model")
        if c.spec != first.spec or c.loss != first.loss or c.bn_mode != first.bn_mode:
            problems.append(f"client {i} differs from client 0 in data spec, loss or BatchNorm mode")
    if truths is not None and len(truths) != len(cases):
        problems.append(f"{len(truths)} truths for {len(cases)} clients")
    if problems:
        raise ValidationError("secure aggregation", problems)
    agg = secure_aggregate([c.observed for c in cases], generator=generator, fraction_bits=fraction_bits,
                           weights=[c.batch_size for c in cases])
    labels = torch.cat([c.labels for c in cases]) if all(c.labels is not None for c in cases) else None
    exact = not isinstance(first.observation, FedAvg)
    facts = {"clients": len(cases), "fraction_bits": fraction_bits, "max_rounding": agg.max_rounding,
             "weights": "batch sizes", "exact": exact, "target_rows": [0, int(first.batch_size)],
             "note": "the observation is the sample-weighted mean of the clients' updates" +
                     ("" if exact else "; FedAvg: not the update of one client on the union batch")}
    case = replace(first, observation=first.observation.with_tensors(agg.mean), batch_size=sum(int(c.batch_size) for c in cases),
                   labels=labels, meta={**first.meta, "secure_aggregation": facts})
    truth = None
    if truths is not None:
        truth = Truth(torch.cat([t.inputs for t in truths]), torch.cat([t.labels for t in truths]))
    return case, truth


@defenses.register("secure-aggregation", aliases=("secagg",))
@dataclass
class SecureAggregation(Defense):
    """Secure aggregation: the server sees only the mean of `clients` clients' updates (pairwise masking).

    A protocol over several clients, not a transform of one update: ``simulate`` needs the other clients'
    batches (``other_clients=``); in ``gl.defenses.utility`` the clients are aggregated in groups of
    ``clients``. List it last: ``compose(dp_sgd, secure_aggregation)`` defends each client, then aggregates."""

    clients: int = option(2, int, low=2, doc="K: clients whose updates are summed")
    fraction_bits: int = option(32, int, low=8, high=56, doc="fixed-point precision of the encoding")
    name: ClassVar[str] = "secure-aggregation"
    aggregates: ClassVar[bool] = True

    def __call__(self, update, generator=None):
        raise ValidationError("secure-aggregation defense", [
            f"aggregates {self.clients} clients' updates: give simulate other_clients=(x, y) with the other "
            f"{self.clients - 1} clients' batches"])

    def client_update(self, client, generator=None):
        return self(None, generator)

    def aggregate(self, updates, generator=None) -> tuple[dict[str, torch.Tensor], dict]:
        """(mean update the server decodes, facts for the case meta)."""
        if len(updates) != self.clients:
            raise ValidationError("secure-aggregation defense", [f"expected {self.clients} updates, got {len(updates)}"])
        agg = secure_aggregate(updates, generator=generator, fraction_bits=self.fraction_bits)
        return agg.mean, {"clients": self.clients, "fraction_bits": self.fraction_bits,
                          "max_rounding": agg.max_rounding, "weights": "equal (same batch size)", "exact": True}
