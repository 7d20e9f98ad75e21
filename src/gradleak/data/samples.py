"""Real photographs that ship inside installed packages (scikit-image, scikit-learn, matplotlib), so demos
and tests run offline. Each photo has its own label (its index)."""

from __future__ import annotations

from functools import lru_cache

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


def load_photo(index: int, size: int | tuple[int, int] = 32, channels: int = 3) -> np.ndarray:
    """Photo ``index`` as a float32 array (channels, H, W) in [0, 1]."""
    im = center_square_resize(_raw(_PHOTOS[index][1]), size)
    if im.ndim == 2:
        im = im[:, :, None]
    if channels == 1 and im.shape[2] == 3:
        im = im @ np.array([0.2125, 0.7154, 0.0721])[:, None]
    elif channels == 3 and im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    return np.ascontiguousarray(im.transpose(2, 0, 1)).astype(np.float32)
