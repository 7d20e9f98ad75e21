"""The run directory a user looks at: ``reconstruction.png`` (truth row above reconstruction row, PSNR under
each), ``metrics.json``, ``reconstruction.safetensors``, ``config.json`` (everything needed to re-run) and a
self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["write_report", "image_grid", "to_jsonable"]


def to_jsonable(v: Any) -> Any:
    """Convert tensors / numpy / paths / non-finite floats into plain JSON values."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return to_jsonable(v.detach().cpu().tolist()) if v.numel() <= 64 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


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


def write_report(out_dir: str | Path, rec, *, truth=None, scores=None, case=None, config: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write the run directory for a reconstruction and return its path.

    rec: a Reconstruction. truth / scores: optional (a real observed update has no truth). case: adds the case
    description. config: everything needed to re-run (written to config.json as given).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = rec.inputs.detach().cpu()
    shown = inputs
    if scores is not None and scores.order and truth is not None and inputs.shape[0] >= truth.inputs.shape[0]:
        shown = inputs[torch.as_tensor(scores.order)]  # aligned to the truth row
    tensors = {"inputs": inputs.contiguous()}
    if rec.labels is not None:
        tensors["labels"] = rec.labels.detach().cpu().contiguous()
    save_file(tensors, str(out / "reconstruction.safetensors"))

    rows = []
    captions = []
    if truth is not None:
        rows.append(("truth", truth.inputs.detach().cpu()))
        captions.append([f"label {int(v)}" for v in truth.labels.tolist()] if truth.labels is not None else [])
    rows.append((rec.attack or "reconstruction", shown))
    if scores is not None:
        captions.append([f"{p:.1f} dB" for p in scores.psnr_per_image])
    else:
        captions.append([])
    image_grid(out / "reconstruction.png", rows, captions)

    metrics = {
        "attack": rec.attack,
        "residual": rec.residual,
        "seconds": rec.info.get("seconds"),
        "iterations": len(rec.history) if rec.history else rec.info.get("iterations"),
        "num_images": int(inputs.shape[0]),
        "labels": None if rec.labels is None else rec.labels.tolist(),
        "interrupted": rec.info.get("interrupted", False),
    }
    if scores is not None:
        metrics.update(scores.to_dict())
    metrics["info"] = {k: v for k, v in rec.info.items() if k not in ("options",)}
    if case is not None:
        metrics["case"] = case.describe()
    if extra:
        metrics.update(extra)
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
    (out / "config.json").write_text(json.dumps(to_jsonable(config or {}), indent=2))
    if rec.history:
        (out / "history.json").write_text(json.dumps(to_jsonable(rec.history)))
    _write_html(out, metrics, config or {})
    return out


def _write_html(out: Path, metrics: dict, config: dict) -> None:
    png = base64.b64encode((out / "reconstruction.png").read_bytes()).decode()
    keys = ["attack", "psnr", "ssim", "mse", "label_accuracy", "residual", "seconds", "iterations", "num_images"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(metrics.get(k)))}</td></tr>" for k in keys
                   if k in metrics)
    layer_html = ""
    layers = metrics.get("info", {}).get("layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict):
        cols = list(layers[0].keys())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(l.get(c)))}</td>" for c in cols) + "</tr>" for l in layers)
        layer_html = f"<h2>Per layer</h2><table><tr>{head}</tr>{body}</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gradleak: {html.escape(str(metrics.get('attack')))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>gradleak reconstruction report</h1><img src="data:image/png;base64,{png}" alt="truth above reconstruction">
<h2>Scores</h2><table>{rows}</table>{layer_html}
<h2>Configuration</h2><pre>{html.escape(json.dumps(to_jsonable(config), indent=2))}</pre></body></html>"""
    (out / "report.html").write_text(page)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
