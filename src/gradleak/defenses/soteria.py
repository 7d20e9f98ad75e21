"""Soteria (Sun et al., CVPR 2021): perturb the data representation that the gradient of the first fully
connected layer reveals.

For a fully connected layer z = W r + b whose input r (B, F) is the representation the convolutional part
computes, dL/dW = sum_b (dL/dz_b) r_b^T: column i of dL/dW is a copy of feature i of the representation, which
is what reconstruction attacks invert. Soteria sends the gradient computed from a perturbed representation
r' that is close to r in the number of changed features but far in what an attacker reconstructs from it. The
paper's closed-form choice: remove (zero) the features with the LARGEST ratio |r_i| / ||d r_i / d x||, i.e.
the features whose removal moves the reconstruction most per unit of change in the representation.

What is implemented here, per gradient step of the client:
- the representation r = the input of ``layer`` (default: the first ``nn.Linear`` of the model),
- per feature i the score s_i = sum_b ||d r_{b,i} / d x_b||_2 / |r_{b,i}| over the step's batch (the inverse
  ratio, summed over examples; a feature that is 0 for an example contributes +inf and is never pruned),
- the ``ratio`` fraction of features with the smallest s_i (largest |r_i| / ||d r_i / d x||) is pruned: their
  columns of dL/dW of that layer are set to zero. Every other gradient is unchanged.
FedAvg applies it at every local step. No privacy accounting: the paper's certificate bounds the
reconstruction error under assumptions not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import functional as Fn
from ..errors import ValidationError
from .base import Defense, defenses, option


def _representation_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    mods = dict(model.named_modules())
    if layer is None:
        found = [(n, m) for n, m in mods.items() if isinstance(m, nn.Linear)]
        if not found:
            raise ValidationError("soteria defense", ["the model has no nn.Linear layer to defend"])
        return found[0]
    if layer not in mods or not isinstance(mods[layer], nn.Linear):
        linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        raise ValidationError("soteria defense", [f"layer {layer!r} is not an nn.Linear of the model; linear "
                                                  f"layers: {linear}"])
    return layer, mods[layer]


@defenses.register("soteria")
@dataclass
class Soteria(Defense):
    """Soteria: zero the ratio of representation features with the largest |r_i|/||dr_i/dx|| in the first FC layer's gradient."""

    ratio: float = option(0.5, float, low=0, high=1, high_open=True, doc="fraction of features pruned")
    layer: str | None = option(None, str, optional=True, doc="nn.Linear module name (default: the first)")
    name: ClassVar[str] = "soteria"
    acts_in_client: ClassVar[bool] = True

    def client_update(self, client, generator=None):
        lname, module = _representation_layer(client.model, self.layer)
        wname = f"{lname}.weight"
        if wname not in client.params:
            raise ValidationError("soteria defense", [f"{wname} is not among the observed parameters"])

        def step(params, x, labels):
            g = Fn.gradient(client.model, params, client.buffers, x, labels, client.loss_fn)
            mask = self.feature_mask(client.model, module, params, client.buffers, x)
            g[wname] = g[wname] * mask.to(g[wname].dtype).unsqueeze(0)
            return g

        return client.train(step)

    def scores(self, model, module, params, buffers, x) -> torch.Tensor:
        """s_i = sum_b ||d r_{b,i} / d x_b|| / |r_{b,i}| for every feature i of the layer's input r."""

        def representation(xb):
            seen = []
            hook = module.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
            try:
                Fn.forward(model, params, buffers, xb)
            finally:
                hook.remove()
            if seen[0].ndim != 2:
                raise ValidationError("soteria defense", [f"the representation layer's input must be (B, F), "
                                                          f"got {tuple(seen[0].shape)}"])
            return seen[0]

        x = x.detach()
        r = representation(x)  # (B, F)
        # examples are computed independently (eval mode), so d(sum_b r_{b,i}) / d x_b = d r_{b,i} / d x_b:
        # one vector-Jacobian product per feature gives every example's row at once
        jac = torch.func.jacrev(lambda xb: representation(xb).sum(0))(x)  # (F, B, *x.shape[1:])
        dnorm = jac.reshape(jac.shape[0], jac.shape[1], -1).double().norm(dim=2).T  # (B, F)
        return (dnorm / r.detach().double().abs()).sum(0)

    def feature_mask(self, model, module, params, buffers, x) -> torch.Tensor:
        """1 for kept features, 0 for the ``ratio`` fraction pruned (the smallest scores)."""
        s = self.scores(model, module, params, buffers, x)
        k = int(self.ratio * s.numel())
        mask = torch.ones_like(s)
        if k > 0:
            mask[torch.argsort(s, stable=True)[:k]] = 0
        return mask
