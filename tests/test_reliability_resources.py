"""Resource guards: the memory a job needs is estimated before the work and refused above the limit; large
images are decoded at reduced resolution; a decompression bomb is a typed error naming the file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gradleak as gl
from gradleak import resources
from gradleak.cli import main
from gradleak.data import images as img_mod
from gradleak.errors import DataError, ResourceError


def test_sizes_parse_with_decimal_and_binary_units():
    assert resources.parse_size("8GB") == 8 * 10 ** 9
    assert resources.parse_size("512MiB") == 512 * 2 ** 20
    assert resources.parse_size("2e9") == 2 * 10 ** 9
    assert resources.parse_size(" 1.5 gib ") == int(1.5 * 2 ** 30)
    for bad in ("lots", "-1GB", "0", "8 parsecs"):
        with pytest.raises(gl.ValidationError, match="max_memory"):
            resources.parse_size(bad)


def test_the_estimate_grows_with_the_job_and_counts_lbfgs_history():
    small = resources.estimate_attack("lenet", (3, 32, 32), 10, batch_size=1)
    big = resources.estimate_attack("lenet", (3, 10000, 10000), 10, batch_size=1)
    batch = resources.estimate_attack("lenet", (3, 32, 32), 10, batch_size=8)
    f64 = resources.estimate_attack("lenet", (3, 32, 32), 10, batch_size=1, dtype=torch.float64)
    lbfgs = resources.estimate_attack("lenet", (3, 32, 32), 10, batch_size=1, candidate_copies=204)
    # lenet's head alone has 12 * 2500^2 * 10 weights at 10,000 px: 750M floats, 3 GB per copy
    assert big.parts["parameters"] >= 6 * 750e6 * 4
    assert batch.parts["activations"] == 8 * small.parts["activations"]
    assert f64.parts["parameters"] == 2 * small.parts["parameters"]
    assert lbfgs.parts["optimiser"] == 51 * small.parts["optimiser"]


def test_a_job_above_the_limit_is_refused_before_the_work(capsys):
    code = main(["attack", "--attack", "ig", "--model", "lenet", "--image-size", "64", "--max-memory", "1MB"])
    err = capsys.readouterr().err
    assert code == 2 and "would need about" in err and "more than --max-memory (max_memory), 1 MB" in err
    with pytest.raises(ResourceError, match="would need about"):
        gl.run_attack(gl.AttackRun(attack="ig", model="lenet", image_size=64), write=False, max_memory="1MB")
    with pytest.raises(ResourceError, match="training lenet"):
        from gradleak.training import train_from_names

        train_from_names("lenet", "digits", epochs=1, image_size=512, max_memory="1GB")


def test_a_limit_above_the_estimate_lets_the_job_run(tmp_path, capsys):
    code = main(["attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "8", "--image-size", "8",
                 "--max-memory", "64GB", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err


def test_the_default_limit_is_the_memory_available(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 10 ** 6)
    with pytest.raises(ResourceError, match="more than the memory available on this machine, 1 MB"):
        gl.run_attack(gl.AttackRun(attack="ig", model="lenet", image_size=64), write=False)
    monkeypatch.setattr(resources, "available_memory", lambda: None)  # unknown: nothing is refused
    resources.check_memory(resources.Estimate(10 ** 15, {}))


def test_the_machine_s_available_memory_is_read():
    avail = resources.available_memory()
    assert avail is None or 0 < avail < 2 ** 60


@pytest.fixture(scope="module")
def large_png(tmp_path_factory):
    d = tmp_path_factory.mktemp("large")
    (d / "photos").mkdir()
    yy, xx = np.mgrid[0:8000, 0:8000]
    a = ((xx // 500 + yy // 500) % 2 * 255).astype(np.uint8)  # a checkerboard of 500-px squares
    Image.fromarray(a, mode="L").save(d / "photos" / "big.png", compress_level=1)
    return d / "photos" / "big.png"


def test_a_large_png_is_reduced_before_the_resize(large_png):
    a, factor = img_mod.read_image(large_png, 1, (32, 32))
    assert factor == 125 == img_mod.reduce_factor((8000, 8000), (32, 32))
    assert a.shape == (64, 64, 1)  # twice the target, for an accurate anti-aliased resize
    ds = gl.data.load_folder(large_png.parent, image_size=32)
    assert ds.images.shape == (1, 1, 32, 32)
    assert any("reduced resolution (by a factor of up to 125" in n for n in ds.notes)


def test_the_reduced_decode_matches_the_full_one(tmp_path):
    """Same picture: the box filter of ``reduce`` then a mild anti-aliasing resize, against one wide Gaussian
    anti-aliasing resize of the full image (the filters differ, so pixels differ by a few percent)."""
    import skimage.data

    from gradleak.data import crop_resize

    big = Image.fromarray(skimage.data.astronaut()).resize((2048, 2048), Image.BICUBIC)
    big.save(tmp_path / "astronaut.png")
    reduced, factor = img_mod.read_image(tmp_path / "astronaut.png", 3, (32, 32))
    full, one = img_mod.read_image(tmp_path / "astronaut.png", 3)
    assert factor == 32 and one == 1 and reduced.shape == (64, 64, 3)
    diff = np.abs(crop_resize(reduced, (32, 32)) - crop_resize(full, (32, 32)))
    assert diff.mean() < 0.03 and 10 * np.log10(1 / np.mean(diff ** 2)) > 25


def test_a_large_jpeg_uses_draft_mode(tmp_path):
    Image.fromarray(np.full((3000, 4000, 3), 128, np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    a, factor = img_mod.read_image(tmp_path / "photo.jpg", 3, (32, 32))
    # draft decodes at 1/8 (500 x 375), then reduce(5) gives 100 x 75: at least twice the target
    assert factor == 40 and a.shape == (75, 100, 3)
    full, one = img_mod.read_image(tmp_path / "photo.jpg", 3)
    assert one == 1 and full.shape == (3000, 4000, 3)


def test_a_decompression_bomb_is_a_data_error_naming_the_file(large_png, monkeypatch):
    monkeypatch.setattr(img_mod, "MAX_IMAGE_PIXELS", 10 ** 7)  # 64 megapixels is now too many
    with pytest.raises(DataError, match=r"big\.png is too large to decode safely \(8000 x 8000"):
        gl.data.load_folder(large_png.parent, image_size=32)
    monkeypatch.setattr(img_mod, "MAX_IMAGE_PIXELS", 10 ** 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 ** 7)  # PIL's own bomb check fires first now
    with pytest.raises(DataError, match=r"big\.png is too large to decode safely"):
        gl.data.load(str(large_png.parent), image_size=32)


def test_a_large_photo_through_the_cli(large_png, tmp_path, capsys):
    code = main(["attack", "--attack", "fc-analytic", "--model", "mlp", "--width", "8", "--images",
                 str(large_png.parent), "--image-size", "16", "--dtype", "float64", "--out", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    notes = json.loads((tmp_path / "r" / "metrics.json").read_text())["notes"]
    assert any("reduced resolution" in n for n in notes)
