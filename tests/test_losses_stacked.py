"""The per-trial (stacked) forms of the losses and priors the batched trials use instead of ``torch.vmap``
(gradleak.losses.Loss.per_trial, gradleak.attacks.optimization.priors.Objective.per_trial_value): equal to the
vmap of the one-trial function BIT FOR BIT (values, gradients, and the gradient of a functional of the
gradient: the second backward the attacks take), in float64 and float32."""

import pytest
import torch

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization import common as C
from gradleak.attacks.optimization import persample as PS
from gradleak.attacks.optimization import priors as P
from gradleak.losses import Loss, losses


def _labels(name, soft, n, b, k, g, dtype):
    if soft:
        return (torch.rand(n, b, generator=g, dtype=dtype) if k == 1
                else torch.softmax(torch.randn(n, b, k, generator=g, dtype=dtype), -1))
    return torch.randint(0, 2 if k == 1 else k, (n, b), generator=g)


def _value_grad_grad(f, x, *args):
    """f(x, *args) (N,), its gradient w.r.t. x (of the sum, with a graph) and the gradient of a fixed
    functional of that gradient."""
    v = f(x, *args)
    gx, = torch.autograd.grad(v.sum(), x, create_graph=True)
    probe = torch.randn(gx.shape, generator=torch.Generator().manual_seed(7), dtype=gx.dtype)
    ggx, = torch.autograd.grad((gx * probe).sum(), x)
    return v, gx, ggx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("name,k,soft", [("cross-entropy", 19, False), ("cross-entropy", 19, True),
                                         ("logistic", 1, False), ("logistic", 1, True),
                                         ("mse", 7, False), ("mse", 7, True), ("mse", 1, False)])
def test_registered_loss_per_trial_equals_its_vmap_bit_for_bit(name, k, soft, b, dtype):
    loss = losses.get(name)
    assert loss.stacked is not None
    g = torch.Generator().manual_seed(0)
    n = 5
    logits = torch.randn(n, b, k, generator=g, dtype=dtype, requires_grad=True)
    labels = _labels(name, soft, n, b, k, g, dtype)
    stacked = _value_grad_grad(loss.per_trial, logits, labels)
    vmapped = _value_grad_grad(torch.vmap(loss.fn), logits, labels)
    assert stacked[0].shape == (n,)
    for a, r in zip(stacked, vmapped):
        assert torch.equal(a, r)
    for t in range(n):  # and each row is the trial's own loss (to rounding: one batch vs the stacked kernel)
        torch.testing.assert_close(stacked[0][t], loss(logits[t], labels[t]))


def test_a_loss_without_a_stacked_form_is_vmapped():
    hinge = Loss("test-hinge-stacked", lambda f, y: torch.relu(1 - (2.0 * y - 1) * f[:, 0]).mean(),
                 single_output=True)
    f = torch.randn(4, 2, 1, dtype=torch.float64)
    y = torch.randint(0, 2, (4, 2))
    assert torch.equal(hinge.per_trial(f, y), torch.vmap(hinge.fn)(f, y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(6, 1, 3, 32, 32), (4, 2, 3, 7, 9), (3, 1, 1, 1, 8), (3, 2, 10)])
def test_prior_per_trial_value_equals_the_vmap_of_its_value_bit_for_bit(shape, dtype):
    """tv and l2 (registered stacked forms) and a plain callable (vmapped) in one objective."""
    photos = gl.data.samples(8, num_images=1)
    model = gl.models.build("lenet", input_shape=(3, 8, 8), num_classes=19, seed=0)
    case, _ = gl.simulate(model, *photos.batch(1), spec=photos.spec)
    plain = lambda x: 0.5 * x.abs().mean()  # noqa: E731
    obj = P.build(case, [("tv", 1e-4), ("l2", 0.3), plain])
    assert set(obj.stacked) == {id(obj.terms[0][2]), id(obj.terms[1][2])}
    assert obj.stacked[id(obj.terms[0][2])] is P.total_variation_per_trial
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype, requires_grad=True)
    stacked = _value_grad_grad(obj.per_trial_value, x)
    vmapped = _value_grad_grad(torch.vmap(obj.value), x)
    for a, r in zip(stacked, vmapped):
        assert torch.equal(a, r)
    both = obj.plus(P.build(case, [("tv", 2.0)]))  # plus keeps the stacked forms of both
    assert torch.equal(both.per_trial_value(x), torch.vmap(both.value)(x))
    assert len(both.stacked) == 2 and both.terms[3][2] is P.total_variation


@pytest.mark.parametrize("engine", ["stacked", "vmap"])
def test_the_batched_objective_with_the_stacked_forms_equals_the_vmap_forms_bit_for_bit(monkeypatch, engine):
    """One batched IG round (LeNet, 4 trials, float64, TV): totals, scores and gradients with the losses' and
    priors' stacked forms are those of the vmap forms; the stacked engine's round then calls no vmap at all."""
    photos = gl.data.samples(16, num_images=4)
    model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=19, seed=0)
    setups = []
    for i in range(4):
        case, _ = gl.simulate(model, *photos.batch(1, i), spec=photos.spec)
        case = case.to(torch.float64)
        m = C.GradientMatcher(case)
        start = [C.randn((1, *case.spec.shape), torch.Generator().manual_seed(i), case)]
        setups.append(B.TrialSetup(case=case, matcher=m, labels=case.labels, objective=None, starts=[start],
                                   settings=dict(optimizer="signed-adam"), tv=1e-4))
    if engine == "vmap":
        monkeypatch.setattr(PS, "problems", lambda model, names: ["forced: the vmap engine"])
    xs = [torch.cat([s.starts[0][0] for s in setups]).unsqueeze(1)]
    sidx = list(range(4))
    obj = B.BatchedObjective(setups)
    assert obj.engine == (B.STACKED if engine == "stacked" else B.ENGINE)
    calls = []
    real_vmap = torch.vmap

    def counting(*a, **k):
        calls.append(a[0])
        return real_vmap(*a, **k)

    monkeypatch.setattr(torch, "vmap", counting)
    fast = obj.stacked(sidx, xs, True)
    if engine == "stacked":
        assert calls == []
    # the same round through the vmap forms: no stacked loss, no stacked priors
    for s in setups:
        monkeypatch.setattr(s.priors, "stacked", {})
    if obj._stacked is not None:
        monkeypatch.setattr(obj._stacked, "loss_fn", setups[0].case.loss_fn.fn)
    slow = obj.stacked(sidx, xs, True)
    assert len(calls) >= 1
    assert fast[0] == slow[0] and fast[1] == slow[1]
    for a, r in zip(fast[2], slow[2]):
        assert torch.equal(a, r)
