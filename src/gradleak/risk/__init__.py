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
                         batch_size: int = 1, seed: int = 0, dtype=None, weights: str | None = None,
                         protocol: str = "fedsgd", local_steps: int = 1, local_lr: float = 1e-4,
                         local_batch_size: int | None = None, defenses: Sequence[str] = (),
                         **model_options: Any) -> RankReport:
    """:func:`analyse` of a model built from its name: a zoo name or a model spec ``FILE.py:NAME`` /
    ``module.path:NAME`` (random weights from ``seed``, ``model_options`` passed to it; float32 by default - the
    systems are built in float64 from these weights), with the checkpoint ``weights`` loaded when given: what
    ``gradleak risk --model NAME`` prints. ``protocol`` (``local_*``) and ``defenses`` describe the deployment:
    the analyses are of one exact gradient, so the report notes (and records in ``extensions['deployment']``)
    where the deployment's update differs from that (``defenses``: the specs, recorded, not applied; the CLI
    checks them with :func:`gradleak.defenses.parse`)."""
    import torch

    from ..errors import ValidationError
    from ..models import build, load_weights
    from ..validate import int_problems, number_problems

    problems = int_problems(local_steps, "local_steps", minimum=1) + number_problems(local_lr, "local_lr",
                                                                                   positive=True)
    problems += int_problems(local_batch_size, "local_batch_size", minimum=1, optional=True)
    if protocol not in ("fedsgd", "fedavg"):
        problems.append(f"protocol must be 'fedsgd' or 'fedavg', got {protocol!r}")
    elif protocol == "fedsgd" and local_batch_size is not None:
        problems.append("local_batch_size only applies to protocol 'fedavg'")
    if problems:
        raise ValidationError("risk", problems)
    model = build(name, input_shape=tuple(input_shape), num_classes=num_classes, seed=seed,
                  dtype=dtype or torch.float32, **model_options)
    if weights:
        model = load_weights(model, weights)
    report = analyse(model, tuple(input_shape), batch_size=batch_size, num_classes=num_classes, seed=seed)
    lbs = local_batch_size or batch_size
    notes = []
    if weights:
        notes.append(f"weights from {weights}: the ranks are those of the trained model")
    exact_one_step = protocol == "fedsgd" or (local_steps == 1 and lbs >= batch_size)
    if protocol == "fedavg" and exact_one_step:
        notes.append(f"fedavg with one local step on the whole batch: the update is -{local_lr:g} x the gradient, so "
                     "the analyses apply to it as to a FedSGD gradient")
    elif protocol == "fedavg":
        notes.append(f"fedavg ({local_steps} local step(s), lr {local_lr:g}, local batch {lbs}): the analyses describe "
                     "ONE exact gradient at the sent weights, not this multi-step update; run an attack with "
                     "--protocol fedavg to measure what it leaks")
    if defenses:
        notes.append(f"defense(s) {', '.join(defenses)}: the analyses describe the exact, undefended gradient; they do "
                     "not model the defense - run an attack with --defense to measure what it leaves")
    report.notes[:0] = notes
    report.extensions["deployment"] = {
        "model": name, "options": dict(model_options), "weights": weights, "protocol": protocol,
        "local_steps": local_steps if protocol == "fedavg" else 1,
        "local_lr": local_lr if protocol == "fedavg" else None,
        "local_batch_size": lbs if protocol == "fedavg" else None,
        "defenses": [str(d) for d in defenses],
        "analyses_model_the_update": exact_one_step and not defenses,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return report


__all__ = ["LayerRank", "RankReport", "analyse", "analyse_architecture", "analyze", "analyses", "counting_index",
           "rank_analysis", "register_analysis"]

from . import security  # noqa: E402,F401  registers the "security" analysis (layer-wise security metric, issue 4)
from . import identifiability  # noqa: E402,F401  registers "identifiability" (two-layer networks, issue 5)
