"""Image folders: a flat folder of PNG/JPEG files, or one subfolder per class (ImageFolder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError, ValidationError
from .dataset import Dataset, _finish, _select
from .images import GREY_MODES, IMAGE_EXTENSIONS, open_image, read_image
from .transforms import _hw, crop_resize


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _scan_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """(files, labels or None for a flat folder, class names)."""
    if not root.exists():
        raise DataError(f"no such folder: {root} (expected a folder of PNG/JPEG images, optionally in one "
                        "subfolder per class)")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected a folder of PNG/JPEG images)")
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = []
    for d in subdirs:
        files = sorted(f for f in d.rglob("*") if _is_image(f))
        if files:
            classes.append((d.name, files))
    if classes and loose:
        raise DataError(f"{root} mixes {len(loose)} image file(s) with {len(classes)} class subfolder(s); expected "
                        "either images directly in the folder or one subfolder per class")
    if classes:
        files, labels = [], []
        for c, (_, fs) in enumerate(classes):
            files += fs
            labels += [c] * len(fs)
        return files, labels, [n for n, _ in classes]
    if not loose:
        raise DataError(f"{root} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)}, directly "
                        "or in one subfolder per class)")
    return loose, None, []


def load_folder(path: str | Path, *, num_images: int | None = None, image_size=None, channels: int | None = None,
                start: int = 0, shuffle: bool = False, seed: int | None = 0, mean=None, std=None) -> Dataset:
    """A folder of PNG/JPEG (any PIL-readable) images. With one subfolder per class (ImageFolder layout) the
    labels are the sorted class-folder index; a flat folder gets labels 0..N-1 in sorted file order (one class
    per image), and ``Dataset.notes`` says so. Images are centre-cropped and resized to ``image_size``
    (default: kept when all selected images share one size, else 32x32); a large image is decoded at reduced
    resolution first (:func:`~gradleak.data.images.read_image`, said in ``notes``), and one above
    :data:`~gradleak.data.images.MAX_IMAGE_PIXELS` is a :class:`DataError` naming it. ``channels`` default: 1 when every
    selected image is greyscale, else 3. Normalisation: ImageNet statistics (their grey mean for 1 channel)."""
    from PIL import UnidentifiedImageError

    root = Path(path).expanduser()
    files, labels, class_names = _scan_folder(root)
    idx = _select(len(files), num_images, start, shuffle, seed, f"the folder {root}")
    chosen = [files[i] for i in idx.tolist()]
    notes = []
    heads, bad = [], []
    for f in chosen:
        try:
            with open_image(f) as im:
                heads.append((im.mode, im.size))
        except (UnidentifiedImageError, OSError) as e:
            bad.append(f"{f.relative_to(root)} ({type(e).__name__})")
    if bad:
        raise DataError(f"cannot read {len(bad)} image file(s) in {root}: {', '.join(bad)} (expected PNG/JPEG images)")
    if channels is None:
        channels = 1 if all(m in GREY_MODES for m, _ in heads) else 3
    if channels not in (1, 3):
        raise ValidationError("load", [f"channels must be 1 or 3, got {channels!r}"])
    hw = _hw(image_size)
    if hw is None:
        sizes = {(h, w) for _, (w, h) in heads}
        if len(sizes) == 1:
            hw = sizes.pop()
        else:
            hw = (32, 32)
            notes.append(f"the images have {len(sizes)} different sizes: centre-cropped and resized to 32x32 "
                         "(pass image_size to choose)")
    imgs, factors = [], []
    for f in chosen:
        try:
            a, factor = read_image(f, channels, hw)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot decode {f} ({type(e).__name__}: {str(e)[:120]}); expected a PNG/JPEG image") \
                from None
        imgs.append(crop_resize(a, hw).transpose(2, 0, 1))
        factors.append(factor)
    if max(factors) > 1:
        notes.append(f"{sum(f > 1 for f in factors)} large image(s) were decoded at reduced resolution (by a factor "
                     f"of up to {max(factors)}, keeping at least twice the target size) before resizing")
    if labels is None:
        lab = idx.copy()
        num_classes = max(len(files), 2)
        notes.append(f"{root} has no class subfolders: labels were assigned in sorted file order (image i of the "
                     f"{len(files)} files gets label i, {num_classes} classes); put images in one subfolder per "
                     "class to give real labels")
        name = "images"
    else:
        lab = np.asarray(labels)[idx]
        num_classes = max(len(class_names), 2)
        name = "folder"
        if len(class_names) == 1:
            notes.append(f"{root} has a single class folder '{class_names[0]}': the spec still has 2 classes")
    return _finish(np.stack(imgs), lab, num_classes=num_classes, name=name, mean=mean, std=std,
                   names=[str(f.relative_to(root)) for f in chosen], notes=notes, class_names=class_names)
