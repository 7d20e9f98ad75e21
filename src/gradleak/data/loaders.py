"""Loaders: scikit-learn digits, a local CIFAR-10 python folder, an image folder, a user's own images
(a folder of PNG/JPEG files or a tensor file). :func:`load` dispatches on the source string.

Every loader returns a :class:`Dataset`: images float32 (N, C, H, W) in [0, 1], labels int64 (N,), and a
:class:`~gradleak.DataSpec` with the normalisation (mean/std) the model sees. Grayscale data stays one
channel. Only the requested images are decoded and resized.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy", ".npz", ".safetensors")
_IMAGE_KEYS = ("images", "inputs", "x", "data")
_LABEL_KEYS = ("labels", "targets", "y")

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


# ---- shared helpers -----------------------------------------------------------------------------------

def _hw(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValidationError("load", [f"image_size must be a positive int or (height, width), got {image_size!r}"])
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


# ---- scikit-learn digits --------------------------------------------------------------------------------

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


# ---- CIFAR-10 (python version) -------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (what the CIFAR-10 python batches hold): a foreign
    pickle cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("collections", "OrderedDict"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            d = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"cannot read {path} as a CIFAR-10 python batch ({type(e).__name__}: {str(e)[:160]}); "
                        "expected the pickled dict of the official cifar-10-python.tar.gz") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, expected a dict with 'data' and 'labels'")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_root(root: str | Path) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"no such folder: {p} (expected a local 'cifar-10-batches-py' folder with data_batch_1..5 "
                        "and test_batch, as unpacked from cifar-10-python.tar.gz)")
    if not (p / "test_batch").exists() and (p / "cifar-10-batches-py").is_dir():
        p = p / "cifar-10-batches-py"
    return p


def load_cifar10(root: str | Path, *, split: str = "test", num_images: int | None = None, image_size=None,
                 channels: int | None = None, start: int = 0, shuffle: bool = False, seed: int | None = 0,
                 mean=None, std=None) -> Dataset:
    """A local CIFAR-10 python folder (``cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta;
    ``root`` may also be its parent). split: 'test' (10,000 images, the default: attacks are evaluated on
    validation images), 'train' (50,000) or 'all' (train then test). Images (N, 3, 32, 32), CIFAR-10 channel
    statistics. Only the batch files needed are read."""
    p = _cifar_root(root)
    files = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}
    files["all"] = files["train"] + files["test"]
    if split not in files:
        raise ValidationError("load cifar10", [f"split must be 'test', 'train' or 'all', got {split!r}"])
    missing = [f for f in files[split] if not (p / f).is_file()]
    if missing:
        raise DataError(f"{p} is missing {missing} (expected a 'cifar-10-batches-py' folder with data_batch_1..5 "
                        "and test_batch)")
    # the official batches hold 10,000 images each; the count is checked when a batch is read
    sizes: list[int] = []
    cache: dict[str, dict] = {}
    for f in files[split]:
        if shuffle or not sizes or sum(sizes) < start + (num_images or 10 ** 12):
            cache[f] = _read_cifar_pickle(p / f)
            sizes.append(_cifar_count(cache[f], p / f))
        else:
            sizes.append(10000)
    idx = _select(sum(sizes), num_images, start, shuffle, seed, f"CIFAR-10 split '{split}' at {p}")
    offsets = np.cumsum([0] + sizes)
    imgs, labels, names = [], [], []
    for i in idx.tolist():
        b = int(np.searchsorted(offsets, i, side="right") - 1)
        f = files[split][b]
        if f not in cache:
            cache[f] = _read_cifar_pickle(p / f)
            _cifar_count(cache[f], p / f)
        d = cache[f]
        j = i - offsets[b]
        imgs.append(np.asarray(d["data"][j], dtype=np.uint8).reshape(3, 32, 32))
        labels.append(int(d["labels"][j]))
        names.append(f"cifar10-{f}-{j}")
    x = np.stack(imgs).astype(np.float32) / 255.0
    x = _resize_batch(x, _hw(image_size))
    x = np.stack([_convert_channels(im, channels) for im in x])
    class_names: list[str] = []
    if (p / "batches.meta").is_file():
        try:
            meta = _read_cifar_pickle(p / "batches.meta")
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
        except DataError:
            class_names = []
    if mean is None and std is None and x.shape[1] == 3:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    return _finish(x, np.asarray(labels), num_classes=10, name="cifar10", mean=mean, std=std, names=names,
                   class_names=class_names if len(class_names) == 10 else [str(c) for c in range(10)])


def _cifar_count(d: dict, path: Path) -> int:
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    problems = []
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        problems.append(f"'data' must be a uint8 array (N, 3072), got "
                        f"{getattr(data, 'shape', type(data).__name__)}")
    if labels is None or len(labels) != (len(data) if isinstance(data, np.ndarray) else -1):
        problems.append("'labels' must list one label per row of 'data'")
    elif isinstance(data, np.ndarray) and len(labels) and (min(labels) < 0 or max(labels) > 9):
        problems.append(f"labels must lie in 0..9, got {min(labels)}..{max(labels)}")
    if problems:
        raise DataError(f"{path} is not a CIFAR-10 batch: " + "; ".join(problems))
    d["labels"] = list(labels)
    return int(data.shape[0])


# ---- image folders ----------------------------------------------------------------------------------------

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


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _read_image(path: Path, channels: int) -> np.ndarray:
    """(H, W, channels) float in [0, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode.startswith("I") or mode == "F":
            a = np.asarray(im, dtype=np.float64)
            scale = 1.0 if mode == "F" else (65535.0 if a.max() > 255 or mode.startswith("I;16") else 255.0)
            a = np.clip(a / scale, 0.0, 1.0)[:, :, None]
            if channels == 3:
                a = np.repeat(a, 3, axis=2)
            return a
        im = im.convert("L" if channels == 1 else "RGB")
        a = np.asarray(im, dtype=np.float64) / 255.0
    return a[:, :, None] if a.ndim == 2 else a


def load_folder(path: str | Path, *, num_images: int | None = None, image_size=None, channels: int | None = None,
                start: int = 0, shuffle: bool = False, seed: int | None = 0, mean=None, std=None) -> Dataset:
    """A folder of PNG/JPEG (any PIL-readable) images. With one subfolder per class (ImageFolder layout) the
    labels are the sorted class-folder index; a flat folder gets labels 0..N-1 in sorted file order (one class
    per image), and ``Dataset.notes`` says so. Images are centre-cropped and resized to ``image_size``
    (default: kept when all selected images share one size, else 32x32). ``channels`` default: 1 when every
    selected image is greyscale, else 3. Normalisation: ImageNet statistics (their grey mean for 1 channel)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path).expanduser()
    files, labels, class_names = _scan_folder(root)
    idx = _select(len(files), num_images, start, shuffle, seed, f"the folder {root}")
    chosen = [files[i] for i in idx.tolist()]
    notes = []
    heads, bad = [], []
    for f in chosen:
        try:
            with Image.open(f) as im:
                heads.append((im.mode, im.size))
        except (UnidentifiedImageError, OSError) as e:
            bad.append(f"{f.relative_to(root)} ({type(e).__name__})")
    if bad:
        raise DataError(f"cannot read {len(bad)} image file(s) in {root}: {', '.join(bad)} (expected PNG/JPEG images)")
    if channels is None:
        channels = 1 if all(m in _GREY_MODES for m, _ in heads) else 3
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
    imgs = []
    for f in chosen:
        try:
            a = _read_image(f, channels)
        except Exception as e:
            raise DataError(f"cannot decode {f} ({type(e).__name__}: {str(e)[:120]}); expected a PNG/JPEG image") \
                from None
        imgs.append(crop_resize(a, hw).transpose(2, 0, 1))
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


# ---- tensor files ----------------------------------------------------------------------------------------

def _read_tensor_file(path: Path) -> tuple[Any, Any, dict]:
    """(images, labels or None, extras) as numpy arrays / torch tensors."""
    suffix = path.suffix.lower()
    expected = ("expected a tensor file holding images (N, C, H, W) or (N, H, W), optionally with labels "
                "(a tensor, or a dict/safetensors with keys 'images' and 'labels')")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                        f"{expected}") from None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None, {}
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and all(isinstance(o, (torch.Tensor, np.ndarray))
                                                                      for o in obj):
        return obj[0], (obj[1] if len(obj) == 2 else None), {}
    if isinstance(obj, Mapping):
        keys = list(obj)
        img_key = next((k for k in _IMAGE_KEYS if k in obj), None)
        if img_key is None and len(obj) == 1:
            img_key = keys[0]
        if img_key is None:
            raise DataError(f"{path} holds the keys {keys}; expected an image tensor under one of {list(_IMAGE_KEYS)}"
                            f" (and optionally labels under one of {list(_LABEL_KEYS)})")
        lab_key = next((k for k in _LABEL_KEYS if k in obj), None)
        extras = {k: obj[k] for k in ("mean", "std", "num_classes") if k in obj}
        return obj[img_key], (obj[lab_key] if lab_key else None), extras
    raise DataError(f"{path} holds a {type(obj).__name__}; {expected}")


def load_tensor_file(path: str | Path, *, num_images: int | None = None, image_size=None,
                     channels: int | None = None, start: int = 0, shuffle: bool = False, seed: int | None = 0,
                     mean=None, std=None) -> Dataset:
    """Images from a ``.pt``/``.pth`` (``torch.save``, read with weights_only), ``.npy``, ``.npz`` or
    ``.safetensors`` file: a tensor (N, C, H, W) with C in {1, 3}, or (N, H, W) (greyscale), float in [0, 1]
    or uint8 (0..255); optionally labels int (N,) (a (images, labels) tuple, or keys 'images'/'labels'),
    and optional 'mean', 'std', 'num_classes' entries. Without labels, image i gets label i (said in notes)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"no such file: {p} (expected a tensor file {', '.join(TENSOR_EXTENSIONS)} or a folder of "
                        "images)")
    raw_x, raw_y, extras = _read_tensor_file(p)
    x = torch.as_tensor(np.asarray(raw_x) if isinstance(raw_x, np.ndarray) else raw_x)
    problems = []
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        problems.append(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    elif x.shape[1] not in (1, 3):
        hint = " (it looks channels-last: permute to (N, C, H, W))" if x.shape[-1] in (1, 3) else ""
        problems.append(f"images must have 1 or 3 channels in dim 1, i.e. (N, C, H, W); got {tuple(x.shape)}{hint}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            problems.append(f"images contain {int((~torch.isfinite(x)).sum())} NaN/inf value(s)")
        elif x.numel() and (x.min() < 0 or x.max() > 1):
            hint = " (looks like 0..255: divide by 255 or store uint8)" if x.max() > 1.5 else ""
            problems.append(f"float images must lie in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]{hint}")
    else:
        problems.append(f"images must be float in [0, 1] or uint8, got {x.dtype}")
    n = int(x.shape[0]) if x.ndim >= 1 else 0
    num_classes = extras.get("num_classes")
    if num_classes is not None:
        num_classes = int(torch.as_tensor(np.asarray(num_classes) if isinstance(num_classes, np.ndarray)
                                          else num_classes).reshape(-1)[0])
    y = None
    if raw_y is not None:
        y = torch.as_tensor(np.asarray(raw_y) if isinstance(raw_y, np.ndarray) else raw_y)
        if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
            problems.append(f"labels must be int class indices of shape ({n},), got {y.dtype} {tuple(y.shape)}")
        elif y.shape[0] != n:
            problems.append(f"labels has {y.shape[0]} entries, images has {n}")
        elif y.numel() and y.min() < 0:
            problems.append(f"labels must be >= 0, got min {int(y.min())}")
        elif num_classes is not None and y.numel() and y.max() >= num_classes:
            problems.append(f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got max "
                            f"{int(y.max())}")
    if problems:
        raise ValidationError(f"tensor file {p.name}", problems)
    idx = _select(n, num_images, start, shuffle, seed, f"the file {p}")
    imgs = _resize_batch(x[torch.as_tensor(idx)].numpy(), _hw(image_size))
    if channels not in (None, 1, 3):
        raise ValidationError("load", [f"channels must be 1 or 3, got {channels!r}"])
    imgs = np.stack([_convert_channels(im, channels) for im in imgs])
    notes = []
    if y is None:
        labels = idx.copy()
        num_classes = num_classes or max(n, 2)
        notes.append(f"{p.name} holds no labels: image i of its {n} images gets label i ({num_classes} classes); "
                     "store a 'labels' tensor to give real labels")
    else:
        labels = y.to(torch.long).numpy()[idx]
        num_classes = num_classes or max(int(y.max()) + 1 if y.numel() else 2, 2)
    if mean is None and "mean" in extras:
        mean = np.asarray(extras["mean"], dtype=np.float64).reshape(-1)
    if std is None and "std" in extras:
        std = np.asarray(extras["std"], dtype=np.float64).reshape(-1)
    return _finish(imgs, labels, num_classes=num_classes, name="tensor", mean=mean, std=std,
                   names=[f"{p.name}[{int(i)}]" for i in idx], notes=notes)


# ---- dispatch ----------------------------------------------------------------------------------------------

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


def _samples_range(*, num_images, image_size, channels, start, shuffle, seed, mean, std) -> Dataset:
    from .samples import SAMPLE_NAMES, load_photo

    idx = _select(len(SAMPLE_NAMES), num_images, start, shuffle, seed, "the bundled photo set")
    hw = _hw(image_size) or (32, 32)
    c = 3 if channels is None else channels
    imgs = np.stack([load_photo(int(i), hw, c) for i in idx])
    return _finish(imgs, idx, num_classes=len(SAMPLE_NAMES), name="samples", mean=mean, std=std,
                   names=[SAMPLE_NAMES[i] for i in idx], class_names=SAMPLE_NAMES)
