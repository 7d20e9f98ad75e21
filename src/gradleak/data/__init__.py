"""Data: bundled real photos, scikit-learn digits, local CIFAR-10 / image folders, a user's own images.

``load(source, num_images=..., image_size=...)`` returns a :class:`Dataset` whose images are float32 in
[0, 1] (N, C, H, W) and whose :class:`~gradleak.DataSpec` carries the normalisation the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..case import DataSpec
from ..errors import DataError, ValidationError
from .samples import SAMPLE_NAMES, load_photo

# Normalisation of the bundled photos (ImageNet statistics, as for natural photographs).
PHOTO_MEAN = (0.485, 0.456, 0.406)
PHOTO_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64; spec: DataSpec; names: one per image;
    notes: facts the user should be told (e.g. how labels were assigned)."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DataSpec
    names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, num_images: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels ``start .. start + num_images``."""
        if num_images < 1 or start < 0 or start + num_images > len(self):
            raise ValidationError("dataset batch", [f"asked for images {start}..{start + num_images - 1}, the "
                                                    f"dataset '{self.spec.name}' has {len(self)}"])
        sl = slice(start, start + num_images)
        return self.images[sl].clone(), self.labels[sl].clone()


def samples(image_size: int = 32, num_images: int | None = None, channels: int = 3) -> Dataset:
    """The bundled photos, centre-cropped and resized to ``image_size``; label = photo index."""
    n = len(SAMPLE_NAMES) if num_images is None else int(num_images)
    if not 1 <= n <= len(SAMPLE_NAMES):
        raise ValidationError("samples", [f"num_images must be 1..{len(SAMPLE_NAMES)} (bundled photos), got {n}"])
    if channels not in (1, 3):
        raise ValidationError("samples", [f"channels must be 1 or 3, got {channels}"])
    imgs = torch.from_numpy(np.stack([load_photo(i, image_size, channels) for i in range(n)]))
    mean, std = (PHOTO_MEAN, PHOTO_STD) if channels == 3 else ((0.449,), (0.226,))
    spec = DataSpec(shape=tuple(imgs.shape[1:]), num_classes=len(SAMPLE_NAMES), mean=mean, std=std, name="samples")
    return Dataset(imgs, torch.arange(n, dtype=torch.long), spec, SAMPLE_NAMES[:n])


__all__ = ["Dataset", "samples", "SAMPLE_NAMES", "PHOTO_MEAN", "PHOTO_STD", "DataError"]
