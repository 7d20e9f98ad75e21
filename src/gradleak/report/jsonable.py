"""Plain JSON values from tensors, numpy values, paths and non-finite floats."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(v: Any) -> Any:
    """Convert tensors / numpy / paths / non-finite floats / objects with ``to_dict()`` into plain JSON values."""
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
    if callable(getattr(v, "to_dict", None)):  # typed reports (LayerReport, ...) say how they are written
        return to_jsonable(v.to_dict())
    return repr(v)
