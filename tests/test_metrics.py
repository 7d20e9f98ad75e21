import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import gradleak as gl
from gradleak import metrics as M


def test_psnr_and_ssim_agree_with_scikit_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    p = M.psnr(y, x)
    s = M.ssim(y, x)
    for i in range(3):
        assert p[i] == pytest.approx(peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1), abs=1e-5)
        ref = structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1, channel_axis=0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert float(s[i]) == pytest.approx(ref, abs=5e-3)


def test_psnr_peak_is_one():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full_like(x, 0.1)
    assert float(M.psnr(y, x)[0]) == pytest.approx(20.0)


def test_ssim_small_images_and_vectors():
    x = torch.rand(2, 1, 8, 8)
    assert torch.isfinite(M.ssim(x, x)).all() and float(M.ssim(x, x).min()) == pytest.approx(1.0, abs=1e-6)
    assert torch.isnan(M.ssim(torch.rand(2, 10), torch.rand(2, 10))).all()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_alignment_recovers_any_permutation(b, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, 1, 6, 6, generator=g)
    perm = torch.randperm(b, generator=g)
    rec = t[perm] + 0.01 * torch.randn(t.shape, generator=g)
    order = M.align(rec, t)
    assert torch.equal(perm[torch.as_tensor(order)], torch.arange(b))


def test_evaluate_aligns_before_scoring_and_counts_labels():
    t = torch.rand(3, 3, 16, 16)
    truth = gl.Truth(t, torch.tensor([4, 5, 6]))
    rec = gl.Reconstruction(inputs=t[[2, 0, 1]], labels=torch.tensor([6, 4, 0]))
    s = gl.evaluate(rec, truth)
    assert s.order == [1, 2, 0]
    assert s.psnr == 300.0 and s.mse == 0.0 and s.ssim == pytest.approx(1.0)
    assert s.label_accuracy == pytest.approx(2 / 3)
    d = s.to_dict()
    assert d["psnr_per_image"] == [300.0] * 3 and math.isclose(d["cosine"], 1.0)


def test_evaluate_rejects_mismatched_shapes():
    with pytest.raises(gl.ValidationError, match="sample shape"):
        gl.evaluate(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 9, 9))


def test_evaluate_scores_a_mixture_against_its_best_matching_truth():
    t = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    mixture = gl.Reconstruction(inputs=t[2:3].clone(), labels=torch.tensor([7]))
    s = gl.evaluate(mixture, gl.Truth(t, torch.tensor([5, 6, 7])))
    assert s.order == [2] and s.psnr == 300.0 and s.label_accuracy == 1.0 and len(s.psnr_per_image) == 1


def test_report_of_a_mixture(tmp_path):
    t = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    rec = gl.Reconstruction(inputs=t[1:2].clone(), attack="probe", info={"seconds": 0.1})
    truth = gl.Truth(t, torch.tensor([0, 1]))
    out = gl.write_report(tmp_path / "r", rec, truth=truth, scores=gl.evaluate(rec, truth))
    assert (out / "reconstruction.png").stat().st_size > 0


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 8, 8), (2, 3, 7, 9), (1, 1, 5, 5)])
def test_ssim_equals_the_torchmetrics_definition(shape):
    """The separable implementation gives torchmetrics' SSIM (Gaussian window, reflect padding) to rounding."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    k = min(11, min(shape[-2:]))
    k = k if k % 2 else k - 1
    ref = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=k, sigma=1.5 * k / 11,
                                              reduction="none")
    assert torch.allclose(gl.metrics.ssim(a, b), ref, rtol=0, atol=1e-12)
    assert torch.allclose(gl.metrics.ssim(a, a), torch.ones(shape[0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 255.0)])
def test_scores_in_a_value_range_equal_those_of_the_images_rescaled_to_the_unit_range(value_range):
    """A data spec's value range (lo, hi) is mapped onto [0, 1]: PSNR (peak hi - lo), SSIM and MSE of images
    in (lo, hi) are those of the same images rescaled to [0, 1], and the alignment is the same."""
    spec = gl.DataSpec((3, 16, 16), 10, value_range=value_range)
    lo, hi = spec.value_range
    g = torch.Generator().manual_seed(3)
    t = torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64)
    r = (t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)).clamp(0, 1)[[1, 2, 0]]
    unit = gl.evaluate(r, t)
    scaled = gl.evaluate(lo + (hi - lo) * r, lo + (hi - lo) * t, spec.value_range)
    assert scaled.order == unit.order == [2, 0, 1]
    for name in ("psnr_per_image", "ssim_per_image", "mse_per_image"):
        assert getattr(scaled, name) == pytest.approx(getattr(unit, name), rel=1e-9, abs=1e-12), name
    assert 10 < unit.psnr < 40 and 0.2 < unit.ssim < 0.99  # not a degenerate pair
    # the same per-image functions take the range too
    a, b = lo + (hi - lo) * r[2:3], lo + (hi - lo) * t[:1]  # truth 0 and its match
    assert float(M.psnr(a, b, spec.value_range)[0]) == pytest.approx(unit.psnr_per_image[0], rel=1e-9)
    assert float(M.ssim(a, b, spec.value_range)[0]) == pytest.approx(unit.ssim_per_image[0], rel=1e-9)


def test_a_reconstruction_outside_the_unit_range_but_inside_the_value_range_is_not_clipped():
    """Range (-1, 1): truth -0.5, reconstruction -0.6 differ by 0.05 on the unit range (PSNR 26.02 dB); clamped
    to [0, 1] as before value ranges were honoured, both would read 0 and score an exact 300 dB."""
    t = torch.full((1, 1, 8, 8), -0.5, dtype=torch.float64)
    r = torch.full_like(t, -0.6)
    assert gl.evaluate(r, t).psnr == 300.0  # the unit-range reading clips both to 0
    s = gl.evaluate(r, t, (-1.0, 1.0))
    assert s.psnr == pytest.approx(10 * math.log10(1 / 0.05 ** 2)) and s.mse == pytest.approx(0.05 ** 2)
    # outside the value range a reconstruction is still clamped to it
    assert gl.evaluate(torch.full_like(t, 1.5), torch.ones_like(t), (-1.0, 1.0)).psnr == 300.0


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.5, 0.5), (0.0,), "ab", (0.0, math.inf), None])
def test_a_bad_value_range_is_a_validation_error(bad):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(gl.ValidationError, match="value_range must be"):
        gl.evaluate(x, x, bad)
    with pytest.raises(gl.ValidationError, match="value_range must be"):
        M.psnr(x, x, bad)
