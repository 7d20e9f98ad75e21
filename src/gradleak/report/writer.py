"""``write_report``: the files of one run directory, written atomically (see :mod:`.rundir`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .figures import image_grid, write_html
from .jsonable import to_jsonable
from .rundir import RunDirectory

# rec.info entries about the run's health, surfaced at the top of metrics.json and printed by the CLI
HEALTH_KEYS = ("diverged", "warnings")
# counts of an optimisation run: named for what they count (L-BFGS takes several gradient evaluations per step)
COUNT_KEYS = ("outer_steps", "gradient_evaluations")


def run_warnings(info: dict) -> list[str]:
    """The warning lines an attack left in ``rec.info`` (``info['warnings']``, ``info['diverged']``, and every
    trial of ``info['trials']`` that diverged), as sentences, in order."""
    w = info.get("warnings")
    out = [str(x) for x in w] if isinstance(w, (list, tuple)) else ([str(w)] if w else [])
    div = info.get("diverged")
    if isinstance(div, str) and div:
        out.append(div)
    elif div is True:
        out.append("the attack diverged: the result is its best point before the divergence")
    elif div:
        out.append(f"the attack diverged ({div})")
    trials = info.get("trials")
    if isinstance(trials, (list, tuple)):
        for i, t in enumerate(trials):
            if isinstance(t, dict) and t.get("diverged_at") is not None:
                why = f" ({t['reason']})" if t.get("reason") else ""
                out.append(f"trial {i + 1} of {len(trials)} diverged at step {t['diverged_at']}{why}")
    return out


def counts_of(rec) -> dict:
    """How much work a run did, named for what is counted: ``iterations`` (optimiser iterations: Adam steps or
    L-BFGS iterations, what ``--iterations`` sets), ``outer_steps`` and ``gradient_evaluations`` when the attack
    reports them (an L-BFGS outer step runs several iterations, an iteration one or more evaluations)."""
    counts = {k: rec.info[k] for k in ("iterations", *COUNT_KEYS) if rec.info.get(k) is not None}
    if counts:
        return counts
    return {"iterations": len(rec.history) if rec.history else None}


def metrics_of(rec, *, scores=None, case=None, extra: dict | None = None) -> dict:
    """The content of ``metrics.json`` for a reconstruction."""
    info = rec.info
    metrics = {
        "attack": rec.attack,
        "kind": getattr(rec, "kind", None),
        "residual": rec.residual,
        "seconds": info.get("seconds"),
        "num_images": int(rec.inputs.shape[0]),
        "labels": None if rec.labels is None else rec.labels.tolist(),
        "interrupted": bool(info.get("interrupted", False)),
    }
    metrics.update(counts_of(rec))
    if getattr(rec, "residual_note", ""):
        metrics["residual_note"] = rec.residual_note
    if info.get("start_point_only"):
        metrics["start_point_only"] = True
    metrics["warnings"] = run_warnings(info)
    if scores is not None:
        metrics.update(scores.to_dict())
    metrics["info"] = {k: v for k, v in info.items() if k not in ("options",)}
    if case is not None:
        metrics["case"] = case.describe()
        if case.meta.get("privacy") is not None:  # a defense with accounting (dp-sgd): its (epsilon, delta)
            metrics["privacy"] = dict(case.meta["privacy"])
    if extra:
        metrics.update(extra)
    return metrics


def write_files(out: Path, rec, *, truth=None, scores=None, case=None, config: dict | None = None,
                extra: dict | None = None) -> None:
    """Write the files of a run directory into the existing folder ``out`` (no atomicity: use
    :func:`write_report`)."""
    from safetensors.torch import save_file

    inputs = rec.inputs.detach().cpu()
    shown = inputs
    if scores is not None and scores.order and truth is not None and inputs.shape[0] >= truth.inputs.shape[0]:
        shown = inputs[torch.as_tensor(scores.order)]  # aligned to the truth row
    tensors = {"inputs": inputs.contiguous()}
    if rec.labels is not None:
        tensors["labels"] = rec.labels.detach().cpu().contiguous()
    save_file(tensors, str(out / "reconstruction.safetensors"))

    rows, captions = [], []
    if truth is not None:
        rows.append(("truth", truth.inputs.detach().cpu()))
        captions.append([f"label {int(v)}" for v in truth.labels.tolist()] if truth.labels is not None else [])
    rows.append((rec.attack or "reconstruction", shown))
    captions.append([f"{p:.1f} dB" for p in scores.psnr_per_image] if scores is not None else [])
    image_grid(out / "reconstruction.png", rows, captions)

    metrics = metrics_of(rec, scores=scores, case=case, extra=extra)
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
    if rec.history:
        (out / "history.json").write_text(json.dumps(to_jsonable(rec.history)))
    write_html(out, metrics, config or {})
    (out / "config.json").write_text(json.dumps(to_jsonable(config or {}), indent=2))  # last: marks a run


def write_report(out_dir: str | Path | RunDirectory, rec, *, truth=None, scores=None, case=None,
                 config: dict | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the run directory for a reconstruction and return its path.

    rec: a Reconstruction. truth / scores: optional (a real observed update has no truth). case: adds the case
    description. config: everything needed to re-run (written to config.json as given).
    out_dir: a path, or a :class:`RunDirectory` reserved before the work (it stays reserved).
    overwrite: replace a previous run in ``out_dir``; without it an existing non-empty directory is an
    :class:`~gradleak.errors.OutputError`, as are a file, a read-only parent and a directory another run is
    writing. The files are written to a temporary directory beside ``out_dir`` and renamed into place, so the
    directory holds either the previous run or the complete new one.
    """
    def fill(tmp: Path) -> None:
        write_files(tmp, rec, truth=truth, scores=scores, case=case, config=config, extra=extra)

    if isinstance(out_dir, RunDirectory):
        return out_dir.write(fill)
    with RunDirectory(out_dir, overwrite=overwrite) as rd:
        return rd.write(fill)


__all__ = ["write_report", "write_files", "metrics_of", "counts_of", "run_warnings"]
