"""Risk analyses: predict leakage from an architecture (and its weights) before any attack runs.

``analyse(model_or_case, input_shape=None)`` returns one :class:`RankReport` holding every registered
analysis: the R-GAP rank analysis (:func:`rank_analysis`, always) and whatever further analyses are registered
with :func:`register_analysis` (e.g. the layer-wise security metric, which fills ``report.security_index`` and
``report.layers[i].security_deficiency``). ``report.to_dict()`` is the CLI's JSON, ``report.table()`` its text.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..registry import Registry
from .rank import LayerRank, RankReport, counting_index, rank_analysis

#: further analyses: name -> fn(report, target, input_shape, **context) that fills fields of ``report`` in place
#: (``security_index``, ``layers[i].security_deficiency``, or ``report.extensions[name]``). context holds
#: ``batch_size``, ``num_classes`` and ``seed`` when the caller knows them.
analyses: Registry[Callable[..., None]] = Registry("risk analysis")


def register_analysis(name: str) -> Callable:
    """Decorator: ``@register_analysis("security") def add_security(report, target, input_shape, **context)``
    runs after the rank analysis in :func:`analyse` and adds its results to the same report."""
    return analyses.register(name)


def analyse(target: Any, input_shape: Sequence[int] | None = None, *, include: Sequence[str] | None = None,
            batch_size: int = 1, num_classes: int | None = None, **options: Any) -> RankReport:
    """Every risk analysis of ``target`` (an ``nn.Module`` with ``input_shape``, a zoo model name, or a
    :class:`~gradleak.Case`) in one :class:`RankReport`. ``options`` go to :func:`rank_analysis` (rtol, method,
    random_weights, seed, ...); ``include`` limits the further analyses by name (default: all registered).
    ``batch_size``: the R-GAP systems are per sample; B > 1 adds a note (a batch only gives mixtures).
    A further analysis that fails records its error in ``report.extensions[name]`` instead of raising."""
    report = rank_analysis(target, input_shape, **options)
    if batch_size > 1:
        report.notes.insert(0, f"batch size {batch_size}: R-GAP solves for one sample; a batch gradient gives one "
                               "mixture of the inputs (fully connected networks) or nothing exact (conv networks); "
                               "the ranks above are per sample")
    context = {"batch_size": batch_size, "num_classes": num_classes, "seed": options.get("seed", 0)}
    names = analyses.names() if include is None else [analyses.canonical(n) for n in include]
    for n in names:
        fn = analyses.get(n)
        try:
            fn(report, target, input_shape, **context)
        except Exception as e:  # one analysis never hides the others
            report.extensions[n] = {"error": f"{type(e).__name__}: {e}"}
    return report


analyze = analyse


def analyse_architecture(name: str, *, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                         batch_size: int = 1, seed: int = 0, dtype=None, **model_options: Any) -> RankReport:
    """:func:`analyse` of a zoo model built from its name (random weights from ``seed``, ``model_options``
    passed to the factory; float32 by default - the systems are built in float64 from these weights): what
    ``gradleak risk --model NAME`` prints."""
    import torch

    from ..models import build

    model = build(name, input_shape=tuple(input_shape), num_classes=num_classes, seed=seed,
                  dtype=dtype or torch.float32, **model_options)
    return analyse(model, tuple(input_shape), batch_size=batch_size, num_classes=num_classes, seed=seed)


__all__ = ["LayerRank", "RankReport", "analyse", "analyse_architecture", "analyze", "analyses", "counting_index",
           "rank_analysis", "register_analysis"]

from . import security  # noqa: E402,F401  registers the "security" analysis (layer-wise security metric, issue 4)
from . import identifiability  # noqa: E402,F401  registers "identifiability" (two-layer networks, issue 5)
