"""The :class:`Dataset` every loader returns, the normalisation statistics, and the shared steps of every
loader: choosing the images to load and packing them with their spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..case import DataSpec
from ..errors import DataError, ValidationError

# ImageNet statistics (natural RGB photographs) and their grey equivalent.
PHOTO_MEAN = (0.485, 0.456, 0.406)
PHOTO_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)
# CIFAR-10 training-set channel statistics (as used by Inverting Gradients' code and most CIFAR work).
CIFAR10_MEAN = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
CIFAR10_STD = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)


@dataclass(frozen=True)
class Dataset:
    """A labelled image set.

    images: (N, C, H, W) float32 in [0, 1]; labels: (N,) int64; spec: :class:`~gradleak.DataSpec`
    (shape, classes, normalisation); names: one per image; notes: facts the user should be told (e.g. how
    labels were assigned); class_names: one per class when the source names them (folders, CIFAR-10)."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DataSpec
    names: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, num_images: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (B, C, H, W) and labels (B,) ``start .. start + num_images`` (copies)."""
        if num_images < 1 or start < 0 or start + num_images > len(self):
            raise ValidationError("dataset batch", [f"asked for images {start}..{start + num_images - 1}, the "
                                                    f"dataset '{self.spec.name}' has {len(self)}"])
        sl = slice(start, start + num_images)
        return self.images[sl].clone(), self.labels[sl].clone()

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "Dataset":
        """The images at ``indices`` (same spec, class names and notes)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        names = tuple(self.names[i] for i in idx.tolist()) if self.names else ()
        return Dataset(self.images[idx].clone(), self.labels[idx].clone(), self.spec, names, self.notes,
                       self.class_names)


def _stats(channels: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m = (PHOTO_MEAN if channels == 3 else GREY_MEAN) if mean is None else tuple(float(v) for v in np.atleast_1d(mean))
    s = (PHOTO_STD if channels == 3 else GREY_STD) if std is None else tuple(float(v) for v in np.atleast_1d(std))
    return m, s


def _select(total: int, num_images: int | None, start: int, shuffle: bool, seed: int | None,
            what: str) -> np.ndarray:
    """Indices of the images to load: ``start .. start + num_images`` of the source's order (or of a
    seeded permutation of it)."""
    problems = []
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or start < 0:
        problems.append(f"start must be an int >= 0, got {start!r}")
    if num_images is not None and (not isinstance(num_images, (int, np.integer)) or isinstance(num_images, bool)
                                   or num_images < 1):
        problems.append(f"num_images must be an int >= 1 (or None for all), got {num_images!r}")
    if problems:
        raise ValidationError("load", problems)
    if total == 0:
        raise DataError(f"{what} holds no images")
    n = total - start if num_images is None else int(num_images)
    if start + n > total or n < 1:
        raise ValidationError("load", [f"asked for {n} image(s) starting at index {start}, but {what} holds "
                                       f"{total} (expected start + num_images <= {total})"])
    order = np.arange(total)
    if shuffle:
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        order = torch.randperm(total, generator=g).numpy()
    return order[start:start + n]


def _finish(images: np.ndarray, labels: np.ndarray, *, num_classes: int, name: str, mean, std,
            names, notes=(), class_names=()) -> Dataset:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    m, s = _stats(x.shape[1], mean, std)
    spec = DataSpec(shape=tuple(x.shape[1:]), num_classes=int(num_classes), mean=m, std=s, name=name)
    return Dataset(x, y, spec, tuple(names), tuple(notes), tuple(class_names))
