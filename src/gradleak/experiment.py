"""One call per CLI job: build the data, model and case, run an attack, score it, write the report.

``run_attack(AttackRun(attack="ig", model="convnet", ...))`` is what ``gradleak attack`` calls.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import data as data_mod
from . import models as models_mod
from . import resources, threads
from .attacks import Reconstruction, attacks, create
from .case import Case, Truth, _num_outputs
from .errors import ValidationError
from .metrics import Scores, evaluate
from .report import RunDirectory, environment, run_warnings, to_jsonable, write_report
from .report.writer import counts_of, write_files
from .simulate import simulate
from .validate import (device_problems, int_problems, is_int, labels_problems, number_problems, require_device,
                       seed_problems)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AttackRun:
    """Everything needed to (re-)run one attack; written to ``config.json`` in the run directory.

    dataset: 'samples' | 'digits' | 'cifar10:ROOT' | 'folder:DIR' (ignored when ``images`` is given).
    images: the user's own images (a folder of PNG/JPEG files or a tensor file).
    observed: a real observed gradient / update file (safetensors or .pt dict keyed like the model's
        state_dict); then there is no simulation and no truth unless ``images`` is also given.
    iterations / restarts: mapped onto the attack's own options (its ``budget_option`` and ``restarts_option``);
        giving one of them and a different value of that option in ``attack_options`` is an error.
    threads: torch CPU threads (None: :mod:`gradleak.threads` chooses per case); results are bit-reproducible only for the same
        thread count on the same machine and software, so ``config.json`` records the count used.
    device: where the model, the simulated client and the attack run: 'cpu' (default), 'cuda', 'cuda:N', 'mps'.
        A device this machine lacks is refused before any work. Seeded draws are made on the CPU and moved, so a
        seed names the same start on every device (the arithmetic differs in rounding only).
    labels: labels of an OBSERVED update (only with ``observed``); defenses apply to simulated updates only.
    aggregate_clients: K > 1 (or a ``secure-aggregation:clients=K`` defense, the same protocol) simulates secure
        aggregation (``gradleak.defenses.SecureAggregation``, after the
        ``defenses``): the server sees only the mean of the K clients' FedSGD updates, the attacked client (the
        batch ``start .. start + num_images``) plus K - 1 others of ``num_images`` images each, drawn without
        replacement from the rest of the same dataset with ``seed``; the attack faces one batch of
        K * num_images images and is scored against all of them (``metrics.json``: ``aggregate_clients``, the
        case's ``secure_aggregation`` facts and ``target_client``: the scores over the attacked client's images).
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
    threads: int | None = None
    device: str = "cpu"
    aggregate_clients: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttackRun":
        """The run a ``config.json`` describes (its ``environment`` record is not part of the run)."""
        if not isinstance(d, Mapping):
            raise ValidationError("attack run config", [f"expected a dict, got {type(d).__name__}"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k != "environment")
        if unknown:
            raise ValidationError("attack run config", [f"unknown key(s) {unknown} (expected {sorted(names)})"])
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "AttackRun":
        """Read a run directory's ``config.json`` (or the directory itself) to re-run it."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValidationError("attack run config", [f"cannot read {p} as JSON ({type(e).__name__}: {e})"]) from None
        return cls.from_dict(d)

    def problems(self) -> list[str]:
        """Every problem with the fields' types, ranges and combinations (checked before any work)."""
        p: list[str] = []
        for name in ("attack", "model", "dataset"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                hint = (" (a zoo name or a model spec FILE.py:NAME / module.path:NAME; or pass a built model to "
                        "gradleak.simulate)") if name == "model" else ""
                p.append(f"{name} must be a name (str), got {type(v).__name__}{hint}")
        p += int_problems(self.num_images, "num_images", minimum=1)
        p += int_problems(self.start, "start", minimum=0)
        p += int_problems(self.num_classes, "num_classes", minimum=1, optional=True)
        p += int_problems(self.iterations, "iterations", minimum=1, optional=True)
        p += int_problems(self.restarts, "restarts", minimum=1, optional=True)
        p += int_problems(self.threads, "threads", minimum=1, optional=True)
        p += device_problems(self.device, dtype=self.dtype)
        p += int_problems(self.local_steps, "local_steps", minimum=1)
        p += number_problems(self.local_lr, "local_lr", positive=True)
        p += seed_problems(self.seed)
        if self.image_size is not None and not (is_int(self.image_size) and self.image_size >= 1):
            p.append(f"image_size must be an int >= 1 (or None for the source's size), got {self.image_size!r}")
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.protocol not in ("fedsgd", "fedavg"):
            p.append(f"protocol must be 'fedsgd' or 'fedavg', got {self.protocol!r}")
        if self.local_batch_size is not None:
            lbs = int_problems(self.local_batch_size, "local_batch_size", minimum=1)
            if not lbs and is_int(self.num_images) and self.local_batch_size > self.num_images:
                lbs = [f"local_batch_size ({self.local_batch_size}) must not exceed the batch "
                       f"(num_images={self.num_images})"]
            if not lbs and self.protocol != "fedavg":
                lbs = ["local_batch_size only applies to protocol 'fedavg'"]
            p += lbs
        if self.labels is not None:
            if self.observed is None:
                p.append("labels are the labels of an observed update: give them only with observed "
                         "(a simulated update takes its labels from the data)")
            else:
                p += labels_problems(self.labels, batch_size=self.num_images if is_int(self.num_images) else None)
        if self.defenses and self.observed is not None:
            p.append("a defense applies to a SIMULATED update; an observed update is attacked as it was received "
                     "(apply the defense where the update is produced, then save it)")
        p += self._aggregate_problems()
        if not isinstance(self.attack_options, Mapping) or not isinstance(self.model_options, Mapping):
            p.append("attack_options and model_options must be dicts")
        elif {"input_shape", "num_classes"} & set(self.model_options):
            p.append("model_options input_shape / num_classes come from the data: give image_size / num_classes "
                     "(--image-size / --num-classes) instead")
        return p


    def secure_clients(self) -> int:
        """K, the clients whose updates the server sees only as their mean: ``aggregate_clients``, or the
        ``clients`` of a ``secure-aggregation`` defense in ``defenses`` (the same protocol); 1 without one."""
        if is_int(self.aggregate_clients) and self.aggregate_clients > 1:
            return int(self.aggregate_clients)
        from . import defenses

        for d in self.defenses:
            part = defenses.parse(d)
            if getattr(part, "aggregates", False):
                return int((part.parts[-1] if hasattr(part, "parts") else part).clients)
        return 1

    def _aggregate_problems(self) -> list[str]:
        p = int_problems(self.aggregate_clients, "aggregate_clients", minimum=1)
        if p or self.aggregate_clients == 1:
            return p
        if self.observed is not None:
            p.append("aggregate_clients simulates secure aggregation of SIMULATED updates; an observed update is "
                     "attacked as it was received")
        if self.protocol != "fedsgd":
            p.append("aggregate_clients: secure aggregation is simulated for protocol 'fedsgd' only (the mean of K "
                     "FedAvg updates is not one client's update on the union of their batches)")
        if any(isinstance(d, str) and d.split(":")[0].strip() in ("secure-aggregation", "secagg")
               for d in self.defenses):
            p.append("give aggregate_clients K or a secure-aggregation defense, not both")
        return p


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
                **counts_of(r), "kind": r.kind, "interrupted": bool(r.info.get("interrupted", False)),
                "warnings": run_warnings(r.info), "out": str(self.out_dir) if self.out_dir else None,
                "notes": self.notes, "aggregate_clients": self.config.secure_clients()}


def _budget_options(cfg: AttackRun) -> dict[str, Any]:
    cls = attacks.get(cfg.attack)
    names = {f.name for f in dataclasses.fields(cls.Options)}
    opts = dict(cfg.attack_options)
    for value, hit, flag in ((cfg.iterations, cls.budget_option, "--iterations"),
                             (cfg.restarts, cls.restarts_option, "--restarts")):
        if value is None:
            continue
        if hit is None:
            raise ValidationError(f"attack {cls.name}", [f"{flag} does not apply: this attack has no such budget "
                                                         f"(its options: {', '.join(sorted(names))})"])
        if hit in opts and opts[hit] != value:
            raise ValidationError(f"attack {cls.name}", [f"{flag} {value} conflicts with --option {hit}={opts[hit]}: "
                                                         "give one of them"])
        opts[hit] = int(value)
    return opts


def load_data(cfg: AttackRun):
    """The dataset the run draws its private batch from."""
    source = cfg.images if cfg.images else cfg.dataset
    # secure aggregation draws the other clients from the whole source
    kwargs = {"num_images": cfg.start + cfg.num_images if cfg.secure_clients() == 1 else None}
    if cfg.image_size is not None:
        kwargs["image_size"] = cfg.image_size
    return data_mod.load(source, **kwargs)


def _candidate_copies(attack) -> int:
    """Copies of the candidate batch an attack's optimiser keeps: L-BFGS 2 x history_size (+ 4), else 4."""
    o = getattr(attack, "options", None)
    history = getattr(o, "history_size", None)
    if isinstance(history, int) and getattr(o, "optimizer", "lbfgs") == "lbfgs":
        return 2 * history + 4
    return 4


def _variable_scale(attack, shape: tuple[int, ...]) -> float:
    """Variables per image element the attack's optimiser may move: a Laplacian pyramid's (given, or the one
    parametrize='auto' would choose on a BatchNorm ResNet: an upper bound, the model is not built yet), else 1."""
    from .attacks.optimization import parametrize as Z
    from .errors import ValidationError

    name = getattr(getattr(attack, "options", None), "parametrize", "pixel")
    if not isinstance(name, str):
        return 1.0
    try:
        if name == "auto":
            name = f"laplacian-{Z.full_levels(shape)}"
        return Z.build(name, tuple(shape)).scale
    except (ValidationError, ValueError):  # not images (or a bad name: the attack's own check says so)
        return 1.0


def check_memory(cfg: AttackRun, shape: tuple[int, ...], num_classes: int, max_memory=None, attack=None) -> None:
    """Refuse (:class:`~gradleak.errors.ResourceError`) an attack job whose estimated memory exceeds
    ``max_memory`` or the memory available (see :mod:`gradleak.resources`)."""
    from .errors import GradleakError

    try:
        est = resources.estimate_attack(cfg.model, tuple(shape), int(num_classes),
                                        batch_size=cfg.num_images * cfg.secure_clients(),
                                        dtype=DTYPES[cfg.dtype], model_options=dict(cfg.model_options),
                                        local_steps=cfg.local_steps if cfg.protocol == "fedavg" else 1,
                                        candidate_copies=_candidate_copies(attack),
                                        variable_scale=_variable_scale(attack, tuple(shape)))
    except GradleakError:
        raise
    except Exception:  # a model option the zoo rejects: the real build below says so
        return
    resources.check_memory(est, max_memory=max_memory,
                           what=f"attacking {cfg.model} on {cfg.num_images} image(s) of shape {tuple(shape)}")


def build_case(cfg: AttackRun, *, max_memory=None, attack=None) -> tuple[Case, Truth | None, list[str]]:
    """Data + model + simulation (or the observed update) -> (case, truth or None, notes). The memory the job
    needs is estimated before the data are decoded (when the source's spec is known without decoding) or
    before the model is built, and refused above ``max_memory`` (bytes or '8GB'; default the memory
    available; ``attack``: the attack that will run, whose optimiser state counts too)."""
    problems = cfg.problems()
    if problems:
        raise ValidationError("attack run", problems)
    device = require_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    notes: list[str] = []
    source = cfg.images if cfg.images else cfg.dataset
    peek = data_mod.peek_spec(source, image_size=cfg.image_size)
    if peek is not None:
        check_memory(cfg, peek[0], cfg.num_classes or peek[1], max_memory, attack)
    # The data source gives the spec (shape, classes, normalisation) and the private batch. With an observed
    # update the batch is the truth for scoring only when the user gave their own --images.
    ds = load_data(cfg)
    if peek is None:
        check_memory(cfg, ds.spec.shape, cfg.num_classes or ds.spec.num_classes, max_memory, attack)
    notes += list(getattr(ds, "notes", ()))
    truth_inputs, truth_labels = ds.batch(cfg.num_images, cfg.start)
    spec = ds.spec
    if cfg.num_classes is not None:  # e.g. a 1000-class checkpoint attacked on the bundled photos
        spec = dataclasses.replace(spec, num_classes=cfg.num_classes)
    # a zoo name or a model spec FILE.py:NAME / module.path:NAME (gradleak.models.custom)
    model = models_mod.build(cfg.model, input_shape=spec.shape, num_classes=spec.num_classes, seed=cfg.seed,
                             dtype=dtype, **cfg.model_options)
    if _num_outputs(model) == 1 and spec.num_classes != 2:  # one output score: a zoo one-score model or yours
        notes.append(f"{cfg.model} has one output score (logistic loss): labels mapped to label % 2")
        spec = dataclasses.replace(spec, num_classes=2)
        truth_labels = truth_labels % 2
    elif cfg.num_classes is not None and int(truth_labels.max()) >= cfg.num_classes:
        raise ValidationError("attack run", [f"--num-classes {cfg.num_classes} is too small for labels up to "
                                             f"{int(truth_labels.max())}"])
    if cfg.observed is not None and not cfg.images:
        truth_inputs = truth_labels = None
        notes.append(f"observed update: the spec comes from '{cfg.dataset}' (shape {spec.shape}, "
                     f"{spec.num_classes} classes); no ground truth, so no PSNR")
    if cfg.weights:
        model = models_mod.load_weights(model, cfg.weights)
    defense = None
    if cfg.defenses:
        from . import defenses

        defense = defenses.compose(*[defenses.parse(d) for d in cfg.defenses])
    others, k = None, cfg.secure_clients()
    if k > 1 and cfg.observed is None:
        if cfg.aggregate_clients > 1:  # else a secure-aggregation defense is already the last part
            from . import defenses

            agg = defenses.SecureAggregation(clients=k)
            defense = agg if defense is None else defenses.compose(defense, agg)
        others = _other_clients(cfg, ds, k, mod2=_num_outputs(model) == 1 and ds.spec.num_classes != 2)
        notes.append(f"secure aggregation over {k} clients: the server sees only the mean of their updates, the "
                     f"attack one batch of {k * cfg.num_images} images (the attacked client's {cfg.num_images} "
                     f"first)")
    if cfg.observed is not None:
        labels = torch.as_tensor(cfg.labels, dtype=torch.long) if cfg.labels is not None else (
            truth_labels if cfg.labels_known and truth_labels is not None else None)
        case = Case.from_observed(model, cfg.observed, spec=spec, batch_size=cfg.num_images, protocol=cfg.protocol,
                                  local_steps=cfg.local_steps, local_lr=cfg.local_lr,
                                  local_batch_size=cfg.local_batch_size, labels=labels, loss=cfg.loss,
                                  bn_mode=cfg.bn_mode)
        case = case.to(dtype=dtype, device=device)
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
                           local_batch_size=cfg.local_batch_size, defense=defense, generator=gen,
                           other_clients=others, device=device)
    return case, truth, notes


def _target_scores(cfg: AttackRun, rec: Reconstruction, truth: Truth | None, value_range) -> dict | None:
    """Under secure aggregation: the scores over the attacked client's images only (the truth's first rows),
    every reconstruction a candidate for them."""
    if truth is None:
        return None
    b = cfg.num_images
    return evaluate(rec, Truth(truth.inputs[:b], truth.labels[:b]), value_range).to_dict()


def _other_clients(cfg: AttackRun, ds, k: int, *, mod2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The K - 1 other clients' batches for ``aggregate_clients``: (K-1) * num_images images drawn without
    replacement from the dataset outside the attacked client's rows, with a generator seeded by ``cfg.seed``;
    labels mapped like the target's (``mod2``: label % 2 for a one-score model)."""
    b = cfg.num_images
    pool = [i for i in range(len(ds)) if not cfg.start <= i < cfg.start + b]
    need = (k - 1) * b
    if len(pool) < need:
        raise ValidationError("attack run", [f"secure aggregation over {k} clients needs {need} more images besides the attacked "
                                             f"client's {b}; the dataset '{ds.spec.name}' has {len(ds)} in all"])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[:need]
    sub = ds.subset(torch.tensor(pool)[order])
    x, y = sub.batch(need)
    return x, (y % 2 if mod2 else y)


def default_out(cfg: AttackRun) -> Path:
    """``runs/ATTACK-MODEL-TIME`` (with a ``-2``, ``-3``, ... suffix when that directory exists already)."""
    from .report.rundir import fresh_run_path

    model = models_mod.custom.label(cfg.model)  # a spec path/net.py:Net -> net.Net
    return fresh_run_path(f"{attacks.canonical(cfg.attack)}-{model}")


def run_config(cfg: AttackRun, case: Case | None = None) -> dict:
    """What ``config.json`` holds: the run (with the thread count used) and the software environment."""
    d = cfg.to_dict()
    d["threads"] = torch.get_num_threads()
    d["environment"] = environment(device=None if case is None else case.device,
                                   dtype=None if case is None else case.dtype)
    return d


def run_attack(cfg: AttackRun, *, progress: bool = False, write: bool = True, overwrite: bool = False,
               max_memory=None) -> RunResult:
    """Run one attack job end to end and (if ``write``) write its run directory.

    Before any work: the configuration is checked, the output directory is reserved (refused when it is a
    file, not writable, holds a previous run and ``overwrite`` is False, or another run is writing it) and
    the memory the job needs is estimated (refused above ``max_memory`` or the memory available).
    Ctrl-C (or SIGTERM under the CLI) during the attack still writes the report of the best result so far,
    with ``metrics.json`` saying ``interrupted``. ``cfg.threads`` sets torch's CPU threads for the
    run (None: :mod:`gradleak.threads` chooses them from the work, unless the user set a count).
    """
    from .attacks.optimization.batched import memory_limit

    job = _Prepared(cfg, write=write, overwrite=overwrite, max_memory=max_memory)
    try:
        with job.pinned_threads():
            with memory_limit(max_memory):  # batched restarts size their chunks to --max-memory
                rec = job.attack.reconstruct(job.case, seed=cfg.seed, progress=progress)
            return job.finish(rec)
    finally:
        job.release()


def run_attacks_batched(cfgs: list[AttackRun], *, overwrite: bool = False, max_memory=None) -> list[RunResult]:
    """Run jobs that differ only in their images (``start``), ``out`` and ``seed`` as ONE batched computation
    (:func:`gradleak.attacks.optimization.reconstruct_many`: the optimisation trials of every case and its
    restarts share one vmap per step) and write each job's run directory as :func:`run_attack` would (the
    same files; ``metrics.json`` ``info.batched`` describes the batch, ``seconds`` is the job's share of it).
    Raises on the first error (a job's checks, its case, the batched run); the caller decides what to do
    with the others (the audit runs them one by one). Ctrl-C (or SIGTERM under the CLI) during the batched run
    writes every job as :func:`run_attack` would: its best result so far, ``metrics.json`` saying
    ``interrupted`` (``reconstruct_many`` returns each case's best so far). Ctrl-C before the jobs had
    reconstructions (while their cases are built) raises KeyboardInterrupt, and while they are written raises
    :class:`GroupInterrupted` holding the results written so far."""
    from .attacks.optimization.batched import reconstruct_many

    cfgs = list(cfgs)
    if not cfgs:
        return []
    keep = ("start", "out", "seed")
    base = {k: v for k, v in cfgs[0].to_dict().items() if k not in keep}
    for c in cfgs[1:]:
        diff = sorted(k for k, v in c.to_dict().items() if k not in keep and base.get(k) != v)
        if diff:
            raise ValidationError("batched jobs", [f"jobs batched together may differ only in {', '.join(keep)}; these "
                                                   + f"differ: {', '.join(diff)}"])
    jobs: list[_Prepared] = []
    try:
        for c in cfgs:
            jobs.append(_Prepared(c, write=True, overwrite=overwrite, max_memory=max_memory))
        with jobs[0].pinned_threads():
            recs = reconstruct_many(jobs[0].attack, [j.case for j in jobs], seeds=[c.seed for c in cfgs],
                                    max_memory=max_memory)
            written: list[RunResult] = []
            try:
                for j, r in zip(jobs, recs):
                    written.append(j.finish(r))
            except KeyboardInterrupt:
                raise GroupInterrupted(written) from None
            return written
    finally:
        for j in jobs:
            j.release()


class GroupInterrupted(KeyboardInterrupt):
    """Ctrl-C while :func:`run_attacks_batched` wrote its jobs' run directories: ``results`` are the jobs
    written, in order (the first ``len(results)`` jobs); the others have none."""

    def __init__(self, results: list[RunResult]):
        super().__init__(f"interrupted after {len(results)} of the batched jobs were written")
        self.results = results


class _Prepared:
    """One attack job up to its reconstruction: checked, its directory reserved, its case built; then
    :meth:`finish` scores and writes a reconstruction of it (what :func:`run_attack` does around the attack)."""

    def __init__(self, cfg: AttackRun, *, write: bool, overwrite: bool, max_memory):
        problems = cfg.problems()
        if problems:
            raise ValidationError("attack run", problems)
        require_device(cfg.device)
        self.cfg = cfg
        self.attack = create(cfg.attack, preset=cfg.preset, **_budget_options(cfg))
        self.run_dir = RunDirectory(Path(cfg.out) if cfg.out else default_out(cfg), overwrite=overwrite) \
            if write else None
        try:
            with threads.using(cfg.threads):
                self.case, self.truth, self.notes = build_case(cfg, max_memory=max_memory, attack=self.attack)
        except BaseException:
            self.release()
            raise

    def pinned_threads(self):
        """The attack, its scoring and config.json all see one count: the run's, else the policy's for this case."""
        return threads.pinned(self.cfg.threads if self.cfg.threads is not None else threads.for_case(self.case))

    def finish(self, rec: Reconstruction) -> RunResult:
        cfg, case, truth, notes = self.cfg, self.case, self.truth, list(self.notes)
        scores = evaluate(rec, truth, case.spec.value_range) if truth is not None else None
        if scores is not None:
            notes += scores.notes
        notes += run_warnings(rec.info)
        if rec.info.get("start_point_only"):
            notes.append("interrupted before the attack's first result: the report shows its START point")
        extra: dict[str, Any] = {"notes": notes, "model": cfg.model,
                                 "model_parameters": sum(p.numel() for p in case.model.parameters())}
        if cfg.secure_clients() > 1 and cfg.observed is None:
            extra.update(aggregate_clients=cfg.secure_clients(),
                         target_client=_target_scores(cfg, rec, truth, case.spec.value_range))
        out = None
        if self.run_dir is not None:
            out = write_report(self.run_dir, rec, truth=truth, scores=scores, case=case,
                               config=run_config(cfg, case), extra=extra)
        return RunResult(cfg, case, truth, rec, scores, out, notes)

    def release(self) -> None:
        if self.run_dir is not None:
            self.run_dir.release()


@dataclass
class CompareResult:
    """One row per attack on the same case: psnr, ssim, mse, residual, seconds, kind (or the error)."""

    model: str
    rows: list[dict[str, Any]]
    out_dir: Path | None = None
    risk: dict[str, Any] | None = None
    interrupted: bool = False

    def to_dict(self) -> dict:
        return {"model": self.model, "rows": self.rows, "out": str(self.out_dir) if self.out_dir else None,
                "risk": self.risk, "interrupted": self.interrupted}

    def table(self) -> str:
        head = f"{'attack':<22}{'PSNR dB':>9}{'SSIM':>8}{'residual':>11}{'seconds':>9}  kind"
        lines = [f"model {self.model}", head, "-" * len(head)]
        for r in self.rows:
            if r.get("error"):
                lines.append(f"{r['attack']:<22}  cannot run: {r['error']}")
                continue
            lines.append(f"{r['attack']:<22}{_f(r['psnr'], 9, 2)}{_f(r['ssim'], 8, 3)}{_f(r['residual'], 11, 3, 'g')}"
                         f"{_f(r['seconds'], 9, 1)}  {r.get('kind') or ''}"
                         f"{' (interrupted: best so far)' if r.get('interrupted') else ''}")
        if self.interrupted:
            lines.append("interrupted: the attacks after the last row did not run")
        return "\n".join(lines)


def _f(v, w, p, kind="f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return f"{'-':>{w}}"
    return f"{v:>{w}.{p}{kind}}"


def compare(*, attacks: list[str], model: str, dataset: str = "samples", images: str | None = None,
            num_images: int = 1, start: int = 0, image_size: int | None = None, iterations: int | None = None,
            dtype: str = "float64", seed: int = 0, out: str | None = None, model_options: dict | None = None,
            attack_options: dict[str, dict] | None = None, progress: bool = False, overwrite: bool = False,
            max_memory=None, num_classes: int | None = None, weights: str | None = None, protocol: str = "fedsgd",
            local_steps: int = 5, local_lr: float = 1e-4, local_batch_size: int | None = None,
            defenses: list[str] | None = None, device: str = "cpu") -> CompareResult:
    """Run several attacks on ONE simulated case and tabulate PSNR, SSIM, residual and seconds (the central
    comparison of the layer-wise paper). An attack that cannot handle the case gets a row with the reason.
    ``iterations`` goes to the attacks that have an iteration budget. ``model`` is a zoo name or a model spec
    (``FILE.py:NAME``, ``module.path:NAME``); ``weights``, ``protocol`` (with ``local_*``), ``defenses`` and
    ``num_classes`` are those of :class:`AttackRun`. ``out``: one run directory holding
    ``comparison.json`` and one sub-directory per attack, written atomically like :func:`run_attack`'s. Ctrl-C
    stops after the running attack's best result so far (the table says ``interrupted``). ``device``: as
    :class:`AttackRun`'s (every attack runs on the case's device)."""
    from .attacks import attacks as registry
    from .errors import RequirementError

    attacks = [registry.canonical(a) for a in attacks]  # every unknown name fails before any work
    base = AttackRun(attack=attacks[0], model=model, dataset=dataset, images=images, num_images=num_images,
                     start=start, image_size=image_size, dtype=dtype, seed=seed, model_options=dict(model_options or {}),
                     num_classes=num_classes, weights=weights, protocol=protocol, local_steps=local_steps,
                     local_lr=local_lr, local_batch_size=local_batch_size, defenses=list(defenses or []), device=device)
    problems = base.problems()
    if problems:
        raise ValidationError("compare", problems)
    require_device(device)
    run_dir = RunDirectory(out, overwrite=overwrite) if out else None
    try:
        case, truth, notes = build_case(base, max_memory=max_memory)
        rows: list[dict[str, Any]] = []
        recs = []
        interrupted = False
        for name in attacks:
            cfg = dataclasses.replace(base, attack=name, attack_options=dict((attack_options or {}).get(name, {})))
            if iterations is not None and registry.get(name).budget_option is not None:
                cfg = dataclasses.replace(cfg, iterations=iterations)
            try:
                rec = create(name, **_budget_options(cfg)).reconstruct(case, seed=seed, progress=progress)
            except RequirementError as e:
                rows.append({"attack": name, "error": "; ".join(e.problems)})
                continue
            sc = evaluate(rec, truth, case.spec.value_range)
            rows.append({"attack": rec.attack, "psnr": sc.psnr, "ssim": sc.ssim, "mse": sc.mse,
                         "residual": rec.residual, "seconds": rec.seconds, "kind": rec.kind,
                         "interrupted": bool(rec.info.get("interrupted")), "warnings": run_warnings(rec.info)})
            recs.append((rec, sc, cfg))
            if rec.info.get("interrupted"):
                interrupted = True
                break
        res = CompareResult(model=model, rows=rows, out_dir=Path(out) if out else None, interrupted=interrupted)
        if run_dir is not None:
            def fill(tmp: Path) -> None:
                for rec, sc, cfg in recs:
                    (tmp / rec.attack).mkdir()
                    write_files(tmp / rec.attack, rec, truth=truth, scores=sc, case=case,
                                config=run_config(cfg, case))
                (tmp / "comparison.json").write_text(json.dumps(to_jsonable(res.to_dict()), indent=2))

            run_dir.write(fill)
    finally:
        if run_dir is not None:
            run_dir.release()
    return res
