"""The tensor attack's options and their validation."""

from __future__ import annotations

from dataclasses import dataclass

FITS = ("auto", "patterns", "nonlinear", "none")
ESTIMATORS = ("auto", "hidden", "output")
BATCH = ("case", "gap")


@dataclass
class TensorOptions:
    """order: Hermite order p (0: the smallest p in {3, 4} with mu_p != 0).
    draws: Jennrich draws; every one is polished and fitted to the gradient, the best fit is kept.
    polish_sweeps: CP-ALS sweeps on the implicit tensor after each Jennrich draw.
    estimator: 'hidden' (first-layer gradient x He_{p-1}, lower variance), 'output' (output-layer gradient x He_p)
    or 'auto' (= 'hidden').
    fit: 'patterns' (activation-pattern alternating least squares; ReLU family), 'nonlinear' (Levenberg-Marquardt
    over span coordinates and residuals), 'none' (tensor directions only; signs/scales by least squares), 'auto'.
    fit_rounds: rounds of the pattern ALS (then pattern snapping) / alternating rounds of the non-linear fit.
    fit_tol: stop trying draws once the relative gradient-fit residual is below this.
    refine_steps: optional L-BFGS gradient-matching steps on the full model afterwards (0 = none).
    batch_size: 'case' (the case's batch size) or 'gap' (estimated from the singular-value gap).
    check_weights: refuse non-Gaussian first-layer weights (RequirementError) instead of a warning in info.
    """

    order: int = 0
    draws: int = 8
    polish_sweeps: int = 4
    estimator: str = "auto"
    fit: str = "auto"
    fit_rounds: int = 10
    fit_tol: float = 1e-9
    refine_steps: int = 0
    batch_size: str = "case"
    check_weights: bool = True


def option_problems(o: TensorOptions) -> list[str]:
    """Every invalid option value, as a sentence."""
    p = []
    if o.order not in (0, 3, 4):
        p.append(f"order must be 0 (auto), 3 or 4, got {o.order}")
    if o.draws < 1:
        p.append(f"draws must be >= 1, got {o.draws}")
    if o.polish_sweeps < 0 or o.fit_rounds < 0 or o.refine_steps < 0:
        p.append("polish_sweeps, fit_rounds and refine_steps must be >= 0")
    if o.fit not in FITS:
        p.append(f"fit must be one of {FITS}, got {o.fit!r}")
    if o.estimator not in ESTIMATORS:
        p.append(f"estimator must be one of {ESTIMATORS}, got {o.estimator!r}")
    if o.batch_size not in BATCH:
        p.append(f"batch_size must be one of {BATCH}, got {o.batch_size!r}")
    if not (o.fit_tol >= 0):
        p.append(f"fit_tol must be >= 0, got {o.fit_tol}")
    return p
