"""The audit's plan: its settings, and the jobs (attack x defense x batch) they expand to.

Every attack whose requirements a probe case meets runs (``attacks='auto'``); the others are listed with the
reason, as are attacks that need a malicious server under a threat model that does not allow one. A job is one
:class:`~gradleak.experiment.AttackRun` writing its own run directory under ``jobs/``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attacks import attacks as attack_registry
from ..attacks.base import BUDGETS
from ..errors import GradleakError, ValidationError
from ..experiment import AttackRun, build_case
from ..validate import int_problems, number_problems, seed_problems
from . import threat as threat_mod

NO_DEFENSE = "none"


@dataclass
class AuditConfig:
    """Everything an audit needs; written to ``audit.json`` (``settings``) so a rerun can resume it.

    model: a zoo name, ``FILE.py:NAME`` or ``module.path:NAME`` (see ``gradleak list models``).
    dataset / images: the private images (as for ``gradleak attack``); ``num_images`` from ``start``.
    batch_sizes: the client batch sizes audited; the images are cut into consecutive batches of each size.
    defenses: specs (``'none'``, ``'prune:ratio=0.9'``; ``'+'`` composes, e.g. ``'clip-update:max_norm=1+noise:sigma=0.01'``).
    attacks: ``'auto'`` (every applicable attack) or a list of names.
    budget: one of ``quick``, ``standard``, ``thorough`` (each attack declares its options per budget).
    utility: also measure each defense's accuracy cost (``gl.defenses.utility`` on ``utility_dataset``).
    """

    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    dataset: str = "samples"
    images: str | None = None
    num_images: int = 4
    start: int = 0
    image_size: int | None = None
    num_classes: int | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    protocol: str = "fedsgd"
    local_steps: int = 5
    local_lr: float = 1e-4
    local_batch_size: int | None = None
    threat_model: str = threat_mod.DEFAULT
    defenses: list[str] = field(default_factory=lambda: [NO_DEFENSE])
    attacks: str | list[str] = "auto"
    budget: str = "quick"
    seed: int = 0
    dtype: str = "float32"
    bn_mode: str = "eval"
    device: str | None = None
    utility: bool = False
    utility_dataset: str = "digits"
    utility_rounds: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.model, str) or not self.model:
            p.append(f"model must be a name or a spec string, got {type(self.model).__name__}")
        p += int_problems(self.num_images, "num_images", minimum=1)
        p += int_problems(self.start, "start", minimum=0)
        p += int_problems(self.utility_rounds, "utility_rounds", minimum=1)
        p += number_problems(self.local_lr, "local_lr", positive=True)
        p += seed_problems(self.seed)
        if not isinstance(self.batch_sizes, (list, tuple)) or not self.batch_sizes:
            p.append(f"batch_sizes must be a non-empty list of ints >= 1, got {self.batch_sizes!r}")
        else:
            for b in self.batch_sizes:
                bad = int_problems(b, "batch size", minimum=1)
                if not bad and isinstance(self.num_images, int) and b > self.num_images:
                    bad = [f"batch size {b} exceeds num_images ({self.num_images}): give more images or a "
                           "smaller batch"]
                p += bad
        if self.budget not in BUDGETS:
            p.append(f"unknown budget {self.budget!r}: expected one of {', '.join(BUDGETS)}")
        try:
            threat_mod.get(self.threat_model)
        except GradleakError as e:
            p.append(str(e))
        if not isinstance(self.defenses, (list, tuple)) or not self.defenses:
            p.append("defenses must be a non-empty list of specs ('none' for no defense)")
        elif len(set(self.defenses)) != len(self.defenses):
            p.append(f"defenses repeat a spec: {list(self.defenses)}")
        if self.attacks != "auto":
            if not isinstance(self.attacks, (list, tuple)) or not self.attacks:
                p.append(f"attacks must be 'auto' or a non-empty list of names, got {self.attacks!r}")
        return p


@dataclass
class PlannedJob:
    """One job. ``group``: the jobs with the same group share everything but their images (one optimisation
    attack, defense and batch size on one model), so they can run as one batched computation; None where
    batching does not apply or does not pay (``batch_note`` says why)."""

    id: str
    attack: str
    defense: str
    batch_size: int
    images: list[int]
    run: AttackRun
    group: str | None = None
    batch_note: str | None = None


@dataclass
class Plan:
    jobs: list[PlannedJob]
    skipped: list[dict[str, Any]]
    attacks: list[str]
    notes: list[str]
    budget: dict[str, dict[str, Any]]


def batch_group(attack, case, key: str) -> tuple[str | None, str | None]:
    """(group, None) when ``attack``'s jobs on ``case``'s model can share one batched run
    (:func:`gradleak.attacks.optimization.reconstruct_many`), else (None, why not): the reasons
    :func:`gradleak.attacks.optimization.batched.batch_problems` gives (not an optimisation attack, BatchNorm in
    train mode, the BatchNorm-statistics prior, in-place modules, a model too large to gain on a CPU, ...).
    Such jobs run one by one, each its own unit (its own failure, interrupt and resume); so do jobs whose
    attack fails while it sets its trials up on the probe case (each job then fails, or not, on its own)."""
    from ..attacks.optimization.batched import batch_problems

    try:
        problems = batch_problems(attack, case)
    except Exception as e:  # the jobs themselves report it, one by one
        words = " ".join(str(e).split())
        return None, f"the attack's trial setup failed on the plan's probe case ({type(e).__name__}: {words})"
    return (None, "; ".join(problems)) if problems else (key, None)


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")
    return s.replace("=", "") or "x"


def defense_list(spec: str) -> list[str]:
    """The AttackRun defenses of one audit defense spec ('none' -> [], 'a+b' -> ['a', 'b'])."""
    return [] if spec.strip().lower() == NO_DEFENSE else [s.strip() for s in spec.split("+") if s.strip()]


def check_defenses(specs: list[str]) -> list[str]:
    """Every unparseable defense spec as a sentence (nothing is built but the Defense objects)."""
    from .. import defenses as defenses_mod

    out = []
    for spec in specs:
        try:
            for part in defense_list(spec):
                defenses_mod.parse(part)
        except GradleakError as e:
            out.append(f"defense {spec!r}: {e}")
    return out


def base_run(cfg: AuditConfig, tm: threat_mod.ThreatModel) -> AttackRun:
    return AttackRun(attack="inverting-gradients", model=cfg.model, dataset=cfg.dataset, images=cfg.images,
                     num_images=1, start=cfg.start, image_size=cfg.image_size, num_classes=cfg.num_classes,
                     seed=cfg.seed, protocol=cfg.protocol, local_steps=cfg.local_steps, local_lr=cfg.local_lr,
                     local_batch_size=None, dtype=cfg.dtype, labels_known=tm.labels_known, bn_mode=cfg.bn_mode,
                     model_options=dict(cfg.model_options), weights=cfg.weights,
                     device=cfg.device or "cpu")


def bn_prior_options(cls, case, tm: threat_mod.ThreatModel, opts: dict, budget: dict) -> dict:
    """``opts`` of attack ``cls`` on ``case`` with the BatchNorm-statistics prior (``bn_prior``) the threat model
    allows (:func:`gradleak.attacks.optimization.priors.bn_channel`: the update's returned statistics, else the
    running statistics where ``tm.bn_statistics`` grants them); ``opts`` itself when the attack has no such
    option or uses none. Records the channel in the attack's ``budget`` entry (audit.json, the report)."""
    from ..attacks.optimization.priors import bn_channel

    if cls.Options is None or "bn_prior" not in {f.name for f in dataclasses.fields(cls.Options)}:
        return opts
    ch = bn_channel(case, tm.bn_statistics)
    budget["bn_statistics"] = ch.sentence
    if ch.source == "none":
        return opts
    budget["bn_prior"] = ch.source
    return {**opts, "bn_prior": ch.source}


def _local_batch(cfg: AuditConfig, b: int) -> int | None:
    if cfg.protocol != "fedavg" or cfg.local_batch_size is None:
        return None
    return min(cfg.local_batch_size, b)


def _probe(run: AttackRun, cfg: AuditConfig):
    """The case every non-crafting attack of one (defense, batch size) is checked on. A model that fails on the
    data is the user's input error, said in one line."""
    try:
        return build_case(run)[0]
    except GradleakError:
        raise
    except Exception as e:  # a user's model that crashes on the data
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValidationError("audit", [f"model {cfg.model!r} fails on a batch of {run.num_images} image(s) from "
                                        f"{cfg.images or cfg.dataset}: {type(e).__name__}: {msg}"]) from None


def plan(cfg: AuditConfig, out: Path) -> Plan:
    """The jobs of an audit; builds one probe case per (defense, batch size) (and per crafting attack) to
    check each attack's requirements, so every skip has the attack's own reason."""
    problems = cfg.problems() + check_defenses(list(cfg.defenses) if isinstance(cfg.defenses, (list, tuple)) else [])
    if problems:
        raise ValidationError("audit", problems)
    tm = threat_mod.get(cfg.threat_model)
    if cfg.attacks == "auto":
        names = attack_registry.names()
    else:
        names = list(dict.fromkeys(attack_registry.canonical(a) for a in cfg.attacks))  # unknown names fail here
    base = base_run(cfg, tm)
    jobs: list[PlannedJob] = []
    skipped: list[dict[str, Any]] = []
    notes: list[str] = []
    budget = {}
    for name in names:
        preset, opts = attack_registry.get(name).budget(cfg.budget)
        budget[name] = {**({"preset": preset} if preset else {}), **opts}
    runnable: set[str] = set()
    for b in sorted(set(cfg.batch_sizes)):
        starts = list(range(cfg.start, cfg.start + cfg.num_images - b + 1, b))
        left = cfg.num_images - len(starts) * b
        if left:
            notes.append(f"batch size {b}: the last {left} image(s) do not fill a batch and are not audited at this "
                         "batch size")
        for spec in cfg.defenses:
            probe_run = dataclasses.replace(base, num_images=b, defenses=defense_list(spec),
                                            local_batch_size=_local_batch(cfg, b))
            probe = None
            for name in names:
                cls = attack_registry.get(name)
                if cls.crafts_model and not tm.may_modify_model:
                    skipped.append({"attack": name, "defense": spec, "batch_size": b,
                                    "reason": f"needs a malicious server (it modifies the model the server sends); the "
                                              f"threat model '{tm.name}' (SoK {tm.sok}) does not allow that: use "
                                              "--threat-model active-manipulator to audit it"})
                    continue
                preset, opts = cls.budget(cfg.budget)
                run = dataclasses.replace(probe_run, attack=name, preset=preset, attack_options=opts)
                try:
                    attack = cls(preset=preset, **opts)
                    if cls.crafts_model:
                        case, _, _ = build_case(run, attack=attack)
                    else:
                        if probe is None:
                            probe = _probe(run, cfg)
                        case = probe
                    bn_opts = bn_prior_options(cls, case, tm, opts, budget[name])
                    if bn_opts is not opts:
                        opts, attack = bn_opts, cls(preset=preset, **bn_opts)
                        run = dataclasses.replace(run, attack_options=opts)
                    reasons = attack.requirements(case)
                except GradleakError as e:
                    if probe is None and not cls.crafts_model:
                        raise  # the settings themselves fail (data, model, defense): nothing can run
                    reasons = [str(e)]
                if reasons:
                    skipped.append({"attack": name, "defense": spec, "batch_size": b, "reason": "; ".join(reasons)})
                    continue
                runnable.add(name)
                group, why = batch_group(attack, case, f"{name}__{_slug(spec)}__b{b}")
                for s in starts:
                    jid = f"{name}__{_slug(spec)}__b{b}__i{s}"
                    job_run = dataclasses.replace(run, start=s, seed=cfg.seed, out=str(out / "jobs" / jid))
                    jobs.append(PlannedJob(jid, name, spec, b, list(range(s, s + b)), job_run, group, why))
    return Plan(jobs, skipped, sorted(runnable), notes, budget)


__all__ = ["AuditConfig", "NO_DEFENSE", "Plan", "PlannedJob", "base_run", "bn_prior_options", "check_defenses",
           "defense_list", "plan"]
