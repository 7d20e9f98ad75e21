"""DP-SGD: what the client sends, checked against the slow obvious computation, and its accounting against
opacus's own accountants."""

import math

import pytest
import torch

import gradleak as gl
from gradleak import defenses as D
from gradleak import functional as Fn


@pytest.fixture(scope="module")
def setup():
    data = gl.data.load("digits")
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=10, dtype=torch.float64)
    x, y = data.batch(6, start=100)
    return data, model, x.double(), y


def _clipped_mean_slow(case_like, params, x, y, c):
    """mean_i g_i * min(1, C / ||g_i||), each g_i by its own backward pass."""
    out = None
    for i in range(x.shape[0]):
        g = Fn.gradient(case_like.model, params, case_like.buffers, x[i:i + 1], y[i:i + 1], case_like.loss_fn)
        n = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
        f = min(1.0, c / n)
        out = {k: v * f for k, v in g.items()} if out is None else {k: out[k] + v * f for k, v in g.items()}
    return {k: v / x.shape[0] for k, v in out.items()}


def test_per_example_gradients_equal_one_backward_per_example(setup):
    data, model, x, y = setup
    clean, _ = gl.simulate(model, x, y, spec=data.spec)
    xn = data.spec.normalize(x)
    per = Fn.per_example_gradients(clean.model, clean.parameters, clean.buffers, xn, y, clean.loss_fn)
    for i in range(x.shape[0]):
        g = Fn.gradient(clean.model, clean.parameters, clean.buffers, xn[i:i + 1], y[i:i + 1], clean.loss_fn)
        for k in g:
            assert torch.allclose(per[k][i], g[k], atol=1e-15, rtol=1e-12)


@pytest.mark.parametrize("c", [1e-3, 0.05, 1e3])  # every example clipped / some / none
def test_sigma_zero_is_the_mean_of_per_example_clipped_gradients(setup, c):
    data, model, x, y = setup
    case, _ = gl.simulate(model, x, y, spec=data.spec, defense=D.DPSGD(max_grad_norm=c, noise_multiplier=0.0))
    want = _clipped_mean_slow(case, case.parameters, data.spec.normalize(x), y, c)
    for k in want:
        assert torch.allclose(case.observed[k], want[k], atol=1e-15, rtol=1e-10)
    assert case.meta["privacy"]["epsilon"] is None and case.meta["privacy"]["guarantee"] is False


def test_fedavg_clips_every_local_step(setup):
    data, model, x, y = setup
    c, lr, steps, b = 0.05, 0.3, 4, 2
    case, _ = gl.simulate(model, x, y, spec=data.spec, protocol="fedavg", local_steps=steps, local_lr=lr,
                          local_batch_size=b, defense=D.DPSGD(max_grad_norm=c, noise_multiplier=0.0))
    xn = data.spec.normalize(x)
    theta0 = {k: v.detach() for k, v in case.parameters.items()}
    theta = dict(theta0)
    for s in range(steps):
        sl = Fn.minibatch_indices(x.shape[0], b, s)
        g = _clipped_mean_slow(case, theta, xn[sl], y[sl], c)
        theta = {k: theta[k] - lr * g[k] for k in theta}
    for k in theta:
        assert torch.allclose(case.observed[k], theta[k] - theta0[k], atol=1e-15, rtol=1e-10)
    assert case.meta["privacy"]["steps"] == steps  # rounds=1 x 4 local steps


def test_noise_std_on_the_mean_is_sigma_c_over_b(setup):
    data, model, x, y = setup
    sigma, c, b = 0.7, 0.5, x.shape[0]
    d0 = D.DPSGD(max_grad_norm=c, noise_multiplier=0.0)
    d = D.DPSGD(max_grad_norm=c, noise_multiplier=sigma)
    clean, _ = gl.simulate(model, x, y, spec=data.spec, defense=d0)
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(30):
        case, _ = gl.simulate(model, x, y, spec=data.spec, defense=d, generator=gen)
        draws.append(torch.cat([(case.observed[k] - clean.observed[k]).flatten() for k in clean.observed]))
    noise = torch.stack(draws)  # 30 draws x 8026 parameters = 240780 Gaussian samples
    n = noise.numel()
    want = sigma * c / b
    # the sample std of N Gaussian samples has relative standard error 1/sqrt(2N) = 0.14%: 1% is 7 of them
    assert float(noise.std()) == pytest.approx(want, rel=0.01)
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(n)
    # independent across draws and coordinates: the correlation of two draws is ~ N(0, 1/8026)
    r = float(torch.corrcoef(noise[:2])[0, 1])
    assert abs(r) < 5 / math.sqrt(noise.shape[1])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_the_accountants_own_answer(setup, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    data, model, x, y = setup
    sigma, q, rounds, delta = 1.1, 0.05, 20, 1e-5
    d = D.DPSGD(max_grad_norm=1.0, noise_multiplier=sigma, sample_rate=q, rounds=rounds, delta=delta,
                accountant=accountant)
    case, _ = gl.simulate(model, x, y, spec=data.spec, protocol="fedavg", local_steps=3, local_lr=0.1, defense=d)
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(rounds * 3):  # 20 rounds of 3 local DP-SGD steps each
        acc.step(noise_multiplier=sigma, sample_rate=q)
    want = acc.get_epsilon(delta=delta)
    p = case.meta["privacy"]
    assert p["epsilon"] == pytest.approx(want, rel=1e-9)
    assert (p["steps"], p["sample_rate"], p["noise_multiplier"], p["delta"], p["accountant"]) == \
        (60, q, sigma, delta, accountant)
    assert case.describe()["meta"]["privacy"]["epsilon"] == p["epsilon"]  # reaches the result's case summary


def test_target_epsilon_is_calibrated_by_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    d = D.DPSGD(max_grad_norm=1.0, target_epsilon=8.0, sample_rate=0.1, rounds=20)
    p = d.privacy(steps_per_round=5)
    want = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.1, steps=100)
    assert p["noise_multiplier"] == want
    assert p["epsilon"] <= 8.0 and p["epsilon"] > 8.0 - 0.05  # opacus's search tolerance is 0.01
    with pytest.raises(gl.ValidationError, match="dp-sgd defense: give exactly one"):
        D.DPSGD(noise_multiplier=1.0, target_epsilon=8.0)


def test_train_mode_batchnorm_is_refused():
    data = gl.data.samples(16, num_images=2)
    model = gl.models.build("convnet", input_shape=data.spec.shape, num_classes=19, width=4)
    x, y = data.batch(2)
    with pytest.raises(gl.ValidationError, match="dp-sgd defense: per-example gradients need"):
        gl.simulate(model, x, y, spec=data.spec, bn_mode="train", defense=D.DPSGD(noise_multiplier=1.0))


def test_cli_spec_builds_dp_sgd():
    d = D.parse("dp-sgd:max_grad_norm=1,noise_multiplier=1.1,sample_rate=0.01,rounds=100,accountant=prv")
    assert isinstance(d, D.DPSGD) and d.acts_in_client
    assert (d.max_grad_norm, d.noise_multiplier, d.sample_rate, d.rounds, d.accountant) == (1.0, 1.1, 0.01, 100, "prv")
