"""``gl.audit(...)``: run every applicable attack and risk analysis on a deployment's settings, write one report.

The run directory holds ``audit.json`` (schema in docs/audit.md), ``report.html`` (one self-contained page),
``truth.safetensors`` (the audited images) and ``jobs/<id>/`` (one ``gradleak attack`` run directory per attack
x defense x batch). ``audit.json`` is rewritten as each job ends, so an interrupted or killed audit keeps what
finished; rerunning with the same ``out`` skips the finished jobs (resume).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import data as data_mod
from .. import models as models_mod
from ..errors import GradleakError, OutputError, ValidationError
from ..report import to_jsonable
from ..report.environment import environment, hardware
from . import threat as threat_mod
from .execute import DEFAULT_GROUP_SIZE
from .plan import NO_DEFENSE, AuditConfig, Plan, plan
from .verdict import job_row, read_metrics, verdicts

_RUN_KEYS_IGNORED = ("out", "threads", "environment")


@dataclass
class AuditResult:
    """What :func:`audit` returns: ``data`` is audit.json's content, ``out_dir`` the run directory."""

    data: dict[str, Any]
    out_dir: Path
    report: Path | None = None

    @property
    def verdict(self) -> list[dict[str, Any]]:
        return self.data["verdict"]

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return self.data["jobs"]

    @property
    def interrupted(self) -> bool:
        return bool(self.data.get("interrupted"))

    def summary_dict(self) -> dict[str, Any]:
        """What ``gradleak audit --json`` prints: the verdict and where the report is."""
        d = self.data
        return {"schema": d["schema"], "schema_version": d["schema_version"], "out": str(self.out_dir),
                "report": str(self.report) if self.report else None, "threat_model": d["threat_model"]["name"],
                "budget": d["budget"]["name"], "interrupted": d["interrupted"], "verdict": d["verdict"],
                "jobs": {s: sum(1 for j in d["jobs"] if j["status"] == s)
                         for s in sorted({j["status"] for j in d["jobs"]})},
                "skipped": len(d["attacks"]["skipped"]), "warnings": d["warnings"]}

    def summary(self) -> str:
        lines = [f"audit of {self.data['model']['name']} under threat model {self.data['threat_model']['name']}"
                 f" ({self.data['budget']['name']} budget) -> {self.out_dir}"]
        lines += ["  " + v["statement"] for v in self.verdict]
        if self.interrupted:
            lines.append("  interrupted: the report shows the jobs that finished")
        return "\n".join(lines)


# ---- inputs --------------------------------------------------------------------------------------------
_STAGED_PREFIXES = ("model_", "data_")  # files gl.audit writes for a module / tensors it was given


def _hashed_write(out: Path, prefix: str, suffix: str, save) -> Path:
    """Write with ``save(buffer)`` to ``out/<prefix><sha256[:12]><suffix>``: a different module or batch gets
    another name, so a rerun into the same directory resumes only the very same inputs."""
    import hashlib
    import io

    buf = io.BytesIO()
    save(buf)
    data = buf.getvalue()
    path = (out / f"{prefix}{hashlib.sha256(data).hexdigest()[:12]}{suffix}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return path


def _stage_model(model: Any, out: Path) -> str:
    """A model spec string workers can rebuild: names and spec strings as they are; an nn.Module is saved whole
    to ``out/model_<hash>.pt`` with a loader ``out/model_<hash>.py:load`` (its class must be importable where
    the jobs run: a module on the path, or ``workers=1`` for a class defined in a script or notebook)."""
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        path = _hashed_write(out, "model_", ".pt", lambda b: torch.save(model, b))
        loader = path.with_suffix(".py")
        loader.write_text(f'''"""Loads the nn.Module gl.audit was given (saved whole to {path.name})."""

import torch


def load(input_shape=None, num_classes=None):
    return torch.load({str(path)!r}, map_location="cpu", weights_only=False)
''')
        return f"{loader}:load"
    raise ValidationError("audit", [f"model must be a zoo name, a spec 'FILE.py:NAME' / 'module:NAME' or an "
                                    f"nn.Module, got {type(model).__name__}"])


def _stage_data(data: Any, out: Path) -> dict[str, Any]:
    """AuditConfig fields for ``data``: None (the config's own), a source string, or (images, labels) tensors
    (saved to ``out/data_<hash>.safetensors``)."""
    if data is None:
        return {}
    if isinstance(data, (str, Path)):
        return {"dataset": str(data), "images": None}
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        from safetensors.torch import save

        x, y = data
        if x.ndim < 2 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValidationError("audit data", [f"expected (images (N, C, H, W), labels (N,)), got shapes "
                                                 f"{tuple(x.shape)} and {tuple(y.shape)}"])
        tensors = {"images": x.detach().cpu().contiguous(), "labels": y.detach().cpu().long().contiguous()}
        path = _hashed_write(out, "data_", ".safetensors", lambda b: b.write(save(tensors)))
        return {"images": str(path)}
    raise ValidationError("audit data", ["expected a dataset source ('samples', 'digits', 'folder:DIR', a path) or a "
                                         f"tuple (images, labels) of tensors, got {type(data).__name__}"])


def to_command(cfg: AuditConfig, out: Path, *, workers: int | None, backend: str, batch: bool = True) -> str:
    """The ``gradleak audit`` command line that re-runs ``cfg`` into ``out``."""
    a = ["gradleak", "audit", "--model", cfg.model]
    for k, v in cfg.model_options.items():
        a += ["--model-opt", f"{k}={v}"]
    if cfg.weights:
        a += ["--weights", cfg.weights]
    a += ["--images", cfg.images] if cfg.images else ["--dataset", cfg.dataset]
    a += ["--num-images", str(cfg.num_images)]
    if cfg.start:
        a += ["--start", str(cfg.start)]
    if cfg.image_size:
        a += ["--image-size", str(cfg.image_size)]
    a += ["--batch-sizes", ",".join(map(str, cfg.batch_sizes)), "--protocol", cfg.protocol]
    if cfg.protocol == "fedavg":
        a += ["--local-steps", str(cfg.local_steps), "--local-lr", str(cfg.local_lr)]
        if cfg.local_batch_size:
            a += ["--local-batch-size", str(cfg.local_batch_size)]
    a += ["--threat-model", cfg.threat_model]
    for d in cfg.defenses:
        a += ["--defense", d]
    a += ["--attacks", cfg.attacks if isinstance(cfg.attacks, str) else ",".join(cfg.attacks),
          "--budget", cfg.budget, "--seed", str(cfg.seed), "--dtype", cfg.dtype, "--bn-mode", cfg.bn_mode]
    if cfg.device:
        a += ["--device", cfg.device]
    if cfg.utility:
        a += ["--utility", "--utility-dataset", cfg.utility_dataset, "--utility-rounds", str(cfg.utility_rounds)]
    if workers:
        a += ["--workers", str(workers)]
    if backend != "local":
        a += ["--backend", backend]
    if not batch:
        a += ["--no-batch"]
    a += ["--out", str(out)]
    return " ".join(shlex.quote(x) for x in a)


# ---- pieces of audit.json --------------------------------------------------------------------------------
def _risk(model: nn.Module, shape, num_classes: int, batch_sizes, seed: int) -> list[dict[str, Any]]:
    """The risk analyses per batch size. An analysis that does not apply says why; it is never a verdict."""
    from .. import risk

    out = []
    for b in sorted(set(batch_sizes)):
        try:
            rep = risk.analyse(model, tuple(shape), batch_size=b, num_classes=num_classes, seed=seed)
        except GradleakError as e:
            out.append({"analysis": "rgap-rank", "batch_size": b, "applies": False, "summary": "could not run",
                        "reason": str(e), "detail": {}})
            continue
        d = to_jsonable(rep.to_dict())
        problems = list(d.get("problems") or [])
        out.append({"analysis": "rgap-rank", "title": "R-GAP rank analysis (Zhu & Blaschko 2021)", "batch_size": b,
                    "applies": not problems, "summary": d.get("verdict"),
                    "reason": "; ".join(problems) if problems else None,
                    "detail": {k: d.get(k) for k in ("exact_recovery_possible", "ra_index", "deficient_layers", "notes")}})
        for name, ext in (d.get("extensions") or {}).items():
            err = ext.get("error") if isinstance(ext, dict) else None
            na = ext.get("not_applicable") if isinstance(ext, dict) else None
            applies = not err and not na and not problems if name == "security" else not err and not na
            reason = err or na or ("the layer systems it reads do not apply: " + "; ".join(problems)
                                   if (name == "security" and problems) else None)
            summary = None
            if applies and name == "security":
                summary = f"security index {ext.get('index')} (0 = every layer full rank, leaks most)"
            elif applies:
                summary = ext.get("summary") or ext.get("verdict")
            out.append({"analysis": name, "batch_size": b, "applies": bool(applies), "summary": summary,
                        "reason": reason, "detail": ext})
    return out


def _defense_entries(cfg: AuditConfig, rows: list[dict], utility: dict | None) -> list[dict[str, Any]]:
    util = {}
    if utility:
        for d in utility.get("defenses", []):
            util[d["defense"]] = d
    out = []
    for spec in cfg.defenses:
        priv = next((r.get("privacy") for r in rows if r["defense"] == spec and r.get("privacy")), None)
        u = None
        if utility and spec == NO_DEFENSE:
            u = {"baseline_accuracy": utility["baseline_accuracy"], "accuracy": utility["baseline_accuracy"],
                 "accuracy_drop": 0.0}
        elif spec in util:
            u = {"baseline_accuracy": utility["baseline_accuracy"], "accuracy": util[spec]["accuracy"],
                 "accuracy_drop": util[spec]["accuracy_drop"], "epsilon": util[spec].get("epsilon"),
                 "privacy": util[spec].get("privacy"),
                 "run": f"FedAvg on {utility.get('dataset')}, {utility.get('settings', {}).get('rounds')} rounds"}
        out.append({"spec": spec, "label": "no defense" if spec == NO_DEFENSE else spec,
                    "epsilon": priv.get("epsilon") if priv else None, "delta": priv.get("delta") if priv else None,
                    "accounting": (f"the attacked update: {priv.get('accountant')} accountant, {priv.get('steps')} "
                                   f"step(s) at sample rate "
                                   f"{priv.get('sample_rate')}; assumes {priv.get('assumes')}") if priv else None,
                    "utility": u})
    return out


def _check_out(out: Path, cfg: AuditConfig) -> None:
    """Refuse an ``out`` that holds something else than this audit (a resume needs the same settings)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; expected a directory for the audit")
    prev = out / "audit.json"
    if prev.is_file():
        try:
            old = json.loads(prev.read_text()).get("settings")
        except (OSError, ValueError):
            old = None
        if old != to_jsonable(cfg.to_dict()):
            diff = sorted(k for k in cfg.to_dict() if (old or {}).get(k) != to_jsonable(cfg.to_dict()).get(k))
            raise OutputError(f"{out} holds an audit with other settings ({', '.join(diff) or 'unreadable'}); "
                              "rerun with the same settings to resume, or pass --overwrite / another --out")
    elif out.is_dir() and any(not p.name.startswith(_STAGED_PREFIXES) for p in out.iterdir()):
        raise OutputError(f"{out} is not empty and holds no audit; pass --overwrite or another --out")


def _finished(job) -> bool:
    """Whether the job's directory holds a finished (not interrupted) run of exactly this job."""
    out = Path(job.run.out)
    m = read_metrics(out)
    if m is None or m.get("interrupted"):
        return False
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    mine = to_jsonable(job.run.to_dict())
    return all(old.get(k) == v for k, v in mine.items() if k not in _RUN_KEYS_IGNORED)


# ---- the audit ------------------------------------------------------------------------------------------
def audit(model: Any, data: Any = None, *, out: str | Path | None = None, workers: int | None = None,
          backend: str = "local", progress: bool = False, overwrite: bool = False, max_memory=None,
          command: str | None = None, on_job: Callable[[dict], None] | None = None, batch: bool = True,
          group_size: int | None = DEFAULT_GROUP_SIZE, **settings: Any) -> AuditResult:
    """Audit a deployment: every applicable attack under ``threat_model`` on each defense and batch size, the
    risk analyses, optionally each defense's accuracy cost; writes the run directory and returns an
    :class:`AuditResult`.

    model: a zoo name, ``'FILE.py:NAME'`` / ``'module.path:NAME'`` (a class or factory), or an nn.Module.
    data: None (``dataset``/``images`` settings; default the bundled photos), a source string, or
        ``(images, labels)`` tensors in image space.
    settings: the fields of :class:`AuditConfig` (``num_images``, ``batch_sizes``, ``protocol``, ``local_steps``,
        ``local_lr``, ``local_batch_size``, ``threat_model``, ``defenses``, ``attacks``, ``budget``, ``seed``,
        ``dtype``, ``bn_mode``, ``device``, ``utility``, ...).
    workers / backend: how jobs run ('local' process pool, 'ray' or 'ray:ADDRESS'); see
        :func:`gradleak.audit.execute.run_jobs`. Ctrl-C stops the run and still writes the report.
    batch: run the jobs of one optimisation attack, defense and batch size (different images, one model) as
        batched groups (``reconstruct_many``) where they batch and that pays (``batched.batch_problems``);
        False: every job alone.
        ``group_size``: the most jobs in one group (None: no limit); groups are also split so that every
        worker has one. Each job still writes its own directory (docs/audit.md).
    """
    from .execute import Job, group_size_problems, run_jobs
    from .report import write_report_html
    from .schema import SCHEMA, SCHEMA_VERSION, thresholds

    t0 = time.perf_counter()
    if not isinstance(batch, bool):
        raise ValidationError("audit", [f"batch must be True or False, got {batch!r}"])
    if group_size_problems(group_size):
        raise ValidationError("audit", group_size_problems(group_size))
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    bad = sorted(set(settings) - known)
    if bad:
        raise ValidationError("audit", [f"unknown setting(s) {bad}; expected some of {sorted(known - {'model'})}"])
    out = Path(out) if out is not None else _default_out(model)
    if isinstance(model, str):
        model = models_mod.custom.normalize(model)  # a file spec made absolute: workers started elsewhere find it
    staged_model = model if isinstance(model, str) else None
    if isinstance(model, nn.Module) and settings.get("num_classes") is None:
        from ..case import _num_outputs

        outs = _num_outputs(model)  # a built model's head fixes the classes (labels may not show them all)
        settings["num_classes"] = None if outs == 1 else outs
    cfg = AuditConfig(model=staged_model or "<module>", **settings)
    problems = cfg.problems()
    if problems:
        raise ValidationError("audit", problems)
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    if staged_model is None:
        cfg.model = _stage_model(model, out)
    cfg = dataclasses.replace(cfg, **_stage_data(data, out))
    _check_out(out, cfg)  # a rerun resumes only the same settings (and the same staged inputs)
    tm = threat_mod.get(cfg.threat_model)
    the_plan = plan(cfg, out)
    out.mkdir(parents=True, exist_ok=True)

    # the images audited (the truth every job's scores refer to) and the model, for the risk section
    ds = data_mod.load(cfg.images or cfg.dataset, num_images=cfg.start + cfg.num_images,
                       **({"image_size": cfg.image_size} if cfg.image_size else {}))
    x, y = ds.batch(cfg.num_images, cfg.start)
    from safetensors.torch import save_file

    save_file({"inputs": x.detach().cpu().float().contiguous(), "labels": y.detach().cpu().contiguous()},
              str(out / "truth.safetensors"))
    num_classes = cfg.num_classes or ds.spec.num_classes
    net = models_mod.build(cfg.model, input_shape=ds.spec.shape, num_classes=num_classes, seed=cfg.seed,
                           **cfg.model_options)
    if cfg.weights:
        net = models_mod.load_weights(net, cfg.weights)
    models_mod.custom.check_forward(net, tuple(ds.spec.shape), cfg.model)
    images = list(range(cfg.start, cfg.start + cfg.num_images))
    doc: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or to_command(cfg, out, workers=workers, backend=backend, batch=batch),
        "environment": {**environment(device=cfg.device or "cpu", dtype=cfg.dtype), "hardware": hardware()},
        "interrupted": False,
        "seconds": None, "settings": to_jsonable(cfg.to_dict()),
        "model": {"name": cfg.model, "options": cfg.model_options, "weights": cfg.weights,
                  "parameters": sum(p.numel() for p in net.parameters()), "input_shape": list(ds.spec.shape),
                  "num_classes": num_classes},
        "data": {"source": cfg.images or cfg.dataset, "num_images": cfg.num_images, "start": cfg.start,
                 "shape": list(ds.spec.shape), "value_range": list(ds.spec.value_range),
                 "truth": "truth.safetensors", "labels": y.tolist(), "indices": images},
        "protocol": {"name": cfg.protocol, "local_steps": cfg.local_steps if cfg.protocol == "fedavg" else None,
                     "local_lr": cfg.local_lr if cfg.protocol == "fedavg" else None,
                     "local_batch_size": cfg.local_batch_size if cfg.protocol == "fedavg" else None,
                     "bn_mode": cfg.bn_mode},
        "threat_model": tm.to_dict(),
        "budget": {"name": cfg.budget, "per_attack": the_plan.budget},
        "thresholds": thresholds(),
        "batch_sizes": sorted(set(cfg.batch_sizes)),
        "attacks": {"planned": the_plan.attacks, "skipped": the_plan.skipped},
        "batch": _batch_entry(the_plan, batch, group_size),
        "risk": _risk(net, ds.spec.shape, num_classes, cfg.batch_sizes, cfg.seed),
        "jobs": [], "defenses": [], "verdict": [], "utility": None, "warnings": list(the_plan.notes),
    }
    if not the_plan.jobs:
        doc["warnings"].append("no attack applies to these settings: see the skipped attacks and their reasons")

    rows = {j.id: {**job_row(j, "pending", audit_dir=out), "group": None} for j in the_plan.jobs}
    todo = []
    for j in the_plan.jobs:
        if _finished(j):
            rows[j.id] = {**job_row(j, "resumed", audit_dir=out), "group": None}
        else:
            todo.append(j)
    by_id = {j.id: j for j in the_plan.jobs}

    def finish_doc(interrupted: bool) -> dict:
        doc["jobs"] = [rows[j.id] for j in the_plan.jobs]
        doc["interrupted"] = interrupted
        doc["defenses"] = _defense_entries(cfg, doc["jobs"], doc["utility"])
        doc["verdict"] = verdicts(doc["jobs"], doc["defenses"], images)
        doc["warnings"] = list(dict.fromkeys(doc["warnings"] + _job_warnings(doc["jobs"])))
        doc["seconds"] = time.perf_counter() - t0
        tmp = out / "audit.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(doc), indent=2))
        tmp.replace(out / "audit.json")
        return doc

    def row_of(o) -> dict:
        row = job_row(by_id[o.id], o.status, error=o.error, audit_dir=out)
        row["group"] = o.group
        return row

    def on_outcome(o) -> None:
        rows[o.id] = row_of(o)
        if on_job is not None:
            on_job(rows[o.id])
        finish_doc(False)

    finish_doc(False)
    jobs = [Job(id=j.id, config=j.run.to_dict(), group=j.group if batch else None) for j in todo]
    outcomes = run_jobs(jobs, backend=backend, workers=workers, progress=progress, on_outcome=on_outcome,
                        max_memory=max_memory, group_size=group_size) if jobs else []
    interrupted = any(o.status in ("interrupted", "cancelled") for o in outcomes)
    for o in outcomes:  # the executor's final word (a callback may have been missed on Ctrl-C)
        if rows[o.id]["status"] == "pending":
            rows[o.id] = row_of(o)
    if cfg.utility and not interrupted:
        doc["utility"] = _utility(cfg, doc)
    finish_doc(interrupted)
    report = write_report_html(out, doc)
    return AuditResult(doc, out, report)


def _utility(cfg: AuditConfig, doc: dict) -> dict | None:
    from ..defenses import compose, parse, utility
    from .plan import defense_list

    specs = [d for d in cfg.defenses if d != NO_DEFENSE]
    try:
        res = utility(cfg.model, cfg.utility_dataset, [compose(*map(parse, defense_list(d))) for d in specs],
                      rounds=cfg.utility_rounds,
                      seed=cfg.seed, model_options=dict(cfg.model_options) or None)
    except GradleakError as e:
        doc["warnings"].append(f"utility not measured: {e}")
        return None
    d = to_jsonable(res.to_dict())
    d["dataset"] = cfg.utility_dataset
    for spec, entry in zip(specs, d.get("defenses", [])):
        entry["defense"] = spec  # keyed by the audit's spec string
    return d


def _batch_entry(the_plan: Plan, batch: bool, group_size: int | None) -> dict[str, Any]:
    """audit.json's ``batch``: whether jobs were grouped, the limit, and which jobs could not be, with why."""
    why: dict[tuple, str] = {}
    for j in the_plan.jobs:
        if j.group is None and j.batch_note:
            why.setdefault((j.attack, j.defense, j.batch_size), j.batch_note)
    return {"enabled": batch, "group_size": group_size,
            "not_batched": [{"attack": a, "defense": d, "batch_size": b, "reason": r} for (a, d, b), r in why.items()]
            if batch else []}


def _job_warnings(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        fallback = (r.get("group") or {}).get("fallback")
        if fallback:
            out.append(f"{r['id']}: its batched group of {r['group']['jobs']} jobs failed ({fallback}); "
                       "the group's jobs ran one by one")
        for w in r.get("warnings") or []:
            out.append(f"{r['id']}: {w}")
        if r["status"] == "failed":
            out.append(f"{r['id']}: failed: {r['error']}")
    return out


def _default_out(model: Any) -> Path:
    name = model if isinstance(model, str) else type(model).__name__
    name = models_mod.custom.label(name) if ":" in name else name
    from ..report.rundir import fresh_run_path

    return fresh_run_path(f"audit-{name}")


__all__ = ["AuditConfig", "AuditResult", "Plan", "audit", "to_command"]
