"""The steps of the layer-wise attack (:mod:`gradleak.attacks.layerwise`): (a) the closed form of one layer,
(b) the pull-back from the preceding layer, (c) the null-space prior, (d) the per-layer gradient-matching
correction, whose Adam / L-BFGS runs go through the one optimisation driver (:mod:`.optimization.driver`).
ALGORITHMS.md section 3."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import layers as L
from ..case import Case
from ..losses import Loss
from .base import RunContext
from .optimization.common import total_variation
from .optimization.driver import run_adam, run_lbfgs

if TYPE_CHECKING:
    from .layerwise import LayerwiseOptions


# =====================================================================================================
# Closed-form solutions (from the smaller side)
# =====================================================================================================

def _closed_form(system: L.LayerSystem, rtol: float, max_dense: int) -> L.Solution:
    """Step (a): the minimum-norm least-squares solution, from the smaller side (an underdetermined layer by
    eigh of A A^T: the 'rows-eigh' strategy of the linear-algebra core, whose factorisation the null-space
    projector of step (c) reuses)."""
    if system.wide:
        return system.solve(rtol=rtol, method="rows-eigh")
    return system.solve(rtol=rtol, max_dense=max_dense)


# =====================================================================================================
# Pieces of the objectives
# =====================================================================================================

def _clamp_range(act: L.Activation, y: torch.Tensor, margin: float = 1e-6) -> torch.Tensor:
    """An invertible activation's inverse is taken after clamping into its open output range with a margin
    (a non-invertible one is left as it is)."""
    return act.clamp_to_range(y, margin) if act.invertible else y


def _inverse(act: L.Activation, y: torch.Tensor) -> torch.Tensor:
    return act.inverse(_clamp_range(act, y))


def _rel2(r: torch.Tensor, ref2: float) -> torch.Tensor:
    return r.pow(2).sum() / ref2


def _nz(v: float) -> float:
    return v if v > 0 else 1.0


@dataclass
class _Sub:
    """The sub-network from layer i to the output, for the correction: its weights, biases, the observed
    gradient of each parameter tensor and the label."""

    layers: list[L.Layer]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    observed: list[torch.Tensor]  # per parameter tensor, in the order (w_i, b_i, w_i+1, b_i+1, ...), flat
    label: torch.Tensor
    loss_fn: Loss

    @classmethod
    def build(cls, layers: list[L.Layer], params: dict, grads: dict, label: int, loss_fn: Loss) -> "_Sub":
        obs = []
        for l in layers:
            obs.append(grads[l.weight_name].reshape(-1))
            if l.has_bias:
                obs.append(grads[l.bias_name].reshape(-1))
        return cls(list(layers), [params[l.weight_name] for l in layers],
                   [params[l.bias_name] if l.has_bias else None for l in layers], obs, torch.tensor([label]), loss_fn)

    def match(self, x: torch.Tensor) -> torch.Tensor:
        """sum over the parameter tensors of layers j >= i of 1 - cos(dL/dtheta(x), observed); x (in_shape of
        layers[0]). Differentiable w.r.t. x."""
        with torch.enable_grad():
            ws = [w.detach().requires_grad_(True) for w in self.weights]
            bs = [None if b is None else b.detach().requires_grad_(True) for b in self.biases]
            named = {l.weight_name: w for l, w in zip(self.layers, ws)}
            named.update({l.bias_name: b for l, b in zip(self.layers, bs) if b is not None})
            out = L.forward(self.layers, x, named)[-1][1]
            loss = self.loss_fn(out.reshape(1, -1), self.label)
            params = [t for pair in zip(ws, bs) for t in pair if t is not None]
            grads = torch.autograd.grad(loss, params, create_graph=x.requires_grad)
        out = x.new_zeros(())
        for g, ob in zip(grads, self.observed):
            g = g.reshape(-1)
            out = out + 1 - (g @ ob) / (g.norm() * ob.norm()).clamp_min(1e-300)
        return out


def _optimise(loss_fn, var: torch.Tensor, steps: int, lr: float, *, optimizer: str = "adam", clamp=None,
              project=None, ctx: RunContext | None, tag: str, schedule: str = "step",
              anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """``loss_fn`` minimised over ``var`` by the one optimisation driver (:func:`.optimization.driver.run_trial`)
    for ``steps`` iterations; returns the best finite iterate (``var`` itself if none) and the loss history.

    'adam': Adam, schedule 'step': learning rate x0.1 at 3/8, 5/8, 7/8 of the steps, 'constant': none;
    ``clamp`` restores a box after each step; ``project`` (a map of displacements) then keeps the iterate on the
    affine set anchor + range(project): var <- anchor + project(var - anchor) (anchor: the start by default).
    'lbfgs': L-BFGS with a strong-Wolfe line search, one iteration per outer step, 50 curvature pairs (no clamp
    or projection): the driver's scale-free L-BFGS, which keeps descending where torch.optim.LBFGS's absolute
    tests stalled (cnn3-c1's pull-back: stuck from its 3rd step before, bench_layerwise --quick 17.86 -> 18.19
    dB). One progress update per iteration on ``ctx`` (stage ``tag``)."""
    start = var.detach().clone()
    anchor = start if anchor is None else anchor.detach()

    def restore(vs: list[torch.Tensor]) -> None:
        v = vs[0]
        if clamp is not None:
            v.copy_(clamp(v))
        if project is not None:
            v.copy_(anchor + project(v - anchor))

    def objective(vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        val = loss_fn(vs[0])
        return val, val

    on_step = None if ctx is None else (lambda step, total, best: ctx.update(1, loss=total, stage=tag))
    if optimizer == "lbfgs":
        trial = run_lbfgs(objective, [start], max_iterations=steps, lr=lr, inner=1, history_size=50,
                          line_search="strong-wolfe", on_step=on_step, name=f"layerwise {tag}")
    else:
        trial = run_adam(objective, [start], steps=steps, lr=lr, signed=False, decay=schedule == "step",
                         project=None if clamp is None and project is None else restore, on_step=on_step,
                         name=f"layerwise {tag}")
    return (start if trial.variables is None else trial.variables[0]), trial.history


def _pullback(prev: L.Layer, layer: L.Layer, params, grads, W, delta, x0: torch.Tensor, system_term,
              o: LayerwiseOptions, ctx) -> tuple[torch.Tensor, dict]:
    """Refine layer i's input x jointly with the preceding layer's input y under the pull-back penalty;
    returns the new x and a report."""
    dt = torch.float64
    act = prev.activation
    Wp = params[prev.weight_name]
    bp = params[prev.bias_name] if prev.has_bias else None
    dWp = grads[prev.weight_name]
    bshape = prev.bias_shape()
    gp = layer.apply_weight_T(delta.reshape(1, *layer.out_shape), W)[0].reshape(prev.out_shape)  # dL/dx_i
    u0 = _inverse(act, x0.reshape(prev.out_shape))
    # y0: the closed form of the preceding layer given x0
    d0 = gp * act.grad(u0)
    t0 = u0 - (bp.reshape(bshape) if bp is not None else 0.0)
    sys_p = L.LayerSystem(prev, Wp, d0, dWp, t0, weight_ratio=math.sqrt(o.weight_weight / o.gradient_weight))
    sol_p = _closed_form(sys_p, o.rtol, o.max_dense)
    y0 = sol_p.x.reshape(prev.in_shape).to(dt)
    u_ref2 = _nz(float(u0.pow(2).sum()))
    gp_ref2 = _nz(float(dWp.pow(2).sum()))
    nu = u0.numel()
    use_f = o.pullback in ("forward", "both")
    use_g = o.pullback in ("gradient", "both")

    def split(v):
        return v[:nu].reshape(prev.out_shape), v[nu:].reshape(prev.in_shape)

    def pb_term(u, y):
        out = u.new_zeros(())
        if use_f:
            z = prev.apply_weight(y.reshape(1, *prev.in_shape), Wp)[0]
            z = z + (bp.reshape(bshape) if bp is not None else 0.0)
            out = out + _rel2(z - u, u_ref2)
        if use_g:
            dp = gp * act.grad(u)
            out = out + _rel2(prev.apply_grad(dp, y) - dWp, gp_ref2)
        return out

    def objective(v):
        u, y = split(v)
        x = act.fn(u).reshape(layer.in_shape)
        return (o.weight_weight + o.gradient_weight) * system_term(x) + o.pullback_weight * pb_term(u, y)

    v0 = torch.cat([u0.reshape(-1), y0.reshape(-1)])
    with torch.no_grad():
        start = float(objective(v0))
        pb_start = float(pb_term(u0, y0))
    v, hist = _optimise(objective, v0, o.pullback_steps, o.pullback_lr, optimizer=o.pullback_optimizer, ctx=ctx,
                        tag=f"pullback {layer.label}")
    u, y = split(v)
    with torch.no_grad():
        end = float(objective(v))
        pb_end = float(pb_term(u, y))
    if not (math.isfinite(end) and end <= start):
        u, end, pb_end = u0, start, pb_start
    x = act.fn(u).reshape(layer.in_shape).detach()
    return x, {"mode": o.pullback, "optimizer": o.pullback_optimizer, "steps": len(hist),
               "objective_start": start, "objective_end": end, "residual_start": math.sqrt(pb_start),
               "residual_end": math.sqrt(pb_end), "_history": hist}


def _variable(case: Case, i: int, layers: list[L.Layer], x0: torch.Tensor, *, direct: bool):
    """(var0, to_x, clamp, map_shape) for optimising layer i's input x0: the image (clamped to the data's box)
    for i = 0; for i >= 1 either x itself clamped to the preceding activation's range (``direct``) or the
    preceding layer's pre-activation u with x = sigma(u)."""
    layer = layers[i]
    if i == 0:
        lo, hi = case.spec.bounds(x0)
        full = torch.zeros(case.spec.shape, dtype=x0.dtype)  # per-channel bounds -> the layer's input shape
        lo, hi = (lo.to(x0.dtype) + full).reshape(layer.in_shape), (hi.to(x0.dtype) + full).reshape(layer.in_shape)
        clamp = lambda v: torch.maximum(torch.minimum(v, hi), lo)  # noqa: E731
        return clamp(x0.reshape(layer.in_shape)), (lambda v: v), clamp, layer.in_shape
    act = layers[i - 1].activation
    shape = layers[i - 1].out_shape
    if direct:
        return (_clamp_range(act, x0.reshape(layer.in_shape)), (lambda v: v),
                (lambda v: _clamp_range(act, v)), shape)
    return _inverse(act, x0.reshape(shape)), (lambda v: act.fn(v).reshape(layer.in_shape)), None, shape


def _tv(x: torch.Tensor, shape) -> torch.Tensor:
    return total_variation(x.reshape(1, *shape)) if len(shape) == 3 else x.new_zeros(())


def _prior(case: Case, i: int, layers: list[L.Layer], x0: torch.Tensor, projector, o: LayerwiseOptions,
           ctx) -> tuple[torch.Tensor, dict]:
    """TV minimisation inside x0 + null(U_i) (Adam, step decay; box / range clamp, then re-projection)."""
    var0, to_x, clamp, shape = _variable(case, i, layers, x0, direct=True)
    project = lambda dv: projector.project(dv.reshape(-1)).reshape(dv.shape)  # noqa: E731
    objective = lambda v: _tv(v, shape)  # noqa: E731
    start = float(objective(var0))
    v, hist = _optimise(objective, var0, o.prior_steps, o.prior_lr, clamp=clamp, project=project, ctx=ctx,
                        tag=f"prior {layers[i].label}", schedule="step", anchor=x0.reshape(var0.shape))
    end = float(objective(v))
    if not (math.isfinite(end) and end <= start):
        v, end = var0, start
    return to_x(v).detach().reshape(layers[i].in_shape), {
        "steps": len(hist), "tv_start": start, "tv_end": end, "null_dim": int(layers[i].n_in - _rank_of(projector)),
        "_history": hist}


def _rank_of(projector) -> int:
    return int(projector.rank)


def _correct(case: Case, i: int, layers: list[L.Layer], x0: torch.Tensor, sub: "_Sub", system_term,
             o: LayerwiseOptions, d: int, ctx) -> tuple[torch.Tensor, dict]:
    """The per-layer gradient-matching correction (step (d)); returns the new x and a report."""
    a, b, c = float(o.correction_match[d]), float(o.correction_tv[d]), float(o.correction_system[d])
    steps = int(o.correction_steps[d])
    layer = layers[i]
    var0, to_x, clamp, shape = _variable(case, i, layers, x0, direct=False)

    def objective(v):
        x = to_x(v)
        out = x.new_zeros(())
        if a:
            out = out + a * sub.match(x)
        if b:
            out = out + b * _tv(x, shape)
        if c:
            out = out + c * system_term(x)
        return out

    start = float(objective(var0).detach())
    v, hist = _optimise(objective, var0, steps, o.correction_lr, clamp=clamp, ctx=ctx,
                        tag=f"correction {layer.label}", schedule=o.correction_schedule)
    end = float(objective(v).detach())
    if not (math.isfinite(end) and end <= start):
        v, end = var0, start
    x = to_x(v).detach().reshape(layer.in_shape)
    with torch.no_grad():
        match_end = float(sub.match(x).detach())
    return x, {"steps": len(hist), "weights": [a, b, c], "objective_start": start, "objective_end": end,
               "match_end": match_end, "_history": hist}
