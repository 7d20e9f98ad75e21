"""The attack class (registered as "tensor") and :func:`recover_directions`, the identifiable core of it."""

from __future__ import annotations

from typing import Any

import torch

from ...case import Case
from ...errors import RequirementError, ValidationError
from ..base import Attack, Reconstruction, RunContext, register
from ..optimization.driver import run_lbfgs
from .hermite import hermite_order
from .options import TensorOptions, option_problems
from .pipeline import run_solver
from .samples import resolve_samples, unused_labels
from .view import TwoLayerView, find_two_layer, protocol_problems
from .weights import normality_problem, weight_normality

PAPER = ("Wang, Lee, Lei. Reconstructing Training Data from Model Gradient, Provably. AISTATS 2023 "
         "(arXiv 2212.03714)")


@register("tensor", aliases=("moment-tensor", "wang2023"))
class TensorAttack(Attack):
    """The moment-tensor attack of Wang, Lee & Lei (AISTATS 2023): all B samples from one gradient of a random
    two-layer network (Gaussian first layer), by Hermite moment tensors, Jennrich's algorithm and a fit of the
    raw gradient. Identifiability limits (signs for odd sigma, norms for the ReLU family) are resolved from the
    loss residual, a bias or a stated prior, reported per sample in ``info['samples']``."""

    paper = PAPER
    Options = TensorOptions
    presets = {
        # tensor directions only, as in the paper's statement of the algorithm (no gradient-fit refinement)
        "tensor-only": dict(fit="none", draws=10),
        "thorough": dict(draws=16, polish_sweeps=8, fit_rounds=40, refine_steps=50),
    }
    budgets = {"thorough": {"preset": "thorough"}}

    def batch_facts(self, case: Case, rec: Reconstruction) -> list[str]:
        facts = super().batch_facts(case, rec)
        missing = sum(1 for s in rec.info.get("samples") or () if isinstance(s, dict) and s.get("unrecovered"))
        if missing:
            facts.append(f"{missing} of {case.batch_size} samples were not recovered (the gradient spans fewer "
                         "dimensions than the batch; they are filled with the data mean)")
        return facts

    def check_options(self, o: TensorOptions) -> list[str]:
        return option_problems(o)

    def requirements(self, case: Case) -> list[str]:
        return self._problems(case, head=False)

    def head_requirements(self, case: Case) -> list[str]:
        """What :func:`~gradleak.attacks.tensor.recover_head_features` needs: the attack's requirements for the
        model's final Linear -> activation -> Linear head, with any body before it allowed."""
        return self._problems(case, head=True)

    def _problems(self, case: Case, *, head: bool) -> list[str]:
        view = find_two_layer(case.model)
        if isinstance(view, list):
            return ["needs a two-layer network Linear -> activation -> Linear (e.g. the zoo's 'two-layer')"
                    + (" as the model's head" if head else "") + ": " + "; ".join(view)]
        problems = protocol_problems(case)
        if view.body and not head:
            problems.append(f"needs a plain two-layer network; this model has {len(view.body)} layer(s) before its "
                            "Linear-activation-Linear head (use gradleak.attacks.tensor.recover_head_features for "
                            "the head's input features)")
        if view.activation.linear:
            problems.append("the activation is linear: mu_p = 0 for every p >= 2, no sample is identifiable")
        elif self.options.order == 0 and hermite_order(view.activation) is None:
            problems.append(f"mu_p = 0 for every p <= 4 for activation {view.activation.name!r}: the moment "
                            "tensors vanish and the method cannot work")
        if case.batch_size > view.d_aug:
            problems.append(f"batch size {case.batch_size} exceeds the input dimension d = {view.d_aug}: the samples "
                            "cannot be linearly independent, the batch is not identifiable")
        if case.batch_size > view.width:
            problems.append(f"batch size {case.batch_size} exceeds the width {view.width}")
        params = case.parameters
        if self.options.check_weights:
            stats = weight_normality(params[view.weight_key], params[view.bias_key] if view.has_bias else None)
            msg = normality_problem(stats)
            if msg:
                problems.append(msg)
        A = params[view.out_key]
        if view.num_outputs == 1 and bool((A == 0).any()):
            problems.append("some output weights a_j are 0: their neurons carry no first-layer gradient")
        return problems

    # --------------------------------------------------------------------------------------------------
    def _reconstruct(self, case: Case, ctx: RunContext) -> Reconstruction:
        o = self.options
        view = find_two_layer(case.model)
        spec = case.spec
        sol, prob, span, B, meta = run_solver(case, view, o, ctx)
        info: dict[str, Any] = dict(meta)
        d = view.d_in
        X, labels, samples, lab_source = resolve_samples(case, view, sol, prob, span, B, prior="box")
        n_missing = case.batch_size - B
        if n_missing > 0:
            X = torch.cat([X, torch.zeros(n_missing, d, dtype=X.dtype, device=X.device)])
            if labels is not None and case.labels is not None:
                rest = unused_labels(case.labels.tolist(), labels.tolist())
                labels = torch.cat([labels, torch.tensor(rest[:n_missing], dtype=torch.long, device=labels.device)])
            elif labels is not None:
                labels = torch.cat([labels, torch.zeros(n_missing, dtype=torch.long, device=labels.device)])
            samples += [{"unrecovered": True, "note": "the gradient spans fewer dimensions than the batch size; "
                         "filled with the data mean"} for _ in range(n_missing)]
        x_in = X.reshape(case.batch_size, *spec.shape).to(case.dtype)
        if labels is not None:
            labels = labels.to(case.device)
        if o.refine_steps > 0 and labels is not None:
            x_in, rinfo = _refine(case, x_in, labels, o.refine_steps)
            info["refinement"] = rinfo
        img = spec.denormalize(x_in)
        lo, hi = spec.value_range
        info["samples"] = samples
        info["labels_source"] = lab_source
        info["pixels_outside_range"] = float(((img < lo) | (img > hi)).double().mean())
        ctx.offer(sol.residual, img.clamp(lo, hi), labels)
        return Reconstruction(inputs=img, labels=labels, info=info)


def _refine(case: Case, x0: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[torch.Tensor, dict]:
    """Gradient matching (squared distance relative to the observed update) from the tensor solution: L-BFGS
    with a strong-Wolfe line search (20 curvature pairs) on the one optimisation driver, as one
    torch.optim.LBFGS step of ``steps`` iterations (at most 5/4 x ``steps`` evaluations, torch's absolute
    tolerances 1e-7 / 1e-9: a start that already matches to rounding is left alone); the best iterate is kept
    when it improves on the start."""
    target = case.observed
    norm = sum(float((v.double() ** 2).sum()) for v in target.values())

    def objective(vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        upd = case.update(vs[0], labels, create_graph=True)
        loss = sum(((upd[k] - target[k]) ** 2).sum() for k in target) / norm
        return loss, loss

    trial = run_lbfgs(objective, [x0.detach()], max_iterations=steps, inner=steps, history_size=20,
                      line_search="strong-wolfe", tolerances="absolute", tol_grad=1e-7, tol_change=1e-9,
                      max_outer_steps=1, name="tensor refinement")
    first = trial.history[0] if trial.history else None
    counts = {k: v for k, v in trial.summary().items() if k != "score"}
    report = {"steps": steps, "start": first, "end": trial.score if trial.finite else None, **counts}
    if not trial.finite or (first is not None and trial.score > first):
        return x0, {**report, "accepted": False}
    return trial.variables[0].to(x0.dtype), {**report, "accepted": True}


def prepare_run(case: Case, options: dict[str, Any], *, generator: torch.Generator | None, seed: int, caller: str,
                head: bool = False) -> tuple[TensorAttack, TwoLayerView, RunContext]:
    """The entry of the public functions that run the solver outside :meth:`TensorAttack.reconstruct`: the
    options validated by the attack, its requirements checked (:meth:`TensorAttack.requirements`, or
    :meth:`TensorAttack.head_requirements` with ``head``; a :class:`RequirementError` naming ``caller`` lists
    every problem), and a :class:`RunContext` on ``generator`` (or one seeded with ``seed``)."""
    if not isinstance(case, Case):
        raise ValidationError(caller, [f"expected a gradleak.Case, got {type(case).__name__}"])
    attack = TensorAttack(**options)
    problems = attack.head_requirements(case) if head else attack.requirements(case)
    if problems:
        raise RequirementError(caller, problems)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    return attack, find_two_layer(case.model), RunContext(generator, desc=caller)


def recover_directions(case: Case, *, generator: torch.Generator | None = None, seed: int = 0,
                       **options: Any) -> tuple[torch.Tensor, dict]:
    """The identifiable core of the attack: unit directions x_i / |x_i| (B, d) in the model's (normalised,
    flattened) input space, before any norm, sign or label is fixed (the sign is meaningful only where the
    activation identifies it; see ``info['identifiable']``). options: :class:`TensorOptions` fields, e.g.
    ``fit='none'`` for the tensor step alone. Returns (directions, solver report)."""
    attack, view, ctx = prepare_run(case, options, generator=generator, seed=seed, caller="recover_directions")
    sol, prob, span, B, info = run_solver(case, view, attack.options, ctx)
    E = (span.U.double() @ sol.coords.T).T[:, : view.d_in]
    return (E / E.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(case.dtype), info
