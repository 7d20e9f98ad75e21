"""Secure aggregation over K clients: the server sees only the aggregate of the clients' updates."""

from __future__ import annotations

from typing import Sequence

import torch

from ...case import Case, FedAvg, Truth
from ...errors import ValidationError

__all__ = ["secure_aggregate"]


def secure_aggregate(cases: Sequence[Case], truths: Sequence[Truth] | None = None) -> tuple[Case, Truth | None]:
    """What a server sees under secure aggregation: the sample-weighted mean sum_k (B_k / N) u_k of the K clients'
    updates u_k (N = sum B_k; the clients' batch sizes are public, as in FedAvg weighting), nothing per client.

    For FedSGD this is exactly the gradient of the union batch of N samples, so the result is a Case of batch size
    N on the same (possibly crafted) model. For FedAvg it is the weighted mean of the clients' local deltas, which
    is not one client's K-step run on the union (``meta['aggregate_exact']`` says which). Labels: the union's if
    every client's are known. ``truths`` (kept apart from the cases) are concatenated in the same order.
    Returns ``(case, truth or None)``."""
    cases = list(cases)
    problems = []
    if len(cases) < 1 or not all(isinstance(c, Case) for c in cases):
        raise ValidationError("secure_aggregate", ["expected a non-empty sequence of gradleak.Case"])
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
        raise ValidationError("secure_aggregate", problems)
    N = sum(c.batch_size for c in cases)
    agg = {k: sum(c.observed[k] * (c.batch_size / N) for c in cases) for k in keys}
    labels = None
    if all(c.labels is not None for c in cases):
        labels = torch.cat([c.labels for c in cases])
    exact = not isinstance(first.observation, FedAvg) or len(cases) == 1
    from dataclasses import replace

    case = replace(first, observation=first.observation.with_tensors(agg), batch_size=N, labels=labels,
                   meta={**first.meta, "secure_aggregation": len(cases), "aggregate_exact": exact,
                         "aggregate_note": "sample-weighted mean of the clients' updates" +
                         ("" if exact else "; FedAvg: not the update of one client on the union batch")})
    truth = None
    if truths is not None:
        truth = Truth(torch.cat([t.inputs for t in truths]), torch.cat([t.labels for t in truths]))
    return case, truth
