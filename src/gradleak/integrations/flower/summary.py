"""The audit over rounds: ``leakage.json``, one line per round, the plot of leakage over rounds and a
self-contained page (``index.html``) linking every record's own report."""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

SCHEMA = "gradleak.flower-audit/1"


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def per_round(records: Sequence) -> list[dict[str, Any]]:
    """One entry per audited round: clients, errors, residual (min / median) and PSNR (mean / max, the client
    with the max) where the truth was shared."""
    out = []
    for r in sorted({rec.server_round for rec in records}):
        rs = [rec for rec in records if rec.server_round == r]
        res = _finite(rec.residual for rec in rs)
        with_psnr = [rec for rec in rs if rec.psnr is not None and math.isfinite(rec.psnr)]
        top = max(with_psnr, key=lambda rec: rec.psnr) if with_psnr else None
        out.append({"round": r, "clients": len(rs), "errors": sum(rec.error is not None for rec in rs),
                    "residual_min": min(res) if res else None,
                    "residual_median": statistics.median(res) if res else None,
                    "psnr_mean": statistics.fmean(rec.psnr for rec in with_psnr) if with_psnr else None,
                    "psnr_max": top.psnr if top else None, "psnr_max_client": top.client if top else None,
                    "assumptions": sum(bool(rec.replay and rec.replay.assumptions) for rec in rs)})
    return out


def worst_round(records: Sequence) -> dict[str, Any] | None:
    """The round at which leakage was worst: the highest PSNR of any client where the truth was shared (ties:
    the lower residual), else the lowest residual (the reconstruction that best explains its update)."""
    rounds = per_round(records)
    scored = [r for r in rounds if r["psnr_max"] is not None]
    if scored:
        best = max(scored, key=lambda r: (r["psnr_max"], -(r["residual_min"] if r["residual_min"] is not None
                                                            else math.inf)))
        return {"round": best["round"], "by": "psnr", "value": best["psnr_max"],
                "why": f"PSNR {best['psnr_max']:.1f} dB for {best['psnr_max_client']}"}
    fit = [r for r in rounds if r["residual_min"] is not None]
    if fit:
        best = min(fit, key=lambda r: r["residual_min"])
        return {"round": best["round"], "by": "residual", "value": best["residual_min"],
                "why": f"lowest residual {best['residual_min']:.3g}; no truth shared, so no PSNR"}
    return None


def round_line(records: Sequence, server_round: int) -> str:
    """The one line printed after a round."""
    rs = [rec for rec in records if rec.server_round == server_round]
    info = next((r for r in per_round(records) if r["round"] == server_round), None)
    if info is None:
        return f"[gradleak] round {server_round}: no client update audited"
    parts = [f"[gradleak] round {server_round}: {info['clients']} client(s)"]
    if info["residual_median"] is not None:
        parts.append(f"residual min {info['residual_min']:.3g} median {info['residual_median']:.3g}")
    if info["psnr_max"] is not None:
        parts.append(f"PSNR mean {info['psnr_mean']:.1f} dB, max {info['psnr_max']:.1f} dB ({info['psnr_max_client']})")
    elif rs:
        parts.append("no truth shared (residual only)")
    if info["errors"]:
        parts.append(f"{info['errors']} failed: " + "; ".join(rec.error for rec in rs if rec.error)[:200])
    if info["assumptions"]:
        parts.append(f"{info['assumptions']} with assumed replay settings")
    w = worst_round(records)
    if w is not None:
        parts.append(f"worst so far: round {w['round']}")
    parts.append(f"{sum(rec.seconds for rec in rs):.1f} s")
    return ", ".join(parts[:2]) + "; " + "; ".join(parts[2:])


def leakage_summary(records: Sequence, *, meta: dict[str, Any] | None = None, root: Path | None = None) -> dict:
    """What ``leakage.json`` holds: ``records`` (one per client per round), ``rounds`` and ``worst_round``."""
    return {"schema": SCHEMA, **(meta or {}), "worst_round": worst_round(records), "rounds": per_round(records),
            "records": [rec.to_dict(root) for rec in records]}


def plot_leakage(records: Sequence, path: Path) -> Path:
    """PNG of leakage over rounds: PSNR per client (where the truth was shared) and the residual per client."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    clients = sorted({rec.client for rec in records})
    has_psnr = any(rec.psnr is not None for rec in records)
    fig, axes = plt.subplots(2 if has_psnr else 1, 1, figsize=(7, 5.5 if has_psnr else 3), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    w = worst_round(records)
    for c in clients:
        rs = sorted((rec for rec in records if rec.client == c), key=lambda rec: rec.server_round)
        if has_psnr:
            pts = [(rec.server_round, rec.psnr) for rec in rs if rec.psnr is not None]
            if pts:
                axes[0].plot(*zip(*pts), marker="o", label=c)
        pts = [(rec.server_round, max(rec.residual, 1e-300)) for rec in rs if math.isfinite(rec.residual)]
        if pts:
            axes[-1].plot(*zip(*pts), marker="o", label=c)
    if has_psnr:
        axes[0].set_ylabel("PSNR (dB)")
        axes[0].set_title("reconstruction quality per client (higher: more leakage)")
    axes[-1].set_yscale("log")
    axes[-1].set_ylabel("residual (1 - cosine)")
    axes[-1].set_xlabel("round")
    rounds = sorted({rec.server_round for rec in records})
    axes[-1].set_xticks(rounds)
    for ax in axes:
        if w is not None:
            ax.axvline(w["round"], color="red", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    if clients and len(clients) <= 12:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_page(out_dir: Path, summary: dict, png: Path) -> Path:
    """``index.html``: one self-contained page (the plot inlined) over every round and client."""
    img = base64.b64encode(png.read_bytes()).decode()
    w = summary.get("worst_round")
    worst = (f"Leakage was worst in <b>round {w['round']}</b> ({html.escape(w['why'])})." if w else
             "No reconstruction succeeded.")
    truth = ("PSNR/SSIM are measured against the batches the simulated clients shared through the simulation-only "
             "truth channel." if summary.get("truth_channel") else
             "No truth channel: only the residual (how well each reconstruction explains its update) is known.")
    head = ["round", "client", "residual", "psnr", "ssim", "label_accuracy", "kind", "seconds"]
    rows = []
    for r in summary["records"]:
        link = (f'<a href="{html.escape(r["dir"])}/report.html">{html.escape(r["client"])}</a>' if r.get("dir")
                else html.escape(r["client"]))
        cells = [str(r["round"]), link] + [html.escape(_fmt(r.get(k))) for k in head[2:]]
        notes = [html.escape(a) for a in r.get("assumptions", [])] + [html.escape(n) for n in r.get("notes", [])]
        if r.get("error"):
            notes.insert(0, "<b>" + html.escape(r["error"]) + "</b>")
        cells.append("<br>".join(notes) or "reported by the client (exact replay)")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head + ["replay assumptions"])
    rounds = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in
                                      ("round", "clients", "errors", "residual_min", "residual_median", "psnr_mean",
                                       "psnr_max", "psnr_max_client")) + "</tr>" for r in summary["rounds"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gradleak: Flower leakage audit</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}}img{{max-width:100%}}</style>
</head><body><h1>Flower leakage audit</h1>
<p>Attack <b>{html.escape(str(summary.get('attack')))}</b> on model <b>{html.escape(str(summary.get('model')))}</b>,
every audited client update of every round. {worst} {truth}</p>
<img src="data:image/png;base64,{img}" alt="leakage over rounds">
<h2>Per round</h2><table><tr><th>round</th><th>clients</th><th>errors</th><th>residual min</th>
<th>residual median</th><th>PSNR mean</th><th>PSNR max</th><th>client at max</th></tr>{rounds}</table>
<h2>Per client and round</h2><table><tr>{th}</tr>{''.join(rows)}</table>
<p>Data: <code>leakage.json</code>. Each client link opens that update's reconstruction report.</p>
</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def write_summary(out_dir: Path, records: Sequence, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``leakage.json``, ``leakage.png`` and ``index.html`` into ``out_dir``; returns the json's path."""
    from ...report import to_jsonable

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = leakage_summary(records, meta=meta, root=out_dir)
    path = out_dir / "leakage.json"
    path.write_text(json.dumps(to_jsonable(summary), indent=2))
    if records:
        png = plot_leakage(records, out_dir / "leakage.png")
        write_page(out_dir, summary, png)
    return path
