"""The pictures and the page of a run directory: the PNG grid (truth row above reconstruction row) and the
self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from .jsonable import to_jsonable


def _as_hwc(img: torch.Tensor, shape_hint=None) -> np.ndarray:
    a = img.detach().cpu().double().clamp(0, 1).numpy()
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
        return a[:, :, 0] if a.shape[2] == 1 else a
    if a.ndim == 1:
        side = int(round(math.sqrt(a.size)))
        if side * side == a.size:
            return a.reshape(side, side)
        return a[None, :]
    return a


def image_grid(path: str | Path, rows: list[tuple[str, torch.Tensor]], captions: list[list[str]] | None = None,
               max_images: int = 16) -> Path:
    """Save a PNG grid: one row per (title, images (B, ...)) pair, optional caption under each image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(max(r[1].shape[0] for r in rows), max_images)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 0.8, 1.9 * len(rows)), squeeze=False)
    for i, (title, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < imgs.shape[0]:
                a = _as_hwc(imgs[j])
                ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                if captions and captions[i] and j < len(captions[i]):
                    ax.set_xlabel(captions[i][j], fontsize=8)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(out: Path, metrics: dict, config: dict) -> None:
    png = base64.b64encode((out / "reconstruction.png").read_bytes()).decode()
    keys = ["attack", "kind", "psnr", "ssim", "mse", "label_accuracy", "residual", "seconds", "outer_steps",
            "gradient_evaluations", "iterations", "num_images", "aggregate_clients", "interrupted"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(metrics.get(k)))}</td></tr>" for k in keys
                   if k in metrics)
    warn = "".join(f"<li>{html.escape(str(w))}</li>" for w in metrics.get("warnings") or ())
    layer_html = f"<h2>Warnings</h2><ul>{warn}</ul>" if warn else ""
    layer_html += _privacy_html(metrics.get("privacy"))
    layers = to_jsonable(metrics.get("info", {}).get("layers"))  # LayerReports (or dicts of an older run)
    if isinstance(layers, list) and layers and isinstance(layers[0], dict):
        cols = [c for c in layers[0] if c != "notes" and not isinstance(layers[0][c], (dict, list))]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(l.get(c)))}</td>" for c in cols) + "</tr>" for l in layers)
        layer_html += f"<h2>Per layer</h2><table><tr>{head}</tr>{body}</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gradleak: {html.escape(str(metrics.get('attack')))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>gradleak reconstruction report</h1><img src="data:image/png;base64,{png}" alt="truth above reconstruction">
<h2>Scores</h2><table>{rows}</table>{layer_html}
<h2>Configuration</h2><pre>{html.escape(json.dumps(to_jsonable(config), indent=2))}</pre></body></html>"""
    (out / "report.html").write_text(page)


def _privacy_html(p) -> str:
    """The run's privacy accounting (a defense with one, e.g. dp-sgd): epsilon first, then delta and what the
    accountant assumed (steps = rounds x steps per round, sampling rate, noise, clipping, adjacency)."""
    if not isinstance(p, dict):
        return ""
    eps = p.get("epsilon")
    head = (f"&epsilon; = {html.escape(_fmt(eps))} at &delta; = {html.escape(_fmt(p.get('delta')))}" if eps is not None
            else f"no privacy guarantee ({html.escape(str(p.get('note', 'epsilon is infinite')))})")
    steps = str(p.get("steps"))
    if p.get("rounds") is not None:
        steps += f" ({p['rounds']} round(s) x {p.get('steps_per_round')} step(s) per round)"
    rows = [("mechanism", p.get("mechanism")), ("accountant", p.get("accountant")), ("accounted steps", steps),
            ("sampling rate", p.get("sample_rate")), ("noise multiplier", p.get("noise_multiplier")),
            ("max grad norm", p.get("max_grad_norm")), ("assumes", p.get("assumes"))]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
                   if v is not None)
    return f"<h2>Privacy</h2><p>{head}</p><table>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
