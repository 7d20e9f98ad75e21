"""Rank analysis: the R-GAP risk metric (Zhu & Blaschko, ICLR 2021, section "rank analysis"; ALGORITHMS.md 2.1).

For every weight layer of a chain (input side first) it builds the layer's stacked system [K(k); W] of
``gradleak.layers`` and reports

- ``rank`` / ``deficiency``: the numerical rank of the block-balanced system and how many of the layer's input
  unknowns it leaves undetermined (singular values below ``rtol * ||A||_F`` count as zero). Exact recovery by
  R-GAP needs deficiency 0 at every layer. This is the number that decides; it needs only the weights, not a
  gradient: the back-propagated maps k are drawn at random (a generic k gives the generic rank; the attack's
  own report gives the rank with the actual k).
- ``ra``: the counting index RA_i^v of the paper, for comparability: RA_i = n_x - n_w - n_z (unknown inputs
  minus weights minus outputs) with virtual constraints V_1 = 0,
  V_{i+1} = V_i + max(max(n_z - n_x, 0) - max(RA_i, 0), 0) (an expanding layer constrains the next layer's
  input) and RA_i^v = RA_i - V_i; the network's RA-i is max_i RA_i^v (> 0: exact recovery impossible).
  This formula is a third-party reading of the paper (its own could not be read). Counting is optimistic:
  every conv layer has C_out^2 exact dependencies between its K and W blocks and stride adds more - CNN6-d's
  conv2 has 312 constraints to spare by count and is 280 short numerically.

The fully connected head is recovered in closed form from its rank-one gradient (rank = its inputs); a hidden
fully connected layer's gradient block alone has full rank (K^T K = |k|^2 I).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .. import layers as L
from ..case import Case
from ..errors import ValidationError

__all__ = ["LayerRank", "RankReport", "rank_analysis", "counting_index"]


@dataclass
class LayerRank:
    """One layer of a :class:`RankReport`.

    unknowns: n_x (the layer's unpadded input size); weights: n_w (gradient constraints); outputs: n_z (weight
    constraints); constraints: n_w + n_z; rank / deficiency: numerical (None if not computed); ra: RA_i^v;
    ra_raw: RA_i; virtual: V_i; condition: sigma_max / sigma_min of the balanced system (or an estimate);
    method: how the rank was obtained ('svd', 'cholesky', 'closed-form', 'head', 'skipped');
    security_deficiency: the layer-wise system's d_i (filled by the security analysis; None otherwise).
    """

    index: int
    name: str
    label: str
    kind: str
    in_shape: list[int]
    out_shape: list[int]
    activation: str
    unknowns: int
    weights: int
    outputs: int
    constraints: int
    rank: int | None
    deficiency: int | None
    ra: int
    ra_raw: int
    virtual: int
    condition: float | None = None
    method: str = ""
    dependencies: int = 0
    security_deficiency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def deficient(self) -> bool:
        return bool(self.deficiency)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deficient"] = self.deficient
        d["determined"] = None if self.deficiency is None else self.deficiency == 0  # LayerReport's name
        if d["condition"] is not None and not math.isfinite(d["condition"]):
            d["condition"] = None
        return d


@dataclass
class RankReport:
    """The rank analysis of one architecture (and weights) for one input shape.

    model: its name; input_shape: (C, H, W) or (D,); layers: :class:`LayerRank` per weight layer, input side
    first; ra_index: the network's counting index RA-i (max_i RA_i^v); deficient_layers: labels of layers with
    deficiency > 0; exact_recovery_possible: True / False (None if some rank could not be computed);
    verdict: "exact recovery possible" or "not possible: ..." (or "undetermined: ..."); rtol / method:
    the rank tolerance and method; problems: why R-GAP does not apply at all (unsupported layers,
    non-invertible activations), each naming the module; notes: caveats; source: 'model' or 'case';
    security_index: the layer-wise security metric S (filled by that analysis, None otherwise);
    extensions: results of further analyses by name (see :func:`gradleak.risk.register_analysis`).
    """

    model: str
    input_shape: list[int]
    layers: list[LayerRank]
    ra_index: int | None
    deficient_layers: list[str]
    exact_recovery_possible: bool | None
    verdict: str
    rtol: float
    method: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = "model"
    weights: str = "model"
    seconds: float = 0.0
    security_index: int | None = None
    extensions: dict[str, Any] = field(default_factory=dict)

    def layer(self, name_or_label: str) -> LayerRank:
        """The layer with this module path or label ('conv2')."""
        for l in self.layers:
            if name_or_label in (l.name, l.label):
                return l
        raise KeyError(f"no layer {name_or_label!r}; layers: {[l.label for l in self.layers]}")

    def to_dict(self) -> dict:
        """One JSON-able object (the CLI's ``--json``)."""
        return {"model": self.model, "input_shape": list(self.input_shape),
                "exact_recovery_possible": self.exact_recovery_possible, "verdict": self.verdict,
                "ra_index": self.ra_index, "deficient_layers": list(self.deficient_layers),
                "security_index": self.security_index,
                "layers": [l.to_dict() for l in self.layers],
                "tolerance": {"rtol": self.rtol, "rule": "singular values of the block-balanced stacked system "
                              "[K/|K|_F; W/|W|_F] below rtol * |A|_F count as zero", "method": self.method},
                "problems": list(self.problems), "notes": list(self.notes), "source": self.source,
                "weights": self.weights, "seconds": self.seconds, "extensions": dict(self.extensions)}

    def summary(self) -> str:
        """One line: model, shape, verdict, RA-i (and the security index when present)."""
        shape = "x".join(str(s) for s in self.input_shape)
        parts = [f"{self.model} ({shape}): {self.verdict}"]
        if self.ra_index is not None:
            parts.append(f"RA-i {self.ra_index:+d}")
        if self.security_index is not None:
            parts.append(f"security index {self.security_index}")
        return "; ".join(parts)

    def table(self) -> str:
        """A plain-text table, one row per layer, then the problems and notes (print ``summary()`` after it)."""
        sec = any(l.security_deficiency is not None for l in self.layers)
        head = ["layer", "module", "kind", "input", "output", "act", "unknowns", "constraints", "rank", "deficiency",
                "RA_i", "RA_i^v", "cond", "method"] + (["sec d_i"] if sec else [])
        rows = []
        for l in self.layers:
            rows.append([l.label, l.name, l.kind, "x".join(map(str, l.in_shape)), "x".join(map(str, l.out_shape)),
                         l.activation, str(l.unknowns), str(l.constraints), "-" if l.rank is None else str(l.rank),
                         "-" if l.deficiency is None else str(l.deficiency), f"{l.ra_raw:+d}", f"{l.ra:+d}",
                         "-" if not l.condition or not math.isfinite(l.condition) else f"{l.condition:.3g}",
                         l.method] + ([("-" if l.security_deficiency is None else str(l.security_deficiency))]
                                      if sec else []))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.rjust(w) if i >= 6 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        for p in self.problems:
            lines.append(f"problem: {p}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def counting_index(sizes: Sequence[tuple[int, int, int]]) -> tuple[list[int], list[int], list[int]]:
    """RA_i, V_i and RA_i^v for layers given as (n_x, n_w, n_z), input side first (see the module docstring)."""
    ra, virt, rav = [], [], []
    v = 0
    for n_x, n_w, n_z in sizes:
        r = n_x - n_w - n_z
        ra.append(r)
        virt.append(v)
        rav.append(r - v)
        v = v + max(max(n_z - n_x, 0) - max(r, 0), 0)
    return ra, virt, rav


def _resolve(target: Any, input_shape) -> tuple[nn.Module, tuple[int, ...], str, str, Case | None]:
    from ..models import build

    if isinstance(target, Case):
        shape = tuple(target.spec.shape) if input_shape is None else tuple(input_shape)
        return target.model, shape, getattr(target.model, "zoo_name", type(target.model).__name__), "case", target
    if isinstance(target, str):
        shape = tuple(input_shape) if input_shape is not None else (3, 32, 32)
        model = build(target, input_shape=shape)  # the systems are built in float64 from these weights
        return model, shape, getattr(model, "zoo_name", target), "model", None
    if isinstance(target, nn.Module):
        shape = input_shape if input_shape is not None else getattr(target, "input_shape", None)
        if shape is None:
            raise ValidationError("rank_analysis", [f"give input_shape for a {type(target).__name__} (the model does "
                                                    "not record one), e.g. input_shape=(3, 32, 32)"])
        return target, tuple(int(s) for s in shape), getattr(target, "zoo_name", type(target).__name__), "model", None
    raise ValidationError("rank_analysis", [f"expected a model, a zoo model name or a Case, got {type(target).__name__}"])


def rank_analysis(
    target: nn.Module | Case | str,
    input_shape: Sequence[int] | None = None,
    *,
    rtol: float = L.DEFAULT_RTOL,
    method: str = "auto",
    svd_max: int = 2048,
    max_unknowns: int = 12000,
    random_weights: bool = False,
    seed: int = 0,
) -> RankReport:
    """Rank analysis of the R-GAP systems of a model (and input shape) or of a :class:`~gradleak.Case`.

    target: an ``nn.Module`` (input_shape needed unless the model records one, as zoo models do), a zoo model
    name (built with seed 0), or a Case (its model, weights and data shape). No gradient is needed.
    method: 'svd' (all singular values: rank, condition), 'cholesky' (pivoted Cholesky: rank and a condition
    estimate, ~4x faster) or 'auto' (svd up to ``svd_max``, cholesky above). The smaller Gram matrix is used
    (A^T A, or A A^T when a layer has fewer constraints than unknowns); layers where even that exceeds
    ``max_unknowns`` rows are skipped (rank None, the verdict says 'undetermined').
    random_weights: redraw the weights N(0, 1/fan_in) instead of using the model's (the generic rank of the
    architecture). The back-propagated maps k are always drawn at random (N(0, 1), ``seed``).
    Returns a :class:`RankReport`.
    """
    import time

    if method not in ("auto", "svd", "cholesky"):
        raise ValidationError("rank_analysis", [f"method must be 'auto', 'svd' or 'cholesky', got {method!r}"])
    if not (0 < rtol < 1):
        raise ValidationError("rank_analysis", [f"rtol must be in (0, 1), got {rtol}"])
    t0 = time.perf_counter()
    model, shape, name, source, case = _resolve(target, input_shape)
    chain = L.walk(model, shape)
    problems = chain.problems + chain.activation_problems()
    notes: list[str] = []
    gen = torch.Generator().manual_seed(int(seed))
    rows: list[LayerRank] = []
    structural = bool(chain.issues)
    sizes = [(l.n_in, l.n_weights, l.n_out) for l in chain.layers]
    ra, virt, rav = counting_index(sizes)
    undetermined = []
    for i, layer in enumerate(chain.layers):
        rank = deficiency = cond = None
        how = "skipped"
        is_head = i == len(chain.layers) - 1 and layer.can_be_head
        if structural:
            how = "skipped"
        elif is_head:
            rank, deficiency, how = layer.n_in, 0, "head"
        elif layer.dense:  # K^T K = ||k||^2 I: full rank for any non-zero k (the drawn k is)
            rank, deficiency, how, cond = layer.n_in, 0, "closed-form", 1.0
        elif min(layer.n_in, layer.n_weights + layer.n_out) > max_unknowns:
            undetermined.append(layer.label)
        else:
            weight = layer.module.weight.detach().to(torch.float64).cpu()
            if random_weights:
                fan_in = max(1, layer.n_weights // layer.weight_shape[0])
                weight = torch.randn(weight.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
            k = torch.randn(layer.out_shape, generator=gen, dtype=torch.float64)
            system = L.LayerSystem(layer, weight, k)
            size = min(layer.n_in, layer.n_weights + layer.n_out)  # the smaller Gram matrix is used
            m = method if method != "auto" else ("svd" if size <= svd_max else "cholesky")
            info = system.rank(rtol=rtol, method=m)
            rank, deficiency, cond, how = info.rank, info.deficiency, info.condition, info.method
        rows.append(LayerRank(index=layer.index, name=layer.name, label=layer.label, kind=layer.kind,
                              in_shape=list(layer.in_shape), out_shape=list(layer.out_shape),
                              activation=layer.activation.name, unknowns=layer.n_in, weights=layer.n_weights,
                              outputs=layer.n_out, constraints=layer.n_weights + layer.n_out, rank=rank,
                              deficiency=deficiency, ra=rav[i], ra_raw=ra[i], virtual=virt[i], condition=cond,
                              method=how, dependencies=layer.dependencies()))
    deficient = [r.label for r in rows if r.deficiency]
    if structural:
        possible = False
        verdict = "not possible: R-GAP does not apply (" + "; ".join(chain.problems[:3]) + \
                  (f"; and {len(chain.problems) - 3} more" if len(chain.problems) > 3 else "") + ")"
        rows_ra = None
    else:
        rows_ra = max(rav) if rav else None
        if deficient:
            possible = False
            verdict = "not possible: " + "; ".join(f"layer {r.label} ('{r.name}') is short by {r.deficiency}"
                                                    for r in rows if r.deficiency)
        elif undetermined:
            possible = None
            verdict = (f"undetermined: layer(s) {', '.join(undetermined)} need a Gram matrix larger than "
                       f"{max_unknowns} (raise max_unknowns to compute their rank)")
        else:
            possible = True
            verdict = "exact recovery possible"
        act = chain.activation_problems()
        if act:
            possible = False
            verdict = ("not possible: " + "; ".join(act)) if not deficient else verdict + "; " + "; ".join(act)
            notes.append("the ranks assume a dense k; a ReLU-type activation zeroes k where it is inactive, which "
                         "can only lower them")
    if rows_ra is not None and rows_ra > 0 and possible:
        notes.append(f"the counting index RA-i = {rows_ra} > 0 predicts failure while the numerical rank is full: "
                     "the numerical rank decides")
    if rows_ra is not None and rows_ra <= 0 and deficient:
        notes.append(f"the counting index RA-i = {rows_ra} <= 0 misses the deficiency: counting ignores the "
                     "C_out^2 exact dependencies between a conv layer's K and W blocks and those from stride")
    notes.append("RA-i follows a third-party reading of the paper's counting rule (the paper's own formula could "
                 "not be read); the numerical rank is the truth")
    notes.append("k maps drawn at random (a generic k); the rgap attack reports the rank with the actual k")
    return RankReport(model=name, input_shape=list(shape), layers=rows, ra_index=rows_ra,
                      deficient_layers=deficient, exact_recovery_possible=possible, verdict=verdict, rtol=rtol,
                      method=method, problems=problems, notes=notes, source=source,
                      weights="random" if random_weights else source, seconds=time.perf_counter() - t0)
