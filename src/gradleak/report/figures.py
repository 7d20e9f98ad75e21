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


def image_uint8(img: torch.Tensor) -> np.ndarray:
    """One image (C, H, W), (H, W) or flat (a square number of pixels) in [0, 1] as a uint8 array (H, W) or
    (H, W, C), clamped to [0, 1] and rounded: what a PNG of it holds."""
    return np.rint(_as_hwc(img) * 255.0).astype(np.uint8)


def png_bytes(img: torch.Tensor | np.ndarray) -> bytes:
    """The PNG encoding of one image (a tensor in [0, 1], or a uint8 array from :func:`image_uint8`)."""
    import io

    from PIL import Image

    a = img if isinstance(img, np.ndarray) else image_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig, dpi: int = 100) -> bytes:
    """The PNG encoding of a matplotlib figure (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI, to embed a PNG in a page that opens offline."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


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


def frontier_png(pts: list[tuple[str, float, float | None, float | None]], psnr_threshold: float) -> bytes:
    """The privacy-utility frontier as a PNG: one marker per (label, accuracy drop in [0, 1], worst-case PSNR,
    share of images recognisable); left panel PSNR with the recognisability threshold, right panel the share."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4 + 0.22 * ((len(pts) + 1) // 2)))
    markers = "osD^vP*Xh<>"
    for ax, k, ylabel in ((axes[0], 2, "worst-case PSNR over attacks (dB)"),
                          (axes[1], 3, "share of images recognisable")):
        for i, p in enumerate(pts):
            if p[k] is not None and math.isfinite(p[k]):
                ax.plot(100 * p[1], p[k], markers[i % len(markers)], ms=8, color=f"C{i % 10}", label=p[0])
        ax.set_xlabel("accuracy drop (percentage points, held-out)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    axes[0].axhline(psnr_threshold, ls="--", color="#9b1c1c", lw=1, label=f"recognisable at {psnr_threshold:g} dB")
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo, max(hi, psnr_threshold + 1.5))
    axes[1].set_ylim(-0.05, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("privacy-utility frontier: lower and further left is better", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(pts) + 1) // 2), 1, 1))
    return figure_png(fig, dpi=100)


def convergence_png(by_attack: dict[str, list[tuple[str, list[float]]]]) -> bytes:
    """Small multiples of objective curves as a PNG: one panel per attack, one line per (label, history)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(by_attack)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    legend_rows = max((len(c) + 1) // 2 if len(c) <= 12 else 0 for c in by_attack.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, (3.0 + 0.16 * legend_rows) * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (attack, curves) in zip(axes.flat, by_attack.items()):
        for label, h in curves:
            ax.plot(range(1, len(h) + 1), h, lw=1.2, marker="o" if len(h) < 12 else None, ms=3, label=label)
        if all(v > 0 for _, h in curves for v in h):
            ax.set_yscale("log")
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel("recorded step", fontsize=8)
        ax.set_ylabel("objective", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(curves) <= 12:  # below the axes, where it hides no curve
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def write_html(out: Path, metrics: dict, config: dict) -> None:
    uri = png_data_uri((out / "reconstruction.png").read_bytes())
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
<h1>gradleak reconstruction report</h1><img src="{uri}" alt="truth above reconstruction">
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
