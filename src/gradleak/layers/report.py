"""One layer's report from a closed-form attack (:class:`LayerReport`): the same field names for the same facts
whichever attack solved the layer (R-GAP, layer-wise), with what only one attack measures in a typed
:class:`LayerExtra` subclass that the attack defines (``report.extra``).

``Reconstruction.info['layers']`` is a list of these, input side first; ``to_dict()`` is what metrics.json holds
(docs/architecture.md, "Per-layer reports", lists the keys and the names they replaced)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["LayerReport", "LayerExtra", "finite_or_none"]


def finite_or_none(v: float | None) -> float | None:
    """``v`` as a float, None when it is None or not finite (a condition estimate that overflowed, ...)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class LayerExtra:
    """What one attack measures on a layer beyond the shared facts. Subclasses (one per attack) set ``attack``
    and declare their fields; ``to_dict()`` gives them with the attack's name."""

    attack: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, **asdict(self)}


@dataclass(kw_only=True)
class LayerReport:
    """One weight layer as a closed-form attack solved it.

    index / name / label / kind / activation: the layer (``gradleak.layers.Layer``: module path, 'conv2', its
    rule's kind, the activation after it; None for the head); head: whether this is the output layer the
    recursion starts from; unknowns: the layer's input size; constraints: rows of its stacked system (gradient
    + weight); rank: numerical rank of that system (rtol: the tolerance used; None where no factorisation ran,
    e.g. the head, whose input follows from dW = k x^T); method: how the layer's input was obtained
    ('cholesky', 'rows-eigh', 'lsqr', 'head', 'gradient-only (mixture)', ...).
    residual: ||A x - b|| / ||b|| of the block-balanced system at the layer's final input; residual_gradient /
    residual_weight: the same for the gradient block K(k) x = dW and the weight block W x = z - b (None when the
    layer has no such block, e.g. the head's weight block); residual_bias: consistency of k with the observed
    bias gradient (None without a bias); condition: sigma_max / sigma_min estimate (None if unknown);
    seconds: time spent on this layer; notes: caveats about this layer; extra: the attack's own measurements.

    Derived: ``deficiency = unknowns - rank`` (>= 0), ``determined`` (deficiency 0), ``security_deficiency``
    (Chen & Campbell's d_i = rank - unknowns <= 0; :func:`gradleak.layers.security_index`).
    """

    index: int
    name: str
    label: str
    kind: str
    activation: str | None = None
    head: bool = False
    unknowns: int
    constraints: int
    rank: int
    method: str
    residual: float | None = None
    residual_gradient: float | None = None
    residual_weight: float | None = None
    residual_bias: float | None = None
    condition: float | None = None
    rtol: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: LayerExtra | None = None

    @property
    def deficiency(self) -> int:
        return self.unknowns - self.rank

    @property
    def determined(self) -> bool:
        return self.rank >= self.unknowns

    @property
    def security_deficiency(self) -> int:
        return self.rank - self.unknowns

    @classmethod
    def of(cls, layer, solution=None, **fields_: Any) -> "LayerReport":
        """The report of ``layer`` (a :class:`~gradleak.layers.Layer`), with the rank, sizes, residuals, condition,
        method and tolerance of its :class:`~gradleak.layers.Solution` when given; ``fields_`` set or override
        the rest."""
        d: dict[str, Any] = {"index": layer.index, "name": layer.name, "label": layer.label, "kind": layer.kind,
                             "activation": None if fields_.get("head") else layer.activation.name}
        if solution is not None:
            d.update(unknowns=solution.unknowns, constraints=solution.constraints, rank=solution.rank,
                     method=solution.method, residual=solution.residual,
                     residual_gradient=solution.residual_gradient, residual_weight=solution.residual_weight,
                     condition=finite_or_none(solution.condition), rtol=solution.rtol)
        d.update(fields_)
        return cls(**d)

    def residuals(self) -> list[float]:
        """The residuals this layer has (gradient, weight, bias), for a claim over all of them."""
        return [v for v in (self.residual_gradient, self.residual_weight, self.residual_bias) if v is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the fields, the derived ``deficiency`` / ``determined`` / ``security_deficiency``,
        non-finite floats as None, ``extra`` as its own dict (with the attack's name) or None."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":
                v = None if v is None else v.to_dict()
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            elif isinstance(v, list):
                v = list(v)
            d[f.name] = v
            if f.name == "rank":
                d.update(deficiency=self.deficiency, determined=self.determined,
                         security_deficiency=self.security_deficiency)
        return d
