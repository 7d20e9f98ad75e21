"""Per-layer linear systems (a package): the machinery shared by R-GAP (``attacks/rgap.py``), the layer-wise attack
(``attacks/layerwise.py``) and the risk analyses (``risk/``).

For one sample, a layer with weight W maps its input x (in_shape) to z = W x (+ b), and the gradient of the
loss w.r.t. its weight is linear in x once the back-propagated map k = dL/dz (out_shape) is fixed:

    weight constraint    W x        = z - b         (one row per output;   ``n_out``     rows)
    gradient constraint  K(k) x     = vec(dL/dW)    (one row per weight;   ``n_weights`` rows)

The closed-form attacks solve the stacked system [K(k); W] x = [dL/dW; z - b] layer by layer from the output
back (R-GAP: ALGORITHMS.md section 2; layer-wise: section 3, where the same system is called U x = V).
Padding is handled by solving for the UNPADDED input: the zero padding is built into the operators, which is
exactly the paper's padded unknown x~ with padding rows P x~ = 0 (same rank deficiency, fewer unknowns).

Walking a model
    ``walk(model, input_shape) -> Chain``: traces the model (torch.fx) into a chain of supported layers, each a
    :class:`Layer` (a Linear / Conv2d ... followed by its activation). Every problem (BatchNorm, pooling, skip
    connections, unknown modules, non-invertible activations ...) is collected, never only the first:
    ``Chain.problems`` (structural) and ``Chain.activation_problems()``; ``require_chain(...)`` raises a
    :class:`~gradleak.errors.RequirementError` listing all of them.

Per-layer rules (a registry keyed by module type, like opacus' ``@register_grad_sampler(nn.Linear)``)
    ``@register_layer(nn.Conv2d) class Conv2dLayer(Layer)``. A :class:`Layer` provides, all in float64 or the
    dtype of its arguments:

    - matrix-free operators: ``apply_weight`` (W x), ``apply_weight_T`` (W^T y), ``apply_grad`` (K(k) x, via
      ``torch.nn.grad.conv2d_weight`` for convs), ``apply_grad_T`` (K(k)^T G, via ``conv2d_input``);
    - sparse matrices built with vectorised index arithmetic: ``weight_matrix(weight)``, ``grad_matrix(k)``
      (``scipy.sparse.csr_array``; column of input pixel (c, iy, ix) is (c*H + iy)*W + ix);
    - Gram blocks: ``gram_weight(weight)`` = W^T W and ``gram_grad(k)`` = K^T K (structured, no big matrices);
    - slow obvious dense references for tests: :func:`reference_weight_matrix`, :func:`reference_grad_matrix`.

    A user adds a layer type by subclassing :class:`Layer` and decorating it with ``@register_layer(MyModule)``;
    an activation module type by ``@register_activation_module(MyAct)`` returning an
    :class:`~gradleak.activations.Activation` (with ``inverse`` for the recursive attacks).

Systems and solving
    ``LayerSystem(layer, weight, k, grad, target)`` holds one stacked, block-balanced system (each block divided
    by its Frobenius norm, so the rank tolerance is scale-free). ``system.solve(rtol=...) -> Solution`` solves it
    in least squares with minimum norm: the smaller Gram matrix (A^T A, or A A^T when the layer has fewer
    constraints than unknowns) factored by LAPACK's rank-revealing pivoted Cholesky, the minimum-norm solution
    from the pivoted factor when rank-deficient, then one residual-correction step; matrix-free LSQR for layers
    too large for a dense Gram. ``system.rank(rtol=..., method='svd'|'cholesky') -> RankInfo`` gives the
    numerical rank: singular values of the balanced stacked system below ``rtol * ||A||_F`` count as zero
    (:data:`DEFAULT_RTOL`). ``Solution`` carries rank, unknowns, constraints, deficiency, relative residuals
    per block and a condition estimate, which is what per-layer reports print.

Files: ``rules.py`` (Layer base + registry), ``linear.py`` / ``conv.py`` (the rules), ``walk.py`` (walker, Chain,
forward), ``linalg.py`` (the tolerance rule, rank, min-norm solves, null spaces, head solver), ``system.py``
(LayerSystem, Solution), ``report.py`` (LayerReport: one layer's report from a closed-form attack). See docs/architecture.md.

Example (one conv layer, one sample)::

    chain = walk(model, (3, 32, 32)); layer = chain.layers[0]
    system = LayerSystem(layer, weight, k, grad=dL_dW, target=z - b)
    sol = system.solve(); sol.x, sol.rank, sol.deficiency, sol.residual
"""


from __future__ import annotations

import numpy as np
import torch

from .rules import Layer, activation_of, layer_rules, register_activation_module, register_layer
from .rules import unregister_layer
from .linear import LinearLayer
from .conv import Conv2dLayer
from .walk import Chain, Issue, forward, require_chain, walk
from .linalg import (CERTIFICATE_MARGIN, DEFAULT_RTOL, EigenPseudoInverse, RankInfo, full_rank_certificate,
                     head_solve, numerical_rank, psd_solver, tolerance)
from .system import LayerSystem, NullProjector, Solution
from .index import security_index, security_weights
from .report import LayerExtra, LayerReport
from ..activations import Activation

__all__ = [
    "security_index", "security_weights", "LayerReport", "LayerExtra",
    "DEFAULT_RTOL", "CERTIFICATE_MARGIN", "Layer", "LinearLayer", "Conv2dLayer", "Chain", "Issue", "LayerSystem",
    "Solution", "RankInfo", "NullProjector", "EigenPseudoInverse", "Activation",
    "register_layer", "unregister_layer", "register_activation_module", "layer_rules", "walk", "require_chain", "forward",
    "reference_weight_matrix", "reference_grad_matrix", "numerical_rank", "activation_of", "tolerance",
    "head_solve", "psd_solver", "full_rank_certificate",
]


def reference_weight_matrix(layer: Layer, weight: torch.Tensor) -> np.ndarray:
    """Dense W built with plain Python loops straight from the definition (tiny layers only; tests)."""
    return layer.reference_weight_matrix(weight)


def reference_grad_matrix(layer: Layer, k: torch.Tensor) -> np.ndarray:
    """Dense K(k) built with plain Python loops straight from the definition (tiny layers only; tests)."""
    return layer.reference_grad_matrix(k)
