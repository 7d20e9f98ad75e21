"""A user's images from a tensor file: ``.pt``/``.pth`` (read with ``weights_only``), ``.npy``, ``.npz`` or
``.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import DataError, ValidationError
from .dataset import Dataset, _finish, _select
from .transforms import _convert_channels, _hw, _resize_batch

TENSOR_EXTENSIONS = (".pt", ".pth", ".npy", ".npz", ".safetensors")
_IMAGE_KEYS = ("images", "inputs", "x", "data")
_LABEL_KEYS = ("labels", "targets", "y")


def _read_tensor_file(path: Path) -> tuple[Any, Any, dict]:
    """(images, labels or None, extras) as numpy arrays / torch tensors."""
    suffix = path.suffix.lower()
    expected = ("expected a tensor file holding images (N, C, H, W) or (N, H, W), optionally with labels "
                "(a tensor, or a dict/safetensors with keys 'images' and 'labels')")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                        f"{expected}") from None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None, {}
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and all(isinstance(o, (torch.Tensor, np.ndarray))
                                                                      for o in obj):
        return obj[0], (obj[1] if len(obj) == 2 else None), {}
    if isinstance(obj, Mapping):
        keys = list(obj)
        img_key = next((k for k in _IMAGE_KEYS if k in obj), None)
        if img_key is None and len(obj) == 1:
            img_key = keys[0]
        if img_key is None:
            raise DataError(f"{path} holds the keys {keys}; expected an image tensor under one of {list(_IMAGE_KEYS)}"
                            f" (and optionally labels under one of {list(_LABEL_KEYS)})")
        lab_key = next((k for k in _LABEL_KEYS if k in obj), None)
        extras = {k: obj[k] for k in ("mean", "std", "num_classes") if k in obj}
        return obj[img_key], (obj[lab_key] if lab_key else None), extras
    raise DataError(f"{path} holds a {type(obj).__name__}; {expected}")


def load_tensor_file(path: str | Path, *, num_images: int | None = None, image_size=None,
                     channels: int | None = None, start: int = 0, shuffle: bool = False, seed: int | None = 0,
                     mean=None, std=None) -> Dataset:
    """Images from a ``.pt``/``.pth`` (``torch.save``, read with weights_only), ``.npy``, ``.npz`` or
    ``.safetensors`` file: a tensor (N, C, H, W) with C in {1, 3}, or (N, H, W) (greyscale), float in [0, 1]
    or uint8 (0..255); optionally labels int (N,) (a (images, labels) tuple, or keys 'images'/'labels'),
    and optional 'mean', 'std', 'num_classes' entries. Without labels, image i gets label i (said in notes)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"no such file: {p} (expected a tensor file {', '.join(TENSOR_EXTENSIONS)} or a folder of "
                        "images)")
    raw_x, raw_y, extras = _read_tensor_file(p)
    x = torch.as_tensor(np.asarray(raw_x) if isinstance(raw_x, np.ndarray) else raw_x)
    problems = []
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        problems.append(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    elif x.shape[1] not in (1, 3):
        hint = " (it looks channels-last: permute to (N, C, H, W))" if x.shape[-1] in (1, 3) else ""
        problems.append(f"images must have 1 or 3 channels in dim 1, i.e. (N, C, H, W); got {tuple(x.shape)}{hint}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            problems.append(f"images contain {int((~torch.isfinite(x)).sum())} NaN/inf value(s)")
        elif x.numel() and (x.min() < 0 or x.max() > 1):
            hint = " (looks like 0..255: divide by 255 or store uint8)" if x.max() > 1.5 else ""
            problems.append(f"float images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]{hint}")
    else:
        problems.append(f"images must be float in [0, 1] or uint8, got {x.dtype}")
    n = int(x.shape[0]) if x.ndim >= 1 else 0
    num_classes = extras.get("num_classes")
    if num_classes is not None:
        num_classes = int(torch.as_tensor(np.asarray(num_classes) if isinstance(num_classes, np.ndarray)
                                          else num_classes).reshape(-1)[0])
    y = None
    if raw_y is not None:
        y = torch.as_tensor(np.asarray(raw_y) if isinstance(raw_y, np.ndarray) else raw_y)
        if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
            problems.append(f"labels must be int class indices of shape ({n},), got {y.dtype} {tuple(y.shape)}")
        elif y.shape[0] != n:
            problems.append(f"labels has {y.shape[0]} entries, images has {n}")
        elif y.numel() and y.min() < 0:
            problems.append(f"labels must be >= 0, got min {int(y.min())}")
        elif num_classes is not None and y.numel() and y.max() >= num_classes:
            problems.append(f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got max "
                            f"{int(y.max())}")
    if problems:
        raise ValidationError(f"tensor file {p.name}", problems)
    idx = _select(n, num_images, start, shuffle, seed, f"the file {p}")
    imgs = _resize_batch(x[torch.as_tensor(idx)].numpy(), _hw(image_size))
    if channels not in (None, 1, 3):
        raise ValidationError("load", [f"channels must be 1 or 3, got {channels!r}"])
    imgs = np.stack([_convert_channels(im, channels) for im in imgs])
    notes = []
    if y is None:
        labels = idx.copy()
        num_classes = num_classes or max(n, 2)
        notes.append(f"{p.name} holds no labels: image i of its {n} images gets label i ({num_classes} classes); "
                     "store a 'labels' tensor to give real labels")
    else:
        labels = y.to(torch.long).numpy()[idx]
        num_classes = num_classes or max(int(y.max()) + 1 if y.numel() else 2, 2)
    if mean is None and "mean" in extras:
        mean = np.asarray(extras["mean"], dtype=np.float64).reshape(-1)
    if std is None and "std" in extras:
        std = np.asarray(extras["std"], dtype=np.float64).reshape(-1)
    return _finish(imgs, labels, num_classes=num_classes, name="tensor", mean=mean, std=std,
                   names=[f"{p.name}[{int(i)}]" for i in idx], notes=notes)
