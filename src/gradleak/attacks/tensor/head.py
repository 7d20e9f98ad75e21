"""Deep networks: the input features phi(x) of a random two-layer head (:func:`recover_head_features`), and the
regulariser that feeds them to an optimisation attack (:func:`feature_matching_term`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ...case import Case
from ...errors import ValidationError
from .attack import prepare_run
from .pipeline import run_solver
from .samples import resolve_samples
from .view import TwoLayerView


@dataclass
class HeadFeatures:
    """Recovered input features of a two-layer head: ``features`` (B, d_feat) (norm and sign as identifiable;
    see ``info['samples']``), ``directions`` (B, d_feat) unit vectors, ``body`` the module computing phi(x) (or
    None if the model is not an nn.Sequential and no body was given), and the solver report ``info``."""

    features: torch.Tensor
    directions: torch.Tensor
    body: nn.Module | None
    info: dict


def _sequential_body(model: nn.Module, view: TwoLayerView) -> nn.Module | None:
    if not isinstance(model, nn.Sequential):
        return None
    names = [n for n, _ in model.named_children()]
    top = view.hidden.split(".")[0]
    if top not in names:
        return None
    idx = names.index(top)
    return nn.Sequential(*[model[i] for i in range(idx)], nn.Flatten())


def recover_head_features(case: Case, *, body: nn.Module | None = None, generator: torch.Generator | None = None,
                          seed: int = 0, **options: Any) -> HeadFeatures:
    """Recover the B input features phi(x_i) of the model's final Linear -> activation -> Linear head (a wide
    random head with Gaussian first layer) from the case's gradient, with the moment-tensor attack's solver.

    body: the feature extractor phi (x_normalised -> (B, d_feat)); default: for an nn.Sequential model, every layer
    before the head. options: :class:`TensorOptions` fields. Norms follow the loss residual when it determines
    them; otherwise features are unit vectors whose sign is fixed by a non-negative-mean prior (post-ReLU
    features), stated in ``info['samples']``. Features come in no particular order (align with Hungarian).
    """
    attack, view, ctx = prepare_run(case, options, generator=generator, seed=seed, caller="recover_head_features",
                                    head=True)
    sol, prob, span, B, info = run_solver(case, view, attack.options, ctx)
    X, labels, samples, source = resolve_samples(case, view, sol, prob, span, B, prior="nonneg")
    info["labels_source"] = source
    info["labels"] = None if labels is None else labels.tolist()
    feats = list(X)
    dirs = [x / x.norm().clamp_min(1e-300) for x in X]
    info["samples"] = samples
    if body is None:
        body = _sequential_body(case.model, view)
    F = torch.stack(feats).to(case.dtype)
    return HeadFeatures(features=F, directions=torch.stack(dirs).to(case.dtype), body=body, info=info)


def feature_matching_term(model_body: nn.Module, features_hat: torch.Tensor | HeadFeatures, *,
                          weight: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A regulariser for ``inverting-gradients`` (``regularizers=(term,)``): the mean over the batch of
    1 - cos^2(phi(x_b), z_hat_pi(b)), phi = ``model_body`` on normalised inputs, z_hat the recovered head features
    (B, d_feat) and pi the Hungarian assignment of the current features to the recovered ones (recomputed at every
    call, without gradient). cos^2 ignores the sign and norm, which the head's gradient may not identify.
    Follows Liu, Wang, Chen, Lei 2024 (the follow-up of the moment-tensor attack).

    Returns ``term(x_normalised (B, *shape)) -> 0-d tensor`` (times ``weight``)."""
    from scipy.optimize import linear_sum_assignment

    if isinstance(features_hat, HeadFeatures):
        features_hat = features_hat.features
    if not isinstance(model_body, nn.Module):
        raise ValidationError("feature_matching_term", [f"model_body must be an nn.Module, got {type(model_body).__name__}"])
    Zh = features_hat.detach()
    if Zh.ndim != 2:
        raise ValidationError("feature_matching_term", [f"features_hat must be (B, d_feat), got {tuple(Zh.shape)}"])
    Zh = Zh / Zh.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def term(x: torch.Tensor) -> torch.Tensor:
        phi = model_body(x).flatten(1)
        if phi.shape[1] != Zh.shape[1]:
            raise ValidationError("feature_matching_term", [f"the body outputs {phi.shape[1]} features, the recovered "
                                                            f"ones have {Zh.shape[1]}"])
        z = Zh.to(device=phi.device, dtype=phi.dtype)
        cos = (phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ z.T  # (B, B_hat)
        c2 = cos ** 2
        rows, cols = linear_sum_assignment(-c2.detach().cpu().double().numpy())
        return weight * (1.0 - c2[torch.as_tensor(rows), torch.as_tensor(cols)]).mean()

    return term
