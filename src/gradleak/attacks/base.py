"""The attack base class: hyperparameters in the constructor, data in the call.

Subclasses declare an ``Options`` dataclass (every hyperparameter with its default), optional ``presets``
(paper settings), ``requirements(case)`` (every unmet requirement as a sentence) and ``_reconstruct``.
The base class owns the final :meth:`Attack.reconstruct`: it checks the case, seeds, times, runs the
subclass, keeps the best result so far (Ctrl-C returns it), and computes the residual the same way for
every attack.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from .. import threads
from ..case import Case
from ..errors import GradleakError, NumericalError, RequirementError, ValidationError
from ..registry import Registry
from ..validate import require_seed


Kind = Literal["estimate", "exact", "mixture"]
KINDS = ("estimate", "exact", "mixture")
#: the audit's budgets, cheapest first; each attack declares its options for each in ``Attack.budgets``
BUDGETS = ("quick", "standard", "thorough")


def exact_tolerance(dtype: torch.dtype) -> float:
    """The largest residual (1 - cosine) an "exact" reconstruction may have in ``dtype``.

    A reconstruction is called exact only when the update it produces matches the observed one to a relative
    error delta = sqrt(2 * residual) of at most 1e4 machine epsilons of ``dtype`` (float64: 2.2e-12, float32:
    1.2e-3); the tolerance returned is 0.5 * delta**2. Noise of that relative size or more on the update (a
    defense, a rounding step) makes the result an estimate, whatever the attack's theory says."""
    delta = 1e4 * torch.finfo(dtype).eps
    return 0.5 * delta * delta


@dataclass
class Reconstruction:
    """What an attack returns.

    inputs: (B, *spec.shape) reconstructed batch in IMAGE space (spec.value_range, normally [0, 1]),
        on the case's device and dtype. A mixture may have another number of rows (see ``kind``).
    labels: int64 (B,) labels used or recovered (None if the attack produced none).
    residual: 1 - cosine between the update ``inputs`` produce and the observed update (see
        :meth:`gradleak.Case.residual`); the same definition for every attack. NaN only where it cannot be
        computed, and then ``residual_note`` says why.
    claim: what the attack's own theory says of its result: 'exact' (the system it solved was fully
        determined: every rank checked), 'mixture' (rows are known to mix several samples) or 'estimate'.
        Set by the attack.
    kind: what the result IS, derived by the base class from ``claim`` and the residual (see
        :func:`exact_tolerance`): 'exact' only when claimed AND the residual verifies it; ``info['kind_check']``
        records the check. Attacks never set it.
    history: objective value per step where there is one.
    info: attack-specific facts (timings, per-layer reports, ...).
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    residual: float = float("nan")
    history: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    attack: str = ""
    claim: Kind = "estimate"
    kind: Kind = "estimate"
    residual_note: str = ""

    @property
    def seconds(self) -> float:
        return float(self.info.get("seconds", float("nan")))


@dataclass
class Candidate:
    """A result offered to the run context: kept if it scores lowest so far (an interrupted run returns it)."""

    score: float
    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    claim: Kind = "estimate"


class RunContext:
    """Handed to ``_reconstruct``: the random generator, progress reporting and best-so-far bookkeeping."""

    def __init__(self, generator: torch.Generator, *, progress: bool = False, desc: str = ""):
        self.generator = generator
        self._progress = progress
        self._desc = desc
        self._bar = None
        self.best: Candidate | None = None
        self.start_point: Candidate | None = None
        self.history: list[float] = []

    def progress(self, total: int, desc: str | None = None):
        """Start a progress bar of ``total`` steps (a no-op object unless progress is on)."""
        self.close()
        if self._progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc or self._desc, leave=False, file=sys.stderr, dynamic_ncols=True)
        return self

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def offer(self, score: float, inputs: torch.Tensor, labels: torch.Tensor | None = None, *,
              claim: Kind = "estimate", **info) -> bool:
        """Offer a candidate (IMAGE-space inputs); kept if finite and its score is the lowest so far.
        Returns whether it was kept. An interrupted run returns the best candidate offered. Scores of one
        attack must be comparable (lower is better): the residual, or the attack's own objective."""
        score = float(score)
        if not math.isfinite(score) or not torch.isfinite(inputs).all():
            return False
        if self.best is None or score < self.best.score:
            self.best = Candidate(score, inputs.detach().clone(), None if labels is None else labels.detach().clone(),
                                  info, claim)
            return True
        return False

    def start(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, **info) -> None:
        """Record the start point (IMAGE-space inputs) before the first step: a run interrupted before it
        offers any candidate returns it, marked ``info['start_point_only'] = True``."""
        if self.start_point is None and torch.isfinite(inputs).all():
            self.start_point = Candidate(float("inf"), inputs.detach().clone(),
                                         None if labels is None else labels.detach().clone(), info)


def _coerce(name: str, value: Any, default: Any, hint: Any) -> tuple[Any, str | None]:
    """Check an option value against its declared type; ints pass as floats."""
    if default is None:
        return value, None
    if value is None:
        return value, f"option {name!r} must be {type(default).__name__} (default {default!r}), got None"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value, None
        return value, f"option {name!r} must be true/false, got {value!r}"
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(hint, str) and "|" in hint and type(default) in (int, float, str):
        # a union option (e.g. ``tv: float | str = "auto"``): a number or one of its words
        allowed = {t.strip() for t in hint.split("|")}
        if "float" in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if "tuple" in allowed and isinstance(value, list):  # e.g. ``layers: tuple | str = "auto"``
            return tuple(value), None
        if type(value).__name__ in allowed:
            return value, None
        return value, f"option {name!r} must be {' or '.join(sorted(allowed))}, got {type(value).__name__} {value!r}"
    if isinstance(default, str) and isinstance(value, str):
        return value, None
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value), None
    if type(default) in (int, float, str, tuple):
        return value, f"option {name!r} must be {type(default).__name__}, got {type(value).__name__} {value!r}"
    return value, None


class Attack:
    """Base class of every attack. Subclasses set ``name``, ``paper``, ``Options`` and implement
    ``_reconstruct(case, ctx) -> Reconstruction`` and optionally ``requirements(case) -> list[str]``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type] = None  # a dataclass
    budget_option: ClassVar[str | None] = None  # the option that sets the main budget (iterations), if any
    restarts_option: ClassVar[str | None] = None  # the option that sets the number of independent trials, if any
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    default_preset: ClassVar[str | None] = None
    # True: the attack needs a malicious server (the right to modify the model it sends); an honest-but-curious
    # threat model must skip it. Such an attack implements craft() and simulates the client on its result.
    crafts_model: ClassVar[bool] = False
    # The options (and optionally a "preset") this attack runs with at each audit budget of BUDGETS. An attack
    # without an entry runs with its defaults at that budget (a closed-form attack costs the same at every one).
    budgets: ClassVar[dict[str, dict[str, Any]]] = {}
    # What the batch allows, declared per attack (read by batch_findings; see docs/guide.md "Batches"):
    # typical_max_batch: the largest batch this attack is known to recover, typical_max_batch_source: where that
    # figure comes from (a measurement here, or the paper); None: no known limit short of its requirements().
    # failed_residual: a final residual above it was measured only on failed reconstructions of this attack
    # (failed_residual_source says where). batch_advice: what to try instead, as a phrase.
    typical_max_batch: ClassVar[int | None] = None
    typical_max_batch_source: ClassVar[str] = ""
    failed_residual: ClassVar[float | None] = None
    failed_residual_source: ClassVar[str] = ""
    batch_advice: ClassVar[str] = "a smaller batch"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "reconstruct" in cls.__dict__:
            raise TypeError(f"{cls.__name__} must not override reconstruct(); implement _reconstruct() instead")

    def __init__(self, *, preset: str | None = None, **options: Any):
        if self.Options is None:
            raise TypeError(f"{type(self).__name__} declares no Options dataclass")
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        preset = preset if preset is not None else self.default_preset
        values: dict[str, Any] = {}
        problems = []
        if preset is not None:
            if preset not in self.presets:
                raise ValidationError(f"{self.name} preset", [f"unknown preset {preset!r}: expected one of "
                                                              f"{sorted(self.presets) or 'none'}"])
            values.update(self.presets[preset])
        values.update(options)
        for k in list(values):
            if k not in fields:
                problems.append(f"unknown option {k!r} (valid options: {', '.join(sorted(fields))})")
                continue
            default = self.Options().__dict__[k] if _has_default(fields[k]) else None
            values[k], err = _coerce(k, values[k], default, fields[k].type)
            if err:
                problems.append(err)
        if problems:
            raise ValidationError(f"{self.name or type(self).__name__} options", problems)
        self.preset = preset
        self.options = self.Options(**values)
        problems = self.check_options(self.options)
        if problems:
            raise ValidationError(f"{self.name} options", problems)

    @classmethod
    def budget(cls, name: str) -> tuple[str | None, dict[str, Any]]:
        """(preset, options) this attack runs with at audit budget ``name`` (one of :data:`BUDGETS`)."""
        if name not in BUDGETS:
            raise ValidationError("budget", [f"unknown budget {name!r}: expected one of {', '.join(BUDGETS)}"])
        opts = dict(cls.budgets.get(name, {}))
        return opts.pop("preset", None), opts

    # ---- hooks for subclasses --------------------------------------------------------------------
    def check_options(self, options) -> list[str]:
        """Return every problem with the option values (ranges etc.)."""
        return []

    def requirements(self, case: Case) -> list[str]:
        """Return every unmet requirement of this attack on ``case`` as a sentence ([] if none)."""
        return []

    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:  # pragma: no cover - abstract
        raise NotImplementedError

    def craft(self, model, spec, *, generator: torch.Generator | None = None, **kw):
        """The model a malicious server sends instead of ``model`` (only where ``crafts_model``)."""
        raise RequirementError(self.name, [f"{self.name} attacks the update of the model as it is: it does not "
                                           "craft a model (crafts_model is False)"])

    def batch_findings(self, case: Case, rec: Reconstruction) -> list[str]:
        """Warnings (one line each, at most one) where the batch is beyond what this attack recovered: the attack,
        the batch, every fact found (:meth:`batch_facts`) and what to try. Results that carry their own claim
        ('exact': every rank checked, verified by the residual; 'mixture') say it themselves: none here."""
        if rec.claim != "estimate":
            return []
        facts = self.batch_facts(case, rec)
        if not facts:
            return []
        res = rec.residual
        if not self._residual_failed(case, rec):
            facts.append(f"its residual was {rec.residual_note or 'not computed'}" if not math.isfinite(res) else
                         f"its residual {res:.3g} is against a defended update" if "defense" in case.meta else
                         f"its residual {res:.3g} is low, but a low residual does not show success here")
        return [f"{self.name} on a batch of {case.batch_size}: " + "; ".join(facts) + f"; try {self.batch_advice}"]

    def batch_facts(self, case: Case, rec: Reconstruction) -> list[str]:
        """The facts that show the batch is beyond this attack ([] if none): a final residual above the attack's
        ``failed_residual`` (undefended updates only); more unknown pixels than the update has values (no attack
        can then determine the batch from the update alone); a batch above ``typical_max_batch``. Attacks with
        more facts (ranks, unrecovered samples) extend this list."""
        facts: list[str] = []
        b = case.batch_size
        res = rec.residual
        if self._residual_failed(case, rec):
            work = rec.info.get("iterations") or len(rec.history)
            facts.append(f"residual {res:.3g} stayed above {self.failed_residual:g} after "
                         f"{f'{work} iterations' if work else 'the run'} ({self.failed_residual_source})")
        unknowns = b * math.prod(case.spec.shape)
        values = sum(int(v.numel()) for v in case.observed.values())
        if unknowns > values:
            facts.append(f"the update has {values} values for {b} x {math.prod(case.spec.shape)} = {unknowns} "
                         "unknown pixels, so it cannot determine the batch (many batches produce the same update)")
        if self.typical_max_batch is not None and b > self.typical_max_batch:
            facts.append(f"a batch above {self.typical_max_batch} is beyond what it is known to recover "
                         f"({self.typical_max_batch_source})")
        return facts

    def _residual_failed(self, case: Case, rec: Reconstruction) -> bool:
        """The residual is above ``failed_residual``, measured on undefended updates (a defense's noise or
        pruning keeps any reconstruction's residual high, so a defended case is not judged by it)."""
        return (self.failed_residual is not None and "defense" not in case.meta and math.isfinite(rec.residual)
                and rec.residual > self.failed_residual)

    # ---- the one public verb ---------------------------------------------------------------------
    def reconstruct(
        self,
        case: Case,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """Reconstruct the private batch behind ``case``.

        Returns a :class:`Reconstruction` whose inputs are (B, *shape) in image space. Raises
        :class:`RequirementError` listing every unmet requirement before any work. Randomness comes only
        from ``generator`` (or ``seed``; default seed 0). Ctrl-C returns the best result so far with
        ``info['interrupted'] = True``.
        """
        if not isinstance(case, Case):
            raise ValidationError(self.name, [f"expected a gradleak.Case, got {type(case).__name__}"])
        problems = self.requirements(case)
        if problems:
            raise RequirementError(self.name, problems)
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(0 if seed is None else require_seed(seed, f"{self.name} seed"))
        ctx = RunContext(generator, progress=progress, desc=self.name)
        t0 = time.perf_counter()
        interrupted = False
        try:
            with threads.using(threads.for_case(case)):  # the user's count, else the policy's for this work
                rec = self._reconstruct(case, ctx)
        except KeyboardInterrupt:
            kept = ctx.best if ctx.best is not None else ctx.start_point
            if kept is None:
                raise
            interrupted = True
            info = {**kept.info, "best_score": kept.score} if kept is ctx.best else {**kept.info, "start_point_only": True}
            rec = Reconstruction(inputs=kept.inputs, labels=kept.labels, history=list(ctx.history), info=info,
                                 claim=kept.claim)
        finally:
            ctx.close()
        seconds = time.perf_counter() - t0
        if not isinstance(rec, Reconstruction):
            raise TypeError(f"{type(self).__name__}._reconstruct must return a Reconstruction")
        expected = (case.batch_size, *case.spec.shape)
        if rec.claim not in KINDS:
            raise TypeError(f"{type(self).__name__} returned claim {rec.claim!r}, expected one of {KINDS}")
        if rec.claim != "mixture" and tuple(rec.inputs.shape) != expected:
            raise NumericalError(f"{self.name} returned inputs of shape {tuple(rec.inputs.shape)}, expected {expected}")
        if not torch.isfinite(rec.inputs).all():
            raise NumericalError(f"{self.name} produced no finite reconstruction (every trial diverged); "
                                 "try a smaller learning rate or float64")
        lo, hi = case.spec.value_range
        rec.inputs = rec.inputs.detach().to(device=case.device, dtype=case.dtype).clamp(lo, hi)
        if rec.labels is None and case.labels is not None:
            rec.labels = case.labels.clone()
        rec.attack = self.name
        rec.info.update(seconds=seconds, interrupted=interrupted, preset=self.preset,
                        options=dataclasses.asdict(self.options))
        if tuple(rec.inputs.shape) != expected:
            rec.residual_note = (f"not computed: the result has {rec.inputs.shape[0]} rows (a mixture) where the "
                                 f"update came from a batch of {case.batch_size}")
        elif rec.labels is None:
            rec.residual_note = "not computed: the labels are unknown and the attack recovered none"
        else:
            try:
                rec.residual = case.residual(rec.inputs, rec.labels)
            except GradleakError:
                raise
            except Exception as e:  # residual must never hide the result
                rec.residual_note = f"not computed: {type(e).__name__}: {e}"
        rec.kind = _derive_kind(rec, case)
        findings = self.batch_findings(case, rec)
        if findings:
            rec.info.setdefault("warnings", []).extend(findings)
        return rec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def _derive_kind(rec: Reconstruction, case: Case) -> Kind:
    """The one place a result's kind is decided: 'exact' only when the attack claims it and the residual
    verifies it within :func:`exact_tolerance` of the case's dtype; the check goes into ``info['kind_check']``."""
    if rec.claim == "mixture":
        return "mixture"
    if rec.claim != "exact":
        return "estimate"
    tol = exact_tolerance(case.dtype)
    passed = math.isfinite(rec.residual) and rec.residual <= tol and not rec.info.get("interrupted")
    rec.info["kind_check"] = {"claimed": "exact", "residual": rec.residual, "tolerance": tol, "passed": passed,
                              "rule": "residual <= 0.5 * (1e4 * eps(dtype))**2"}
    if not passed:
        why = ("the residual could not be computed" if not math.isfinite(rec.residual) else
               f"the residual {rec.residual:.3g} exceeds {tol:.3g}" if rec.residual > tol else "the run was interrupted")
        rec.info.setdefault("warnings", []).append(
            f"{rec.attack}: its system was determined but {why}: reported as an estimate, not exact")
    return "exact" if passed else "estimate"


def rank_facts(reports: Any) -> list[str]:
    """One fact per rank-deficient layer of a closed-form attack's per-layer reports (``info['layers']``:
    :class:`gradleak.layers.LayerReport` objects, or their dicts): its input is not determined by the gradient."""
    out = []
    for r in reports if isinstance(reports, (list, tuple)) else ():
        if hasattr(r, "to_dict"):
            r = r.to_dict()
        d = r.get("deficiency") if isinstance(r, dict) else None
        if isinstance(d, int) and d > 0:
            out.append(f"layer {r.get('label') or r.get('name')}: rank {r.get('rank')} < {r.get('unknowns')} unknowns "
                       f"(deficiency {d}), so the gradient does not determine its input")
    return out


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


attacks: Registry[type[Attack]] = Registry("attack")


def register(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: register an Attack subclass under ``name`` (kebab-case) and ``aliases``."""

    def deco(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        return attacks.register(name, aliases=aliases)(cls)

    return deco


def create(name: str, *, preset: str | None = None, **options: Any) -> Attack:
    """Build a registered attack by name (or alias) with options, e.g. ``create("ig", max_iterations=500)``."""
    return attacks.get(name)(preset=preset, **options)
