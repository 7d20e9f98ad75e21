import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradleak as gl
from gradleak import defenses as D


def _update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(20, 10, generator=g), "b": torch.randn(7, generator=g)}


def _norm(u):
    return float(torch.sqrt(sum(v.pow(2).sum() for v in u.values())))


@settings(max_examples=20, deadline=None)
@given(ratio=st.floats(0.0, 0.95), seed=st.integers(0, 1000))
def test_prune_zeroes_the_requested_fraction(ratio, seed):
    u = _update(seed)
    out = D.Prune(ratio)(u)
    for k, v in u.items():
        zeros = int((out[k] == 0).sum())
        assert zeros == int(ratio * v.numel())
        kept = out[k] != 0
        if kept.any() and (~kept).any():
            assert v[kept].abs().min() >= v[~kept].abs().max()


@settings(max_examples=20, deadline=None)
@given(max_norm=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
def test_clip_bounds_the_global_norm(max_norm, seed):
    u = _update(seed)
    out = D.Clip(max_norm)(u)
    assert _norm(out) <= max_norm * (1 + 1e-5)
    if _norm(u) <= max_norm:
        assert _norm(out) == pytest.approx(_norm(u))


def test_noise_is_seeded_and_scaled():
    u = _update()
    a = D.Noise(0.5)(u, torch.Generator().manual_seed(3))
    b = D.Noise(0.5)(u, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in u)
    std = float(torch.cat([(a[k] - u[k]).flatten() for k in u]).std())
    assert 0.4 < std < 0.6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_uses_at_most_2_to_the_bits_levels(bits):
    out = D.Quantize(bits)(_update())
    for v in out.values():
        assert v.unique().numel() <= 2 ** bits


def test_parse_compose_and_errors():
    d = D.compose(D.parse("clip:max_norm=1"), D.parse("noise:sigma=0.0"))
    out = d(_update(), torch.Generator().manual_seed(0))
    assert _norm(out) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(gl.ValidationError, match="unknown option"):
        D.parse("noise:sgima=1")
    with pytest.raises(gl.UnknownNameError, match="did you mean"):
        D.parse("prun:ratio=0.5")
    with pytest.raises(gl.ValidationError, match="ratio must be"):
        D.Prune(1.5)


def test_defense_reaches_the_case(photos32):
    x, y = photos32.batch(1)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=19)
    clean, truth = gl.simulate(model, x, y, spec=photos32.spec)
    pruned, _ = gl.simulate(model, x, y, spec=photos32.spec, defense=D.Prune(0.9))
    assert "prune" in pruned.meta["defense"]
    assert pruned.residual(truth.inputs, truth.labels) > clean.residual(truth.inputs, truth.labels) + 1e-3
