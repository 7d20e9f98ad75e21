"""The BatchNorm side channel: the running statistics a client returns, and the batch statistics they reveal."""

import copy

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak import batchnorm as B
from gradleak import functional as Fn
from gradleak.integrations.flower import case_from_flower
from gradleak.integrations.flower.contract import resolve_replay


def _resnet(photos32):
    return gl.models.build("resnet20", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                           seed=0).double()


def _true_batch_statistics(model, xn, bn_mode="train"):
    """Each BatchNorm layer's per-channel input mean and unbiased variance on xn, read by torch itself: a copy
    whose layers have momentum 1 holds exactly the last batch's statistics in its running buffers."""
    ref = copy.deepcopy(model)
    Fn.set_bn_mode(ref, bn_mode)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        ref(xn)
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in ref.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_fedsgd_train_mode_reveals_every_layers_batch_statistics_exactly(photos32):
    x, y = photos32.batch(4)
    x = x.double()
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train")
    assert case.observed_buffers is not None
    stats = B.revealed_statistics(case)
    true = _true_batch_statistics(model, photos32.spec.normalize(x))
    assert set(stats.layers) == set(true) and len(true) == 21 and stats.exact
    for name, (mu, var) in true.items():
        got = stats.layers[name]
        assert torch.allclose(got.mean, mu, rtol=0, atol=1e-10), name
        assert torch.allclose(got.var, var, rtol=1e-10, atol=1e-10), name
    # the server's copy is untouched; the returned buffers moved by exactly one step of momentum 0.1
    before = case.buffers["bn1.running_mean"]
    assert torch.allclose(case.observed_buffers["bn1.running_mean"], 0.9 * before + 0.1 * true["bn1"][0])
    assert int(case.observed_buffers["bn1.num_batches_tracked"]) == int(case.buffers["bn1.num_batches_tracked"]) + 1


def test_fedavg_buffers_are_a_real_clients_and_reveal_the_step_mixture(photos32):
    x, y = photos32.batch(4)
    x = x.double()
    model = _resnet(photos32)
    steps, lr, b = 3, 0.05, 2
    case, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train", protocol="fedavg", local_steps=steps,
                          local_lr=lr, local_batch_size=b)
    # a plain torch client: SGD in train-mode BatchNorm, recording each step's input statistics
    client = copy.deepcopy(model)
    Fn.set_bn_mode(client, "train")
    opt = torch.optim.SGD(client.parameters(), lr=lr)
    xn = photos32.spec.normalize(x)
    per_step = []
    for k in range(steps):
        sl = Fn.minibatch_indices(4, b, k)
        per_step.append(_true_batch_statistics(client, xn[sl]))
        opt.zero_grad()
        nn.functional.cross_entropy(client(xn[sl]), y[sl]).backward()
        opt.step()
    for k, v in client.named_buffers():
        assert torch.allclose(case.observed_buffers[k], v, rtol=1e-10, atol=1e-12) if v.is_floating_point() else \
            torch.equal(case.observed_buffers[k], v), k
    stats = B.revealed_statistics(case)
    assert not stats.exact and stats.steps == steps
    m = 0.1
    w = [m * (1 - m) ** (steps - 1 - k) for k in range(steps)]
    for name, got in stats.layers.items():
        mix = sum(wk * s[name][0] for wk, s in zip(w, per_step)) / sum(w)
        assert torch.allclose(got.mean, mix, atol=1e-10), name
        assert got.weights == pytest.approx([wk / sum(w) for wk in w])
    # the candidate side models the mixture on the step mini-batches: chunk 0 is used by steps 1 and 3
    chunks = B.candidate_chunks(case, stats)
    assert [(c.start, c.stop) for c, _ in chunks] == [(0, 2), (2, 4)]
    assert chunks[0][1] == pytest.approx((w[0] + w[2]) / sum(w))


class _CumulativeBN(nn.Module):
    """One conv, a BatchNorm with momentum=None (torch's cumulative average) that has seen 3 batches."""

    num_outputs = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4, momentum=None)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.num_batches_tracked.fill_(3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_cumulative_average_momentum_is_inverted_too():
    model = _CumulativeBN().double()
    spec = gl.DataSpec(shape=(1, 8, 8), num_classes=3)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    case, _ = gl.simulate(model, x, torch.tensor([0, 2]), spec=spec, bn_mode="train")
    stats = B.revealed_statistics(case)
    mu, var = _true_batch_statistics(model, x)["bn"]
    assert torch.allclose(stats.layers["bn"].mean, mu, atol=1e-12)
    assert torch.allclose(stats.layers["bn"].var, var, atol=1e-12)
    assert int(case.observed_buffers["bn.num_batches_tracked"]) == 4


def test_eval_mode_buffers_come_back_unchanged_and_reveal_nothing(photos32):
    x, y = photos32.batch(2)
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="eval")
    for k, v in case.buffers.items():
        assert torch.equal(case.observed_buffers[k], v), k
    with pytest.raises(gl.ValidationError, match="'eval' mode"):
        B.revealed_statistics(case)
    ch = B.side_channel(case)
    assert ch["leaks"] is False and ch["consistent"] is True and "unchanged" in ch["note"]
    # buffers that moved although the case says eval: the client trained in train mode
    train, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="train")
    wrong = gl.Case(model=model, observation=train.observation, spec=photos32.spec, batch_size=2, labels=y,
                    bn_mode="eval", observed_buffers=train.observed_buffers)
    ch = B.side_channel(wrong)
    assert ch["consistent"] is False and "bn_mode='train'" in ch["note"]
    assert B.side_channel(train)["leaks"] is True


def test_the_case_checks_the_buffers_it_is_given(photos32):
    x, y = photos32.batch(1)
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="train")
    bufs = dict(case.observed_buffers)
    bad = {**bufs, "bn1.running_mean": torch.zeros(3, dtype=torch.float64), "bn9.running_mean": torch.zeros(16)}
    bad.pop("layer1.0.bn1.running_var")
    bad["layer1.0.bn2.running_var"] = torch.full((16,), float("nan"), dtype=torch.float64)
    with pytest.raises(gl.ValidationError) as e:
        gl.Case(model=model, observation=case.observation, spec=photos32.spec, batch_size=1, bn_mode="train",
                observed_buffers=bad)
    msg = str(e.value)
    assert "unknown key(s) ['bn9.running_mean']" in msg
    assert "'bn1.running_mean'] has shape (3,), expected (16,)" in msg
    assert "has 'layer1.0.bn1.running_mean' but not 'layer1.0.bn1.running_var'" in msg
    assert "'layer1.0.bn2.running_var'] has 16 non-finite" in msg
    # a counter that disagrees with the protocol's forward passes is reported, not silently inverted
    off = {**bufs, "bn1.num_batches_tracked": bufs["bn1.num_batches_tracked"] + 2}
    c = gl.Case(model=model, observation=case.observation, spec=photos32.spec, batch_size=1, bn_mode="train",
                observed_buffers=off)
    with pytest.raises(gl.ValidationError, match="bn1.num_batches_tracked advanced by 3, but the fedsgd"):
        B.revealed_statistics(c)
    # buffers follow the case's dtype and device
    assert case.to(torch.float32).observed_buffers["bn1.running_var"].dtype == torch.float32


def test_from_observed_reads_buffers_from_a_state_dict_file(tmp_path, photos32):
    x, y = photos32.batch(2)
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="train", protocol="fedavg",
                          local_steps=2, local_lr=0.01)
    before = model.state_dict()
    # a whole state_dict difference saved by the server (after - before), buffers included
    delta = {**{k: v for k, v in case.observed.items()},
             **{k: case.observed_buffers[k] - before[k] for k in case.observed_buffers}}
    torch.save(delta, tmp_path / "delta.pt")
    back = gl.Case.from_observed(model, tmp_path / "delta.pt", spec=photos32.spec, batch_size=2, protocol="fedavg",
                                 local_steps=2, local_lr=0.01, bn_mode="train")
    for k, v in case.observed_buffers.items():
        assert torch.allclose(back.observed_buffers[k], v, atol=1e-12) if v.is_floating_point() else \
            torch.equal(back.observed_buffers[k], v), k
    rev, ref = B.revealed_statistics(back), B.revealed_statistics(case)
    assert torch.allclose(rev.layers["bn1"].mean, ref.layers["bn1"].mean, atol=1e-10)
    # FedSGD: buffer entries are the returned values; given twice is an error
    sgd, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="train")
    back = gl.Case.from_observed(model, {**sgd.observed, **sgd.observed_buffers}, spec=photos32.spec, batch_size=2,
                                 bn_mode="train")
    assert torch.equal(back.observed_buffers["bn1.running_var"], sgd.observed_buffers["bn1.running_var"])
    with pytest.raises(gl.ValidationError, match="buffers are given twice"):
        gl.Case.from_observed(model, {**sgd.observed, **sgd.observed_buffers}, spec=photos32.spec, batch_size=2,
                              buffers=sgd.observed_buffers)


def test_flower_case_reads_the_returned_buffers(photos32):
    x, y = photos32.batch(2)
    model = _resnet(photos32)
    case, _ = gl.simulate(model, x.double(), y, spec=photos32.spec, bn_mode="train", protocol="fedavg",
                          local_steps=1, local_lr=0.01)
    sent = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    after = {k: (v + case.observed[k]) if k in case.observed else case.observed_buffers[k]
             for k, v in model.state_dict().items()}
    back = {k: v.detach().numpy().copy() for k, v in after.items()}
    replay = resolve_replay({}, num_examples=2, local_steps=1, local_lr=0.01, local_batch_size=2)
    fc = case_from_flower(model, sent, back, spec=photos32.spec, replay=replay, bn_mode="train")
    true = _true_batch_statistics(model, photos32.spec.normalize(x.double()))
    stats = B.revealed_statistics(fc)
    assert torch.allclose(stats.layers["layer3.2.bn2"].var, true["layer3.2.bn2"][1], rtol=1e-9)
    ch = fc.meta["side_channels"][0]
    assert ch["leaks"] and ch["exact"] and ch["layers"] == 21


def test_flower_audit_notes_what_the_buffers_leaked(photos32):
    from gradleak.integrations.flower import Auditor

    x, y = photos32.batch(2)
    model = _resnet(photos32).float()
    case, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train", protocol="fedavg", local_steps=2,
                          local_lr=0.01)
    sent = [v.numpy().copy() for v in model.state_dict().values()]
    back = [((v + case.observed[k]) if k in case.observed else case.observed_buffers[k]).detach().numpy().copy()
            for k, v in model.state_dict().items()]
    for mode, expect in (("train", "mixture of the 2 local steps"), ("eval", "client ran BatchNorm in train mode")):
        auditor = Auditor(model, photos32.spec, attack=gl.create("ig", max_iterations=1), local_steps=2,
                          local_lr=0.01, bn_mode=mode, verbose=False)
        rec = auditor.audit_update(1, 3, sent, back, num_examples=2, reported={})
        assert rec.error is None and any(expect in n for n in rec.notes), (mode, rec.notes)
