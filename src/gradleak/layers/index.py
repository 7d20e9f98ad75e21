"""The security index of Chen & Campbell 2021 from per-layer rank deficiencies: a pure function of the ranks
the per-layer systems have, shared by the layer-wise attack and :mod:`gradleak.risk.security`."""

from __future__ import annotations

from typing import Sequence

from ..errors import ValidationError


def security_weights(num_layers: int) -> list[float]:
    """The weights (L-1-i)/(L-1) of the hidden layers i = 0 .. L-2 of a chain of ``num_layers`` = L weight
    layers (1 at the input side, falling linearly). [] when L < 2."""
    Lw = int(num_layers)
    if Lw < 2:
        return []
    return [(Lw - 1 - i) / (Lw - 1) for i in range(Lw - 1)]


def security_index(deficiencies: Sequence[int], num_layers: int | None = None) -> int:
    """S = sum_i round(d_i * (L-1-i) / (L-1)) for per-layer d_i <= 0 of the hidden layers, input side first.

    deficiencies: d_0 .. d_{L-2} (the final FC is not scored); num_layers: L (default: len(deficiencies) + 1).
    Python's round (half to even) is used, so the index is an int."""
    d = [int(v) for v in deficiencies]
    Lw = len(d) + 1 if num_layers is None else int(num_layers)
    if len(d) != max(Lw - 1, 0):
        raise ValidationError("security_index", [f"expected {max(Lw - 1, 0)} deficiencies for {Lw} layers "
                                                 f"(every layer but the final one), got {len(d)}"])
    if any(v > 0 for v in d):
        raise ValidationError("security_index", [f"deficiencies d_i = rank - unknowns must be <= 0, got {d}"])
    return int(sum(round(di * w) for di, w in zip(d, security_weights(Lw))))
