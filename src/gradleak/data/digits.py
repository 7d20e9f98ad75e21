"""scikit-learn's handwritten digits (ship with scikit-learn)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .dataset import Dataset, _finish, _select
from .transforms import _convert_channels, _hw, _resize_batch


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = (np.asarray(d.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    x.setflags(write=False)
    y = np.asarray(d.target, dtype=np.int64)
    y.setflags(write=False)
    return x, y


def digits_stats() -> tuple[float, float]:
    """Mean and std of all 1,797 scikit-learn digits in [0, 1] (values / 16)."""
    x, _ = _digits_arrays()
    return float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))


def load_digits(*, num_images: int | None = None, image_size=None, channels: int | None = None, start: int = 0,
                shuffle: bool = False, seed: int | None = 0, mean=None, std=None) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (ships with scikit-learn): (N, 1, 8, 8), values / 16, labels
    0..9, normalised with the digits' own mean/std. ``image_size`` resizes (bilinear when growing)."""
    x, y = _digits_arrays()
    idx = _select(len(x), num_images, start, shuffle, seed, "the digits set")
    imgs = _resize_batch(x[idx], _hw(image_size))
    imgs = np.stack([_convert_channels(im, channels) for im in imgs])
    if mean is None and std is None:
        mu, sd = digits_stats()
        c = imgs.shape[1]
        mean, std = (mu,) * c, (sd,) * c
    return _finish(imgs, y[idx], num_classes=10, name="digits", mean=mean, std=std,
                   names=[f"digits-{int(i)}" for i in idx], class_names=[str(c) for c in range(10)])
