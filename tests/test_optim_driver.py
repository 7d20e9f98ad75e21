"""The optimisation driver against references (torch.optim on a smooth problem), and scale-free matching."""

import math

import pytest
import torch

import gradleak as gl
from gradleak import functional as Fn
from gradleak.attacks.optimization import common as C
from gradleak.attacks.optimization.driver import LBFGS


def rosenbrock(v):
    x = v[0]
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _objective(v):
    f = rosenbrock(v)
    return f, f


def _torch_lbfgs(x0, steps, line_search):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=100, line_search_fn=line_search,
                            tolerance_grad=0.0, tolerance_change=0.0)
    out = []

    def closure():
        opt.zero_grad()
        f = rosenbrock([x])
        f.backward()
        return f

    for _ in range(steps):
        opt.step(closure)
        out.append(x.detach().clone())
    return out, opt.state[opt.param_groups[0]["params"][0]]["n_iter"]


@pytest.mark.parametrize("line_search", ["", "strong-wolfe"])
def test_lbfgs_iterates_match_torch_optim_on_rosenbrock(line_search):
    """float64, 6-d Rosenbrock from a fixed start: the iterates after each outer step of 20 iterations are
    torch.optim.LBFGS's (same algorithm; the scale-free tests only differ from torch's on badly scaled losses).
    The two order floating-point operations differently and Rosenbrock's valley amplifies rounding
    exponentially (1e-16 after one iteration; fixed step: 5e-13 / 3e-8 / 4e-4 after 20 / 40 / 60 iterations;
    strong Wolfe: 2e-12 after 60), so: 2 outer steps for the fixed step, 3 with the line search, tolerance 1e-6."""
    x0 = torch.tensor([-1.2, 1.0, -0.5, 0.8, 1.3, -0.7], dtype=torch.float64)
    ref, n_iter = _torch_lbfgs(x0, 3 if line_search else 2, "strong_wolfe" if line_search else None)
    z = x0.clone()

    def fn(zz):
        v = zz.clone().requires_grad_(True)
        f = rosenbrock([v])
        return float(f), torch.autograd.grad(f, v)[0]

    opt = LBFGS(z, lr=1.0, max_iter=20, history_size=100, line_search=bool(line_search), tolerance_grad=0.0,
                tolerance_change=0.0)
    for r in ref:
        opt.step(fn)
        torch.testing.assert_close(z, r, rtol=0, atol=1e-6)
    assert opt.total_iter == n_iter and n_iter >= 40


def test_signed_adam_is_torch_adam_on_the_sign():
    """The driver's signed Adam with step decay = torch.optim.Adam fed sign(gradient), lr x0.1 at 3/8, 5/8, 7/8."""
    x0 = torch.tensor([-1.2, 1.0, 0.3], dtype=torch.float64)
    trial = C.run_trial(lambda v: _objective(v), [x0], optimizer="signed-adam", max_iterations=16, lr=0.1)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    best = (float("inf"), None)
    for step in range(16):
        f = rosenbrock([x])
        if float(f) < best[0]:
            best = (float(f), x.detach().clone())
        if step in (6, 10, 14):
            opt.param_groups[0]["lr"] *= 0.1
        x.grad = torch.autograd.grad(f, x)[0].sign()
        opt.step()
    f = float(rosenbrock([x]))
    if f < best[0]:
        best = (f, x.detach().clone())
    torch.testing.assert_close(trial.variables[0], best[1], rtol=0, atol=1e-12)
    assert trial.score == pytest.approx(best[0], rel=1e-12)
    assert (trial.iterations, trial.outer_steps, trial.evaluations, trial.stop) == (16, 16, 16, "budget")


def test_lbfgs_counts_and_stop_reasons():
    """A budget of 50 iterations in outer steps of 20 -> 20 + 20 + 10 iterations; on a quadratic the
    gradient criterion is met and is the stated stop reason."""
    x0 = torch.tensor([-1.2, 1.0] * 10, dtype=torch.float64)  # 20-d Rosenbrock: needs > 50 iterations
    t = C.run_trial(_objective, [x0], optimizer="lbfgs", max_iterations=50, lr=1.0, inner=20)
    assert (t.iterations, t.outer_steps, t.stop) == (50, 3, "budget") and t.evaluations >= 50
    quad = lambda v: ((v[0] - 3.0) ** 2).sum().repeat(2)  # noqa: E731  (total, score)
    t = C.run_trial(lambda v: tuple(quad(v)), [x0], optimizer="lbfgs", max_iterations=1000, lr=1.0, inner=20)
    assert t.stop.startswith("converged: max |gradient| <= 1e-10") and t.iterations < 40
    torch.testing.assert_close(t.variables[0], torch.full_like(x0, 3.0))
    assert t.outer_steps == 1 and t.evaluations >= t.iterations  # the first outer step ends at convergence


# ---- scale-free cosine ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet_case(photos32):
    model = gl.models.build("lenet", input_shape=(3, 32, 32), num_classes=19, seed=0)
    x, y = photos32.batch(1, 0)
    return gl.simulate(model, x, y, spec=photos32.spec)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_cosine_distance_is_scale_free(scale):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, generator=g), "b": torch.randn(5, generator=g)}
    b = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    ref = float(Fn.cosine_distance(a, b))
    scaled = float(Fn.cosine_distance(a, {k: v * scale for k, v in b.items()}))
    both = float(Fn.cosine_distance({k: v * scale for k, v in a.items()}, {k: v * scale for k, v in b.items()}))
    assert 0 < ref < 1 and scaled == pytest.approx(ref, rel=1e-6) and both == pytest.approx(ref, rel=1e-6)
    assert float(Fn.cosine_distance(a, {k: -v for k, v in a.items()})) == pytest.approx(2.0, abs=1e-12)
    assert float(Fn.cosine_distance(a, {k: torch.zeros_like(v) for k, v in a.items()})) == 1.0
    assert math.isnan(float(Fn.cosine_distance(a, {k: v * float("nan") for k, v in a.items()})))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_residual_and_attack_are_scale_free(lenet_case, scale):
    """An observed update x1e-30 / x1e30 (float32): the residual stays in [0, 2] and equals the unscaled one,
    and IG (cosine) reaches the same quality as unscaled (10.5 dB, residual 0.012 both ways at 60
    iterations. float32 rounding alone moves the L-BFGS path: an update x(1 + 1e-7) changes the PSNR by up to
    0.12 dB and the residual by 8% (measured, 60 and 200 iterations), so the bars are 0.5 dB and 25%)."""
    case, truth = lenet_case
    scaled = case.with_observation({k: v * scale for k, v in case.observed.items()})
    noise = truth.inputs.flip(-1)
    for x in (truth.inputs, noise):
        r0, r1 = case.residual(x, truth.labels), scaled.residual(x, truth.labels)
        assert 0.0 <= r1 <= 2.0 and r1 == pytest.approx(r0, rel=1e-4, abs=1e-7)
    a = gl.create("ig", max_iterations=60).reconstruct(case, seed=0)
    b = gl.create("ig", max_iterations=60).reconstruct(scaled, seed=0)
    pa, pb = (float(gl.metrics.psnr(r.inputs, truth.inputs).mean()) for r in (a, b))
    assert pa > 10.0 and abs(pa - pb) < 0.5
    assert a.residual < 0.02 and b.residual == pytest.approx(a.residual, rel=0.25)


def test_lbfgs_with_absolute_tolerances_is_one_torch_optim_lbfgs_step():
    """tolerances='absolute', max_outer_steps=1 (the tensor attack's refinement): one torch.optim.LBFGS.step of
    max_iter iterations with torch's default tolerances, on a Rosenbrock scaled by 1e-5 where torch's absolute
    loss-change test (1e-9) ends the step early; the scale-free default runs on past it."""
    x0 = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)
    scaled = lambda v: 1e-5 * rosenbrock(v)  # noqa: E731
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = scaled([x])
        f.backward()
        return f

    opt.step(closure)
    n_iter = opt.state[opt.param_groups[0]["params"][0]]["n_iter"]
    assert n_iter < 200  # torch stopped on its tolerance, not its budget
    t = C.run_lbfgs(lambda v: (scaled(v),) * 2, [x0], max_iterations=200, inner=200, history_size=20,
                    line_search="strong-wolfe", tolerances="absolute", tol_grad=1e-7, tol_change=1e-9,
                    max_outer_steps=1)
    assert t.iterations == n_iter and t.outer_steps == 1 and t.stop.startswith("outer steps: 1")
    torch.testing.assert_close(t.variables[0], x.detach(), rtol=0, atol=1e-9)
    assert t.score == pytest.approx(float(scaled([x.detach()])), rel=1e-9)
    free = C.run_lbfgs(lambda v: (scaled(v),) * 2, [x0], max_iterations=200, inner=200, history_size=20,
                       line_search="strong-wolfe")
    assert free.iterations > n_iter and free.score < t.score


def test_layerwise_adam_step_is_torch_adam_with_the_clamp_and_projection():
    """Layer-wise's Adam sub-step on the driver (step decay, box clamp, then re-projection onto anchor +
    range(P)) gives the iterates of a torch.optim.Adam loop doing the same, to the bit."""
    from gradleak.attacks.layerwise_steps import _optimise

    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    P = q @ q.T  # projector onto a 4-d subspace
    x0 = torch.rand(6, generator=g, dtype=torch.float64)
    loss = lambda v: ((v - target) ** 2).sum() + 0.1 * v.pow(4).sum()  # noqa: E731
    clamp = lambda v: v.clamp(0.0, 0.8)  # noqa: E731
    project = lambda dv: P @ dv  # noqa: E731
    best, hist = _optimise(loss, x0, 40, 0.05, clamp=clamp, project=project, ctx=None, tag="t", schedule="step")
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    ref_best, ref_val, ref_hist = x0.clone(), math.inf, []
    for step in range(40):
        if step in (15, 25, 35):
            opt.param_groups[0]["lr"] *= 0.1
        opt.zero_grad()
        f = loss(x)
        ref_hist.append(float(f.detach()))
        if ref_hist[-1] < ref_val:
            ref_val, ref_best = ref_hist[-1], x.detach().clone()
        f.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(clamp(x))
            x.copy_(x0 + project(x - x0))
    if float(loss(x.detach())) < ref_val:
        ref_best = x.detach().clone()
    assert hist == ref_hist and torch.equal(best, ref_best)
    assert min(ref_hist) < ref_hist[0]  # it moved
