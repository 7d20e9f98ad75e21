"""Data loaders: bundled photos, digits, a fake CIFAR-10 python folder, image folders, tensor files, and the
bad-input table (every error says what was expected)."""

from __future__ import annotations

import pickle
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import gradleak as gl
from gradleak.data import load, sources
from gradleak.errors import DataError, ValidationError


# ---- helpers writing tiny files in the real formats -------------------------------------------------------

def _write_cifar(root, n_per_batch=6, seed=0):
    """A fake cifar-10-batches-py with the real layout: dict of bytes keys, data (N, 3072) uint8 (R plane,
    G plane, B plane, row-major), labels list, batches.meta with label_names."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        obj = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
               b"filenames": [f"img{i}_{j}.png".encode() for j in range(n_per_batch)]}
        with open(d / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, fh, protocol=2)
    return d, batches


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---- bundled photos ---------------------------------------------------------------------------------------

def test_samples_are_cached_and_cheap_to_reload():
    a = gl.data.samples(32)
    t = time.perf_counter()
    for _ in range(5):
        b = gl.data.samples(32)
    assert (time.perf_counter() - t) / 5 < 0.05
    assert torch.equal(a.images, b.images)
    b.images[0].zero_()  # callers get copies: the cache cannot be damaged
    assert torch.equal(gl.data.samples(32).images, a.images)
    assert a.images.shape == (19, 3, 32, 32) and a.labels.tolist() == list(range(19))
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1


def test_samples_disk_cache_is_validated(tmp_path, monkeypatch):
    sm = sys.modules["gradleak.data.samples"]
    monkeypatch.setenv("GRADLEAK_CACHE_DIR", str(tmp_path))
    sm._cached_photo.cache_clear()
    ref = sm._compute_photo(1, (12, 12), 3)
    first = sm.load_photo(1, 12)
    files = list((tmp_path / "samples").glob("chelsea-cat-12x12-c3-*.npy"))
    assert len(files) == 1 and np.array_equal(first, ref)
    files[0].write_bytes(b"garbage")  # a damaged cache file is recomputed, not trusted
    sm._cached_photo.cache_clear()
    assert np.array_equal(sm.load_photo(1, 12), ref)
    sm._cached_photo.cache_clear()
    assert np.array_equal(np.load(files[0]), ref)
    monkeypatch.setenv("GRADLEAK_CACHE_DIR", str(tmp_path / "no" / "such"))
    (tmp_path / "no").write_text("a file where the cache folder should be")  # unwritable: still works
    sm._cached_photo.cache_clear()
    assert np.array_equal(sm.load_photo(1, 12), ref)
    sm._cached_photo.cache_clear()


def test_load_samples_range_and_grey():
    ds = load("samples", num_images=3, start=4, image_size=16, channels=1)
    assert ds.images.shape == (3, 1, 16, 16)
    assert ds.labels.tolist() == [4, 5, 6] and ds.names == gl.data.SAMPLE_NAMES[4:7]
    assert ds.spec.channels == 1 and len(ds.spec.mean) == 1
    full = gl.data.samples(16, channels=1)
    assert torch.equal(full.images[4:7], ds.images)


def test_sources_lists_every_kind():
    names = [n for n, _ in sources()]
    assert names[:4] == ["samples", "digits", "cifar10:ROOT", "folder:DIR"]
    assert all(isinstance(d, str) and d for _, d in sources())


# ---- digits -------------------------------------------------------------------------------------------------

def test_digits_grey_8x8_with_own_stats_and_resize():
    from sklearn.datasets import load_digits

    sk = load_digits()
    ds = load("digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.spec.channels == 1 and ds.spec.num_classes == 10
    assert torch.allclose(ds.images[:, 0].double(), torch.from_numpy(sk.images) / 16, atol=1e-7)
    assert ds.labels.tolist() == sk.target.tolist()
    assert ds.spec.mean[0] == pytest.approx((sk.images / 16).mean(), abs=1e-6)
    assert ds.spec.std[0] == pytest.approx((sk.images / 16).std(), abs=1e-6)
    big = load("digits", num_images=4, start=10, image_size=32)
    assert big.images.shape == (4, 1, 32, 32) and big.labels.tolist() == sk.target[10:14].tolist()
    # growing keeps the digit: its mean brightness is preserved to within a few percent
    assert torch.allclose(big.images.mean(dim=(1, 2, 3)), ds.images[10:14].mean(dim=(1, 2, 3)), atol=0.03)


def test_shuffle_is_seeded():
    a = load("digits", num_images=8, shuffle=True, seed=3)
    b = load("digits", num_images=8, shuffle=True, seed=3)
    c = load("digits", num_images=8, shuffle=True, seed=4)
    assert a.names == b.names and torch.equal(a.images, b.images)
    assert a.names != c.names
    assert len(set(a.labels.tolist())) > 2  # a permutation, not the class-ordered prefix


# ---- CIFAR-10 -------------------------------------------------------------------------------------------

def test_cifar10_python_folder(tmp_path):
    d, batches = _write_cifar(tmp_path)
    ds = load(f"cifar10:{d}", num_images=4, start=1)
    data, labels = batches["test_batch"]
    assert ds.images.shape == (4, 3, 32, 32) and ds.spec.name == "cifar10"
    expect = torch.from_numpy(data[1:5].reshape(4, 3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(ds.images, expect)
    assert ds.labels.tolist() == labels[1:5]
    assert ds.spec.mean == pytest.approx(gl.data.CIFAR10_MEAN) and ds.class_names[0] == "airplane"
    # the parent folder works too; the train split spans the five batches in order
    tr = load(f"cifar10:{tmp_path}", split="train", start=4, num_images=4)
    tdata = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    tlab = sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert torch.equal(tr.images, torch.from_numpy(tdata[4:8].reshape(4, 3, 32, 32).astype(np.float32) / 255))
    assert tr.labels.tolist() == tlab[4:8]
    assert len(load(f"cifar10:{d}", split="all")) == 36
    small = load(f"cifar10:{d}", num_images=2, image_size=16, channels=1)
    assert small.images.shape == (2, 1, 16, 16)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    d, _ = _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(DataError, match="CIFAR-10 python batch"):
        load(f"cifar10:{d}")


# ---- image folders ------------------------------------------------------------------------------------------

def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / "tree" / cls / f"{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    ds = load(f"folder:{tmp_path / 'tree'}", image_size=16)
    assert ds.images.shape == (5, 3, 16, 16)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.class_names == ("cat", "dog")
    assert ds.spec.num_classes == 2 and ds.spec.mean == gl.data.PHOTO_MEAN
    assert ds.names[2] == "dog/0.png" and ds.notes == ()
    # without image_size and a uniform size, the images are kept pixel for pixel
    same = load(str(tmp_path / "tree"), num_images=1)
    arr = np.asarray(Image.open(tmp_path / "tree" / "cat" / "0.png"), dtype=np.float32) / 255
    assert torch.allclose(same.images[0], torch.from_numpy(arr.transpose(2, 0, 1)), atol=1e-6)


def test_flat_folder_labels_in_sorted_order_and_said_so(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("b.png", "a.jpg", "c.png"):
        img = Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), mode="L")
        img.save(tmp_path / name)
    ds = load(tmp_path)
    assert ds.names == ("a.jpg", "b.png", "c.png") and ds.labels.tolist() == [0, 1, 2]
    assert ds.images.shape == (3, 1, 10, 10)  # greyscale stays one channel
    assert ds.spec.mean == gl.data.GREY_MEAN
    assert any("sorted file order" in n for n in ds.notes)
    rgb = load(tmp_path, channels=3, num_images=2, start=1)
    assert rgb.images.shape == (2, 3, 10, 10) and rgb.labels.tolist() == [1, 2]
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_mixed_sizes_are_cropped_to_a_default_and_said_so(tmp_path):
    _png(tmp_path / "wide.png", np.full((20, 40, 3), 200, np.uint8))
    _png(tmp_path / "tall.png", np.full((50, 25, 3), 100, np.uint8))
    ds = load(tmp_path)
    assert ds.images.shape == (2, 3, 32, 32)
    assert any("different sizes" in n for n in ds.notes)
    assert torch.allclose(ds.images[1], torch.full((3, 32, 32), 200 / 255), atol=1e-5)


# ---- tensor files ---------------------------------------------------------------------------------------------

def test_tensor_files_pt_npy_npz_safetensors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g)
    y = torch.tensor([3, 1, 4, 1, 5])
    torch.save({"images": x, "labels": y}, tmp_path / "a.pt")
    torch.save((x, y), tmp_path / "tuple.pt")
    np.save(tmp_path / "b.npy", (x.numpy() * 255).round().astype(np.uint8))
    np.savez(tmp_path / "c.npz", images=x[:, 0].numpy(), labels=y.numpy())
    save_file({"images": x.contiguous(), "labels": y, "mean": torch.tensor([0.5, 0.5, 0.5]),
               "std": torch.tensor([0.25, 0.25, 0.25])}, str(tmp_path / "d.safetensors"))
    a = load(tmp_path / "a.pt")
    assert torch.equal(a.images, x) and a.labels.tolist() == y.tolist() and a.spec.num_classes == 6 and not a.notes
    assert torch.equal(load(str(tmp_path / "tuple.pt")).images, x)
    b = load(str(tmp_path / "b.npy"), num_images=2, start=3)
    assert torch.allclose(b.images, x[3:5], atol=0.5 / 255 + 1e-6) and b.labels.tolist() == [3, 4]
    assert any("holds no labels" in n for n in b.notes)
    c = load(str(tmp_path / "c.npz"), image_size=4)
    assert c.images.shape == (5, 1, 4, 4)  # (N, H, W) is greyscale
    d = load(str(tmp_path / "d.safetensors"))
    assert torch.equal(d.images, x) and d.spec.mean == (0.5, 0.5, 0.5) and d.spec.std == (0.25, 0.25, 0.25)


def test_load_feeds_a_model_and_simulate():
    ds = load("digits", num_images=2)
    model = gl.models.build("lenet", input_shape=ds.spec.shape, num_classes=ds.spec.num_classes)
    case, truth = gl.simulate(model, ds.images, ds.labels, spec=ds.spec)
    assert case.spec.shape == (1, 8, 8) and torch.equal(truth.inputs, ds.images)


# ---- the bad-input table ------------------------------------------------------------------------------------

def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "readme.txt").write_text("hi")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a torch file at all")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    torch.save(torch.rand(2, 5, 8, 8), tmp_path / "five_channels.pt")
    torch.save(torch.rand(2, 8, 8, 3), tmp_path / "channels_last.pt")
    torch.save(torch.rand(8, 8), tmp_path / "two_dims.pt")
    torch.save(torch.rand(2, 1, 4, 4) * 255, tmp_path / "range.pt")
    torch.save(torch.full((2, 1, 4, 4), float("nan")), tmp_path / "nan.pt")
    torch.save({"images": torch.rand(3, 1, 4, 4), "labels": torch.tensor([0, 1])}, tmp_path / "labels.pt")
    torch.save({"images": torch.rand(2, 1, 4, 4), "labels": torch.tensor([0.5, 1.0])}, tmp_path / "flabels.pt")
    torch.save({"pixels": torch.rand(2, 1, 4, 4), "other": torch.zeros(1)}, tmp_path / "keys.pt")
    torch.save(torch.randint(0, 9, (2, 1, 4, 4)), tmp_path / "int64.pt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ok.png").write_bytes(b"")
    _png(tmp_path / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "mixed" / "cls" / "b.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "cifar_missing").mkdir()
    return [
        (str(tmp_path / "nope"), {}, DataError, "no such dataset, folder or file"),
        (f"folder:{tmp_path / 'nope'}", {}, DataError, "no such folder"),
        (str(tmp_path / "nope.pt"), {}, DataError, "no such file"),
        (str(tmp_path / "empty"), {}, DataError, "holds no images"),
        (str(tmp_path / "only_text"), {}, DataError, "holds no images"),
        (str(tmp_path / "corrupt.pt"), {}, DataError, "expected a tensor file"),
        (str(tmp_path / "corrupt.safetensors"), {}, DataError, "expected a tensor file"),
        (str(tmp_path / "corrupt.npy"), {}, DataError, "expected a tensor file"),
        (str(tmp_path / "five_channels.pt"), {}, ValidationError, "1 or 3 channels"),
        (str(tmp_path / "channels_last.pt"), {}, ValidationError, "channels-last"),
        (str(tmp_path / "two_dims.pt"), {}, ValidationError, r"\(N, C, H, W\) or \(N, H, W\)"),
        (str(tmp_path / "range.pt"), {}, ValidationError, r"must lie in \[0, 1\].*divide by 255"),
        (str(tmp_path / "nan.pt"), {}, ValidationError, "NaN"),
        (str(tmp_path / "labels.pt"), {}, ValidationError, "labels has 2 entries, images has 3"),
        (str(tmp_path / "flabels.pt"), {}, ValidationError, "int class indices"),
        (str(tmp_path / "keys.pt"), {}, DataError, "expected an image tensor under one of"),
        (str(tmp_path / "int64.pt"), {}, ValidationError, "float in \\[0, 1\\] or uint8"),
        (str(tmp_path / "broken"), {}, DataError, "cannot read 1 image file"),
        (str(tmp_path / "mixed"), {}, DataError, "mixes 1 image file"),
        (str(tmp_path / "notes.txt"), {}, DataError, "not a folder or a tensor file"),
        (f"cifar10:{tmp_path / 'nope'}", {}, DataError, "cifar-10-batches-py"),
        (f"cifar10:{tmp_path / 'cifar_missing'}", {}, DataError, "is missing"),
        ("cifar10", {}, ValidationError, "cifar10:ROOT"),
        ("samples", {"num_images": 20}, ValidationError, "holds 19"),
        ("samples", {"num_images": 5, "start": 17}, ValidationError, "start \\+ num_images <= 19"),
        ("digits", {"num_images": 0}, ValidationError, "num_images must be an int >= 1"),
        ("digits", {"start": -1}, ValidationError, "start must be an int >= 0"),
        ("digits", {"channels": 2}, ValidationError, "channels must be 1 or 3"),
        ("digits", {"image_size": 0}, ValidationError, "image_size must be positive"),
        ("digits", {"split": "train"}, ValidationError, "only applies to 'cifar10:ROOT'"),
        ("digits", {"num_images": 1800}, ValidationError, "holds 1797"),
    ]


def test_bad_inputs_raise_typed_errors_that_say_what_was_expected(tmp_path):
    for source, kw, err, pattern in _bad_inputs(tmp_path):
        with pytest.raises(err, match=pattern):
            load(source, **kw)


def test_bad_cifar_split_and_batch(tmp_path):
    d, _ = _write_cifar(tmp_path)
    with pytest.raises(ValidationError, match="split must be 'test', 'train' or 'all'"):
        load(f"cifar10:{d}", split="val")
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(DataError, match=r"not a CIFAR-10 batch: 'data' must be a uint8 array \(N, 3072\).*one label"):
        load(f"cifar10:{d}")
