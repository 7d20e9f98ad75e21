"""The stacked formulation of batched trials (gradleak.attacks.optimization.persample): the trials' inputs as
one batch of the shared model, per-trial parameter gradients from per-sample rules.

Tolerance (float64): the rules contract in another order than autograd's convolution/linear backward (bmm
over positions, grouped convolutions in the second backward), so they agree to rounding: per-trial gradients
and input gradients within 1e-10 relative here; IG runs (signed Adam) within 1e-9 after their steps. DLG
(L-BFGS, which amplifies last-bit differences) on the stacked engine: test_batched_trials.py (1e-7).
"""

import math

import pytest
import torch
from test_batched_trials import _compare, spy  # noqa: F401 (the fixture)
from test_batched_trials import _flat as _trials
from torch import nn

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization import common as C
from gradleak.attacks.optimization import persample as PS
from gradleak.losses import losses


def _net():
    """Every rule: conv with bias / stride / padding / dilation, conv without bias, eval BatchNorm with
    non-trivial running statistics, a Linear on a (…, positions, in) input, a bias-free Linear head."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(5)
            self.c2 = nn.Conv2d(5, 4, 3, padding=2, dilation=2, bias=False)
            self.mix = nn.Linear(8, 6)
            self.head = nn.Linear(4 * 8 * 6, 7, bias=False)

        def forward(self, x):
            h = torch.tanh(self.bn(self.c1(x)))
            h = torch.tanh(self.c2(h))                 # (B, 4, 8, 8)
            h = torch.tanh(self.mix(h))                # Linear over the last axis: (B, 4, 8, 6)
            return self.head(h.flatten(1))

    net = Net().double()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("b", [1, 3])
def test_per_trial_gradients_and_their_input_gradients_equal_autograd_one_by_one(b):
    """N = 4 trials of B samples: each trial's gradient of every parameter = torch.autograd.grad of its own
    batch-mean loss, and the gradient of a functional of those gradients w.r.t. the inputs (the second
    backward the attacks take) = the one-by-one double backward."""
    net = _net()
    names = [k for k, _ in net.named_parameters()]
    lf = losses.get("cross-entropy")
    assert PS.problems(net, names) == []
    n = 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, b, 3, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (n, b), generator=g)
    probe = [torch.randn(n, p.numel(), generator=g, dtype=torch.float64) for p in net.parameters()]
    gs = PS.StackedGradients(net, names, lf)(x, y)
    gx, = torch.autograd.grad(sum((gi * pi).sum() for gi, pi in zip(gs, probe)), x)
    params = list(net.parameters())
    for t in range(n):
        xt = x[t].detach().requires_grad_(True)
        ref = torch.autograd.grad(lf(net(xt), y[t]), params, create_graph=True)
        for gi, ri in zip(gs, ref):
            torch.testing.assert_close(gi[t], ri.reshape(-1), rtol=1e-10, atol=1e-13)
        rx, = torch.autograd.grad(sum((ri.reshape(-1) * pi[t]).sum() for ri, pi in zip(ref, probe)), xt)
        torch.testing.assert_close(gx[t], rx, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("unfold_max,small_maps,bmm_channels,s2d", [
    (0, 0, 0, False), (0, 10 ** 9, 0, False), (10 ** 9, 0, 0, False), (10 ** 9, 0, 10 ** 9, False),
    (10 ** 9, 0, 0, True), (0, 0, 0, True), (10 ** 9, 10 ** 9, 10 ** 9, True)])
def test_every_conv_weight_gradient_path_equals_autograd_one_by_one(monkeypatch, b, unfold_max, small_maps,
                                                                    bmm_channels, s2d):
    """The same check with each Conv2d path forced: the grouped convolution's weight gradient (UNFOLD_MAX 0)
    or unfold + bmm in the forward, the bmm + fold (SMALL_MAPS large) or grouped-convolution backward, its
    output-gradient part as a bmm against the kept unfold (BMM_MAX_CHANNELS large) or a grouped convolution,
    and the strided convolution (c1: 3x3, stride 2) in its space-to-depth form or not."""
    monkeypatch.setattr(PS, "UNFOLD_MAX", unfold_max)
    monkeypatch.setattr(PS, "SMALL_MAPS", small_maps)
    monkeypatch.setattr(PS, "BMM_MAX_CHANNELS", bmm_channels)
    monkeypatch.setattr(PS, "SPACE_TO_DEPTH_MAX_FLOPS", 2.0 if s2d else 0.0)
    monkeypatch.setattr(PS, "SPACE_TO_DEPTH_MAX_CHANNELS", 10 ** 9)
    test_per_trial_gradients_and_their_input_gradients_equal_autograd_one_by_one(b)


@pytest.mark.parametrize("h,w,k,stride,padding", [(32, 32, (5, 5), (2, 2), (2, 2)), (16, 16, (5, 5), (2, 2), (2, 2)),
                                                  (33, 17, (4, 5), (2, 3), (1, 2)), (9, 10, (3, 3), (3, 3), (0, 0)),
                                                  (7, 9, (5, 5), (3, 3), (2, 1))])
def test_the_space_to_depth_form_equals_the_strided_convolution(monkeypatch, h, w, k, stride, padding):
    """float64: the stacked model's strided conv in its space-to-depth form (forward, input gradient, and the
    gradient of a functional of that input gradient) and the rule's grouped input gradient equal torch's
    strided convolution to rounding (the same products, summed in another order)."""
    monkeypatch.setattr(PS, "SPACE_TO_DEPTH_MAX_FLOPS", 2.0)
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=padding).double()
    assert PS._space_to_depth_kernel(conv.weight, k, stride, (1, 1)) is not None
    fast = PS._conv_input_only(conv)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    z, ref = fast(x), conv(x)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn(z.shape, generator=g, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad((z * probe).sum(), x, create_graph=True)
    rx, = torch.autograd.grad((ref * probe).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    q = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gp, = torch.autograd.grad((gx * q).sum(), probe)
    rp, = torch.autograd.grad((rx * q).sum(), probe)
    torch.testing.assert_close(gp, rp, rtol=1e-12, atol=1e-12)
    n, b, o = 3, 2, 5
    kern = torch.randn(n * o, 3, *k, generator=g, dtype=torch.float64)
    dg = torch.randn(b, n * o, *z.shape[2:], generator=g, dtype=torch.float64)
    got = PS._grouped_input_gradient((b, n * 3, h, w), kern, dg, n, (k, (1, 1), padding, stride))
    want = torch.nn.grad.conv2d_input((b, n * 3, h, w), kern, dg, stride=stride, padding=padding, groups=n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layers_without_a_rule_are_named():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, groups=2),
                        nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1), nn.BatchNorm2d(4).train())
    p = PS.problems(net, [k for k, _ in net.named_parameters()])
    assert p == ["no per-sample rule for GroupNorm (1)", "2: grouped convolution (groups=2)",
                 "3: padding_mode='reflect'",
                 "4: BatchNorm with batch statistics (train mode or no running statistics)"]
    assert PS.problems(net, ["0.weight", "0.bias"]) == []  # only the matched tensors' modules count


def _photos_cases(name, n, size=16, batch=1, **kw):
    photos = gl.data.samples(size, num_images=max(n * batch, 2))
    model = gl.models.build(name, input_shape=(3, size, size), num_classes=19, seed=0, **kw)
    out = []
    for i in range(n):
        x, y = photos.batch(batch, i * batch)
        case, _ = gl.simulate(model, x, y, spec=photos.spec)
        out.append(case.to(torch.float64))
    return out


@pytest.mark.parametrize("attack,options,tol,batch", [
    ("ig", dict(optimizer="signed-adam", max_iterations=12, restarts=2, tv=1e-4), 1e-9, 1),
    ("ig", dict(optimizer="signed-adam", max_iterations=12, restarts=2, tv=1e-4), 1e-9, 2),
])
def test_stacked_runs_equal_one_by_one_on_a_convnet_with_batchnorm(spy, attack, options, tol, batch):
    """ConvNet (conv, eval BatchNorm, ReLU, max-pool, linear) x 2 cases x 2 restarts, trials of ``batch``
    images: the stacked engine runs them, and every trial equals its one-by-one run. (DLG's L-BFGS with
    joint labels on the stacked engine: test_batched_trials.py, on LeNet, smooth; on this ReLU net its line
    searches branch differently at rounding level.)"""
    cases = _photos_cases("convnet", 2, batch=batch, width=4)
    recs = B.reconstruct_many(gl.create(attack, **options), cases, seeds=[0, 1])
    note = recs[0].info["batched"]
    assert note["batched"] is True and note["engine"] == B.STACKED and "stacked_problems" not in note
    batched = _trials(spy)
    spy.clear()
    for c, s in zip(cases, (0, 1)):
        gl.create(attack, batch_trials=False, **options).reconstruct(c, seed=s)
    _compare(batched, _trials(spy), tol)


def test_a_nan_trial_leaves_the_others_bit_for_bit_in_the_stacked_batch():
    """A NaN trial (batch of 2 images, BatchNorm model) shares the stacked forward, backward and grouped
    convolutions with the others: its NaN stays its own (it stops diverged at step 0) and the other trials are
    exactly those of the batch without it."""
    case = _photos_cases("convnet", 1, batch=2, width=4)[0]
    m = C.GradientMatcher(case)

    def objective(v):
        data, cos = m.terms(v[0], case.labels)
        return data + 1e-4 * C.total_variation(v[0]), cos

    g = torch.Generator().manual_seed(0)
    starts = [[C.randn((2, *case.spec.shape), g, case)] for _ in range(3)]
    bad = [starts[0][0].clone()]
    bad[0][1, 0, 3, 3] = float("nan")  # one pixel of one of its two images

    def setup(st):
        return B.TrialSetup(case=case, matcher=m, labels=case.labels, objective=objective, starts=st,
                            settings=dict(optimizer="signed-adam", max_iterations=8, lr=0.1), tv=1e-4)

    with pytest.warns(C.DivergenceWarning):
        (with_nan, note), = B.run_setups([setup([starts[0], bad, starts[1], starts[2]])])
    (clean, _), = B.run_setups([setup(starts)])
    assert note["engine"] == B.STACKED
    assert with_nan[1].diverged and not with_nan[1].finite and with_nan[1].diverged_at == 0
    for a, b in zip([with_nan[0], with_nan[2], with_nan[3]], clean):
        assert a.finite and a.score == b.score
        assert torch.equal(a.variables[0], b.variables[0])


def _tiny_cases(middle: nn.Module):
    """Two float64 cases (8 px photos) on conv -> ``middle`` -> sigmoid -> linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), middle, nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 19))
    photos = gl.data.samples(8, num_images=2)
    cases = []
    for i in range(2):
        x, y = photos.batch(1, i)
        case, _ = gl.simulate(net, x, y, spec=photos.spec)
        cases.append(case.to(torch.float64))
    return cases


def test_an_unsupported_layer_falls_back_to_vmap_with_the_reason(spy):
    """GroupNorm has no per-sample rule: the trials run batched with vmap (the note names the layer), equal
    to one by one."""
    cases = _tiny_cases(nn.GroupNorm(2, 4))
    opts = dict(optimizer="signed-adam", max_iterations=8, restarts=2, tv=1e-4)
    recs = B.reconstruct_many(gl.create("ig", **opts), cases, seeds=[0, 1])
    note = recs[0].info["batched"]
    assert note["batched"] is True and note["engine"] == B.ENGINE
    assert note["stacked_problems"] == ["no per-sample rule for GroupNorm (1)"]
    batched = _trials(spy)
    spy.clear()
    for c, s in zip(cases, (0, 1)):
        gl.create("ig", batch_trials=False, **opts).reconstruct(c, seed=s)
    _compare(batched, _trials(spy), 1e-9)


def test_fedavg_stays_on_vmap_and_says_why():
    photos = gl.data.samples(16, num_images=2)
    model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=19, seed=0)
    x, y = photos.batch(2)
    case, _ = gl.simulate(model, x, y, spec=photos.spec, protocol="fedavg", local_steps=2, local_lr=0.1)
    rec = gl.create("ig", preset="fedavg", max_iterations=2, restarts=2).reconstruct(case.to(torch.float64), seed=0)
    note = rec.info["batched"]
    assert note["engine"] == B.ENGINE and note["stacked_problems"][0].startswith("FedAvg")
    assert math.isfinite(rec.residual)


def test_a_module_that_mixes_samples_is_caught_by_the_first_round_check():
    """A parameter-free module that centres the batch (x - x.mean(0)) couples the stacked trials: the first
    round's comparison with the sequential objective catches it and the trials run one by one."""
    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    cases = _tiny_cases(Centre())
    opts = dict(optimizer="signed-adam", max_iterations=3, restarts=2, tv=1e-4)
    recs = B.reconstruct_many(gl.create("ig", **opts), cases, seeds=[0, 1])
    note = recs[0].info["batched"]
    assert note["batched"] is False and "disagreed with the sequential one" in note["reason"]
    seq = gl.create("ig", batch_trials=False, **opts).reconstruct(cases[1], seed=1)
    torch.testing.assert_close(recs[1].inputs, seq.inputs, rtol=0, atol=0)
