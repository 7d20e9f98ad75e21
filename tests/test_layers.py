"""The shared per-layer systems: fast paths against slow obvious references, solving, rank, the model walker."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradleak as gl
from gradleak import layers as L
from gradleak.activations import Act, Activation
from gradleak.errors import RequirementError


CONVS = [
    # (in_shape, conv kwargs)
    ((3, 7, 9), dict(in_channels=3, out_channels=5, kernel_size=(3, 4), stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    ((2, 8, 8), dict(in_channels=2, out_channels=3, kernel_size=4, stride=2, padding=2)),
    ((1, 6, 11), dict(in_channels=1, out_channels=4, kernel_size=3, stride=1, padding=0)),
    ((3, 5, 5), dict(in_channels=3, out_channels=2, kernel_size=5, stride=3, padding=2)),
    ((2, 9, 7), dict(in_channels=2, out_channels=3, kernel_size=3, padding="same")),
]


def _conv_layer(in_shape, kw, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(bias=False, **kw).double()
    chain = L.walk(nn.Sequential(conv), in_shape)
    return chain.layers[0], conv.weight.detach()


@pytest.mark.parametrize("in_shape,kw", CONVS)
def test_conv_sparse_matrix_free_and_reference_agree(in_shape, kw):
    layer, w = _conv_layer(in_shape, kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(layer.in_shape, generator=g, dtype=torch.float64)
    k = torch.randn(layer.out_shape, generator=g, dtype=torch.float64)
    Wd, Kd = L.reference_weight_matrix(layer, w), L.reference_grad_matrix(layer, k)
    Ws, Ks = layer.weight_matrix(w), layer.grad_matrix(k)
    assert Ws.shape == (layer.n_out, layer.n_in) and Ks.shape == (layer.n_weights, layer.n_in)
    np.testing.assert_array_equal(Ws.toarray(), Wd)
    np.testing.assert_array_equal(Ks.toarray(), Kd)
    # matrix-free operators = the matrices, and = what torch computes for the module
    z = layer.apply_weight(x[None], w)[0]
    np.testing.assert_allclose(z.numpy().ravel(), Wd @ x.numpy().ravel(), atol=1e-13)
    np.testing.assert_allclose(z.numpy(), F.conv2d(x[None], w, **layer._kw())[0].numpy(), atol=1e-13)
    wr = w.clone().requires_grad_(True)
    gw, = torch.autograd.grad((F.conv2d(x[None], wr, **layer._kw())[0] * k).sum(), wr)
    np.testing.assert_allclose(layer.apply_grad(k, x).numpy().ravel(), gw.numpy().ravel(), atol=1e-12)
    np.testing.assert_allclose(Kd @ x.numpy().ravel(), gw.numpy().ravel(), atol=1e-12)
    # adjoints
    y = torch.randn(1, *layer.out_shape, generator=g, dtype=torch.float64)
    G = torch.randn(layer.weight_shape, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(layer.apply_weight_T(y, w).numpy().ravel(), Wd.T @ y.numpy().ravel(), atol=1e-12)
    np.testing.assert_allclose(layer.apply_grad_T(k, G).numpy().ravel(), Kd.T @ G.numpy().ravel(), atol=1e-12)
    # structured Gram blocks and norms
    np.testing.assert_allclose(layer.gram_weight(w).numpy(), Wd.T @ Wd, atol=1e-12)
    np.testing.assert_allclose(layer.gram_grad(k).numpy(), Kd.T @ Kd, atol=1e-12)
    assert layer.weight_norm2(w) == pytest.approx((Wd ** 2).sum(), rel=1e-12)
    assert layer.grad_norm2(k) == pytest.approx((Kd ** 2).sum(), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 3), f=st.integers(1, 4), h=st.integers(4, 10), w=st.integers(4, 10), kh=st.integers(1, 4),
       kw=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2))
def test_conv_operators_property(c, f, h, w, kh, kw, s, p):
    assume(h + 2 * p >= kh and w + 2 * p >= kw)  # the kernel fits the padded input
    layer, wt = _conv_layer((c, h, w), dict(in_channels=c, out_channels=f, kernel_size=(kh, kw), stride=s, padding=p))
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(layer.in_shape, generator=g, dtype=torch.float64)
    k = torch.randn(layer.out_shape, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(layer.grad_matrix(k) @ x.numpy().ravel(), layer.apply_grad(k, x).numpy().ravel(),
                               atol=1e-12)
    np.testing.assert_allclose(layer.weight_matrix(wt) @ x.numpy().ravel(),
                               layer.apply_weight(x[None], wt).numpy().ravel(), atol=1e-12)
    Wm = layer.weight_matrix(wt)
    np.testing.assert_allclose(layer.gram_weight(wt).numpy(), (Wm.T @ Wm).toarray(), atol=1e-12)


def test_linear_layer_matrices_and_gram():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=True).double()
    layer = L.walk(nn.Sequential(lin), (6,)).layers[0]
    k = torch.randn(4, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64)
    np.testing.assert_array_equal(layer.grad_matrix(k).toarray(), L.reference_grad_matrix(layer, k))
    np.testing.assert_allclose(layer.apply_grad(k, x).numpy(), torch.outer(k, x).numpy())
    np.testing.assert_allclose(layer.gram_grad(k).numpy(), float(k @ k) * np.eye(6), atol=1e-14)
    assert layer.has_bias and layer.bias_name == "0.bias"


def _system(in_shape, kw, seed=0):
    layer, w = _conv_layer(in_shape, kw, seed)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(layer.in_shape, generator=g, dtype=torch.float64)
    k = torch.randn(layer.out_shape, generator=g, dtype=torch.float64)
    system = L.LayerSystem(layer, w, k, layer.apply_grad(k, x), layer.apply_weight(x[None], w)[0])
    return system, x


def test_solve_full_rank_direct_lsqr_and_dense_lstsq_agree():
    system, x = _system((2, 8, 8), dict(in_channels=2, out_channels=4, kernel_size=3, stride=1, padding=1))
    A, b = system.sparse()
    ref = np.linalg.lstsq(A.toarray(), b, rcond=None)[0]
    direct = system.solve()
    free = system.solve(method="lsqr")
    assert direct.rank == direct.unknowns == 128 and not direct.deficient and direct.method == "cholesky"
    np.testing.assert_allclose(direct.x.numpy().ravel(), x.numpy().ravel(), atol=1e-12)
    np.testing.assert_allclose(direct.x.numpy().ravel(), ref, atol=1e-12)
    np.testing.assert_allclose(free.x.numpy().ravel(), ref, atol=1e-9)
    assert direct.residual < 1e-13 and direct.condition is not None and direct.condition >= 1


@pytest.mark.parametrize("in_shape,kw,wide", [
    # 2 filters, 4x4 stride 2 on 3x10x12: fewer constraints than unknowns (solved through A A^T)
    ((3, 10, 12), dict(in_channels=3, out_channels=2, kernel_size=4, stride=2), True),
    # more constraints than unknowns, yet 6 short: the K/W dependencies and the stride
    ((2, 9, 9), dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1), False),
])
def test_solve_rank_deficient_gives_minimum_norm_and_reports_it(in_shape, kw, wide):
    system, x = _system(in_shape, kw)
    assert system.wide is wide
    A, b = system.sparse()
    dense = A.toarray()
    ref = np.linalg.lstsq(dense, b, rcond=None)[0]  # minimum-norm least squares
    sol = system.solve()
    true_rank = np.linalg.matrix_rank(dense)
    assert sol.rank == true_rank < sol.unknowns and sol.deficient and sol.deficiency == system.unknowns - true_rank
    assert sol.method == "cholesky-minnorm" + ("-rows" if wide else "")
    np.testing.assert_allclose(sol.x.numpy().ravel(), ref, atol=1e-12)
    assert sol.residual < 1e-12  # consistent system: solved, but not the true input
    assert float((sol.x - x).norm() / x.norm()) > 1e-3
    # numerical rank: SVD and pivoted Cholesky agree with numpy
    assert system.rank(method="svd").rank == system.rank(method="cholesky").rank == true_rank
    info = system.rank(method="svd")
    assert info.unknowns == system.unknowns and info.deficiency == system.unknowns - true_rank
    assert info.sigma_next < info.tolerance < info.sigma_min


def test_block_choice_and_balance():
    system, x = _system((2, 6, 6), dict(in_channels=2, out_channels=3, kernel_size=3, padding=1))
    only_w = L.LayerSystem(system.layer, system.weight, None, None, system.target, blocks=("weight",))
    assert only_w.constraints == system.layer.n_out
    sol = only_w.solve()
    assert sol.rank <= system.layer.n_out
    np.testing.assert_allclose(only_w.matvec(sol.x.reshape(-1)).numpy(), only_w.rhs().numpy(), atol=1e-12)
    with pytest.raises(gl.ValidationError):
        L.LayerSystem(system.layer, system.weight, None, blocks=("gradient",))
    # balancing makes both blocks unit Frobenius norm
    G = system.gram()
    assert float(G.diagonal().sum()) == pytest.approx(2.0, rel=1e-12)


def test_walk_zoo_chains():
    cnn6 = gl.models.build("cnn6")
    chain = L.walk(cnn6, (3, 32, 32))
    assert chain.supported and [l.label for l in chain] == [f"conv{i}" for i in range(1, 7)] + ["fc7"]
    assert all(l.activation.name == "leaky-relu" for l in chain.layers[:-1])
    assert chain.layers[1].in_shape == (12, 17, 17) and chain.layers[-1].in_shape == (3200,)
    assert chain.layers[-1].prev_shape == (128, 5, 5)
    fcn3 = L.walk(gl.models.build("fcn3", input_shape=(1, 28, 28)), (1, 28, 28))
    assert fcn3.all_linear and fcn3.layers[0].in_shape == (784,)


def test_walk_traces_custom_modules_and_functional_activations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.c1(x)).flatten(1))

    chain = L.walk(Net(), (1, 6, 6))
    assert chain.supported, chain.problems
    assert [l.name for l in chain] == ["c1", "fc"] and chain.layers[0].activation.name == "tanh"

    class MyLinear(nn.Linear):  # subclasses of a registered type use its rule
        pass

    chain = L.walk(nn.Sequential(MyLinear(4, 3), nn.Tanh(), MyLinear(3, 1)), (4,))
    assert chain.supported and all(isinstance(l, L.LinearLayer) for l in chain)
    assert L.layer_rules()[nn.Conv2d] is L.Conv2dLayer


def test_unsupported_layers_are_all_named_at_once():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 11 * 11, 2))
    with pytest.raises(RequirementError) as e:
        L.require_chain(model, (3, 28, 28), "rgap")
    msg = str(e.value)
    assert "'1' (BatchNorm2d)" in msg and "'3' (MaxPool2d)" in msg and "'2', '5' (relu): not invertible" in msg
    assert len(e.value.problems) == 3
    res = L.walk(gl.models.build("resnet20"), (3, 32, 32))
    text = " ".join(res.problems)
    assert "'add'" in text and "skip connection" in text and "BatchNorm2d" in text and "'avgpool'" in text


def test_user_registered_activation_module():
    class Cube(nn.Module):
        def forward(self, z):
            return z ** 3

    cube = Activation("cube", lambda z: z ** 3, lambda z: 3 * z ** 2, lambda y: torch.sign(y) * y.abs() ** (1 / 3))
    model = nn.Sequential(nn.Linear(4, 3), Cube(), nn.Linear(3, 1))
    assert "outside the supported chain" in " ".join(L.walk(model, (4,)).problems)  # traced into: pow
    L.register_activation_module(Cube)(lambda m: cube)
    try:
        chain = L.walk(model, (4,))
        assert chain.supported and chain.layers[0].activation is cube and not chain.activation_problems()
    finally:
        gl.activations.unregister_module(Cube)


def test_unknown_module_and_head_activation_reported():
    model = nn.Sequential(nn.Linear(4, 3), Act("tanh"), nn.Linear(3, 2), nn.Sigmoid())
    probs = L.walk(model, (4,)).problems
    assert any("follows the output layer" in p for p in probs)


# ---- a new layer type is ONE registration ----------------------------------------------------------------

class _Scale(nn.Module):
    """A bias-free per-feature scale z = s * x (not a module type gradleak knows)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(0.5 + torch.rand(n))

    def forward(self, x):
        return x * self.weight


class _ScaleLayer(L.Layer):
    """Its rule: W = diag(s), K(k) = diag(k) (dL/ds = k * x); not dense (one weight per input entry)."""

    kind = "scale"

    def output_shape(self, in_shape):
        return in_shape

    def problems(self):
        return [] if self.in_shape == tuple(self.module.weight.shape) else ["flatten before a scale layer"]

    def apply_weight(self, x, weight):
        return x.reshape(x.shape[0], -1) * weight.reshape(-1)

    def apply_weight_T(self, y, weight):
        return y.reshape(y.shape[0], -1) * weight.reshape(-1)

    def apply_grad(self, k, x):
        return k.reshape(-1) * x.reshape(-1)

    def apply_grad_T(self, k, g):
        return g.reshape(-1) * k.reshape(-1)

    def weight_matrix(self, weight):
        import scipy.sparse as sp
        return sp.csr_array(sp.diags(weight.detach().double().reshape(-1).numpy()))

    def grad_matrix(self, k):
        import scipy.sparse as sp
        return sp.csr_array(sp.diags(k.detach().double().reshape(-1).numpy()))

    def reference_weight_matrix(self, weight):
        return np.diag(weight.detach().double().reshape(-1).numpy())

    def reference_grad_matrix(self, k):
        return np.diag(k.detach().double().reshape(-1).numpy())


@pytest.fixture
def scale_rule():
    L.register_layer(_Scale)(_ScaleLayer)
    yield _ScaleLayer
    L.unregister_layer(_Scale)
    assert _Scale not in L.layer_rules()


def test_a_new_layer_type_is_one_registration(scale_rule, photos32):
    from gradleak.risk.rank import rank_analysis
    from gradleak.risk.security import security_analysis

    torch.manual_seed(3)
    model = gl.models.zoo.Sequential(nn.Flatten(), _Scale(48), Act("tanh"), nn.Linear(48, 10), num_outputs=10).double()
    shape = (3, 4, 4)
    chain = L.walk(model, shape)
    assert chain.supported and [l.kind for l in chain.layers] == ["scale", "linear"]
    layer = chain.layers[0]
    k = torch.randn(48, dtype=torch.float64)
    w = model[1].weight.detach()
    np.testing.assert_allclose(layer.weight_matrix(w).toarray(), layer.reference_weight_matrix(w))
    # rank: [diag(k); diag(s)] has full rank 48 (computed numerically: the rule is not dense)
    rep = rank_analysis(model, shape)
    assert [r.rank for r in rep.layers] == [48, 48] and rep.layers[0].method == "svd"
    assert rep.exact_recovery_possible is True
    sec = security_analysis(model, shape)
    assert sec.index == 0 and sec.layers[0].method in ("certificate", "cholesky", "svd")
    # rgap through the new layer: exact in float64
    x, y = photos32.batch(1, 0)
    x = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False).clamp(0, 1).double()
    case, truth = gl.simulate(model, x, y % 10, spec=gl.DataSpec(shape, 10))
    rec = gl.create("rgap").reconstruct(case)
    assert rec.kind == "exact"
    assert float((rec.inputs - truth.inputs).abs().max()) < 1e-9
    # a zero scale entry loses that input entry's weight constraint; a zero k entry its gradient one: with both at
    # the same entry the rank drops by exactly one
    s = w.clone()
    s[5] = 0.0
    k[5] = 0.0
    assert L.LayerSystem(layer, s, k).rank().rank == 47
    # the rule is not dense: batches on it are refused by rgap (one sample), as for convolutions
    case2, _ = gl.simulate(model, x.repeat(2, 1, 1, 1), (y % 10).repeat(2), spec=gl.DataSpec(shape, 10))
    assert any("non-fully-connected" in p for p in gl.create("rgap").requirements(case2))
