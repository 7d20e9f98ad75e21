"""The layer-wise security metric of an architecture (Chen, Campbell 2021, arXiv 2111.10178; ALGORITHMS.md 3).

The layer-wise attack (:mod:`gradleak.attacks.layerwise`) solves, for every layer i from the output back, the
stacked linear system U_i x = V_i with U_i = [W_i; D_i] (weight and gradient constraints; the same stacked system
as R-GAP's [K; W], built by :mod:`gradleak.layers`). A layer whose system is rank-deficient leaves degrees of
freedom of its input undetermined; the closer to the input such a layer sits, the less of the image leaks.

    d_i = rank(U_i) - n_cols(U_i)  <= 0            for each hidden layer i = 0 (input side) ... L-2
    S   = sum_i round(d_i * (L-1-i) / (L-1))       (L weight layers including the final FC, which is not scored)

S = 0: every layer has full rank, the model leaks most; more negative: more unresolvable degrees of freedom near
the input, more secure. Worked values: CNN6 0, CNN6-d -233 (its conv2 is 280 short: round(-280 * 5/6)); the
layer-wise paper's test CNNs cnn2-c2 -1470, cnn3-c1 round(-4533/2) = -2266 (Python rounds half to even),
cnn4-c1 -2772, cnn4-c2 -6211. This definition comes from the authors' later code, where it is called the COPA index
(COPA: combined optimisation attack); the paper itself describes the metric in words. Hidden fully connected
layers are scored like conv layers (their d_i is 0 whenever the back-propagated map is non-zero).

Ranks are numerical ranks of the block-balanced system (see :func:`gradleak.layers.numerical_rank`), computed
from the smaller side: the Gram matrix A^T A when the system has at least as many rows as unknowns, else
A A^T (same non-zero singular values; a layer with 12,544 unknowns and 3,264 rows costs a 3,264-square
eigenproblem). A full-rank layer is certified by one Cholesky factorisation of A^T A - (100 tol)^2 I (success
proves every singular value exceeds 100x the tolerance); only layers that fail it pay for the rank-revealing
factorisation.

``security_analysis(model, input_shape)`` -> :class:`SecurityReport`; ``security_from_case(case)``; and, through
:func:`gradleak.risk.analyse`, the fields ``security_index`` and ``layers[i].security_deficiency`` of the
rank report (this module registers the analysis "security").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .. import layers as L
from ..case import Case
from ..errors import ValidationError

__all__ = ["SecurityLayer", "SecurityReport", "security_analysis", "security_from_case", "security_index",
           "security_weights", "system_rank", "SOURCE_NOTE"]

SOURCE_NOTE = ("security index S = sum_i round(d_i (L-1-i)/(L-1)), d_i = rank(U_i) - n_cols(U_i): the definition of "
               "the layer-wise authors' later code (the 'COPA index'; Chen & Campbell 2021 describe the metric in "
               "words); 0 = every layer full rank (leaks most), more negative = more secure")

CERTIFICATE_MARGIN = L.CERTIFICATE_MARGIN


# =====================================================================================================
# The formula
# =====================================================================================================

# security_weights and security_index live with the per-layer linear algebra (layers/index.py), where the
# attacks read them too; they are re-exported here.
security_weights = L.security_weights
security_index = L.security_index


# =====================================================================================================
# Rank of one stacked system, from its smaller side
# =====================================================================================================

@dataclass
class SystemRank:
    """rank / unknowns / constraints of one stacked system; side: 'columns' (A^T A) or 'rows' (A A^T);
    method: 'certificate' (Cholesky proof of full rank), 'cholesky' or 'svd'; sigma_max / sigma_min / condition
    when the method gives them."""

    rank: int
    unknowns: int
    constraints: int
    side: str
    method: str
    rtol: float
    condition: float | None = None

    @property
    def deficiency(self) -> int:
        """d = rank - unknowns (<= 0), the security metric's sign convention."""
        return self.rank - self.unknowns


def system_rank(system: L.LayerSystem, *, rtol: float = L.DEFAULT_RTOL, method: str = "auto") -> SystemRank:
    """Numerical rank of a :class:`gradleak.layers.LayerSystem` (:meth:`~gradleak.layers.LayerSystem.rank`: the
    one tolerance rule of :mod:`gradleak.layers.linalg`, from the smaller side).

    method: 'auto' (full-rank certificate first, then pivoted Cholesky), 'cholesky', or 'svd' (all singular values,
    gives the condition number). Does not modify the system's cached Gram matrix."""
    if method not in ("auto", "cholesky", "svd"):
        raise ValidationError("system_rank", [f"method must be 'auto', 'cholesky' or 'svd', got {method!r}"])
    info = system.rank(rtol=rtol, method="certificate" if method == "auto" else method)
    return SystemRank(info.rank, system.unknowns, system.constraints, info.side, info.method, rtol,
                      info.condition if info.method in ("svd", "cholesky") else None)


# =====================================================================================================
# The report
# =====================================================================================================

@dataclass
class SecurityLayer:
    """One hidden layer: d_i = rank - unknowns (<= 0), weight (L-1-i)/(L-1), contribution round(d_i * weight)."""

    index: int
    name: str
    label: str
    kind: str
    unknowns: int
    constraints: int
    rank: int | None
    deficiency: int | None
    weight: float
    contribution: int | None
    side: str = ""
    method: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SecurityReport:
    """The security metric of one architecture (and weights) for one input shape.

    layers: :class:`SecurityLayer` per hidden layer (input side first; the final FC is not scored);
    num_layers: L; index: S (None if some rank could not be computed or the model is not a chain);
    problems: why the metric does not apply (unsupported layers ...); notes: caveats."""

    model: str
    input_shape: list[int]
    layers: list[SecurityLayer]
    num_layers: int
    index: int | None
    rtol: float
    maps: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def deficiencies(self) -> list[int | None]:
        return [l.deficiency for l in self.layers]

    def to_dict(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape), "security_index": self.index,
                "num_layers": self.num_layers, "deficiencies": self.deficiencies,
                "layers": [l.to_dict() for l in self.layers], "rtol": self.rtol, "maps": self.maps,
                "definition": SOURCE_NOTE, "problems": list(self.problems), "notes": list(self.notes),
                "seconds": self.seconds}

    def summary(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        if self.index is None:
            return f"{self.model} ({shape}): security index undetermined" + \
                   (f" ({self.problems[0]})" if self.problems else "")
        d = ", ".join("?" if v is None else str(v) for v in self.deficiencies)
        return f"{self.model} ({shape}): security index (COPA) {self.index}; per-layer d_i [{d}]"

    def table(self) -> str:
        head = ["layer", "module", "kind", "unknowns", "constraints", "rank", "d_i", "weight", "round(d_i*w)"]
        rows = [[l.label, l.name, l.kind, str(l.unknowns), str(l.constraints), "-" if l.rank is None else str(l.rank),
                 "-" if l.deficiency is None else str(l.deficiency), f"{l.weight:.3f}",
                 "-" if l.contribution is None else str(l.contribution)] for l in self.layers]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        lines += [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        lines.append(self.summary())
        return "\n".join(lines)


def _finish(layers: list[SecurityLayer], num_layers: int) -> int | None:
    if any(l.deficiency is None for l in layers):
        return None
    return security_index([l.deficiency for l in layers], num_layers)


def _backprop_maps(chain: L.Chain, params: dict[str, torch.Tensor], x: torch.Tensor, label: int,
                   loss: str) -> list[torch.Tensor]:
    """dL/dz_i (out_shape) of every layer for one input ``x`` (in_shape of layer 0), through the chain."""
    from ..losses import losses

    h = x.detach().reshape(1, *chain.input_shape).requires_grad_(True)
    with torch.enable_grad():
        zs = [z for _, z in chain.forward(h, params)]
        out = zs[-1]
        y = torch.tensor([label])
        lossv = losses.get(loss)(out, y)
        ks = torch.autograd.grad(lossv, zs)
    return [k[0].detach() for k in ks]


def _resolve(target: Any, input_shape) -> tuple[nn.Module, tuple[int, ...], str]:
    from ..models import build

    if isinstance(target, Case):
        return target.model, tuple(target.spec.shape if input_shape is None else input_shape), \
            getattr(target.model, "zoo_name", type(target.model).__name__)
    if isinstance(target, str):
        shape = tuple(input_shape) if input_shape is not None else (3, 32, 32)
        return build(target, input_shape=shape, dtype=torch.float64), shape, target
    if isinstance(target, nn.Module):
        shape = input_shape if input_shape is not None else getattr(target, "input_shape", None)
        if shape is None:
            raise ValidationError("security_analysis", [f"give input_shape for a {type(target).__name__} (the model "
                                                        "does not record one), e.g. input_shape=(3, 32, 32)"])
        return target, tuple(int(s) for s in shape), getattr(target, "zoo_name", type(target).__name__)
    raise ValidationError("security_analysis", [f"expected a model, a zoo model name or a Case, got "
                                                f"{type(target).__name__}"])


def security_analysis(
    model: nn.Module | str | Case,
    input_shape: Sequence[int] | None = None,
    *,
    rtol: float = L.DEFAULT_RTOL,
    method: str = "auto",
    maps: str = "random",
    seed: int = 0,
    loss: str | None = None,
    max_unknowns: int = 20000,
    known: Sequence[int | None] | None = None,
) -> SecurityReport:
    """The layer-wise security metric (the authors' "COPA index") of ``model`` for per-sample inputs of
    ``input_shape`` ((C, H, W) or (D,); default: the shape a zoo model records).

    model: an ``nn.Module``, a zoo model name (built with seed 0, float64) or a :class:`~gradleak.Case`
    (its model and data shape; see also :func:`security_from_case`). The model must be a plain chain of
    Linear/Conv2d layers with activations (``gradleak.layers.walk``); otherwise the report lists every problem
    and its index is None. Ranks use the model's weights in float64.
    maps: the back-propagated maps delta_i = dL/dz_i in D_i: 'random' (N(0, 1) from ``seed``; a generic map
    gives the generic rank, as the rank analysis does) or 'backprop' (the loss gradient for a random input
    N(0, 1) and label 0; ``loss`` defaults to the model's head: logistic for one output, else cross-entropy).
    method: 'auto' (full-rank certificate, then pivoted Cholesky), 'cholesky' or 'svd' (see :func:`system_rank`).
    max_unknowns: a layer whose smaller side exceeds this is not computed (its d_i and the index are None).
    known: optional d_i per hidden layer already computed elsewhere (None entries are computed here).
    Returns a :class:`SecurityReport` (``.index`` is S, ``.deficiencies`` the d_i).
    """
    t0 = time.perf_counter()
    if maps not in ("random", "backprop"):
        raise ValidationError("security_analysis", [f"maps must be 'random' or 'backprop', got {maps!r}"])
    if not (0 < rtol < 1):
        raise ValidationError("security_analysis", [f"rtol must be in (0, 1), got {rtol}"])
    net, shape, name = _resolve(model, input_shape)
    chain = L.walk(net, shape)
    problems = chain.problems
    Lw = len(chain.layers)
    notes = [SOURCE_NOTE]
    if problems:
        return SecurityReport(name, list(shape), [], Lw, None, rtol, maps, problems, notes, time.perf_counter() - t0)
    params = {k: v.detach().to(torch.float64).cpu() for k, v in net.named_parameters()}
    gen = torch.Generator().manual_seed(int(seed))
    if maps == "backprop":
        from ..case import _num_outputs
        from ..losses import default_loss_for

        head_loss = loss or default_loss_for(_num_outputs(net))
        x = torch.randn(chain.input_shape, generator=gen, dtype=torch.float64)
        ks = _backprop_maps(chain, params, x, 0, head_loss)
    else:
        ks = [torch.randn(l.out_shape, generator=gen, dtype=torch.float64) for l in chain.layers]
    weights = security_weights(Lw)
    rows: list[SecurityLayer] = []
    skipped = []
    for i, layer in enumerate(chain.layers[:-1]):
        w = weights[i]
        constraints = layer.n_weights + layer.n_out
        pre = None if known is None or i >= len(known) else known[i]
        if pre is not None:
            d = int(pre)
            rows.append(SecurityLayer(layer.index, layer.name, layer.label, layer.kind, layer.n_in, constraints,
                                      layer.n_in + d, d, w, int(round(d * w)), "", "given"))
            continue
        if min(layer.n_in, constraints) > max_unknowns and not layer.dense:
            skipped.append(layer.label)
            rows.append(SecurityLayer(layer.index, layer.name, layer.label, layer.kind, layer.n_in, constraints,
                                      None, None, w, None, "", "skipped"))
            continue
        system = L.LayerSystem(layer, params[layer.weight_name], ks[i])
        r = system_rank(system, rtol=rtol, method=method)
        rows.append(SecurityLayer(layer.index, layer.name, layer.label, layer.kind, layer.n_in, r.constraints,
                                  r.rank, r.deficiency, w, int(round(r.deficiency * w)), r.side, r.method))
    if skipped:
        notes.append(f"layer(s) {', '.join(skipped)} have more than {max_unknowns} unknowns and constraints: rank not "
                     "computed (raise max_unknowns)")
    if Lw < 2:
        notes.append("a single weight layer: nothing to score (S = 0)")
    return SecurityReport(name, list(shape), rows, Lw, _finish(rows, Lw), rtol, maps, [], notes,
                          time.perf_counter() - t0)


def security_from_case(case: Case, **options: Any) -> SecurityReport:
    """:func:`security_analysis` of a case's model (its weights at the time of the update) and data shape;
    ``options`` as there (the metric is a property of the architecture and weights, not of the private data)."""
    if not isinstance(case, Case):
        raise ValidationError("security_from_case", [f"expected a gradleak.Case, got {type(case).__name__}"])
    options.setdefault("loss", case.loss)
    return security_analysis(case, None, **options)


# =====================================================================================================
# Integration with gradleak.risk.analyse: fills report.security_index and layers[i].security_deficiency
# =====================================================================================================

def _add_to_rank_report(report, target, input_shape, **context) -> None:
    """Registered as the risk analysis "security": reuses the rank report's per-layer deficiencies (the same
    stacked systems U_i = [W_i; D_i] with generic maps) and computes only the layers it skipped."""
    if report.problems and not report.layers:
        return
    hidden = report.layers[:-1]
    known = [None if l.deficiency is None else -int(l.deficiency) for l in hidden]
    if isinstance(target, Case):
        model, shape = target, input_shape
    else:
        model, shape = target, (report.input_shape if input_shape is None else input_shape)
    sec = security_analysis(model, shape, rtol=report.rtol, known=known, seed=int(context.get("seed") or 0))
    if sec.problems:
        report.extensions["security"] = {"error": "; ".join(sec.problems)}
        return
    for row, s in zip(hidden, sec.layers):
        row.security_deficiency = s.deficiency
    if report.layers:
        report.layers[-1].security_deficiency = None
    report.security_index = sec.index
    report.extensions["security"] = {"index": sec.index, "num_layers": sec.num_layers,
                                     "weights": [l.weight for l in sec.layers],
                                     "contributions": [l.contribution for l in sec.layers],
                                     "definition": SOURCE_NOTE}
    if sec.index is not None:
        report.notes.append(f"security index (COPA) S = {sec.index} from the per-layer d_i = rank - unknowns "
                            "(0: every layer full rank, leaks most; more negative: more secure); definition in "
                            "extensions['security']")


# gradleak.risk imports this module once, after defining the registry: join its analyses.
from . import register_analysis  # noqa: E402

register_analysis("security")(_add_to_rank_report)
