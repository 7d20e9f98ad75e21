"""Loaders: :func:`load` dispatches a source string ('samples', 'digits', 'cifar10:ROOT', 'folder:DIR', a folder
of images or a tensor file) to the loader of that source (one module each: :mod:`.digits`, :mod:`.cifar`,
:mod:`.folders`, :mod:`.tensors`; the bundled photos in :mod:`.samples`).

Every loader returns a :class:`Dataset`: images float32 (N, C, H, W) in [0, 1], labels int64 (N,), and a
:class:`~gradleak.DataSpec` with the normalisation (mean/std) the model sees. Grayscale data stays one
channel. Only the requested images are decoded and resized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, ValidationError
from .cifar import load_cifar10
from .dataset import Dataset, _finish, _select
from .digits import load_digits
from .folders import load_folder
from .tensors import TENSOR_EXTENSIONS, load_tensor_file
from .transforms import _hw


_SOURCES = [
    ("samples", "19 real photos bundled with scikit-image / scikit-learn / matplotlib, one label each, "
                "ImageNet normalisation (default 32x32)"),
    ("digits", "scikit-learn's 1,797 handwritten digits, 1x8x8 greyscale (values/16), 10 classes"),
    ("cifar10:ROOT", "a local CIFAR-10 python folder (cifar-10-batches-py); test split unless split='train'"),
    ("folder:DIR", "an image folder, one subfolder per class (ImageFolder layout)"),
    ("PATH", "your own images: a folder of PNG/JPEG files (labels from class subfolders, else file order), or a "
             "tensor file .pt/.npy/.npz/.safetensors with images (N,C,H,W)/(N,H,W) and optional labels"),
]


def sources() -> list[tuple[str, str]]:
    """The data sources :func:`load` accepts, as (name, description) pairs (for ``gradleak list datasets``)."""
    return list(_SOURCES)


def load(source: str | Path, *, num_images: int | None = None, image_size=None, channels: int | None = None,
         start: int = 0, seed: int | None = 0, shuffle: bool = False, split: str | None = None,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Dataset:
    """Load a data set by source string.

    source: 'samples' | 'digits' | 'cifar10:ROOT' | 'folder:DIR' | a path (a folder of images, or a tensor
        file .pt/.pth/.npy/.npz/.safetensors). See :func:`sources`.
    num_images: how many images (None: all from ``start``); asking for more than the source holds is an error.
    image_size: int or (height, width): centre-crop and resize; None keeps the source's size (samples: 32).
    channels: 1 or 3 to convert; None keeps the source's (greyscale stays one channel).
    start: index of the first image in the source's order.
    shuffle, seed: take the images from a permutation of the source drawn from ``seed`` instead of the
        source's order (digits, folders and CIFAR-10 are otherwise ordered by class or file).
    split: CIFAR-10 only: 'test' (default), 'train' or 'all'.
    mean, std: override the normalisation put in the spec.
    Returns a :class:`Dataset` (images (N, C, H, W) float32 in [0, 1], labels (N,) int64, spec, names, notes).
    """
    kw = dict(num_images=num_images, image_size=image_size, channels=channels, start=start, shuffle=shuffle,
              seed=seed, mean=mean, std=std)
    if channels not in (None, 1, 3):
        raise ValidationError("load", [f"channels must be 1 or 3 (or None to keep the source's), got {channels!r}"])
    if isinstance(source, Path):
        src = str(source)
    elif isinstance(source, str):
        src = source.strip()
    else:
        raise ValidationError("load", [f"source must be a string or path, got {type(source).__name__}"])
    if split is not None and not src.startswith("cifar10:"):
        raise ValidationError("load", [f"split={split!r} only applies to 'cifar10:ROOT' sources"])
    if src == "samples":
        return _samples_range(**kw)
    if src == "digits":
        return load_digits(**kw)
    if src.startswith("cifar10:"):
        return load_cifar10(src[len("cifar10:"):], split=split or "test", **kw)
    if src == "cifar10":
        raise ValidationError("load", ["give the folder: 'cifar10:ROOT' where ROOT is a local cifar-10-batches-py "
                                       "folder (gradleak never downloads)"])
    if src.startswith("folder:"):
        return load_folder(src[len("folder:"):], **kw)
    p = Path(src).expanduser()
    if p.is_dir():
        return load_folder(p, **kw)
    if p.suffix.lower() in TENSOR_EXTENSIONS or p.exists():
        if p.exists() and p.suffix.lower() not in TENSOR_EXTENSIONS:
            raise DataError(f"{p} is not a folder or a tensor file (expected a folder of images or a file ending "
                            f"in {', '.join(TENSOR_EXTENSIONS)})")
        return load_tensor_file(p, **kw)
    raise DataError(f"no such dataset, folder or file: {src!r} (expected one of 'samples', 'digits', "
                    "'cifar10:ROOT', 'folder:DIR', a folder of images or a tensor file)")


def peek_spec(source: str | Path, *, image_size=None, split: str = "test"
              ) -> tuple[tuple[int, ...], int, int] | None:
    """(shape, num_classes, number of images) a :func:`load` of ``source`` would give, told WITHOUT decoding
    any image (for a memory estimate before the work), or None when that needs the files (folders, tensor
    files)."""
    hw = _hw(image_size)
    src = str(source).strip() if isinstance(source, (str, Path)) else None
    if src == "samples":
        from .samples import SAMPLE_NAMES

        return (3, *(hw or (32, 32))), len(SAMPLE_NAMES), len(SAMPLE_NAMES)
    if src == "digits":
        return (1, *(hw or (8, 8))), 10, 1797
    if src is not None and src.startswith("cifar10:"):
        return (3, *(hw or (32, 32))), 10, {"test": 10000, "train": 50000, "all": 60000}.get(split, 60000)
    return None


def _samples_range(*, num_images, image_size, channels, start, shuffle, seed, mean, std) -> Dataset:
    from .samples import SAMPLE_NAMES, load_photo

    idx = _select(len(SAMPLE_NAMES), num_images, start, shuffle, seed, "the bundled photo set")
    hw = _hw(image_size) or (32, 32)
    c = 3 if channels is None else channels
    imgs = np.stack([load_photo(int(i), hw, c) for i in idx])
    return _finish(imgs, idx, num_classes=len(SAMPLE_NAMES), name="samples", mean=mean, std=std,
                   names=[SAMPLE_NAMES[i] for i in idx], class_names=SAMPLE_NAMES)
