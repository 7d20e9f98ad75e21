"""Data: bundled real photos, scikit-learn digits, local CIFAR-10 / image folders, a user's own images.

``load(source, num_images=..., image_size=...)`` returns a :class:`Dataset` whose images are float32 in
[0, 1] (N, C, H, W) and whose :class:`~gradleak.DataSpec` carries the normalisation the model sees;
``sources()`` lists the accepted sources.
"""

from __future__ import annotations

from ..errors import DataError, ValidationError
from .cifar import load_cifar10
from .dataset import CIFAR10_MEAN, CIFAR10_STD, GREY_MEAN, GREY_STD, PHOTO_MEAN, PHOTO_STD, Dataset
from .digits import digits_stats, load_digits
from .folders import load_folder
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, read_image
from .loaders import _samples_range, load, peek_spec, sources
from .tensors import TENSOR_EXTENSIONS, load_tensor_file
from .transforms import crop_resize
from .samples import SAMPLE_NAMES, cache_dir, load_photo


def samples(image_size: int = 32, num_images: int | None = None, channels: int = 3) -> Dataset:
    """The bundled photos (N, channels, S, S) in [0, 1], centre-cropped and resized to ``image_size``;
    label = photo index; ImageNet normalisation. Resized photos are cached (memory and disk), so repeated
    loads are cheap. Same as ``load('samples', ...)``."""
    n = len(SAMPLE_NAMES) if num_images is None else num_images
    if not isinstance(n, int) or not 1 <= n <= len(SAMPLE_NAMES):
        raise ValidationError("samples", [f"num_images must be 1..{len(SAMPLE_NAMES)} (bundled photos), got {n}"])
    if channels not in (1, 3):
        raise ValidationError("samples", [f"channels must be 1 or 3, got {channels}"])
    return _samples_range(num_images=n, image_size=image_size, channels=channels, start=0, shuffle=False, seed=0,
                          mean=None, std=None)


__all__ = ["Dataset", "load", "sources", "samples", "load_digits", "load_cifar10", "load_folder",
           "load_tensor_file", "load_photo", "crop_resize", "digits_stats", "cache_dir", "SAMPLE_NAMES",
           "PHOTO_MEAN", "PHOTO_STD", "GREY_MEAN", "GREY_STD", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGE_EXTENSIONS",
           "TENSOR_EXTENSIONS", "MAX_IMAGE_PIXELS", "read_image", "peek_spec", "DataError"]
