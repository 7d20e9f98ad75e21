"""Secure aggregation: the server learns only the sum (and so the mean) of K clients' updates.

The protocol simulated is pairwise additive masking (Bonawitz et al., CCS 2017, without the dropout
recovery): every update is encoded in fixed point (``fraction_bits`` bits after the point) as integers modulo
M = 2^62; every pair of clients (i < j) shares a random mask m_ij (in the real protocol from a key agreement;
here drawn from the generator); client i sends q_i + sum_{j>i} m_ij - sum_{j<i} m_ji (mod M). Each message
alone is uniformly distributed; the masks cancel in the sum, which the server decodes. The decoded mean
differs from the float mean only by the fixed-point rounding, at most 2^-(fraction_bits+1) per entry.

An attack then faces the mean update of K*B images (``simulate(..., other_clients=...)``), i.e. one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch

from ..errors import NumericalError, ValidationError
from .base import Defense, defenses, option

MODULUS = 2 ** 62


@dataclass
class Aggregate:
    """What secure aggregation produced: ``mean`` and ``total`` (decoded, float), ``messages`` (what each client
    sent: masked fixed-point integers mod 2^62, one dict per client) and the fixed-point resolution."""

    mean: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    messages: list[dict[str, torch.Tensor]]
    fraction_bits: int


def secure_aggregate(updates: Sequence[Mapping[str, torch.Tensor]], *, generator: torch.Generator | None = None,
                     fraction_bits: int = 32) -> Aggregate:
    """Run pairwise-masked secure aggregation over ``updates`` (one dict per client, same keys and shapes)."""
    k = len(updates)
    if k < 2:
        raise ValidationError("secure aggregation", [f"needs at least 2 clients, got {k}"])
    keys = list(updates[0])
    bad = [i for i, u in enumerate(updates) if list(u) != keys or any(u[n].shape != updates[0][n].shape for n in keys)]
    if bad:
        raise ValidationError("secure aggregation", [f"client(s) {bad} send other tensors than client 0"])
    scale = float(2 ** fraction_bits)
    limit = MODULUS / (4 * k * scale)
    biggest = max(float(u[n].detach().abs().max()) for u in updates for n in keys)
    if not biggest < limit:
        raise NumericalError(f"secure aggregation: an update entry {biggest:.3g} does not fit the fixed-point "
                             f"range {limit:.3g} of {fraction_bits} fraction bits over {k} clients")
    seeds = torch.randint(0, 2 ** 62, (k, k), generator=generator, dtype=torch.int64)
    messages = []
    for i, u in enumerate(updates):
        msg = {}
        for t, n in enumerate(keys):
            v = u[n].detach().to("cpu", torch.float64)
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
        mean[n] = (s.to(torch.float64) / scale / k).to(device=ref.device, dtype=ref.dtype)
    return Aggregate(mean, total, messages, fraction_bits)


@defenses.register("secure-aggregation", aliases=("secagg",))
@dataclass
class SecureAggregation(Defense):
    """Secure aggregation: the server sees only the mean of `clients` clients' updates (pairwise masking).

    A protocol over several clients, not a transform of one update: ``simulate`` needs the other clients'
    batches (``other_clients=``); in ``gl.defenses.utility`` the clients are aggregated in groups of
    ``clients``. List it last: ``compose(dp_sgd, secure_aggregation)`` defends each client, then aggregates."""

    clients: int = option(2, int, low=2, doc="K: clients whose updates are summed")
    fraction_bits: int = option(32, int, low=8, high=40, doc="fixed-point precision of the encoding")
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
                          "max_rounding": 2.0 ** -(self.fraction_bits + 1)}
