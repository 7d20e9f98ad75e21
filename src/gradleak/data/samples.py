"""Real photographs that ship inside installed packages (scikit-image, scikit-learn, matplotlib), so demos
and tests run offline. Each photo has its own label (its index)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

# (name, loader). The first eight are colour photos: benchmarks use "the first 8 bundled photos".
_PHOTOS: list[tuple[str, str]] = [
    ("astronaut", "skimage:astronaut"),
    ("chelsea-cat", "skimage:chelsea"),
    ("coffee", "skimage:coffee"),
    ("rocket", "skimage:rocket"),
    ("china-temple", "sklearn:china.jpg"),
    ("flower", "sklearn:flower.jpg"),
    ("grace-hopper", "matplotlib:grace_hopper.jpg"),
    ("motorcycle", "skimage:stereo_motorcycle"),
    ("hubble", "skimage:hubble_deep_field"),
    ("immunohistochemistry", "skimage:immunohistochemistry"),
    ("retina", "skimage:retina"),
    ("camera", "skimage:camera"),
    ("coins", "skimage:coins"),
    ("moon", "skimage:moon"),
    ("grass", "skimage:grass"),
    ("gravel", "skimage:gravel"),
    ("brick", "skimage:brick"),
    ("clock", "skimage:clock"),
    ("cell", "skimage:cell"),
]

SAMPLE_NAMES: tuple[str, ...] = tuple(n for n, _ in _PHOTOS)


@lru_cache(maxsize=None)
def _raw(source: str) -> np.ndarray:
    pkg, key = source.split(":", 1)
    if pkg == "skimage":
        import skimage.data

        im = getattr(skimage.data, key)()
        if isinstance(im, tuple):
            im = im[0]
    elif pkg == "sklearn":
        from sklearn.datasets import load_sample_image

        im = load_sample_image(key)
    else:
        import matplotlib.cbook as cbook
        from PIL import Image

        with cbook.get_sample_data(key) as fh:
            im = np.asarray(Image.open(fh).convert("RGB"))
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 3 and im.shape[2] == 4:
        im = im[:, :, :3]
    return im


def center_square_resize(im: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Centre-crop an (H, W[, C]) image to a square (or to the target aspect) and resize it; float in [0, 1]."""
    from skimage.transform import resize

    th, tw = (size, size) if isinstance(size, int) else size
    h, w = im.shape[:2]
    target = tw / th
    if w / h > target:
        nw = int(round(h * target))
        x0 = (w - nw) // 2
        im = im[:, x0:x0 + nw]
    else:
        nh = int(round(w / target))
        y0 = (h - nh) // 2
        im = im[y0:y0 + nh]
    im = im.astype(np.float64)
    if im.max() > 1.0:
        im = im / 255.0
    out = resize(im, (th, tw), anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0.0, 1.0)


def cache_dir() -> Path | None:
    """Where resized photos are cached on disk: ``$GRADLEAK_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradleak``,
    else ``~/.cache/gradleak``. ``GRADLEAK_CACHE_DIR=""`` (empty) or ``GRADLEAK_NO_CACHE=1`` disables it."""
    if os.environ.get("GRADLEAK_NO_CACHE", "").strip() not in ("", "0"):
        return None
    env = os.environ.get("GRADLEAK_CACHE_DIR")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradleak"


def _source_version(source: str) -> str:
    pkg = source.split(":", 1)[0]
    mod = {"skimage": "skimage", "sklearn": "sklearn", "matplotlib": "matplotlib"}[pkg]
    try:
        from importlib.metadata import version

        return version({"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(mod, mod))
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _cache_file(index: int, size: tuple[int, int], channels: int) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    name, source = _PHOTOS[index]
    key = f"v1|{source}|{_source_version(source)}|{size[0]}x{size[1]}|c{channels}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return root / "samples" / f"{name}-{size[0]}x{size[1]}-c{channels}-{digest}.npy"


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:
        return None
    if arr.shape != shape or arr.dtype != np.float32 or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        return None
    return arr


def _write_cache(path: Path, arr: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            os.replace(tmp, path)  # atomic: readers never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only or full disk only costs speed


def _compute_photo(index: int, size: tuple[int, int], channels: int) -> np.ndarray:
    im = center_square_resize(_raw(_PHOTOS[index][1]), size)
    if im.ndim == 2:
        im = im[:, :, None]
    if channels == 1 and im.shape[2] == 3:
        im = im @ np.array([0.2125, 0.7154, 0.0721])[:, None]
    elif channels == 3 and im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    return np.ascontiguousarray(im.transpose(2, 0, 1)).astype(np.float32)


@lru_cache(maxsize=512)
def _cached_photo(index: int, size: tuple[int, int], channels: int) -> np.ndarray:
    path = _cache_file(index, size, channels)
    arr = None if path is None else _read_cache(path, (channels, *size))
    if arr is None:
        arr = _compute_photo(index, size, channels)
        if path is not None:
            _write_cache(path, arr)
    arr.setflags(write=False)
    return arr


def load_photo(index: int, size: int | tuple[int, int] = 32, channels: int = 3) -> np.ndarray:
    """Photo ``index`` as a float32 array (channels, H, W) in [0, 1] (a fresh copy).

    Resized photos are cached in memory per (index, size, channels), and on disk under :func:`cache_dir`
    (written atomically, validated on read, recomputed when missing or damaged), so only the very first
    load of a size pays the ~3 s of decoding and anti-aliased resizing."""
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    return _cached_photo(int(index), hw, int(channels)).copy()
