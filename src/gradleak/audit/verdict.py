"""From job results to the audit's verdict: per defense, the best reconstruction an attacker gets of each image.

"Worst case" is the client's worst case: for each image the highest PSNR (and SSIM) over every attack and batch
size that reconstructed it; an image is recognisable when that PSNR or SSIM reaches the thresholds of
:mod:`gradleak.audit.schema`. A defense with no recognisable image is reported as exactly that — for the attacks,
budget and images run — never as "safe"; one with failed or cancelled jobs and no recognisable image is
"incomplete".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


HISTORY_POINTS = 200


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def json_number(v) -> float | None:
    """A float from a JSON value: ±inf for the strings 'inf' / '-inf' (how audit.json writes an infinite
    PSNR: an exact reconstruction), None for null, NaN and anything else."""
    if v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return None
    return float(v)


def downsample(history: list, points: int = HISTORY_POINTS) -> list[float]:
    """At most ``points`` values, evenly spaced, always keeping the last."""
    h = [float(v) for v in history if isinstance(v, (int, float))]
    if len(h) <= points:
        return h
    step = (len(h) - 1) / (points - 1)
    return [h[round(i * step)] for i in range(points)]


def job_row(job, status: str, *, error: str | None = None, audit_dir: Path) -> dict[str, Any]:
    """One ``jobs`` entry of audit.json from a planned job and what its run directory holds."""
    row: dict[str, Any] = {"id": job.id, "attack": job.attack, "defense": job.defense, "batch_size": job.batch_size,
                           "images": list(job.images), "status": status, "error": error,
                           "dir": str(Path(job.run.out).relative_to(audit_dir)), "psnr": None, "psnr_per_image": [],
                           "ssim": None, "ssim_per_image": [], "residual": None, "kind": None, "seconds": None,
                           "warnings": [], "history": []}
    out = Path(job.run.out)
    metrics = read_metrics(out)
    if metrics is None:
        return row
    # under secure aggregation the truth holds every client's images: score the attacked client's only
    scored = metrics.get("target_client") or metrics
    for k in ("psnr", "ssim"):
        row[k] = _finite(scored.get(k))
    for k in ("residual", "seconds"):
        row[k] = _finite(metrics.get(k))
    row["psnr_per_image"] = [_finite(v) for v in scored.get("psnr_per_image") or []][:len(job.images)]
    row["ssim_per_image"] = [_finite(v) for v in scored.get("ssim_per_image") or []][:len(job.images)]
    if metrics.get("aggregate_clients"):
        row["aggregate_clients"] = metrics["aggregate_clients"]
    row["kind"] = metrics.get("kind")
    row["warnings"] = list(metrics.get("warnings") or [])
    row["notes"] = list(metrics.get("notes") or [])
    row["privacy"] = (metrics.get("case") or {}).get("meta", {}).get("privacy")
    row["batched_paths"] = _paths_claim((metrics.get("info") or {}).get("batched"))
    try:
        row["history"] = downsample(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        pass
    return row


def _paths_claim(note) -> str | None:
    """What a batched run's trials share with the job run alone (``info.batched.paths``, the first stage's)."""
    for n in note if isinstance(note, list) else [note]:
        if isinstance(n, dict) and n.get("batched") is True and n.get("paths"):
            return str(n["paths"])
    return None


def read_metrics(run_dir: Path) -> dict | None:
    """A finished job's metrics.json (None when the directory holds no finished run)."""
    if not (run_dir / "config.json").is_file():
        return None
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def is_recognisable(psnr: float | None, ssim: float | None) -> bool:
    from .schema import RECOGNISABLE_PSNR_DB, RECOGNISABLE_SSIM

    return (psnr is not None and psnr >= RECOGNISABLE_PSNR_DB) or (ssim is not None and ssim >= RECOGNISABLE_SSIM)


def best_per_image(rows: list[dict], defense: str) -> dict[int, dict[str, Any]]:
    """image index -> the best reconstruction of it under ``defense``: the highest-PSNR one (psnr, ssim, attack,
    job, position in that job's batch) and ``ssim_best``, the highest SSIM any attack reached on it. Over the
    scored jobs (``SCORED_STATUSES``) only; rows read back from an audit.json may be incomplete: a missing or
    NaN score counts as no score, a row without images as none."""
    from .schema import SCORED_STATUSES

    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if not isinstance(r, dict) or r.get("defense") != defense or r.get("status") not in SCORED_STATUSES:
            continue
        images = r.get("images") if isinstance(r.get("images"), list) else []
        ps = r.get("psnr_per_image") if isinstance(r.get("psnr_per_image"), list) else []
        ss = r.get("ssim_per_image") if isinstance(r.get("ssim_per_image"), list) else []
        for pos, img in enumerate(images):
            p = json_number(ps[pos]) if pos < len(ps) else None
            s = json_number(ss[pos]) if pos < len(ss) else None
            if p is None and s is None:
                continue
            cur = best.get(img)
            ssim_best = max([x for x in (s, cur and cur["ssim_best"]) if x is not None], default=None)
            if cur is None or (p if p is not None else -math.inf) > (cur["psnr"] if cur["psnr"] is not None else -math.inf):
                cur = best[img] = {"psnr": p, "ssim": s, "attack": r.get("attack"), "job": r.get("id"),
                                   "position": pos, "batch_size": r.get("batch_size")}
            cur["ssim_best"] = ssim_best
    return best


def verdicts(rows: list[dict], defenses: list[dict], images: list[int]) -> list[dict[str, Any]]:
    from .schema import RECOGNISABLE_PSNR_DB, RECOGNISABLE_SSIM

    out = []
    for d in defenses:
        spec = d["spec"]
        mine = [r for r in rows if r["defense"] == spec and r["status"] != "not applicable"]
        done = [r for r in mine if r["status"] in ("done", "resumed")]
        failed = [r for r in mine if r["status"] in ("failed", "cancelled", "interrupted")]
        best = best_per_image(rows, spec)
        rec = [i for i in images if i in best and is_recognisable(best[i]["psnr"], best[i]["ssim_best"])]
        worst_img = max(best, key=lambda i: best[i]["psnr"] if best[i]["psnr"] is not None else -math.inf) if best else None
        w = best.get(worst_img) if worst_img is not None else None
        ssims = [b["ssim_best"] for b in best.values() if b.get("ssim_best") is not None]
        attacks_run = sorted({r["attack"] for r in done})
        v = {"defense": spec, "label": d["label"], "worst_psnr": w["psnr"] if w else None,
             "worst_ssim": max(ssims) if ssims else None, "worst_attack": w["attack"] if w else None,
             "worst_image": worst_img, "recognisable": len(rec), "images": len(images),
             "share_recognisable": len(rec) / len(images) if images else 0.0, "jobs_done": len(done),
             "jobs_failed": len(failed), "attacks_run": attacks_run}
        if not mine:
            v["status"] = "incomplete"
            v["statement"] = (f"{d['label']}: no attack applies to these settings (see the skipped attacks and their "
                              "reasons, and the jobs found not applicable when they ran): no conclusion from "
                              "attacks; the risk analyses are all this audit has.")
        elif rec:
            v["status"] = "leaks"
            top = max(rec, key=lambda i: best[i]["psnr"] if best[i]["psnr"] is not None else -math.inf)
            b = best[top]
            how = (f"reaches {b['psnr']:.1f} dB PSNR" if b["psnr"] is not None and b["psnr"] >= RECOGNISABLE_PSNR_DB
                   else f"reaches SSIM {b['ssim_best']:.2f}" + (f" (PSNR {b['psnr']:.1f} dB)" if b["psnr"] is not None else ""))
            v["statement"] = (f"{d['label']}: {len(rec)} of {len(images)} image(s) recognisable (images "
                              f"{', '.join(f'#{i}' for i in rec)}); the best reconstruction ({b['attack']}, image "
                              f"#{top}) {how}.")
        elif failed or not done:
            v["status"] = "incomplete"
            v["statement"] = (f"{d['label']}: no recognisable image in the {len(done)} job(s) that finished, but "
                              f"{len(failed)} job(s) failed or did not finish: no conclusion.")
        else:
            best_txt = f"best {w['psnr']:.1f} dB by {w['attack']}" if w and w["psnr"] is not None else "no score"
            v["status"] = "no recognisable image"
            v["statement"] = (f"{d['label']}: no image reached {RECOGNISABLE_PSNR_DB:g} dB PSNR or SSIM "
                              f"{RECOGNISABLE_SSIM:g} under the {len(attacks_run)} attack(s) run ({best_txt}). This is "
                              "evidence for these attacks, this budget and these images, not a guarantee.")
        out.append(v)
    return out


__all__ = ["best_per_image", "downsample", "is_recognisable", "job_row", "json_number", "read_metrics", "verdicts"]
