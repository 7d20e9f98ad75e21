"""Image-array transforms shared by the loaders: the ``image_size`` argument, centre-crop + resize, channel
conversion."""

from __future__ import annotations

import numpy as np

from ..errors import ValidationError


def _hw(image_size) -> tuple[int, int] | None:
    """``image_size`` (an int or (height, width) of ints >= 1, or None) as (height, width)."""
    if image_size is None:
        return None
    ok = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    if ok(image_size):
        hw = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(ok(v) for v in image_size):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValidationError("load", [f"image_size must be a positive int or (height, width) of ints, got "
                                       f"{image_size!r}"])
    if min(hw) < 1:
        raise ValidationError("load", [f"image_size must be positive, got {image_size!r}"])
    return hw


def crop_resize(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop a float (H, W, C) image in [0, 1] to the aspect of ``size`` (height, width) and resize it
    (anti-aliased when shrinking, bilinear when growing). Returns float32 (h, w, C) in [0, 1]."""
    from skimage.transform import resize

    th, tw = size
    h, w = im.shape[:2]
    if (h, w) == (th, tw):
        return im.astype(np.float32)
    target = tw / th
    if w / h > target + 1e-9:
        nw = max(int(round(h * target)), 1)
        x0 = (w - nw) // 2
        im = im[:, x0:x0 + nw]
    elif w / h < target - 1e-9:
        nh = max(int(round(w / target)), 1)
        y0 = (h - nh) // 2
        im = im[y0:y0 + nh]
    shrink = im.shape[0] > th or im.shape[1] > tw
    out = resize(im.astype(np.float64), (th, tw, im.shape[2]), order=1, anti_aliasing=shrink,
                 preserve_range=True, mode="edge")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _convert_channels(chw: np.ndarray, channels: int | None) -> np.ndarray:
    """(C, H, W) float -> ``channels`` (1: ITU-R 709 luminance; 3: grey replicated)."""
    if channels is None or chw.shape[0] == channels:
        return chw
    if channels == 1:
        return (np.tensordot(np.array([0.2125, 0.7154, 0.0721], dtype=np.float32), chw, axes=1)[None]
                .astype(np.float32))
    return np.repeat(chw, 3, axis=0)


def _resize_batch(images: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, C, h, w)."""
    if hw is None or tuple(images.shape[2:]) == hw:
        return images.astype(np.float32, copy=False)
    return np.stack([crop_resize(im.transpose(1, 2, 0), hw).transpose(2, 0, 1) for im in images])
