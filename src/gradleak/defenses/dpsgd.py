"""DP-SGD (Abadi et al., CCS 2016) inside the client, with opacus's accountant for (epsilon, delta).

Every gradient step of the client: the gradient of each example's own loss g_i (torch.func per-example
gradients), clipped to L2 norm C = ``max_grad_norm`` over all parameters (g_i * min(1, C / ||g_i||)), summed,
Gaussian noise N(0, (sigma C)^2 I) added to the SUM (sigma = ``noise_multiplier``), divided by the step's batch
size B. FedSGD sends that one noisy gradient; FedAvg takes every local step with it and sends theta_K - theta_0.

Accounting: opacus's RDP (default) or PRV accountant for ``steps`` compositions of the subsampled Gaussian
mechanism at ``sample_rate`` q. One simulated update takes ``rounds`` x (steps per update) steps unless
``steps`` is given; ``gl.defenses.utility`` sets them to its own run's steps and q (``for_run``). The accountants assume each
example joins each step independently with probability q (Poisson sampling) and add/remove-one adjacency;
the simulated client uses fixed mini-batches, as most DP-SGD deployments do: the epsilon is the one such a
deployment reports. With sigma = 0 there is no guarantee (epsilon is infinite; recorded as None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import functional as Fn
from ..errors import ValidationError
from .base import Defense, defenses, option


def accountant_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                       accountant: str = "rdp") -> float:
    """epsilon at ``delta`` after ``steps`` subsampled-Gaussian steps, from opacus's accountant ('rdp' | 'prv')."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


@defenses.register("dp-sgd", aliases=("dpsgd",))
@dataclass
class DPSGD(Defense):
    """DP-SGD: per-example clipping to max_grad_norm, N(0,(noise_multiplier*max_grad_norm)^2) on the sum, / B; epsilon from opacus.

    Give ``noise_multiplier`` (opacus's sigma) or ``target_epsilon`` (sigma is then calibrated by opacus's
    ``get_noise_multiplier`` for the accounted steps, sample rate and delta)."""

    max_grad_norm: float = option(1.0, float, low=0, low_open=True, doc="per-example clipping norm C")
    noise_multiplier: float | None = option(None, float, low=0, optional=True, doc="sigma: noise std / C")
    target_epsilon: float | None = option(None, float, low=0, low_open=True, optional=True)
    delta: float = option(1e-5, float, low=0, high=1, low_open=True, high_open=True)
    sample_rate: float = option(1.0, float, low=0, high=1, low_open=True, doc="q: an example's chance per step")
    rounds: int = option(1, int, low=1, doc="updates this client sends (steps = rounds x steps per update)")
    steps: int | None = option(None, int, low=1, optional=True, doc="total accounted steps (overrides rounds)")
    accountant: str = option("rdp", str, choices=("rdp", "prv"))
    name: ClassVar[str] = "dp-sgd"
    acts_in_client: ClassVar[bool] = True
    _calibrated: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def check(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            return ["give exactly one of noise_multiplier (opacus's sigma) or target_epsilon, e.g. "
                    "dp-sgd:max_grad_norm=1,noise_multiplier=1.1"]
        return []

    # ---- accounting ---------------------------------------------------------------------------------
    def accounted_steps(self, steps_per_round: int = 1) -> int:
        return int(self.steps) if self.steps is not None else int(self.rounds) * int(steps_per_round)

    def sigma(self, steps: int, sample_rate: float) -> float:
        """The noise multiplier used: the given one, or opacus's calibration to ``target_epsilon``."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        key = (int(steps), float(sample_rate))
        if key not in self._calibrated:
            from opacus.accountants.utils import get_noise_multiplier

            try:
                self._calibrated[key] = float(get_noise_multiplier(
                    target_epsilon=self.target_epsilon, target_delta=self.delta, sample_rate=sample_rate,
                    steps=int(steps), accountant=self.accountant))
            except ValueError as e:
                raise ValidationError("dp-sgd defense", [f"target_epsilon={self.target_epsilon} cannot be reached "
                                                         f"in {steps} steps at sample_rate={sample_rate}: {e}"]) from None
        return self._calibrated[key]

    def for_run(self, steps, sample_rate):
        run = dataclasses.replace(self, steps=int(steps), sample_rate=float(sample_rate))
        run.sigma(run.steps, run.sample_rate)  # calibrate once; copies (one per client) keep the result
        return run

    def privacy(self, steps_per_round=1):
        total = self.accounted_steps(steps_per_round)
        q = float(self.sample_rate)
        sigma = self.sigma(total, q)
        out = {"mechanism": "dp-sgd", "accountant": self.accountant, "delta": self.delta, "steps": total,
               "rounds": None if self.steps is not None else int(self.rounds),
               "steps_per_round": None if self.steps is not None else int(steps_per_round), "sample_rate": q, "noise_multiplier": sigma, "max_grad_norm": self.max_grad_norm,
               "assumes": "Poisson sampling at sample_rate per step, add/remove-one-example adjacency"}
        if sigma == 0:
            return {**out, "epsilon": None, "guarantee": False,
                    "note": "noise_multiplier = 0: no privacy guarantee (epsilon is infinite)"}
        return {**out, "epsilon": accountant_epsilon(sigma, q, total, self.delta, self.accountant), "guarantee": True}

    # ---- the client computation ---------------------------------------------------------------------
    def client_update(self, client, generator=None):
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in client.model.modules()):
            raise ValidationError("dp-sgd defense", ["per-example gradients need each example computed on its own; "
                                                     "BatchNorm with bn_mode='train' mixes the batch (use bn_mode='eval')"])
        sigma = self.sigma(self.accounted_steps(client.steps), self.sample_rate)

        def step(params, x, labels):
            return self.noisy_gradient(client.model, params, client.buffers, x, labels, client.loss_fn, sigma, generator)

        return client.train(step)

    def noisy_gradient(self, model, params, buffers, x, labels, loss_fn, sigma: float, generator=None):
        """One DP-SGD step's gradient: (sum_i clip_C(g_i) + N(0, (sigma C)^2)) / B."""
        per = Fn.per_example_gradients(model, params, buffers, x, labels, loss_fn)
        b = x.shape[0]
        norms = torch.sqrt(sum(g.reshape(b, -1).double().pow(2).sum(1) for g in per.values()))
        factor = torch.clamp(self.max_grad_norm / norms, max=1.0)  # a zero gradient (norm 0) is kept as is
        out = {}
        for k, g in per.items():
            total = (g * factor.to(g.dtype).view(b, *([1] * (g.ndim - 1)))).sum(0)
            if sigma > 0:
                noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device="cpu").to(total.device)
                total = total + sigma * self.max_grad_norm * noise
            out[k] = total / b
        return out
