"""Per-layer linear systems: the machinery shared by R-GAP (``attacks/rgap.py``), the layer-wise attack
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

Example (one conv layer, one sample)::

    chain = walk(model, (3, 32, 32)); layer = chain.layers[0]
    system = LayerSystem(layer, weight, k, grad=dL_dW, target=z - b)
    sol = system.solve(); sol.x, sol.rank, sol.deficiency, sol.residual
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn import grad as nn_grad

from .activations import Activation, activations, is_activation_function, register_module
from .activations import resolve as resolve_activation
from .errors import RequirementError, ValidationError

__all__ = [
    "DEFAULT_RTOL", "Layer", "LinearLayer", "Conv2dLayer", "Chain", "LayerSystem", "Solution", "RankInfo",
    "register_layer", "register_activation_module", "layer_rules", "walk", "require_chain",
    "reference_weight_matrix", "reference_grad_matrix", "numerical_rank", "activation_of",
]

#: Default numerical-rank tolerance: singular values of the block-balanced stacked system below
#: ``DEFAULT_RTOL * ||A||_F`` count as zero. Round-off in the float64 Gram matrix puts the singular values of
#: true null directions near sqrt(eps) * ||A|| ~ 1e-8 (and below); genuine small singular values of the
#: systems we analysed stay above 1e-5 * ||A||_F.
DEFAULT_RTOL = 1e-6

Shape = tuple[int, ...]


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# =====================================================================================================
# Activation modules -> registry activations (the resolver lives in gradleak.activations)
# =====================================================================================================

def register_activation_module(module_type: type):
    """Decorator: ``@register_activation_module(nn.ELU) def f(module) -> Activation`` tells the layer walker
    what an activation module computes (see :func:`gradleak.activations.register_module`)."""
    return register_module(module_type)


def activation_of(module: nn.Module) -> Activation | None:
    """The :class:`Activation` an activation module computes, or None if ``module`` is not one we know."""
    return resolve_activation(module)


# =====================================================================================================
# Layer rules
# =====================================================================================================

_LAYER_RULES: dict[type, type["Layer"]] = {}


def register_layer(*module_types: type):
    """Class decorator: ``@register_layer(nn.Conv2d) class Conv2dLayer(Layer)`` makes the walker turn modules of
    these types into that :class:`Layer` subclass (most specific type wins)."""

    def deco(cls: type["Layer"]) -> type["Layer"]:
        for t in module_types:
            _LAYER_RULES[t] = cls
        return cls

    return deco


def layer_rules() -> dict[type, type["Layer"]]:
    """A copy of the module type -> Layer class registry."""
    return dict(_LAYER_RULES)


def _rule_for(module: nn.Module) -> type["Layer"] | None:
    for t in type(module).__mro__:
        if t in _LAYER_RULES:
            return _LAYER_RULES[t]
    return None


class Layer:
    """One weight layer of a chain, followed by its activation.

    index: position in the chain (0 = input side); name: module path ("features.0"), also the prefix of its
    parameter names; label: "conv1", "fc3" ...; module: the torch module; in_shape / out_shape: per-sample
    shapes (C, H, W) or (D,); prev_shape: shape of the previous layer's output (or the model input) before
    any flatten, so ``x.reshape(prev_shape)`` turns this layer's input into the previous layer's output;
    activation: the :class:`Activation` after it (identity if none); activation_name: its module path or None.

    Operators act on float tensors with a leading batch dimension where stated; a subclass implements
    ``output_shape``, the four operators and the two sparse matrices (and may override the Gram blocks).
    """

    kind: ClassVar[str] = "layer"

    def __init__(self, index: int, name: str, module: nn.Module, in_shape: Shape, prev_shape: Shape):
        self.index = index
        self.name = name
        self.module = module
        self.in_shape = tuple(int(s) for s in in_shape)
        self.prev_shape = tuple(int(s) for s in prev_shape)
        self.out_shape = self.output_shape(self.in_shape)
        self.activation: Activation = activations.get("identity")
        self.activation_name: str | None = None
        self.label = name

    # ---- description ---------------------------------------------------------------------------
    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def bias_name(self) -> str | None:
        if getattr(self.module, "bias", None) is None:
            return None
        return f"{self.name}.bias" if self.name else "bias"

    @property
    def weight_shape(self) -> Shape:
        return tuple(self.module.weight.shape)

    @property
    def n_in(self) -> int:
        return _prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return _prod(self.out_shape)

    @property
    def n_weights(self) -> int:
        return _prod(self.weight_shape)

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    def describe(self) -> dict:
        """A JSON-able description (no tensors)."""
        return {"index": self.index, "name": self.name, "label": self.label, "kind": self.kind,
                "in_shape": list(self.in_shape), "out_shape": list(self.out_shape),
                "weights": self.n_weights, "bias": self.has_bias, "activation": self.activation.name}

    def problems(self) -> list[str]:
        """Settings of this layer the systems cannot represent, as sentences without the layer name ([] if none)."""
        return []

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.label} '{self.name}', {self.in_shape} -> {self.out_shape}, "
                f"activation={self.activation.name})")

    # ---- to implement ---------------------------------------------------------------------------
    def output_shape(self, in_shape: Shape) -> Shape:
        raise NotImplementedError

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W x without bias: x (N, *in_shape) -> (N, *out_shape)."""
        raise NotImplementedError

    def apply_weight_T(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W^T y: y (N, *out_shape) -> (N, *in_shape)."""
        raise NotImplementedError

    def apply_grad(self, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """K(k) x = dL/dW for one sample: k (*out_shape), x (*in_shape) -> (*weight_shape)."""
        raise NotImplementedError

    def apply_grad_T(self, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """K(k)^T g: g (*weight_shape) -> (*in_shape)."""
        raise NotImplementedError

    def weight_matrix(self, weight: torch.Tensor) -> sp.csr_array:
        """W as a sparse (n_out, n_in) matrix, float64."""
        raise NotImplementedError

    def grad_matrix(self, k: torch.Tensor) -> sp.csr_array:
        """K(k) as a sparse (n_weights, n_in) matrix, float64."""
        raise NotImplementedError

    def bias_shape(self) -> Shape:
        """How the bias broadcasts against one output sample."""
        return self.out_shape

    # ---- derived (override for speed) -------------------------------------------------------------
    def add_bias(self, z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return z if bias is None else z + bias.reshape(self.bias_shape())

    def bias_grad(self, k: torch.Tensor) -> torch.Tensor:
        """dL/db for one sample from k (*out_shape)."""
        return k.reshape(self.out_shape)

    def gram_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W^T W, dense (n_in, n_in) float64."""
        Wm = self.weight_matrix(weight)
        return torch.from_numpy((Wm.T @ Wm).toarray())

    def gram_grad(self, k: torch.Tensor) -> torch.Tensor:
        """K(k)^T K(k), dense (n_in, n_in) float64."""
        Km = self.grad_matrix(k)
        return torch.from_numpy((Km.T @ Km).toarray())

    def add_gram_weight(self, G: torch.Tensor, weight: torch.Tensor, alpha: float) -> None:
        """G += alpha * W^T W in place (override to avoid temporaries)."""
        G.add_(self.gram_weight(weight), alpha=alpha)

    def add_gram_grad(self, G: torch.Tensor, k: torch.Tensor, alpha: float) -> None:
        """G += alpha * K(k)^T K(k) in place (override to avoid temporaries)."""
        G.add_(self.gram_grad(k), alpha=alpha)

    def weight_norm2(self, weight: torch.Tensor) -> float:
        """||W||_F^2 of the operator (not of the kernel: each kernel entry is used at many positions)."""
        return float(self.gram_weight(weight).diagonal().sum())

    def grad_norm2(self, k: torch.Tensor) -> float:
        """||K(k)||_F^2."""
        return float(self.gram_grad(k).diagonal().sum())

    def dependencies(self) -> int:
        """Exact linear dependencies between the K and W blocks known from the structure (0 if none known)."""
        return 0


# ---- fully connected -----------------------------------------------------------------------------------

@register_layer(nn.Linear)
class LinearLayer(Layer):
    """z = W x (+ b) with W (out, in); dL/dW = k x^T, so K(k) = k (x) I_in and K^T K = ||k||^2 I."""

    kind = "linear"

    def output_shape(self, in_shape: Shape) -> Shape:
        return (int(self.module.out_features),)

    def problems(self) -> list[str]:
        if self.in_shape != (self.module.in_features,):
            return [f"gets inputs of shape {self.in_shape}, expected ({self.module.in_features},) - flatten before "
                    "a linear layer"]
        return []

    def apply_weight(self, x, weight):
        return x.reshape(x.shape[0], -1) @ weight.T

    def apply_weight_T(self, y, weight):
        return y.reshape(y.shape[0], -1) @ weight

    def apply_grad(self, k, x):
        return torch.outer(k.reshape(-1), x.reshape(-1))

    def apply_grad_T(self, k, g):
        return g.reshape(self.n_out, self.n_in).T @ k.reshape(-1)

    def weight_matrix(self, weight):
        return sp.csr_array(weight.detach().to(torch.float64).cpu().numpy())

    def grad_matrix(self, k):
        kv = k.detach().to(torch.float64).cpu().numpy().reshape(-1, 1)
        return sp.csr_array(sp.kron(kv, sp.eye(self.n_in, format="csr"), format="csr"))

    def gram_weight(self, weight):
        w = weight.detach().to(torch.float64).cpu()
        return w.T @ w

    def gram_grad(self, k):
        k = k.detach().to(torch.float64).cpu().reshape(-1)
        return torch.eye(self.n_in, dtype=torch.float64) * float(k @ k)

    def weight_norm2(self, weight):
        return float(weight.detach().to(torch.float64).pow(2).sum())

    def grad_norm2(self, k):
        return float(self.n_in * k.detach().to(torch.float64).pow(2).sum())


# ---- 2-D convolution -------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_layer(nn.Conv2d)
class Conv2dLayer(Layer):
    """z = conv2d(x, W) (+ b) with any kernel, stride, zero padding and dilation (groups = 1).

    Pixel bookkeeping: output (f, oy, ox) reads input (c, sy*oy + dy*u - py, sx*ox + dx*v - px) for kernel tap
    (u, v); taps landing in the padding read zeros. dL/dW[f, c, u, v] = sum_{oy, ox} k[f, oy, ox] x(tap).
    """

    kind = "conv2d"

    def _geometry(self):
        m = self.module
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pad = (0, 0)
            else:  # 'same' (stride 1): symmetric only when the total padding is even
                pad = tuple(d * (k - 1) // 2 for d, k in zip(_pair(m.dilation), _pair(m.kernel_size)))
        else:
            pad = _pair(m.padding)
        return _pair(m.kernel_size), _pair(m.stride), pad, _pair(m.dilation)

    def output_shape(self, in_shape: Shape) -> Shape:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        if len(in_shape) != 3:
            return (int(self.module.out_channels), 0, 0)
        _, H, W = in_shape
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return (int(self.module.out_channels), int(Ho), int(Wo))

    def problems(self) -> list[str]:
        m, out = self.module, []
        if len(self.in_shape) != 3:
            out.append(f"gets inputs of shape {self.in_shape}, expected (C, H, W)")
        elif self.in_shape[0] != m.in_channels:
            out.append(f"expects {m.in_channels} input channels, gets {self.in_shape[0]}")
        if m.groups != 1:
            out.append(f"uses groups={m.groups}; only groups=1 is supported")
        if m.padding_mode != "zeros":
            out.append(f"uses padding_mode={m.padding_mode!r}; only 'zeros' is supported")
        if isinstance(m.padding, str) and m.padding == "same":
            (kh, kw), _, _, (dh, dw) = self._geometry()
            if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
                out.append("uses padding='same' with an even kernel (asymmetric padding); give the padding "
                           "explicitly")
        if len(self.out_shape) == 3 and min(self.out_shape[1:]) <= 0:
            out.append(f"produces an empty output from inputs {self.in_shape}")
        return out

    def bias_shape(self) -> Shape:
        return (self.out_shape[0], 1, 1)

    def bias_grad(self, k):
        return k.reshape(self.out_shape).sum(dim=(1, 2))

    def dependencies(self) -> int:
        # sum_{c,u,v} W[f,c,u,v] dL/dW[f',c,u,v] = <W_f x, k_f'> for every pair of filters (f, f'): C_out^2
        return int(self.out_shape[0]) ** 2

    # ---- matrix-free operators ------------------------------------------------------------------
    def _kw(self):
        _, s, p, d = self._geometry()
        return dict(stride=s, padding=p, dilation=d)

    def apply_weight(self, x, weight):
        return F.conv2d(x.reshape(x.shape[0], *self.in_shape), weight, **self._kw())

    def apply_weight_T(self, y, weight):
        y = y.reshape(y.shape[0], *self.out_shape)
        return nn_grad.conv2d_input((y.shape[0], *self.in_shape), weight, y, **self._kw())

    def apply_grad(self, k, x):
        return nn_grad.conv2d_weight(x.reshape(1, *self.in_shape), self.weight_shape,
                                     k.reshape(1, *self.out_shape), **self._kw())

    def apply_grad_T(self, k, g):
        # <K(k) x, G> = <conv2d(x, G), k>, so K(k)^T G = conv2d_input(x_shape, G, k)
        return nn_grad.conv2d_input((1, *self.in_shape), g.reshape(self.weight_shape),
                                    k.reshape(1, *self.out_shape), **self._kw())[0]

    # ---- index arithmetic -------------------------------------------------------------------------
    def _taps(self):
        """Vectorised pixel bookkeeping over (f, c, u, v, oy, ox): input row/col of every tap and validity."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        C, H, W = self.in_shape
        Fo, Ho, Wo = self.out_shape
        u = np.arange(kh).reshape(kh, 1, 1, 1)
        v = np.arange(kw).reshape(1, kw, 1, 1)
        oy = np.arange(Ho).reshape(1, 1, Ho, 1)
        ox = np.arange(Wo).reshape(1, 1, 1, Wo)
        iy = sh * oy + dh * u - ph
        ix = sw * ox + dw * v - pw
        iy, ix = np.broadcast_arrays(iy, ix)  # (kh, kw, Ho, Wo)
        ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        return (kh, kw), (C, H, W), (Fo, Ho, Wo), iy, ix, ok

    def weight_matrix(self, weight):
        (kh, kw), (C, H, W), (Fo, Ho, Wo), iy, ix, ok = self._taps()
        w = weight.detach().to(torch.float64).cpu().numpy()
        f = np.arange(Fo).reshape(Fo, 1, 1, 1, 1, 1)
        c = np.arange(C).reshape(1, C, 1, 1, 1, 1)
        okb = np.broadcast_to(ok, (Fo, C, kh, kw, Ho, Wo))
        rows = np.broadcast_to((f * Ho + np.arange(Ho).reshape(1, 1, 1, 1, Ho, 1)) * Wo
                               + np.arange(Wo).reshape(1, 1, 1, 1, 1, Wo), okb.shape)
        cols = np.broadcast_to((c * H + iy) * W + ix, okb.shape)
        vals = np.broadcast_to(w.reshape(Fo, C, kh, kw, 1, 1), okb.shape)
        return sp.csr_array((vals[okb], (rows[okb], cols[okb])), shape=(Fo * Ho * Wo, C * H * W))

    def grad_matrix(self, k):
        (kh, kw), (C, H, W), (Fo, Ho, Wo), iy, ix, ok = self._taps()
        kk = k.detach().to(torch.float64).cpu().numpy().reshape(Fo, Ho, Wo)
        f = np.arange(Fo).reshape(Fo, 1, 1, 1, 1, 1)
        c = np.arange(C).reshape(1, C, 1, 1, 1, 1)
        u = np.arange(kh).reshape(1, 1, kh, 1, 1, 1)
        v = np.arange(kw).reshape(1, 1, 1, kw, 1, 1)
        okb = np.broadcast_to(ok, (Fo, C, kh, kw, Ho, Wo))
        rows = np.broadcast_to(((f * C + c) * kh + u) * kw + v, okb.shape)
        cols = np.broadcast_to((c * H + iy) * W + ix, okb.shape)
        vals = np.broadcast_to(kk.reshape(Fo, 1, 1, 1, Ho, Wo), okb.shape)
        return sp.csr_array((vals[okb], (rows[okb], cols[okb])), shape=(Fo * C * kh * kw, C * H * W))

    # ---- structured Gram blocks ------------------------------------------------------------------------
    def _tap_matrix(self, k) -> torch.Tensor:
        """M (F*kh*kw, H*W): M[(f,u,v), (iy,ix)] = k[f, oy, ox] for the output read by tap (u, v) at that pixel.
        K(k) acts on every input channel with the same M, so K^T K = I_C (x) M^T M."""
        (kh, kw), (C, H, W), (Fo, Ho, Wo), iy, ix, ok = self._taps()
        kk = k.detach().to(torch.float64).cpu().reshape(Fo, Ho, Wo)
        okb = np.broadcast_to(ok, (Fo, kh, kw, Ho, Wo))
        f = np.arange(Fo).reshape(Fo, 1, 1, 1, 1)
        u = np.arange(kh).reshape(1, kh, 1, 1, 1)
        v = np.arange(kw).reshape(1, 1, kw, 1, 1)
        rows = np.broadcast_to((f * kh + u) * kw + v, okb.shape)[okb]
        cols = np.broadcast_to(iy * W + ix, okb.shape)[okb]
        fo = np.broadcast_to(f, okb.shape)[okb]
        oyb = np.broadcast_to(np.arange(Ho).reshape(1, 1, 1, Ho, 1), okb.shape)[okb]
        oxb = np.broadcast_to(np.arange(Wo).reshape(1, 1, 1, 1, Wo), okb.shape)[okb]
        M = torch.zeros(Fo * kh * kw, H * W, dtype=torch.float64)
        M[torch.from_numpy(rows), torch.from_numpy(cols)] = kk[torch.from_numpy(fo), torch.from_numpy(oyb),
                                                               torch.from_numpy(oxb)]
        return M

    def gram_grad(self, k):
        G = torch.zeros(self.n_in, self.n_in, dtype=torch.float64)
        self.add_gram_grad(G, k, 1.0)
        return G

    def add_gram_grad(self, G, k, alpha):
        M = self._tap_matrix(k)
        B = M.T @ M
        hw = B.shape[0]
        for c in range(self.in_shape[0]):
            G[c * hw:(c + 1) * hw, c * hw:(c + 1) * hw].add_(B, alpha=alpha)

    def grad_norm2(self, k):
        M = self._tap_matrix(k)
        return float(self.in_shape[0] * M.pow(2).sum())

    def gram_weight(self, weight):
        G = torch.zeros(self.n_in, self.n_in, dtype=torch.float64)
        self.add_gram_weight(G, weight, 1.0)
        return G

    def add_gram_weight(self, G, weight, alpha, max_entries: int = 4_000_000):
        """W^T W without forming W: with Q = w^T w over the flattened kernel taps (C*kh*kw)^2, every output
        position o adds Q to the (input pixel, input pixel) pairs its taps read: W^T W = sum_o P_o^T Q P_o.
        Pairs with a tap in the padding are dropped. Scatter-add in chunks of output positions."""
        (kh, kw), (C, H, W), (Fo, Ho, Wo), iy, ix, ok = self._taps()
        n, T, P = C * H * W, C * kh * kw, Ho * Wo
        w = weight.detach().to(torch.float64).cpu().reshape(Fo, T)
        Q = (w.T @ w).reshape(-1) * alpha
        c = np.arange(C).reshape(C, 1, 1, 1, 1)
        cols = (c * H + iy[None]) * W + ix[None]  # (C, kh, kw, Ho, Wo)
        valid = np.broadcast_to(ok[None], cols.shape).reshape(T, P).T  # (P, T)
        cols = torch.from_numpy(np.ascontiguousarray(cols.reshape(T, P).T))
        valid = torch.from_numpy(np.array(valid))
        Gf = G.view(-1)
        if bool(valid.all()):  # no padding taps: every pair counts
            step = max(1, max_entries // (T * T))
            for a in range(0, P, step):
                cc = cols[a:a + step]
                Gf.index_add_(0, (cc[:, :, None] * n + cc[:, None, :]).reshape(-1), Q.repeat(cc.shape[0]))
            return
        Qm = Q.reshape(T, T)
        for a in range(P):  # positions with padding taps: keep the valid sub-block
            v = valid[a]
            if bool(v.all()):
                continue
            cc = cols[a][v]
            Gf.index_add_(0, (cc[:, None] * n + cc[None, :]).reshape(-1), Qm[v][:, v].reshape(-1))
        full = valid.all(dim=1)
        cols = cols[full]
        step = max(1, max_entries // (T * T))
        for a in range(0, cols.shape[0], step):
            cc = cols[a:a + step]
            Gf.index_add_(0, (cc[:, :, None] * n + cc[:, None, :]).reshape(-1), Q.repeat(cc.shape[0]))

    def weight_norm2(self, weight):
        # each kernel entry is used once per output position whose tap lands inside the input
        (kh, kw), _, (Fo, Ho, Wo), iy, ix, ok = self._taps()
        uses = torch.from_numpy(ok.reshape(kh, kw, Ho * Wo).sum(-1).astype(np.float64))  # (kh, kw)
        w2 = weight.detach().to(torch.float64).cpu().pow(2)
        return float((w2 * uses).sum())


# ---- slow obvious references (tests) -------------------------------------------------------------------

def reference_weight_matrix(layer: Layer, weight: torch.Tensor) -> np.ndarray:
    """Dense W built with plain Python loops straight from the definition (tiny layers only; tests)."""
    if isinstance(layer, LinearLayer):
        return weight.detach().to(torch.float64).numpy().copy()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer._geometry()
    C, H, W = layer.in_shape
    Fo, Ho, Wo = layer.out_shape
    w = weight.detach().to(torch.float64).numpy()
    A = np.zeros((Fo * Ho * Wo, C * H * W))
    for f in range(Fo):
        for oy in range(Ho):
            for ox in range(Wo):
                for c in range(C):
                    for u in range(kh):
                        for v in range(kw):
                            iy, ix = sh * oy + dh * u - ph, sw * ox + dw * v - pw
                            if 0 <= iy < H and 0 <= ix < W:
                                A[(f * Ho + oy) * Wo + ox, (c * H + iy) * W + ix] += w[f, c, u, v]
    return A


def reference_grad_matrix(layer: Layer, k: torch.Tensor) -> np.ndarray:
    """Dense K(k) built with plain Python loops straight from the definition (tiny layers only; tests)."""
    kk = k.detach().to(torch.float64).numpy().reshape(layer.out_shape)
    if isinstance(layer, LinearLayer):
        n_out, n_in = layer.n_out, layer.n_in
        A = np.zeros((n_out * n_in, n_in))
        for j in range(n_out):
            for i in range(n_in):
                A[j * n_in + i, i] = kk[j]
        return A
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer._geometry()
    C, H, W = layer.in_shape
    Fo, Ho, Wo = layer.out_shape
    A = np.zeros((Fo * C * kh * kw, C * H * W))
    for f in range(Fo):
        for c in range(C):
            for u in range(kh):
                for v in range(kw):
                    for oy in range(Ho):
                        for ox in range(Wo):
                            iy, ix = sh * oy + dh * u - ph, sw * ox + dw * v - pw
                            if 0 <= iy < H and 0 <= ix < W:
                                A[((f * C + c) * kh + u) * kw + v, (c * H + iy) * W + ix] += kk[f, oy, ox]
    return A


# =====================================================================================================
# Walking a model into a chain
# =====================================================================================================

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_WHY = {
    nn.modules.batchnorm._BatchNorm: "BatchNorm mixes the batch (train mode) or adds a per-channel affine map "
                                     "outside the layer systems",
    nn.GroupNorm: "normalisation is outside the layer systems",
    nn.LayerNorm: "normalisation is outside the layer systems",
    nn.modules.pooling._MaxPoolNd: "max pooling is not invertible",
    nn.modules.pooling._AdaptiveMaxPoolNd: "max pooling is not invertible",
    nn.modules.pooling._AvgPoolNd: "pooling has no weights and loses information",
    nn.modules.pooling._AdaptiveAvgPoolNd: "pooling has no weights and loses information",
    nn.Softmax: "a softmax output is not a linear head",
    nn.LogSoftmax: "a softmax output is not a linear head",
}


def _why_unsupported(m: nn.Module) -> str:
    for t, why in _WHY.items():
        if isinstance(m, t):
            return why
    return "no per-layer rule for this module type (register one with gradleak.layers.register_layer)"


class _ChainTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _rule_for(m) is not None or activation_of(m) is not None or isinstance(m, _PASSTHROUGH + (nn.Flatten,)):
            return True
        if isinstance(m, tuple(_WHY)):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class Issue:
    """One problem found while walking a model: where (module path or node name), what (module type or
    operation), why (the reason, shared by every module with the same problem)."""

    where: str
    what: str
    why: str


def _group(issues: Sequence[Issue], limit: int = 8) -> list[str]:
    """One sentence per distinct (what, why), naming every module (up to ``limit``, then 'and N more')."""
    groups: dict[tuple[str, str], list[str]] = {}
    for i in issues:
        groups.setdefault((i.what, i.why), [])
        if i.where not in groups[(i.what, i.why)]:
            groups[(i.what, i.why)].append(i.where)
    out = []
    for (what, why), wheres in groups.items():
        names = ", ".join(f"'{w}'" for w in wheres[:limit])
        if len(wheres) > limit:
            names += f" and {len(wheres) - limit} more"
        out.append(f"{names} ({what}): {why}" if what else f"{names}: {why}")
    return out


@dataclass
class Chain:
    """A model seen as a chain of weight layers (input side first).

    layers: the :class:`Layer` objects; issues: structural problems (unsupported modules, skip connections,
    shape mismatches, non-linear heads) as :class:`Issue`; ``problems`` formats them, one sentence per kind
    naming every module; input_shape: the per-sample input shape.
    """

    input_shape: Shape
    layers: list[Layer] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    #: activations met where no layer owns them (after an unsupported module): (module path, Activation)
    loose_activations: list[tuple[str, Activation]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Structural problems, one sentence per kind of problem, naming each module."""
        return _group(self.issues)

    @property
    def supported(self) -> bool:
        return not self.issues

    @property
    def head(self) -> Layer | None:
        return self.layers[-1] if self.layers else None

    @property
    def all_linear(self) -> bool:
        return bool(self.layers) and all(isinstance(l, LinearLayer) for l in self.layers)

    def activation_issues(self) -> list[Issue]:
        out = []
        acts = [(l.activation_name or f"after {l.name}", l.activation) for l in self.layers[:-1]]
        for where, act in acts + list(self.loose_activations):
            if not act.invertible:
                out.append(Issue(where, act.name,
                                 "not invertible: the recursion needs an invertible activation after each hidden "
                                 "layer (identity, leaky-relu, sigmoid, tanh, softplus, or one registered with an "
                                 "inverse)"))
        return out

    def activation_problems(self) -> list[str]:
        """Hidden layers whose activation has no inverse (the recursive attacks need one), formatted."""
        return _group(self.activation_issues())

    def all_problems(self, *, invertible: bool = True) -> list[str]:
        """Structural problems plus (``invertible``) non-invertible activations, grouped, naming each module."""
        return _group(list(self.issues) + (self.activation_issues() if invertible else []))

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def describe(self) -> list[dict]:
        return [l.describe() for l in self.layers]


def walk(model: nn.Module, input_shape: Sequence[int]) -> Chain:
    """Trace ``model`` into a :class:`Chain` of supported layers for per-sample inputs of ``input_shape``.

    Never raises for an unsupported model: every problem goes to ``chain.issues`` (formatted by
    ``chain.problems``, naming each module), so callers can list them all at once. Supported: chains of
    registered weight layers (nn.Linear, nn.Conv2d, ...), activation modules or functions, Flatten / reshape,
    Identity, Dropout (the client runs in eval mode). A weight layer's activation is the activation right
    after it; a weight layer followed directly by another has the identity.
    """
    chain = Chain(tuple(int(s) for s in input_shape))
    add = chain.issues.append
    name = type(model).__name__
    try:
        graph = _ChainTracer().trace(model)
    except Exception as e:  # dynamic control flow etc.
        add(Issue(name, "", f"cannot be traced into a chain of layers ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); the closed-form systems need a plain feed-forward "
                            "chain (an nn.Sequential works)"))
        return chain
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    shape: Shape | None = chain.input_shape
    prev_out: Shape | None = chain.input_shape
    last: Layer | None = None
    act_since_layer = False
    current = None
    broken = False  # after an unsupported module: activations cannot be attributed to a layer
    branch = "skip connection or branch: the closed-form systems need a plain chain of layers"
    for node in nodes:
        if node.op == "placeholder":
            if current is not None:
                add(Issue(name, "forward", "takes more than one input"))
            current = node
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            break
        tensor_args = [a for a in node.all_input_nodes if a.op != "get_attr"]
        where = node.target if node.op == "call_module" else node.name
        what = type(modules[node.target]).__name__ if node.op == "call_module" else _fn_name(node)
        if len(tensor_args) > 1:
            add(Issue(where, what, f"combines {len(tensor_args)} tensors - {branch}"))
        elif tensor_args and tensor_args[0] is not current:
            add(Issue(where, what, f"reads an earlier tensor - {branch}"))
        current = node
        if len(tensor_args) != 1 or len(tensor_args[0].users) > 1:
            shape = None
        if node.op == "call_module":
            m = modules[node.target]
            rule = _rule_for(m)
            act = activation_of(m)
            if rule is not None:
                last, act_since_layer = None, False
                if shape is None:
                    continue
                layer = rule(len(chain.layers), node.target, m, shape, prev_out if prev_out is not None else shape)
                prefix = {"linear": "fc", "conv2d": "conv"}.get(layer.kind, layer.kind)
                layer.label = f"{prefix}{len(chain.layers) + 1}"
                chain.issues.extend(Issue(layer.name, what, p) for p in layer.problems())
                chain.layers.append(layer)
                last = layer
                shape = prev_out = layer.out_shape
            elif act is not None:
                if broken and last is None:
                    chain.loose_activations.append((node.target, act))
                else:
                    _attach_activation(chain, last, act, node.target, act_since_layer)
                act_since_layer = True
            elif isinstance(m, _PASSTHROUGH):
                pass
            elif isinstance(m, nn.Flatten):
                if shape is not None:
                    if m.start_dim not in (1, -len(shape) - 1) or m.end_dim != -1:
                        add(Issue(where, what, "must flatten every sample dimension (start_dim=1, end_dim=-1)"))
                    shape = (_prod(shape),)
            else:
                add(Issue(where, what, _why_unsupported(m)))
                shape, last, broken = None, None, True
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            act = (resolve_activation(fn, node.args[1:], node.kwargs)
                   if is_activation_function(fn) and node.op in ("call_function", "call_method") else None)
            if act is not None:
                if broken and last is None:
                    chain.loose_activations.append((node.name, act))
                else:
                    _attach_activation(chain, last, act, None, act_since_layer)
                act_since_layer = True
            elif _is_flatten(node):
                if shape is not None:
                    shape = (_prod(shape),)
            elif node.op == "call_function" and fn in (F.dropout, F.dropout2d):
                pass
            elif len(tensor_args) <= 1:
                add(Issue(where, what, "operation outside the supported chain of layers"))
                shape, last, broken = None, None, True
            else:
                shape, last, broken = None, None, True
        else:
            add(Issue(where, node.op, "operation outside the supported chain of layers"))
            shape, last, broken = None, None, True
    if not chain.layers and not chain.issues:
        add(Issue(name, "", "has no weight layer the closed-form systems know (known: "
                            f"{', '.join(sorted(t.__name__ for t in _LAYER_RULES))})"))
    elif chain.layers and not isinstance(chain.layers[-1], LinearLayer) and not chain.issues:
        add(Issue(chain.layers[-1].name, type(chain.layers[-1].module).__name__,
                  "the network must end with a linear layer"))
    if not broken and chain.layers and act_since_layer and last is chain.layers[-1]:
        head = chain.layers[-1]
        add(Issue(head.activation_name or f"after {head.name}", head.activation.name,
                  "follows the output layer: the head must be linear (the loss applies the link function)"))
    return chain


def _fn_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _is_flatten(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_function" and t is torch.flatten:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        return start == 1
    if node.op == "call_method" and t in ("view", "reshape", "flatten"):
        args = node.args[1:]
        if t == "flatten":
            start = node.kwargs.get("start_dim", args[0] if args else 0)
            return start == 1
        if len(args) == 2 and args[1] == -1:
            return True
    return False


def _attach_activation(chain: Chain, last: Layer | None, act: Activation, where: str | None, again: bool) -> None:
    where = where or act.name
    if last is None and not again:
        if not chain.layers:
            chain.issues.append(Issue(where, act.name, "comes before any weight layer: an activation on the input "
                                                       "is outside the layer systems"))
    elif again or last is None:
        chain.issues.append(Issue(where, act.name, "is a second activation in a row: one activation per layer is "
                                                   "supported"))
    else:
        last.activation = act
        last.activation_name = where


def require_chain(model: nn.Module, input_shape: Sequence[int], who: str, *, invertible: bool = True,
                  extra: Sequence[str] = ()) -> Chain:
    """Walk ``model`` and raise one :class:`RequirementError` listing EVERY problem (structural, and
    non-invertible activations when ``invertible``), plus ``extra`` problems of the caller."""
    chain = walk(model, input_shape)
    problems = chain.all_problems(invertible=invertible) + list(extra)
    if problems:
        raise RequirementError(who, problems)
    return chain


# =====================================================================================================
# Stacked systems, rank and least-squares solutions
# =====================================================================================================

@dataclass
class RankInfo:
    """Numerical rank of a stacked system. sigma_*: singular values of the block-balanced system (None when
    not computed); tolerance: absolute threshold on singular values (rtol * ||A||_F); method: 'svd' (all
    singular values from the Gram matrix's eigenvalues) or 'cholesky' (pivoted Cholesky, rank only)."""

    rank: int
    unknowns: int
    rtol: float
    tolerance: float
    method: str
    sigma_max: float | None = None
    sigma_min: float | None = None  # smallest singular value counted in the rank
    sigma_next: float | None = None  # largest singular value below the tolerance
    condition_estimate: float | None = None  # LAPACK estimate when the singular values were not computed

    @property
    def deficiency(self) -> int:
        return self.unknowns - self.rank

    @property
    def condition(self) -> float | None:
        """sigma_max / sigma_min (of the retained singular values), or the estimate."""
        if self.sigma_max is None or not self.sigma_min:
            return self.condition_estimate
        return self.sigma_max / self.sigma_min

    def to_dict(self) -> dict:
        return {"rank": self.rank, "unknowns": self.unknowns, "deficiency": self.deficiency, "rtol": self.rtol,
                "tolerance": self.tolerance, "method": self.method, "sigma_max": self.sigma_max,
                "sigma_min": self.sigma_min, "sigma_next": self.sigma_next, "condition": self.condition}


def numerical_rank(gram: torch.Tensor, *, rtol: float = DEFAULT_RTOL, method: str = "svd") -> RankInfo:
    """Numerical rank of A from its Gram matrix G = A^T A (n, n): the number of singular values of A above
    ``rtol * ||A||_F`` (||A||_F^2 = trace G). method 'svd': eigenvalues of G (O(n^3), all singular values);
    'cholesky': LAPACK pivoted Cholesky with pivot threshold (rtol ||A||_F)^2 (about 4x faster, rank only)."""
    G = gram.detach().to(torch.float64).cpu()
    n = G.shape[0]
    fro2 = float(G.diagonal().sum())
    tol = rtol * math.sqrt(max(fro2, 0.0))
    if n == 0 or fro2 == 0.0:
        return RankInfo(0, n, rtol, tol, method, 0.0, None, None)
    if method == "svd":
        lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0).sqrt()
        keep = lam > tol
        r = int(keep.sum())
        return RankInfo(r, n, rtol, tol, "svd", float(lam[0]), float(lam[r - 1]) if r else None,
                        float(lam[r]) if r < n else None)
    if method == "cholesky":
        anorm = float(G.abs().sum(dim=0).max())
        U, _, r, _ = sla.lapack.dpstrf(G.numpy().T.copy(order="F"), tol=tol * tol, lower=0, overwrite_a=1)
        r = int(r)
        R11 = U[:r, :r] if r < n else U
        if r < n:
            R11 = np.asfortranarray(np.triu(R11))
            anorm = float(np.abs(R11).sum(axis=0).max() * np.abs(R11).sum(axis=1).max())
        rcond, _ = sla.lapack.dpocon(R11, anorm) if r else (0.0, 0)
        cond = math.sqrt(1.0 / rcond) if rcond > 0 else None
        return RankInfo(r, n, rtol, tol, "cholesky", condition_estimate=cond)
    raise ValidationError("numerical_rank", [f"method must be 'svd' or 'cholesky', got {method!r}"])


@dataclass
class Solution:
    """The least-squares, minimum-norm solution of one layer's stacked system.

    x: (*in_shape) the layer's input (float64); rank / unknowns / deficiency: numerical rank of the balanced
    stacked system; constraints: its rows (gradient + weight); residual: ||A x - b|| / ||b|| (balanced);
    residual_gradient / residual_weight: the same per block, relative to that block's right-hand side;
    condition: sigma_max / sigma_min estimate (None if unknown); method: 'cholesky', 'cholesky-minnorm' or 'lsqr'.
    """

    x: torch.Tensor
    rank: int
    unknowns: int
    constraints: int
    residual: float
    residual_gradient: float
    residual_weight: float
    condition: float | None
    method: str
    rtol: float
    iterations: int = 0

    @property
    def deficiency(self) -> int:
        return self.unknowns - self.rank

    @property
    def deficient(self) -> bool:
        return self.rank < self.unknowns

    def report(self) -> dict:
        """JSON-able per-layer numbers."""
        return {"unknowns": self.unknowns, "constraints": self.constraints, "rank": self.rank,
                "deficiency": self.deficiency, "deficient": self.deficient, "residual": self.residual,
                "residual_gradient": self.residual_gradient, "residual_weight": self.residual_weight,
                "condition": self.condition, "method": self.method, "rtol": self.rtol}


def _t64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64).cpu()


class LayerSystem:
    """The stacked, block-balanced system of one layer for one sample:

        [ wg * K(k) ]  x  =  [ wg * vec(grad)  ]        wg = 1 / ||K(k)||_F
        [ ww * W    ]        [ ww * (z - bias) ]        ww = 1 / ||W||_F

    layer: the :class:`Layer`; weight: its weight tensor; k: dL/dz (*out_shape), the back-propagated map
    (R-GAP's k_i, the layer-wise attack's delta_i); grad: the observed dL/dW (None: no gradient block);
    target: z - bias, the pre-activation minus bias ((*out_shape); None: no weight block).
    ``blocks`` chooses the blocks ('gradient', 'weight'); ``balance`` False keeps the raw scales (wg = ww = 1).
    Everything is float64 on the CPU. Built once, it gives the Gram matrix, the rank and the solution.
    """

    def __init__(self, layer: Layer, weight: torch.Tensor, k: torch.Tensor | None, grad: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, *, blocks: Sequence[str] = ("gradient", "weight"),
                 balance: bool = True, weight_ratio: float = 1.0):
        bad = [b for b in blocks if b not in ("gradient", "weight")]
        if bad or not blocks:
            raise ValidationError("LayerSystem", [f"blocks must be a subset of ('gradient', 'weight'), got {tuple(blocks)}"])
        self.layer = layer
        self.weight = _t64(weight)
        self.k = None if k is None else _t64(k).reshape(layer.out_shape)
        self.grad = None if grad is None else _t64(grad).reshape(layer.weight_shape)
        self.target = None if target is None else _t64(target).reshape(layer.out_shape)
        self.use_grad = "gradient" in blocks
        self.use_weight = "weight" in blocks
        if self.use_grad and self.k is None:
            raise ValidationError("LayerSystem", ["the gradient block needs the back-propagated map k"])
        if self.use_grad:
            n2 = layer.grad_norm2(self.k)
            self.wg = (1.0 / math.sqrt(n2) if balance and n2 > 0 else 1.0)
        else:
            self.wg = 0.0
        if self.use_weight:
            n2 = layer.weight_norm2(self.weight)
            self.ww = (1.0 / math.sqrt(n2) if balance and n2 > 0 else 1.0) * float(weight_ratio)
        else:
            self.ww = 0.0
        self._gram: torch.Tensor | None = None

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def unknowns(self) -> int:
        return self.layer.n_in

    @property
    def constraints(self) -> int:
        return self.layer.n_weights * self.use_grad + self.layer.n_out * self.use_weight

    # ---- operators -----------------------------------------------------------------------------------
    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x (n_in,) -> (constraints,) balanced."""
        x = x.reshape(1, *self.layer.in_shape)
        parts = []
        if self.use_grad:
            parts.append(self.wg * self.layer.apply_grad(self.k, x[0]).reshape(-1))
        if self.use_weight:
            parts.append(self.ww * self.layer.apply_weight(x, self.weight).reshape(-1))
        return torch.cat(parts)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """A^T r for r (constraints,) -> (n_in,)."""
        out = torch.zeros(self.layer.n_in, dtype=torch.float64)
        off = 0
        if self.use_grad:
            m = self.layer.n_weights
            out += self.wg * self.layer.apply_grad_T(self.k, r[off:off + m].reshape(self.layer.weight_shape)).reshape(-1)
            off += m
        if self.use_weight:
            m = self.layer.n_out
            out += self.ww * self.layer.apply_weight_T(r[off:off + m].reshape(1, *self.layer.out_shape),
                                                       self.weight).reshape(-1)
        return out

    def rhs(self) -> torch.Tensor:
        """b (constraints,) balanced; blocks without data are zero."""
        parts = []
        if self.use_grad:
            g = self.grad if self.grad is not None else torch.zeros(self.layer.weight_shape, dtype=torch.float64)
            parts.append(self.wg * g.reshape(-1))
        if self.use_weight:
            t = self.target if self.target is not None else torch.zeros(self.layer.out_shape, dtype=torch.float64)
            parts.append(self.ww * t.reshape(-1))
        return torch.cat(parts)

    def sparse(self) -> tuple[sp.csr_array, np.ndarray]:
        """(A, b) as a scipy sparse matrix and a vector (vectorised index arithmetic, no dense blocks)."""
        blocks = []
        if self.use_grad:
            blocks.append(self.wg * self.layer.grad_matrix(self.k))
        if self.use_weight:
            blocks.append(self.ww * self.layer.weight_matrix(self.weight))
        return sp.csr_array(sp.vstack(blocks, format="csr")), self.rhs().numpy()

    def operator(self) -> spla.LinearOperator:
        """A as a matrix-free scipy LinearOperator (convolutions and their adjoints)."""
        return spla.LinearOperator((self.constraints, self.unknowns), dtype=np.float64,
                                   matvec=lambda v: self.matvec(torch.from_numpy(np.asarray(v).reshape(-1))).numpy(),
                                   rmatvec=lambda v: self.rmatvec(torch.from_numpy(np.asarray(v).reshape(-1))).numpy())

    def gram(self) -> torch.Tensor:
        """A^T A (n_in, n_in), from the structured Gram blocks (cached)."""
        if self._gram is None:
            self._gram = self._build_gram()
        return self._gram

    def _build_gram(self) -> torch.Tensor:
        G = torch.zeros(self.unknowns, self.unknowns, dtype=torch.float64)
        if self.use_weight:
            self.layer.add_gram_weight(G, self.weight, self.ww ** 2)
        if self.use_grad:
            self.layer.add_gram_grad(G, self.k, self.wg ** 2)
        return G

    def normal_rhs(self) -> torch.Tensor:
        """A^T b (n_in,)."""
        return self.rmatvec(self.rhs())

    # ---- analysis --------------------------------------------------------------------------------------
    def residuals(self, x: torch.Tensor) -> tuple[float, float, float]:
        """(total, gradient block, weight block) relative residuals of ``x`` (nan for an absent block)."""
        x = _t64(x).reshape(-1)
        Ax, b = self.matvec(x), self.rhs()
        total = float((Ax - b).norm() / b.norm().clamp_min(1e-300))
        off, rg, rw = 0, float("nan"), float("nan")
        if self.use_grad:
            m = self.layer.n_weights
            rg = float((Ax[:m] - b[:m]).norm() / b[:m].norm().clamp_min(1e-300))
            off = m
        if self.use_weight:
            rw = float((Ax[off:] - b[off:]).norm() / b[off:].norm().clamp_min(1e-300))
        return total, rg, rw

    def row_gram(self) -> torch.Tensor:
        """A A^T (constraints, constraints) from the sparse matrices: the smaller Gram matrix when a layer has
        fewer constraints than unknowns (same nonzero singular values, same Frobenius norm)."""
        A, _ = self.sparse()
        return torch.from_numpy((A @ A.T).toarray())

    @property
    def wide(self) -> bool:
        """Fewer constraints than unknowns: the row Gram matrix is the smaller one (and the system is deficient)."""
        return self.constraints < self.unknowns

    def rank(self, *, rtol: float = DEFAULT_RTOL, method: str = "svd") -> RankInfo:
        """Numerical rank of the balanced stacked system (see :func:`numerical_rank`), from the smaller of
        A^T A and A A^T."""
        if self.wide:
            info = numerical_rank(self.row_gram(), rtol=rtol, method=method)
            info.unknowns = self.unknowns
            return info
        return numerical_rank(self.gram(), rtol=rtol, method=method)

    def solve(self, *, rtol: float = DEFAULT_RTOL, method: str = "auto", refine: int = 1,
              max_dense: int = 12000, lsqr_iterations: int = 20000) -> Solution:
        """Least squares, minimum norm. method 'auto': 'direct' when the smaller Gram matrix has at most
        ``max_dense`` rows, else 'lsqr'. 'direct': the Gram matrix (A^T A, or A A^T when there are fewer
        constraints than unknowns) + LAPACK pivoted Cholesky, rank-revealing with the threshold
        (rtol ||A||_F)^2. Full rank: triangular solves. Rank r below the Gram size: the minimum-norm solution
        from the r x N pivoted factor R (y = P^T R^T (R R^T)^-1 R11^-T (P v)[:r]). Then ``refine`` steps of
        residual correction (r = b - A x, x += A^+ r, which brings the error back to about cond(A) * eps).
        'lsqr': matrix-free LSQR (rank not computed; reported as full, condition None)."""
        n = self.unknowns
        if method == "auto":
            method = "direct" if min(n, self.constraints) <= max_dense else "lsqr"
        if method == "lsqr":
            res = spla.lsqr(self.operator(), self.rhs().numpy(), atol=1e-15, btol=1e-15, conlim=1e12,
                            iter_lim=lsqr_iterations)
            x = torch.from_numpy(res[0])
            tot, rg, rw = self.residuals(x)
            return Solution(x.reshape(self.layer.in_shape), n, n, self.constraints, tot, rg, rw, None, "lsqr",
                            rtol, iterations=int(res[2]))
        if method != "direct":
            raise ValidationError("LayerSystem.solve", [f"method must be 'auto', 'direct' or 'lsqr', got {method!r}"])
        wide = self.wide
        G = self.row_gram() if wide else self.gram()
        self._gram = None  # the factorisation below overwrites it
        b = self.rhs()
        fro2 = float(G.diagonal().sum())
        if fro2 == 0.0:
            x = torch.zeros(n, dtype=torch.float64)
            tot, rg, rw = self.residuals(x)
            return Solution(x.reshape(self.layer.in_shape), 0, n, self.constraints, tot, rg, rw, None, "direct", rtol)
        gsolve, r, cond, tag = _psd_solver(G, rtol * math.sqrt(fro2))
        if wide:  # x = A^T (A A^T)^+ b
            pinv = lambda v: self.rmatvec(torch.from_numpy(gsolve(v.numpy()))) # noqa: E731
        else:  # x = (A^T A)^+ A^T b
            pinv = lambda v: torch.from_numpy(gsolve(self.rmatvec(v).numpy()))  # noqa: E731
        x = pinv(b)
        for _ in range(int(refine)):
            x = x + pinv(b - self.matvec(x))
        tot, rg, rw = self.residuals(x)
        return Solution(x.reshape(self.layer.in_shape), r, n, self.constraints, tot, rg, rw, cond,
                        tag + ("-rows" if wide else ""), rtol)


def _psd_solver(G: torch.Tensor, tol: float):
    """Factor the PSD matrix G (N, N) in place with LAPACK's pivoted Cholesky (pivots below tol^2 stop it) and
    return (gsolve, rank, condition estimate of the retained part's square root, method tag), where gsolve(v)
    is the minimum-norm solution of G y = v (the exact solution when G has full rank)."""
    N = G.shape[0]
    anorm = float(G.abs().sum(dim=0).max())
    # G is symmetric, so its transpose is the Fortran-ordered array LAPACK wants: no copy
    U, piv, r, _ = sla.lapack.dpstrf(G.numpy().T, tol=tol * tol, lower=0, overwrite_a=1)
    r, piv = int(r), piv - 1
    if r == N:
        def gsolve(v: np.ndarray) -> np.ndarray:
            y = sla.solve_triangular(U, v[piv], trans="T", lower=False, check_finite=False)
            y = sla.solve_triangular(U, y, lower=False, check_finite=False)
            out = np.empty_like(y)
            out[piv] = y
            return out

        rcond, _ = sla.lapack.dpocon(U, anorm)
        return gsolve, r, (math.sqrt(1.0 / rcond) if rcond > 0 else float("inf")), "cholesky"
    # rank r < N: G[piv][:, piv] = R^T R with R = [R11 R12] (r x N); G y = v gives R P y = R11^-T (P v)[:r],
    # whose minimum-norm solution is P^T R^T (R R^T)^-1 R11^-T (P v)[:r]
    R = np.triu(U[:r, :])
    RRt = sla.cho_factor(R @ R.T, lower=False, check_finite=False)

    def gsolve(v: np.ndarray) -> np.ndarray:
        y = sla.solve_triangular(R[:, :r], v[piv][:r], trans="T", lower=False, check_finite=False)
        yp = R.T @ sla.cho_solve(RRt, y, check_finite=False)
        out = np.empty_like(yp)
        out[piv] = yp
        return out

    R11 = np.asfortranarray(R[:, :r])
    # 1-norm of R11^T R11 bounded by ||R11||_1 ||R11||_inf (an estimate, like dpocon's)
    anorm11 = float(np.abs(R11).sum(axis=0).max() * np.abs(R11).sum(axis=1).max())
    rcond, _ = sla.lapack.dpocon(R11, anorm11)
    return gsolve, r, (math.sqrt(1.0 / rcond) if rcond > 0 else float("inf")), "cholesky-minnorm"
