"""A local CIFAR-10 python folder (``cifar-10-batches-py``), read with an unpickler that only builds numpy
arrays (a foreign pickle cannot run code)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError, ValidationError
from .dataset import CIFAR10_MEAN, CIFAR10_STD, Dataset, _finish, _select
from .transforms import _convert_channels, _hw, _resize_batch


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
