"""Decoding one image file: bounded in pixels (a decompression bomb is a typed error naming the file) and
cheap for large photos (JPEG draft mode and an integer ``reduce`` before the anti-aliased resize)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Larger images are refused as possible decompression bombs: PIL's own error threshold (2 x its
# MAX_IMAGE_PIXELS), about 179 megapixels, e.g. a 13,000 x 13,000 photo. Monkeypatch to change it.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# EXIF orientation tag -> the PIL transpose that undoes it (as ImageOps.exif_transpose applies it)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def open_image(path: Path):
    """``PIL.Image.open`` with the pixel limit :data:`MAX_IMAGE_PIXELS` (a :class:`DataError` naming the file
    above it; PIL's own decompression-bomb warning and error are replaced by it). Reads the header only."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(f"{path} is too large to decode safely (more than {MAX_IMAGE_PIXELS:,} pixels; a possible "
                        "decompression bomb): shrink it first") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise DataError(f"{path} is too large to decode safely ({w} x {h} = {w * h:,} pixels, the limit is "
                        f"{MAX_IMAGE_PIXELS:,}; a possible decompression bomb): shrink it first")
    return im


def reduce_factor(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The integer factor an image of ``size`` (width, height) can be shrunk by, before it is centre-cropped and
    resized to ``target`` (height, width), while keeping at least twice the target's resolution along its
    shorter side (so the anti-aliased resize that follows is as accurate as from the full image). Independent
    of a 90-degree EXIF rotation. 1 when no shrinking is possible or no target is given."""
    if target is None:
        return 1
    return max(1, min(size) // (2 * max(target)))


def read_image(path: Path, channels: int, target: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Decode an image to (H, W, channels) float64 in [0, 1]. With ``target`` (height, width) of the resize that
    follows, a large image is decoded at reduced resolution (JPEG draft mode, then ``Image.reduce``); returns
    (array, factor) with the factor by which it was shrunk (1: full resolution)."""
    from PIL import Image

    with open_image(path) as im:
        w0 = im.size[0]
        orientation = im.getexif().get(0x0112, 1)
        factor = reduce_factor(im.size, target)
        if factor > 1 and im.format == "JPEG":
            im.draft("L" if channels == 1 else "RGB", (im.size[0] // factor, im.size[1] // factor))
            factor = reduce_factor(im.size, target)
        im.load()
        if factor > 1:
            try:
                im = im.reduce(factor)
            except ValueError:  # a mode reduce does not handle: decode at full size
                pass
        if orientation in _ORIENTATION:
            im = im.transpose(getattr(Image.Transpose, _ORIENTATION[orientation]))
        mode = im.mode
        if mode.startswith("I") or mode == "F":
            a = np.asarray(im, dtype=np.float64)
            scale = 1.0 if mode == "F" else (65535.0 if a.max() > 255 or mode.startswith("I;16") else 255.0)
            a = np.clip(a / scale, 0.0, 1.0)[:, :, None]
            if channels == 3:
                a = np.repeat(a, 3, axis=2)
        else:
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
            a = a[:, :, None] if a.ndim == 2 else a
        shrunk = max(1, round(w0 / (a.shape[1] if orientation not in (5, 6, 7, 8) else a.shape[0])))
    return a, shrunk


__all__ = ["IMAGE_EXTENSIONS", "GREY_MODES", "MAX_IMAGE_PIXELS", "open_image", "reduce_factor", "read_image"]
