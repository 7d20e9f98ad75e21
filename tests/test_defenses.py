import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradleak as gl
from gradleak import defenses as D
from gradleak import functional as Fn


def _update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(20, 10, generator=g), "b": torch.randn(7, generator=g)}


def _norm(u):
    return float(torch.sqrt(sum(v.pow(2).sum() for v in u.values())))


# ---- update transforms ------------------------------------------------------------------------------

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
def test_clip_update_bounds_the_global_norm(max_norm, seed):
    u = _update(seed)
    out = D.ClipUpdate(max_norm)(u)
    assert _norm(out) <= max_norm * (1 + 1e-5)
    if _norm(u) <= max_norm:
        assert _norm(out) == pytest.approx(_norm(u))


def test_noise_is_seeded_and_scaled():
    u = {"a": torch.zeros(200, 100, dtype=torch.float64)}
    a = D.Noise(0.5)(u, torch.Generator().manual_seed(3))
    b = D.Noise(0.5)(u, torch.Generator().manual_seed(3))
    assert torch.equal(a["a"], b["a"])
    # 20000 draws: the sample std of a Gaussian has relative error ~ 1/sqrt(2N) = 0.5%; 3% is 6 of those
    assert float(a["a"].std()) == pytest.approx(0.5, rel=0.03)


def test_laplace_noise_has_scale_b():
    u = {"a": torch.zeros(200, 100, dtype=torch.float64)}
    out = D.create("noise", kind="laplace", scale=0.2)(u, torch.Generator().manual_seed(0))["a"]
    # Laplace(b): mean |x| = b, std = b sqrt(2); 20000 draws give relative errors ~ 1%; 5% tolerance
    assert float(out.abs().mean()) == pytest.approx(0.2, rel=0.05)
    assert float(out.std()) == pytest.approx(0.2 * math.sqrt(2), rel=0.05)
    with pytest.raises(gl.ValidationError, match="noise defense: Laplace noise needs scale"):
        D.create("noise", kind="laplace")
    with pytest.raises(gl.ValidationError, match="sigma is the Gaussian std"):
        D.create("noise", kind="laplace", sigma=0.1, scale=0.1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_uses_at_most_2_to_the_bits_levels(bits):
    out = D.Quantize(bits)(_update())
    for v in out.values():
        assert v.unique().numel() <= 2 ** bits


def test_clip_noise_update_is_not_called_dp_and_has_no_epsilon():
    d = D.create("clip-noise-update", max_norm=1.0, noise_multiplier=0.5)
    assert "NOT DP-SGD" in type(d).__doc__
    assert d.privacy() is None
    for old in ("dp", "clip"):
        with pytest.raises(gl.UnknownNameError):
            D.create(old)


@settings(max_examples=15, deadline=None)
@given(ratio=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
def test_topk_sends_the_largest_entries(ratio, seed):
    u = _update(seed)
    out = D.TopK(ratio)(u)
    sent = torch.cat([(out[k] != 0).flatten() for k in u])
    allv = torch.cat([u[k].flatten() for k in u])
    assert int(sent.sum()) == max(1, round(ratio * allv.numel()))
    assert allv[sent].abs().min() >= allv[~sent].abs().max()
    assert torch.equal(torch.cat([out[k].flatten() for k in u])[sent], allv[sent])


def test_topk_error_feedback_carries_what_was_withheld():
    d = D.TopK(0.05, error_feedback=True)
    plain = D.TopK(0.05)
    updates = [_update(s) for s in range(5)]
    first = d(updates[0])
    assert all(torch.equal(first[k], plain(updates[0])[k]) for k in first)  # no residual before the first update
    sent = [first] + [d(u) for u in updates[1:]]
    # what was sent so far plus what is withheld is exactly everything the client computed
    for k in updates[0]:
        total_in = sum(u[k] for u in updates)
        total_out = sum(s[k] for s in sent) + d._residual[k]
        assert torch.allclose(total_in, total_out, atol=1e-5)
    # withheld entries reach the server later: the second update differs from plain top-k of its input
    d.reset()
    d(updates[0])
    assert not all(torch.equal(d(updates[1])[k], plain(updates[1])[k]) for k in first)
    d.reset()
    assert d._residual is None


# ---- options: typed, one clear error naming the defense --------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("noise:sigma=-1", "noise defense: sigma must be >= 0, got -1"),
    ("noise:sigma=inf", "noise defense: sigma must be finite"),
    ("noise:sigma=nan", "noise defense: sigma must be finite"),
    ("noise:sigma=none", "noise defense: option sigma='none' is not a float"),
    ("noise:sigma=abc", "noise defense: option sigma='abc' is not a float"),
    ("noise:kind=uniform,sigma=1", "noise defense: kind must be one of 'gaussian', 'laplace'"),
    ("prune:ratio=1", r"prune defense: ratio must be in \[0, 1\), got 1.0"),
    ("prune:ratio=-0.1", "prune defense: ratio must be in"),
    ("topk:ratio=1.5", "topk defense: ratio must be in"),
    ("topk:error_feedback=maybe", "topk defense: option error_feedback='maybe' must be true or false"),
    ("quantize:bits=0", r"quantize defense: bits must be in \[1, 32\], got 0"),
    ("quantize:bits=2.5", "quantize defense: option bits='2.5' is not an int"),
    ("clip-update:max_norm=0", "clip-update defense: max_norm must be > 0"),
    ("dp-sgd:max_grad_norm=1", "dp-sgd defense: give exactly one of noise_multiplier"),
    ("dp-sgd:noise_multiplier=-1", "dp-sgd defense: noise_multiplier must be >= 0"),
    ("dp-sgd:noise_multiplier=1,delta=1", "dp-sgd defense: delta must be in"),
    ("dp-sgd:noise_multiplier=1,accountant=gdp", "dp-sgd defense: accountant must be one of 'rdp', 'prv'"),
    ("soteria:ratio=1", "soteria defense: ratio must be in"),
    ("secure-aggregation:clients=1", "secure-aggregation defense: clients must be >= 2"),
])
def test_bad_option_values_are_one_error_naming_the_defense(spec, message):
    with pytest.raises(gl.ValidationError, match=message):
        D.parse(spec)


@pytest.mark.parametrize("build", [
    lambda: D.Noise(sigma=None),
    lambda: D.Noise(sigma="0.1"),
    lambda: D.Noise(sigma=True),
    lambda: D.Prune(ratio=float("inf")),
    lambda: D.Quantize(bits=4.0),
    lambda: D.TopK(0.1, error_feedback="False"),
    lambda: D.DPSGD(noise_multiplier=1.0, rounds=0),
])
def test_wrong_python_values_are_errors_too(build):
    with pytest.raises(gl.ValidationError, match="defense: "):
        build()


def test_cli_booleans_are_parsed_not_truthy():
    assert D.parse("topk:error_feedback=False").error_feedback is False
    assert D.parse("topk:error_feedback=true").error_feedback is True
    assert D.create("topk", error_feedback="0").error_feedback is False


def test_parse_compose_and_errors():
    d = D.compose(D.parse("clip-update:max_norm=1"), D.parse("noise:sigma=0.0"))
    out = d(_update(), torch.Generator().manual_seed(0))
    assert _norm(out) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(gl.ValidationError, match="unknown option"):
        D.parse("noise:sgima=1")
    with pytest.raises(gl.UnknownNameError, match="did you mean"):
        D.parse("prun:ratio=0.5")
    with pytest.raises(gl.ValidationError, match="ratio must be"):
        D.Prune(1.5)
    with pytest.raises(gl.ValidationError, match="in-client defense, listed first"):
        D.compose(D.Noise(0.1), D.DPSGD(noise_multiplier=1.0))
    with pytest.raises(gl.ValidationError, match="secure aggregation must be the last"):
        D.compose(D.SecureAggregation(2), D.Noise(0.1))


def test_registry_lists_every_defense_with_a_one_line_description():
    assert set(D.defenses.names()) >= {"noise", "clip-update", "clip-noise-update", "prune", "quantize", "topk",
                                       "dp-sgd", "soteria", "secure-aggregation"}
    for n in D.defenses.names():
        assert D.defenses.get(n).__doc__.strip().splitlines()[0]


def test_defense_reaches_the_case(photos32):
    x, y = photos32.batch(1)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=19)
    clean, truth = gl.simulate(model, x, y, spec=photos32.spec)
    pruned, _ = gl.simulate(model, x, y, spec=photos32.spec, defense=D.Prune(0.9))
    assert "prune" in pruned.meta["defense"]
    assert pruned.residual(truth.inputs, truth.labels) > clean.residual(truth.inputs, truth.labels) + 1e-3


# ---- Soteria ----------------------------------------------------------------------------------------

def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 4 * 4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()


def test_soteria_prunes_the_features_with_the_largest_representation_ratio():
    model = _small_cnn()
    spec = gl.DataSpec(shape=(1, 4, 4), num_classes=4)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    ratio = 0.5
    case, _ = gl.simulate(model, x, y, spec=spec, defense=D.Soteria(ratio=ratio))
    clean, _ = gl.simulate(model, x, y, spec=spec)
    # the slow obvious way: r = input of the first Linear; d r_{b,i} / d x_b by one backward pass each
    feats = {}
    h = model[3].register_forward_hook(lambda m, i, o: feats.__setitem__("r", i[0]))
    score = torch.zeros(48, dtype=torch.float64)
    for b in range(3):
        xb = x[b:b + 1].clone().requires_grad_(True)
        model(xb)
        r = feats["r"][0]
        for i in range(48):
            (d,) = torch.autograd.grad(r[i], xb, retain_graph=True)
            score[i] += d.norm() / r[i].detach().abs()
    h.remove()
    pruned = torch.argsort(score)[: int(ratio * 48)]
    w = case.observed["3.weight"]
    assert torch.equal((w.abs().sum(0) == 0).nonzero().flatten().sort().values, pruned.sort().values)
    kept = torch.ones(48, dtype=torch.bool)
    kept[pruned] = False
    assert torch.allclose(w[:, kept], clean.observed["3.weight"][:, kept], atol=1e-14)
    for k in clean.observed:  # every other gradient is what the client computed
        if k != "3.weight":
            assert torch.allclose(case.observed[k], clean.observed[k], atol=1e-14)
    with pytest.raises(gl.ValidationError, match="soteria defense: layer 'nope' is not an nn.Linear"):
        gl.simulate(model, x, y, spec=spec, defense=D.Soteria(layer="nope"))


# ---- secure aggregation -----------------------------------------------------------------------------

def test_secure_aggregation_reveals_only_the_sum():
    ups = [{k: v.double() for k, v in _update(s).items()} for s in range(4)]
    agg = D.secure_aggregate(ups, generator=torch.Generator().manual_seed(0), fraction_bits=32)
    for k in ups[0]:
        plain = sum(u[k] for u in ups) / 4
        assert float((agg.mean[k] - plain).abs().max()) <= 2.0 ** -33 + 1e-15  # fixed-point rounding only
    # each message alone is masked: as a fixed-point number it is nowhere near the client's update
    from gradleak.defenses.secagg import MODULUS
    for i, (msg, u) in enumerate(zip(agg.messages, ups)):
        decoded = torch.where(msg["a"] >= MODULUS // 2, msg["a"] - MODULUS, msg["a"]).double() / 2.0 ** 32
        assert float((decoded - u["a"]).abs().median()) > 1e3
    # the masks cancel exactly in the modular sum
    for k in ups[0]:
        s = sum(m[k] for m in agg.messages) % MODULUS
        enc = sum(torch.round(u[k] * 2.0 ** 32).to(torch.int64) % MODULUS for u in ups) % MODULUS
        assert torch.equal(s, enc)
    with pytest.raises(gl.ValidationError, match="at least 2 clients"):
        D.secure_aggregate(ups[:1])
    # public weights (sample counts): the mean is sum w_i u_i / sum w_i, rounding within the stated bound
    w = [1, 3, 4, 8]
    agg = D.secure_aggregate(ups, generator=torch.Generator().manual_seed(1), fraction_bits=40, weights=w)
    assert agg.max_rounding == 4 * 2.0 ** -41 / 16
    for k in ups[0]:
        plain = sum(wi * u[k] for wi, u in zip(w, ups)) / sum(w)
        assert float((agg.mean[k] - plain).abs().max()) <= agg.max_rounding + 1e-15
    with pytest.raises(gl.ValidationError, match="weights must be 4 finite numbers >= 1"):
        D.secure_aggregate(ups, weights=[1, 2, 0, 1])


def test_secure_aggregation_case_is_the_union_batch():
    data = gl.data.load("digits")
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=10, dtype=torch.float64)
    x, y = data.batch(4)
    xo, yo = data.batch(12, start=4)
    case, truth = gl.simulate(model, x.double(), y, spec=data.spec, defense=D.create("secure-aggregation", clients=4),
                              other_clients=(xo.double(), yo), generator=torch.Generator().manual_seed(0))
    assert case.batch_size == 16 and truth.inputs.shape[0] == 16
    assert torch.equal(truth.inputs[:4], x.double())
    union, _ = gl.simulate(model, truth.inputs, truth.labels, spec=data.spec)
    for k in union.observed:
        assert float((case.observed[k] - union.observed[k]).abs().max()) <= 2.0 ** -33 + 1e-15
    assert case.residual(truth.inputs, truth.labels) < 1e-15
    with pytest.raises(gl.ValidationError, match="needs other_clients"):
        gl.simulate(model, x.double(), y, spec=data.spec, defense=D.SecureAggregation(4))
    with pytest.raises(gl.ValidationError, match="fedsgd' only"):
        gl.simulate(model, x.double(), y, spec=data.spec, defense=D.SecureAggregation(4), protocol="fedavg",
                    other_clients=(xo.double(), yo))
    with pytest.raises(gl.ValidationError, match="only used with secure aggregation"):
        gl.simulate(model, x.double(), y, spec=data.spec, other_clients=(xo.double(), yo))


def test_in_client_defense_matches_the_plain_client_when_it_does_nothing():
    # DP-SGD with no noise and a clipping norm no example reaches is plain FedAvg: one code path
    data = gl.data.load("digits")
    model = gl.models.build("lenet", input_shape=data.spec.shape, num_classes=10, dtype=torch.float64)
    x, y = data.batch(6)
    kw = dict(spec=data.spec, protocol="fedavg", local_steps=3, local_lr=0.1, local_batch_size=2)
    clean, _ = gl.simulate(model, x.double(), y, **kw)
    dp, _ = gl.simulate(model, x.double(), y, defense=D.DPSGD(max_grad_norm=1e6, noise_multiplier=0.0), **kw)
    for k in clean.observed:
        assert torch.allclose(dp.observed[k], clean.observed[k], atol=1e-14, rtol=1e-12)
    assert Fn.cosine_distance(dp.observed, clean.observed) < 1e-20
