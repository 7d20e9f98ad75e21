"""Activations and losses are objects: what each declares is checked against what it computes, and adding one
is one registration that every method then recognises."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradleak as gl
from gradleak.activations import activations, resolve
from gradleak.losses import Loss, losses

Z = torch.linspace(-6, 6, 2001, dtype=torch.float64)


@pytest.mark.parametrize("name", activations.names())
def test_each_activation_declares_what_it_computes(name):
    act = activations.get(name)
    y = act.fn(Z)
    # grad is sigma': compared with autograd
    z = Z.clone().requires_grad_(True)
    auto, = torch.autograd.grad(act.fn(z).sum(), z)
    keep = Z.abs() > 1e-6  # ReLU-like kinks at 0
    assert torch.allclose(act.grad(Z)[keep], auto[keep], atol=1e-10)
    # odd: sigma(-z) = -sigma(z), and nothing else is
    assert bool(torch.allclose(act.fn(-Z), -y, atol=1e-12)) == act.odd
    # output range: every value inside; the infimum is attained or approached on [-6, 6] (or a finite bound)
    lo, hi = act.output_range
    assert float(y.min()) >= lo - 1e-12 and float(y.max()) <= hi + 1e-12
    if math.isfinite(lo):
        assert float(y.min()) - lo < 1e-2
    # smooth: the second derivative has no jump (a kink makes sigma' jump by O(1) across 0)
    g = act.grad(torch.tensor([-1e-7, 1e-7], dtype=torch.float64))
    assert (abs(float(g[1] - g[0])) < 1e-5) == act.smooth
    # positively homogeneous: sigma(c z) = c sigma(z) for c > 0
    assert bool(torch.allclose(act.fn(2.5 * Z), 2.5 * y, atol=1e-10)) == act.positively_homogeneous
    # the inverse inverts inside the range
    if act.invertible:
        yy = act.clamp_to_range(y, 1e-9)
        inner = (y - yy).abs() < 1e-12
        assert torch.allclose(act.fn(act.inverse(yy[inner])), yy[inner], atol=1e-8)


def test_the_resolver_maps_torch_modules_and_functions():
    assert resolve(nn.ReLU()) is activations.get("relu")
    assert resolve(nn.Tanh()) is activations.get("tanh")
    assert resolve(nn.LeakyReLU(0.2)) is activations.get("leaky-relu")
    slope = resolve(nn.LeakyReLU(0.05))
    assert slope.name == "leaky-relu(0.05)" and float(slope.fn(torch.tensor(-2.0))) == pytest.approx(-0.1)
    assert resolve(nn.GELU()) is activations.get("gelu") and resolve(nn.GELU(approximate="tanh")) is None
    assert resolve(F.leaky_relu, (0.3,)).inverse(torch.tensor(-0.3)) == pytest.approx(-1.0)
    assert resolve("sigmoid") is activations.get("sigmoid") and resolve("view") is None
    assert resolve(gl.activations.Act("silu")) is activations.get("silu")
    assert resolve(nn.Linear(2, 2)) is None and resolve(print) is None


@pytest.mark.parametrize("name", losses.names())
def test_each_loss_declares_its_label_rule_from_a_real_gradient(name):
    loss = losses.get(name)
    C = 1 if loss.single_output else 5
    torch.manual_seed(0)
    # scores of a fresh model (|f| < 0.4), where every rule must find the label; only the rules that hold for
    # ANY scores may say 'certain' (mse's k = f - onehot is not: a very negative score elsewhere wins)
    f = (0.4 * torch.tanh(torch.randn(1, C, dtype=torch.float64))).requires_grad_(True)
    y = torch.tensor([1 if loss.single_output else 3])
    k, = torch.autograd.grad(loss(f, y), f)  # = dL/db of a head whose bias is f's offset
    label, certain = loss.label_from_bias(k[0], 1)
    assert label == int(y)
    assert certain == (name != "mse")
    f2 = f.detach().clone()
    f2[0, 0] = -5.0  # a confident wrong score
    k2, = torch.autograd.grad(loss(f2.requires_grad_(True), y), f2)
    if certain:
        assert loss.label_from_bias(k2[0], 1)[0] == int(y)
    if loss.single_output:
        assert loss.num_outputs(10) == 1 and loss.label_logits_shape(4, 10) == (4,)
        assert loss.hard_labels(torch.tensor([-1.0, 2.0])).tolist() == [0, 1]
    else:
        assert loss.num_outputs(10) == 10 and loss.label_logits_shape(4, 10) == (4, 10)
        assert torch.allclose(loss.soft_labels(torch.zeros(2, 4)).sum(1), torch.ones(2))


def test_loss_output_and_label_rules():
    ce, lg, sq = losses.get("ce"), losses.get("bce"), losses.get("mse")
    assert ce.output_problem(10, 10) is None and "needs 10" in ce.output_problem(1, 10)
    assert lg.output_problem(1, 2) is None and "needs 1" in lg.output_problem(2, 2)
    assert sq.output_problem(1, 10) is None and sq.output_problem(10, 10) is None
    assert "labels must be 0/1" in ce.label_problem(3, 1) and ce.label_problem(9, 10) is None
    assert "go up to 10" in sq.label_problem(10, 10)
    assert ce.counts_from_bias and not sq.counts_from_bias


def test_a_new_loss_is_one_registration():
    def hinge(logits, labels):
        s = 2.0 * labels.to(logits.dtype) - 1.0
        return F.relu(1 - s * logits[:, 0]).mean()

    gl.losses.add(Loss("test-hinge", hinge, single_output=True), overwrite=True)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    spec = gl.DataSpec(shape=(6,), num_classes=2)
    x = torch.rand(1, 6, dtype=torch.float64)
    case, truth = gl.simulate(model, x, torch.tensor([1]), spec=spec, loss="test-hinge")
    assert case.loss == "test-hinge" and case.loss_fn.single_output
    assert case.residual(x, torch.tensor([1])) < 1e-20
