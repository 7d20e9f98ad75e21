"""Reconstruction.kind is decided in one place (the base class) from the attack's claim and the residual."""

import math

import pytest
import torch

import gradleak as gl
from gradleak.attacks.base import Attack, Reconstruction, exact_tolerance


@pytest.fixture(scope="module")
def photo():
    return gl.data.samples(32, num_images=1)


def _mlp_case(photo, dtype, defense=None):
    model = gl.models.build("mlp", input_shape=(3, 32, 32), num_classes=19, width=64, dtype=dtype, seed=1)
    x, y = photo.batch(1, 0)
    return gl.simulate(model, x.to(dtype), y, spec=photo.spec, defense=defense)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fc_analytic_is_exact_only_when_the_residual_verifies_it(photo, dtype):
    case, truth = _mlp_case(photo, dtype)
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.claim == "exact" and rec.kind == "exact"
    check = rec.info["kind_check"]
    assert check["passed"] and check["residual"] <= check["tolerance"] == exact_tolerance(dtype)


@pytest.mark.parametrize("sigma", [1e-2, 1e-3])
def test_noise_on_the_update_makes_fc_analytic_an_estimate(photo, sigma):
    """Noise: the theory (one sample, dW/db) still 'claims' exact, but the residual refutes it."""
    case, truth = _mlp_case(photo, torch.float64, defense=gl.defenses.create("noise", sigma=sigma))
    rec = gl.create("fc-analytic").reconstruct(case)
    assert rec.claim == "exact"
    assert rec.kind == "estimate"
    assert not rec.info["kind_check"]["passed"] and rec.residual > exact_tolerance(torch.float64)
    assert any("not exact" in w for w in rec.info["warnings"])


def test_exact_tolerance_follows_the_dtype():
    assert exact_tolerance(torch.float64) < 1e-20 < exact_tolerance(torch.float32) < 1e-5


class _Claims(Attack):
    """A test attack that returns the truth it is handed, claiming what it is told to."""

    from dataclasses import dataclass as _dc

    @_dc
    class Options:
        claim: str = "exact"
        rows: int = 1

    def __init__(self, inputs, labels, **kw):
        super().__init__(**kw)
        self._x, self._y = inputs, labels

    def _reconstruct(self, case, ctx):
        x = self._x.repeat(self.options.rows, 1, 1, 1)
        return Reconstruction(inputs=x, labels=self._y, claim=self.options.claim)


def test_a_claimed_exact_result_that_is_wrong_is_an_estimate(photo):
    case, truth = _mlp_case(photo, torch.float64)
    rec = _Claims(torch.rand_like(truth.inputs), truth.labels).reconstruct(case)
    assert rec.kind == "estimate" and rec.residual > 1e-3
    rec = _Claims(truth.inputs, truth.labels).reconstruct(case)
    assert rec.kind == "exact"


def test_an_unknown_claim_is_an_error(photo):
    case, truth = _mlp_case(photo, torch.float64)
    with pytest.raises(TypeError, match="claim"):
        _Claims(truth.inputs, truth.labels, claim="perfect").reconstruct(case)


def test_the_residual_says_why_it_is_missing(photo):
    case, truth = _mlp_case(photo, torch.float64)
    rec = _Claims(truth.inputs, truth.labels, claim="mixture", rows=3).reconstruct(case)
    assert rec.kind == "mixture" and math.isnan(rec.residual) and "3 rows" in rec.residual_note
    blind, _ = gl.simulate(case.model, truth.inputs, truth.labels, spec=photo.spec, labels_known=False)
    rec = _Claims(truth.inputs, None, claim="estimate").reconstruct(blind)
    assert math.isnan(rec.residual) and "labels are unknown" in rec.residual_note
    rec = _Claims(truth.inputs, truth.labels, claim="estimate").reconstruct(blind)  # recovered labels: defined
    assert rec.residual < 1e-12 and rec.residual_note == ""


class _Slow(Attack):
    """Records its start point, then is interrupted before its first candidate."""

    from dataclasses import dataclass as _dc

    @_dc
    class Options:
        offer: bool = False

    def _reconstruct(self, case, ctx):
        start = torch.full((case.batch_size, *case.spec.shape), 0.5, dtype=case.dtype)
        ctx.start(start, case.labels)
        if self.options.offer:
            ctx.offer(0.3, start * 0.5, case.labels)
        raise KeyboardInterrupt


def test_interrupted_before_a_snapshot_returns_the_start_point(photo):
    case, truth = _mlp_case(photo, torch.float64)
    rec = _Slow().reconstruct(case)
    assert rec.info["interrupted"] and rec.info["start_point_only"]
    assert torch.all(rec.inputs == 0.5) and rec.kind == "estimate"
    rec = _Slow(offer=True).reconstruct(case)
    assert rec.info["interrupted"] and "start_point_only" not in rec.info and rec.info["best_score"] == 0.3
    assert torch.all(rec.inputs == 0.25)
