"""The moment-tensor attack (Wang, Lee & Lei 2023): tensors, decomposition, the attack on synthetic and real data,
its failure reports, and the deep-network feature recovery."""

import math

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.activations import Act
from gradleak.attacks.tensor import (TensorAttack, feature_matching_term, find_two_layer, recover_directions,
                                     recover_head_features, weight_normality)
from gradleak.errors import RequirementError, ValidationError
from gradleak.metrics import evaluate
from gradleak.attacks.tensor.moments import (MomentTensor, cp_als_polish, cp_oracle, direction_error, full_moment_tensor,
                                     hermite_form, hermite_tensor, jennrich)

F64 = torch.float64


def _synthetic_case(d=50, B=4, m=40_000, act="relu", K=1, loss="mse", seed=0, dtype=F64, labels_known=True,
                    centred=False, **model_opts):
    """B samples uniform in [0, 1]^d (no normalisation, or ``centred``: normalised by mean 0.5, std 0.29, so the
    model sees nearly orthogonal inputs), a two-layer network of width m."""
    g = torch.Generator().manual_seed(seed)
    stats = dict(mean=(0.5,), std=(0.29,)) if centred else {}
    spec = gl.DataSpec(shape=(d,), num_classes=max(K, 2), **stats)
    x = torch.rand(B, d, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, max(K, 2), (B,), generator=g)
    model = gl.models.build("two-layer", input_shape=(d,), num_classes=max(K, 2), width=m, activation=act,
                            num_outputs=K, dtype=dtype, seed=seed, **model_opts)
    return gl.simulate(model, x, y, spec=spec, loss=loss, labels_known=labels_known)


def _signed_cos(rec, case, truth):
    """Per-sample signed cosine in the model's input space after Hungarian alignment."""
    xs = case.spec.normalize(rec.inputs.double()).flatten(1)
    xt = case.spec.normalize(truth.inputs.double()).flatten(1)
    return direction_error(xs, xt, signed=True)


# ---------------------------------------------------------------------------------------------------------
# Hermite forms and the implicit tensor
# ---------------------------------------------------------------------------------------------------------
def test_hermite_forms_match_dense_hermite_tensors():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=g, dtype=F64)
    for n in range(1, 6):
        for free in (0, 1, 2):
            if n - free < 0:
                continue
            vs = [torch.randn(2, 3, generator=g, dtype=F64) for _ in range(n - free)]
            h = hermite_form(z, vs, free)
            for j in range(7):
                for r in range(h.shape[1]):
                    t = hermite_tensor(z[j], n)
                    for v in vs:
                        t = torch.tensordot(v[r], t, dims=([0], [0]))
                    assert torch.allclose(h[j, r], t, atol=1e-11, rtol=0), (n, free)


def test_implicit_contractions_equal_full_tensor_contractions_small_d():
    """The O(m B^2) contractions in span coordinates equal the contractions of the d^p tensor formed densely in
    the full input space (then projected), to 1e-10."""
    g = torch.Generator().manual_seed(1)
    d, B, m = 6, 3, 400
    X = torch.randn(B, d, generator=g, dtype=F64)
    W = torch.randn(m, d, generator=g, dtype=F64)
    r = torch.randn(B, generator=g, dtype=F64)
    G = ((1 - torch.tanh(W @ X.T) ** 2) * r) @ X / B  # (m, d) tanh first-layer gradient / a_j: rows in span
    U, _ = torch.linalg.qr(X.T)  # (d, B) orthonormal basis of the span
    for p in (3, 4):
        full = full_moment_tensor(G, W, p)  # (d,)*p, never formed for real sizes
        T = MomentTensor(W @ U, order=p, y=G @ U)
        factors = [torch.randn(2, B, generator=g, dtype=F64) for _ in range(p)]
        for n in range(p):
            got = T.contract(factors, n)  # (2, B)
            for k in range(2):
                t = full.movedim(n, 0)
                for q in range(p):
                    if q != n:
                        t = torch.tensordot(t, U @ factors[q][k], dims=([1], [0]))
                assert torch.allclose(got[k], U.T @ t, atol=1e-10, rtol=0), (p, n)
        # symmetrised slice T(I, I, a, .., a) against the symmetrised dense tensor
        a = torch.randn(B, generator=g, dtype=F64)
        import itertools

        sym = sum(full.permute(*pm) for pm in itertools.permutations(range(p))) / math.factorial(p)
        t = sym
        for _ in range(p - 2):
            t = torch.tensordot(t, U @ a, dims=([t.ndim - 1], [0]))
        assert torch.allclose(T.slice(a), U.T @ t @ U, atol=1e-10, rtol=0)
        # output-layer (scalar) estimator too
        gs = torch.randn(m, generator=g, dtype=F64)
        Ts = MomentTensor(W @ U, order=p, g=gs)
        fulls = full_moment_tensor(gs, W, p)
        got = Ts.contract(factors, 0)
        t = fulls
        for q in range(p - 1, 0, -1):
            t = torch.tensordot(t, U @ factors[q][0], dims=([q], [0]))
        assert torch.allclose(got[0], U.T @ t, atol=1e-10, rtol=0)


def test_dense_cp_oracle_and_jennrich_agree_on_small_d():
    """tensorly's parafac on the dense d^4 tensor and Jennrich + CP-ALS on the implicit one find the same
    directions (both close to the planted samples)."""
    g = torch.Generator().manual_seed(2)
    d, B, m = 5, 3, 30_000
    X = torch.randn(B, d, generator=g, dtype=F64)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.randn(m, d, generator=g, dtype=F64)
    r = torch.tensor([1.0, -0.8, 1.2], dtype=F64)
    G = ((W @ X.T > 0).to(F64) * r) @ X / B  # ReLU first-layer gradient / a_j
    full = full_moment_tensor(G, W, 4)
    oracle = cp_oracle(full, B, seed=0)
    U, _ = torch.linalg.qr(X.T)
    T = MomentTensor(W @ U, order=4, y=G @ U)
    best = None
    from gradleak.attacks.tensor.moments import cp_objective

    for dr in jennrich(T, generator=g, draws=4):
        V, _ = cp_als_polish(T, dr.directions, sweeps=5)
        obj = cp_objective(T, V)[0]
        if best is None or obj < best[0]:
            best = (obj, V)
    implicit = best[1] @ U.T
    assert direction_error(oracle, X).min() > 0.98
    assert direction_error(implicit, X).min() > 0.98
    assert direction_error(implicit, oracle).min() > 0.98


def test_dense_tensor_of_moment_tensor_matches_contractions():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(50, 3, generator=g, dtype=F64), torch.randn(50, 3, generator=g, dtype=F64)
    T = MomentTensor(z, order=4, y=y)
    D = T.dense()
    f = [torch.randn(1, 3, generator=g, dtype=F64) for _ in range(4)]
    val = torch.einsum("abcd,a,b,c,d->", D, f[0][0], f[1][0], f[2][0], f[3][0])
    assert abs(float(T.contract_all(f)[0]) - float(val)) < 1e-10
    with pytest.raises(ValidationError, match="exactly one of y"):
        MomentTensor(z, order=4)


# ---------------------------------------------------------------------------------------------------------
# The attack: the quality targets
# ---------------------------------------------------------------------------------------------------------
def test_relu_d50_b4_every_sample_recovered_with_sign():
    case, truth = _synthetic_case(d=50, B=4, m=40_000, act="relu")
    rec = gl.create("tensor").reconstruct(case, seed=0)
    cos = _signed_cos(rec, case, truth)
    assert cos.min() >= 0.99, cos
    assert rec.info["order"] == 4 and rec.kind == "estimate"
    assert rec.residual < 1e-8  # the norms follow from the loss residual: the gradient is matched exactly
    assert evaluate(rec, truth).cosine_per_image == pytest.approx([1.0] * 4, abs=1e-6)
    assert rec.info["batch_size_gap_estimate"] == 4
    assert rec.info["identifiable"] == {"directions": True, "signs": True, "norms": False}
    assert all("loss residual" in s["norm"] for s in rec.info["samples"])


def test_tanh_order_3_directions_up_to_sign():
    case, truth = _synthetic_case(d=50, B=4, m=40_000, act="tanh")
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert rec.info["order"] == 3
    xs = case.spec.normalize(rec.inputs.double())
    xt = case.spec.normalize(truth.inputs.double())
    assert direction_error(xs, xt, signed=False).min() >= 0.99
    assert rec.info["identifiable"]["signs"] is False  # tanh is odd
    # the sign was fixed by the stated value-range prior (data in [0, 1]): signed recovery too
    assert _signed_cos(rec, case, truth).min() >= 0.99
    assert any("prior" in s["sign"] for s in rec.info["samples"])


def test_real_digits_relu():
    data = gl.data.load("digits", num_images=4)
    x, y = data.batch(4)
    model = gl.models.build("two-layer", input_shape=data.spec.shape, num_classes=10, width=40_000, dtype=F64)
    case, truth = gl.simulate(model, x.double(), y, spec=data.spec)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    sc = evaluate(rec, truth)
    assert min(sc.cosine_per_image) >= 0.95, sc.cosine_per_image
    assert sc.label_accuracy == 1.0


def test_real_photos_16px_relu_float32():
    data = gl.data.samples(16, num_images=4)
    x, y = data.batch(4)
    model = gl.models.build("two-layer", input_shape=data.spec.shape, num_classes=data.spec.num_classes,
                            width=40_000)
    case, truth = gl.simulate(model, x, y, spec=data.spec)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    sc = evaluate(rec, truth)
    assert rec.inputs.shape == (4, 3, 16, 16) and rec.inputs.dtype == torch.float32
    assert min(sc.cosine_per_image) >= 0.95, sc.cosine_per_image
    assert sc.psnr > 40


def test_tensor_error_falls_with_width():
    """The tensor step alone (fit='none': no gradient-fit refinement of the directions): mean direction
    error over 4 seeds falls monotonically over widths 1k, 6k, 36k (1 - cos ~ 1/m in theory). Centred data:
    the trend of the estimator, not the conditioning of strongly correlated samples."""
    errs = []
    for m in (1_000, 6_000, 36_000):
        e = []
        for seed in range(4):
            case, truth = _synthetic_case(d=20, B=3, m=m, seed=seed, centred=True)
            dirs, _ = recover_directions(case, seed=seed, fit="none", draws=4)
            xt = case.spec.normalize(truth.inputs.double())
            e.append(float(1 - direction_error(dirs, xt).mean()))
        errs.append(sum(e) / len(e))
    assert errs[0] > 1.5 * errs[1] > 2.25 * errs[2], errs
    assert errs[2] < 0.01


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_fit_none_keeps_the_tensor_steps_directions_for_smooth_activations(act):
    """fit='none' reports the tensor step alone for smooth activations too (the directions are not moved; only
    signs and a common scale are fitted): its error stays that of the moment estimate at this width (measured
    1 - |cos| 2e-3 for tanh, 5e-2 for GELU at m = 2,000), while the default gradient fit from the same draws is
    exact."""
    case, truth = _synthetic_case(d=20, B=4, m=2_000, act=act, seed=3, centred=True)
    xt = case.spec.normalize(truth.inputs.double())
    alone, info_alone = recover_directions(case, seed=0, fit="none", draws=4)
    fitted, info_fit = recover_directions(case, seed=0, draws=4)
    err_alone = float(1 - direction_error(alone, xt).mean())
    err_fit = float(1 - direction_error(fitted, xt).mean())
    assert err_alone > 1e-4 and info_alone["fit_residual"] > 1e-4, (err_alone, info_alone["fit_residual"])
    assert err_fit < 1e-10 and info_fit["fit_residual"] < 1e-12, (err_fit, info_fit["fit_residual"])


# ---------------------------------------------------------------------------------------------------------
# Other activations, losses and settings
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act,K,loss", [("leaky-relu", 1, "logistic"), ("gelu", 3, "cross-entropy"),
                                        ("sigmoid", 1, "mse")])
def test_other_activations(act, K, loss):
    case, truth = _synthetic_case(d=30, B=3, m=20_000, act=act, K=K, loss=loss, seed=4)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert _signed_cos(rec, case, truth).min() >= 0.99
    assert rec.info["fit_residual"] < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("act", ["gelu", "softplus", "silu"])
def test_smooth_activations_single_output_slow(act):
    case, truth = _synthetic_case(d=50, B=4, m=40_000, act=act)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert _signed_cos(rec, case, truth).min() >= 0.99


def test_unknown_labels_are_recovered_cross_entropy():
    case, truth = _synthetic_case(d=30, B=4, m=20_000, K=5, loss="cross-entropy", labels_known=False, seed=5)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    sc = evaluate(rec, truth)
    assert sc.label_accuracy == 1.0
    assert rec.info["labels_source"].startswith("recovered")
    assert rec.residual < 1e-8


def test_mirrored_initialisation_and_gaussian_bias():
    # mirrored: f = 0 at initialisation, every residual known from its label -> exact norms
    case, truth = _synthetic_case(d=30, B=3, m=20_000, K=4, loss="cross-entropy", mirrored=True, seed=6)
    assert torch.allclose(case.forward(case.spec.normalize(truth.inputs)), torch.zeros(3, 4, dtype=F64), atol=1e-12)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert evaluate(rec, truth).mse < 1e-12
    # a Gaussian bias: the augmented input (x, 1) fixes norm and sign, even for an odd activation
    case, truth = _synthetic_case(d=30, B=3, m=20_000, act="tanh", bias=True, seed=7)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert evaluate(rec, truth).mse < 1e-12
    assert all(s["sign"] == "bias" for s in rec.info["samples"])
    assert rec.info["identifiable"] == {"directions": True, "signs": True, "norms": True}


def test_fedavg_single_step_is_a_gradient():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(3, 20, generator=g, dtype=F64)
    spec = gl.DataSpec(shape=(20,), num_classes=3)
    model = gl.models.build("two-layer", input_shape=(20,), num_classes=3, width=10_000, dtype=F64)
    case, truth = gl.simulate(model, x, torch.tensor([0, 1, 2]), spec=spec, protocol="fedavg", local_steps=1,
                              local_lr=0.1)
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert min(evaluate(rec, truth).cosine_per_image) > 0.999


def test_determinism_and_no_side_effects():
    case, truth = _synthetic_case(d=20, B=2, m=5_000, seed=9)
    before = {k: v.clone() for k, v in case.observed.items()}
    a = gl.create("tensor").reconstruct(case, seed=3)
    b = gl.create("tensor").reconstruct(case, seed=3)
    assert torch.equal(a.inputs, b.inputs)
    assert all(torch.equal(v, before[k]) for k, v in case.observed.items())


# ---------------------------------------------------------------------------------------------------------
# Where the method cannot work: clear errors and statements
# ---------------------------------------------------------------------------------------------------------
def test_requirement_errors_list_every_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 4, generator=g, dtype=F64)
    spec = gl.DataSpec(shape=(4,), num_classes=2)
    model = gl.models.build("two-layer", input_shape=(4,), num_classes=2, width=500, activation="identity",
                            dtype=F64)
    case, _ = gl.simulate(model, x, torch.zeros(6, dtype=torch.long), spec=spec, protocol="fedavg", local_steps=3)
    with pytest.raises(RequirementError) as e:
        gl.create("tensor").reconstruct(case)
    msg = str(e.value)
    assert "mu_p = 0" in msg or "linear" in msg
    assert "exceeds the input dimension" in msg
    assert "FedAvg with one full-batch local step" in msg
    assert len(e.value.problems) == 3


def test_non_gaussian_weights_are_refused():
    torch.manual_seed(0)
    d = 30
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 4000, bias=False), Act("relu"), nn.Linear(4000, 3, bias=False))
    model = model.double()  # PyTorch's default init: uniform (excess kurtosis -1.2)
    spec = gl.DataSpec(shape=(d,), num_classes=3)
    case, _ = gl.simulate(model, torch.rand(2, d, dtype=F64), torch.tensor([0, 1]), spec=spec)
    with pytest.raises(RequirementError, match="not i.i.d. Gaussian"):
        gl.create("tensor").reconstruct(case)
    stats = weight_normality(model[1].weight)
    assert stats["excess_kurtosis"] == pytest.approx(-1.2, abs=0.02)
    rec = gl.create("tensor", check_weights=False).reconstruct(case)  # runs anyway when asked
    assert rec.inputs.shape == (2, d)


def test_trained_weights_detected_in_the_span():
    """Weights moved along the data (a few large SGD steps on this batch) pass the marginal check but not the
    normality check of their projection on the gradient's span."""
    case, truth = _synthetic_case(d=30, B=3, m=20_000, seed=10)
    model = gl.models.build("two-layer", input_shape=(30,), num_classes=2, width=20_000, num_outputs=1, dtype=F64,
                            seed=10)
    x = case.spec.normalize(truth.inputs)
    with torch.no_grad():
        model.hidden.weight += 0.2 * torch.randn(20_000, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) @ x
    trained, _ = gl.simulate(model, truth.inputs, truth.labels, spec=case.spec, loss="mse")
    with pytest.raises(RequirementError, match="projected on the gradient's span are not N"):
        gl.create("tensor").reconstruct(trained)


def test_deep_model_and_options_are_validated():
    model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=4)
    view = find_two_layer(model)
    assert isinstance(view, list)  # lenet ends conv -> act -> flatten -> linear: no Linear-act-Linear head
    data = gl.data.samples(16, num_images=1)
    case, _ = gl.simulate(gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=19), *data.batch(1),
                          spec=data.spec)
    with pytest.raises(RequirementError, match="two-layer network"):
        gl.create("tensor").reconstruct(case)
    with pytest.raises(ValidationError, match="fit must be one of"):
        gl.create("tensor", fit="magic")
    with pytest.raises(ValidationError, match="unknown option"):
        gl.create("tensor", widht=3)
    assert gl.attacks.attacks.get("tensor") is TensorAttack
    assert "Wang" in TensorAttack.paper


def test_two_layer_model():
    m = gl.models.build("two-layer", input_shape=(1, 8, 8), num_classes=10, width=4000, mirrored=True, seed=1)
    assert m.W.shape == (4000, 64) and m.a.shape == (10, 4000)
    assert m.W.std().item() == pytest.approx(1.0, abs=0.01)
    assert torch.allclose(m.a.abs(), torch.full_like(m.a, 1 / math.sqrt(4000)))
    assert torch.equal(m.W[:2000], m.W[2000:]) and torch.equal(m.a[:, :2000], -m.a[:, 2000:])
    assert m(torch.randn(2, 1, 8, 8)).abs().max() < 1e-4
    one = gl.models.build("two-layer", input_shape=(5,), num_classes=2, width=10, num_outputs=1, bias=True)
    assert one.num_outputs == 1 and one.hidden.bias is not None
    with pytest.raises(ValidationError, match="even width"):
        gl.models.build("two-layer", input_shape=(5,), num_classes=2, width=11, mirrored=True)
    v = find_two_layer(one)
    assert v.hidden == "hidden" and v.out == "out" and v.has_bias and v.d_aug == 6


def test_duplicate_samples_reported():
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 20, generator=g, dtype=F64)
    x = torch.cat([x, x[:1]])
    spec = gl.DataSpec(shape=(20,), num_classes=2)
    model = gl.models.build("two-layer", input_shape=(20,), num_classes=2, width=10_000, num_outputs=1, dtype=F64)
    case, truth = gl.simulate(model, x, torch.tensor([0, 1, 0]), spec=spec, loss="mse")
    rec = gl.create("tensor").reconstruct(case, seed=0)
    assert rec.inputs.shape == (3, 20)
    assert rec.info["batch_size_used"] == 2
    assert any("spans only 2 dimensions" in w for w in rec.info["warnings"])


# ---------------------------------------------------------------------------------------------------------
# Deep networks: features of a random two-layer head, and the feature-matching term for IG
# ---------------------------------------------------------------------------------------------------------
def _deep_case(m=8000, dtype=torch.float32, n=3, size=8):
    data = gl.data.samples(size, num_images=n)
    x, y = data.batch(n)
    torch.manual_seed(0)
    body = [nn.Conv2d(3, 6, 3, stride=2, padding=1), Act("relu"), nn.Flatten()]
    d_feat = 6 * (size // 2) ** 2
    hidden = nn.Linear(d_feat, m, bias=False)
    out = nn.Linear(m, data.spec.num_classes, bias=False)
    with torch.no_grad():
        hidden.weight.normal_()
        out.weight.copy_((torch.randint(0, 2, out.weight.shape) * 2 - 1).float() / math.sqrt(m))
    model = nn.Sequential(*body, hidden, Act("relu"), out).to(dtype)
    case, truth = gl.simulate(model, x.to(dtype), y, spec=data.spec)
    return case, truth


def test_recover_head_features_of_a_conv_body():
    case, truth = _deep_case(m=20_000, dtype=F64)
    with pytest.raises(RequirementError, match="plain two-layer"):
        gl.create("tensor").reconstruct(case)
    hf = recover_head_features(case, seed=0)
    phi = hf.body(case.spec.normalize(truth.inputs.double()))
    assert direction_error(hf.features.double(), phi, signed=True).min() > 0.999
    assert hf.info["fit_residual"] < 1e-12
    term = feature_matching_term(hf.body, hf)
    assert float(term(case.spec.normalize(truth.inputs.double()))) < 1e-9
    assert float(term(torch.randn(3, 3, 8, 8, dtype=F64))) > 0.1


def test_public_solver_functions_check_the_attacks_requirements():
    """recover_directions / recover_head_features run the attack's own requirement checks (every problem listed,
    under the function's name) before any work, and reject a non-Case with a clear error."""
    case, _ = _deep_case(m=500, dtype=F64)
    with pytest.raises(RequirementError, match="recover_directions") as e:
        recover_directions(case)
    assert any("plain two-layer" in p for p in e.value.problems)
    torch.manual_seed(0)
    d = 12
    model = nn.Sequential(nn.Linear(d, 300, bias=False), Act("identity"), nn.Linear(300, 2, bias=False)).double()
    bad, _ = gl.simulate(model, torch.rand(3, d, dtype=F64), torch.tensor([0, 1, 0]),
                         spec=gl.DataSpec(shape=(d,), num_classes=2), protocol="fedavg", local_steps=2)
    with pytest.raises(RequirementError, match="recover_head_features") as e:
        recover_head_features(bad)
    msg = " | ".join(e.value.problems)
    assert "one full-batch local step" in msg and "not i.i.d. Gaussian" in msg and "linear" in msg
    assert len(e.value.problems) == 3
    with pytest.raises(ValidationError, match="expected a gradleak.Case"):
        recover_directions("not a case")
    with pytest.raises(ValidationError, match="fit must be one of"):
        recover_head_features(case, fit="magic")


def test_feature_matching_term_values_invariances_and_gradient():
    """The term against an independent reference: mean over the batch of 1 - cos^2 under the best one-to-one
    assignment (brute force over permutations); zero exactly at the true features whatever their order, sign and
    scale; positive away from them; scaled by ``weight``; its gradient is finite-difference exact and, followed,
    lowers the term toward 0."""
    import itertools

    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)).double()
    g = torch.Generator().manual_seed(1)
    x_true = torch.randn(3, 2, 6, generator=g, dtype=F64)
    phi = body(x_true).detach()
    # the recovered features: permuted, sign-flipped and rescaled (the head's gradient may not fix sign or norm)
    z_hat = torch.stack([-2.5 * phi[2], 0.3 * phi[0], 7.0 * phi[1]])
    term = feature_matching_term(body, z_hat)

    def val(x, t=term):
        return float(t(x).detach())

    assert val(x_true) == pytest.approx(0.0, abs=1e-14)

    def reference(x):
        f = body(x).detach()
        c2 = ((f / f.norm(dim=1, keepdim=True)) @ (z_hat / z_hat.norm(dim=1, keepdim=True)).T) ** 2
        return min(float(sum(1 - c2[i, p[i]] for i in range(3)) / 3) for p in itertools.permutations(range(3)))

    x = x_true + 0.7 * torch.randn(3, 2, 6, generator=g, dtype=F64)
    assert val(x) == pytest.approx(reference(x), rel=1e-12, abs=1e-15)
    assert val(x) > 1e-3
    assert val(x, feature_matching_term(body, z_hat, weight=4.0)) == pytest.approx(4 * val(x), rel=1e-12)
    # the gradient (through the chosen assignment) agrees with central differences along a random direction
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(term(xg), xg)
    v = torch.randn(3, 2, 6, generator=g, dtype=F64)
    h = 1e-6
    fd = (val(x + h * v) - val(x - h * v)) / (2 * h)
    assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-10)
    # plain gradient descent on the term alone drives it to (nearly) zero from the perturbed start
    xs = x.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([xs], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = term(xs)
        loss.backward()
        return loss

    start = val(x)
    opt.step(closure)
    assert val(xs.detach()) < 1e-8 * start


def test_feature_matching_term_drives_inverting_gradients():
    """End to end: the recovered features enter IG through its ``regularizers`` option; IG with the term ends much
    closer to the recovered features than IG without it (same budget and seed)."""
    case, truth = _deep_case(m=4000)
    hf = recover_head_features(case, seed=0)
    term = feature_matching_term(hf.body, hf, weight=10.0)
    plain = gl.create("ig", max_iterations=60).reconstruct(case, seed=0)
    guided = gl.create("ig", max_iterations=60, regularizers=(term,)).reconstruct(case, seed=0)
    t_plain = float(term(case.spec.normalize(plain.inputs))) / 10
    t_guided = float(term(case.spec.normalize(guided.inputs))) / 10
    assert t_guided < 0.7 * t_plain, (t_guided, t_plain)
    # and closer to the TRUE features phi(x) (measured: mismatch 0.42 -> 0.22), not only to the recovered ones
    true_term = feature_matching_term(hf.body, hf.body(case.spec.normalize(truth.inputs)).detach())
    m_plain = float(true_term(case.spec.normalize(plain.inputs)))
    m_guided = float(true_term(case.spec.normalize(guided.inputs)))
    assert m_guided < 0.7 * m_plain, (m_guided, m_plain)


def test_info_is_json_and_states_assumptions_and_refinement_runs():
    import json

    case, truth = _synthetic_case(d=20, B=3, m=8_000, act="gelu", K=3, loss="cross-entropy", seed=12)
    rec = gl.create("tensor", refine_steps=5).reconstruct(case, seed=0)
    json.dumps(rec.info)
    assert any("Gaussian" in a for a in rec.info["assumptions"])
    assert set(rec.info["refinement"]) >= {"accepted", "start", "end"}
    assert _signed_cos(rec, case, truth).min() >= 0.99
