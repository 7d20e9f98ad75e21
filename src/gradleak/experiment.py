"""One call per CLI job: build the data, model and case, run an attack, score it, write the report.

``run_attack(AttackRun(attack="ig", model="convnet", ...))`` is what ``gradleak attack`` calls.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from . import models as models_mod
from .attacks import Reconstruction, attacks, create
from .case import Case, Truth
from .errors import ValidationError
from .metrics import Scores, evaluate
from .report import write_report
from .simulate import simulate

ITERATION_OPTIONS = ("max_iterations", "iterations", "steps", "num_steps")
RESTART_OPTIONS = ("restarts", "trials", "num_trials")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AttackRun:
    """Everything needed to (re-)run one attack; written to ``config.json`` in the run directory.

    dataset: 'samples' | 'digits' | 'cifar10:ROOT' | 'folder:DIR' (ignored when ``images`` is given).
    images: the user's own images (a folder of PNG/JPEG files or a tensor file).
    observed: a real observed gradient / update file (safetensors or .pt dict keyed like the model's
        state_dict); then there is no simulation and no truth unless ``images`` is also given.
    iterations / restarts: mapped onto the attack's own budget options.
    """

    attack: str
    model: str
    dataset: str = "samples"
    images: str | None = None
    num_images: int = 1
    start: int = 0
    image_size: int | None = None
    num_classes: int | None = None
    iterations: int | None = None
    restarts: int | None = None
    seed: int = 0
    protocol: str = "fedsgd"
    local_steps: int = 5
    local_lr: float = 1e-4
    local_batch_size: int | None = None
    dtype: str = "float32"
    labels_known: bool = True
    labels: list[int] | None = None
    bn_mode: str = "eval"
    loss: str | None = None
    preset: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    observed: str | None = None
    defenses: list[str] = field(default_factory=list)
    out: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    config: AttackRun
    case: Case
    truth: Truth | None
    reconstruction: Reconstruction
    scores: Scores | None
    out_dir: Path | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        r = self.reconstruction
        s = self.scores.summary() if self.scores is not None else "no ground truth"
        where = f" -> {self.out_dir}" if self.out_dir else ""
        flag = " (interrupted: best so far)" if r.info.get("interrupted") else ""
        return (f"{r.attack} on {self.config.model}, {self.case.batch_size} image(s): {s}, residual {r.residual:.3g}, "
                f"{r.seconds:.1f} s{flag}{where}")

    def to_json(self) -> dict:
        r = self.reconstruction
        s = self.scores.to_dict() if self.scores is not None else {}
        return {"attack": r.attack, "model": self.config.model, "num_images": self.case.batch_size,
                "psnr": s.get("psnr"), "psnr_per_image": s.get("psnr_per_image"), "ssim": s.get("ssim"),
                "ssim_per_image": s.get("ssim_per_image"), "mse": s.get("mse"), "cosine": s.get("cosine"),
                "label_accuracy": s.get("label_accuracy"), "residual": r.residual, "seconds": r.seconds,
                "iterations": len(r.history) if r.history else r.info.get("iterations"),
                "kind": r.kind, "interrupted": r.info.get("interrupted", False),
                "out": str(self.out_dir) if self.out_dir else None, "notes": self.notes}


def _budget_options(cfg: AttackRun) -> dict[str, Any]:
    cls = attacks.get(cfg.attack)
    names = {f.name for f in dataclasses.fields(cls.Options)}
    opts = dict(cfg.attack_options)
    for value, candidates, flag in ((cfg.iterations, ITERATION_OPTIONS, "--iterations"),
                                    (cfg.restarts, RESTART_OPTIONS, "--restarts")):
        if value is None:
            continue
        hit = next((c for c in candidates if c in names), None)
        if hit is None:
            raise ValidationError(f"attack {cls.name}", [f"{flag} does not apply: this attack has no such budget "
                                                         f"(its options: {', '.join(sorted(names))})"])
        opts[hit] = int(value)
    return opts


def load_data(cfg: AttackRun):
    """The dataset the run draws its private batch from."""
    source = cfg.images if cfg.images else cfg.dataset
    kwargs = {"num_images": cfg.start + cfg.num_images}
    if cfg.image_size is not None:
        kwargs["image_size"] = cfg.image_size
    return data_mod.load(source, **kwargs)


def build_case(cfg: AttackRun) -> tuple[Case, Truth | None, list[str]]:
    """Data + model + simulation (or the observed update) -> (case, truth or None, notes)."""
    problems = []
    if cfg.dtype not in DTYPES:
        problems.append(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.num_images < 1:
        problems.append(f"num_images must be >= 1, got {cfg.num_images}")
    if cfg.protocol not in ("fedsgd", "fedavg"):
        problems.append(f"protocol must be 'fedsgd' or 'fedavg', got {cfg.protocol!r}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        problems.append(f"num_classes must be >= 1, got {cfg.num_classes}")
    if problems:
        raise ValidationError("attack run", problems)
    dtype = DTYPES[cfg.dtype]
    notes: list[str] = []
    info = models_mod.models.get(cfg.model)
    # The data source gives the spec (shape, classes, normalisation) and the private batch. With an observed
    # update the batch is the truth for scoring only when the user gave their own --images.
    ds = load_data(cfg)
    notes += list(getattr(ds, "notes", ()))
    truth_inputs, truth_labels = ds.batch(cfg.num_images, cfg.start)
    spec = ds.spec
    if cfg.num_classes is not None:  # e.g. a 1000-class checkpoint attacked on the bundled photos
        if int(truth_labels.max()) >= cfg.num_classes:
            raise ValidationError("attack run", [f"--num-classes {cfg.num_classes} is too small for labels up to "
                                                 f"{int(truth_labels.max())}"])
        spec = dataclasses.replace(spec, num_classes=cfg.num_classes)
    if info.single_output and spec.num_classes != 2:
        notes.append(f"{info.name} has one output score (logistic loss): labels mapped to label % 2")
        spec = dataclasses.replace(spec, num_classes=2)
        truth_labels = truth_labels % 2
    if cfg.observed is not None and not cfg.images:
        truth_inputs = truth_labels = None
        notes.append(f"observed update: the spec comes from '{cfg.dataset}' (shape {spec.shape}, "
                     f"{spec.num_classes} classes); no ground truth, so no PSNR")
    model = models_mod.build(cfg.model, input_shape=spec.shape, num_classes=spec.num_classes, seed=cfg.seed,
                             dtype=dtype, **cfg.model_options)
    if cfg.weights:
        model = models_mod.load_weights(model, cfg.weights)
    defense = None
    if cfg.defenses:
        from . import defenses

        defense = defenses.compose(*[defenses.parse(d) for d in cfg.defenses])
    if cfg.observed is not None:
        labels = torch.tensor(cfg.labels) if cfg.labels is not None else (
            truth_labels if cfg.labels_known and truth_labels is not None else None)
        case = Case.from_observed(model, cfg.observed, spec=spec, batch_size=cfg.num_images, protocol=cfg.protocol,
                                  local_steps=cfg.local_steps, local_lr=cfg.local_lr,
                                  local_batch_size=cfg.local_batch_size, labels=labels, loss=cfg.loss,
                                  bn_mode=cfg.bn_mode)
        case = case.to(dtype=dtype)
        truth = Truth(truth_inputs.to(dtype), truth_labels) if truth_inputs is not None else None
        return case, truth, notes
    gen = torch.Generator().manual_seed(cfg.seed)
    attack_cls = attacks.get(cfg.attack)
    if attack_cls.crafts_model:  # a malicious server: the client trains the model the attack sends
        model = create(cfg.attack, preset=cfg.preset, **cfg.attack_options).craft(model, spec, generator=gen)
        notes.append(f"{attack_cls.name} crafted the model the server sends (a malicious-server threat model)")
    case, truth = simulate(model, truth_inputs.to(dtype), truth_labels, protocol=cfg.protocol, spec=spec,
                           loss=cfg.loss, labels_known=cfg.labels_known, bn_mode=cfg.bn_mode,
                           local_steps=cfg.local_steps, local_lr=cfg.local_lr,
                           local_batch_size=cfg.local_batch_size, defense=defense, generator=gen)
    return case, truth, notes


def default_out(cfg: AttackRun) -> Path:
    return Path("runs") / f"{attacks.canonical(cfg.attack)}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_attack(cfg: AttackRun, *, progress: bool = False, write: bool = True) -> RunResult:
    """Run one attack job end to end and (if ``write``) write its run directory. Ctrl-C during the attack
    still writes the report of the best result so far."""
    opts = _budget_options(cfg)
    attack = create(cfg.attack, preset=cfg.preset, **opts)
    case, truth, notes = build_case(cfg)
    rec = attack.reconstruct(case, seed=cfg.seed, progress=progress)
    scores = evaluate(rec, truth) if truth is not None else None
    out = None
    if write:
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        write_report(out, rec, truth=truth, scores=scores, case=case, config=cfg.to_dict(),
                     extra={"notes": notes, "model": cfg.model})
    return RunResult(cfg, case, truth, rec, scores, out, notes)


@dataclass
class CompareResult:
    """One row per attack on the same case: psnr, ssim, mse, residual, seconds, kind (or the error)."""

    model: str
    rows: list[dict[str, Any]]
    out_dir: Path | None = None
    risk: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "rows": self.rows, "out": str(self.out_dir) if self.out_dir else None,
                "risk": self.risk}

    def table(self) -> str:
        head = f"{'attack':<22}{'PSNR dB':>9}{'SSIM':>8}{'residual':>11}{'seconds':>9}  kind"
        lines = [f"model {self.model}", head, "-" * len(head)]
        for r in self.rows:
            if r.get("error"):
                lines.append(f"{r['attack']:<22}  cannot run: {r['error']}")
                continue
            lines.append(f"{r['attack']:<22}{_f(r['psnr'], 9, 2)}{_f(r['ssim'], 8, 3)}{_f(r['residual'], 11, 3, 'g')}"
                         f"{_f(r['seconds'], 9, 1)}  {r.get('kind') or ''}")
        return "\n".join(lines)


def _f(v, w, p, kind="f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return f"{'-':>{w}}"
    return f"{v:>{w}.{p}{kind}}"


def compare(*, attacks: list[str], model: str, dataset: str = "samples", images: str | None = None,
            num_images: int = 1, start: int = 0, image_size: int | None = None, iterations: int | None = None,
            dtype: str = "float64", seed: int = 0, out: str | None = None, model_options: dict | None = None,
            attack_options: dict[str, dict] | None = None, progress: bool = False) -> CompareResult:
    """Run several attacks on ONE simulated case and tabulate PSNR, SSIM, residual and seconds (the central
    comparison of the layer-wise paper). An attack that cannot handle the case gets a row with the reason."""
    from .attacks import attacks as registry
    from .errors import RequirementError

    attacks = [registry.canonical(a) for a in attacks]  # every unknown name fails before any work
    base = AttackRun(attack=attacks[0], model=model, dataset=dataset, images=images, num_images=num_images,
                     start=start, image_size=image_size, dtype=dtype, seed=seed, model_options=dict(model_options or {}))
    case, truth, notes = build_case(base)
    rows = []
    out_dir = Path(out) if out else None
    for name in attacks:
        cfg = dataclasses.replace(base, attack=name, iterations=iterations,
                                  attack_options=dict((attack_options or {}).get(name, {})))
        try:
            opts = _budget_options(cfg) if iterations is not None else dict(cfg.attack_options)
        except ValidationError:
            opts = dict(cfg.attack_options)  # this attack has no iteration budget (closed form)
        try:
            rec = create(name, **opts).reconstruct(case, seed=seed, progress=progress)
        except RequirementError as e:
            rows.append({"attack": name, "error": "; ".join(e.problems)})
            continue
        sc = evaluate(rec, truth)
        rows.append({"attack": rec.attack, "psnr": sc.psnr, "ssim": sc.ssim, "mse": sc.mse, "residual": rec.residual,
                     "seconds": rec.seconds, "kind": rec.kind})
        if out_dir is not None:
            write_report(out_dir / rec.attack, rec, truth=truth, scores=sc, case=case, config=cfg.to_dict())
    res = CompareResult(model=model, rows=rows, out_dir=out_dir)
    if out_dir is not None:
        import json

        from .report import to_jsonable

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "comparison.json").write_text(json.dumps(to_jsonable(res.to_dict()), indent=2))
    return res
