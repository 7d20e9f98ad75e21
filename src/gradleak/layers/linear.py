"""The rule of a fully connected layer (nn.Linear): z = W x (+ b)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .rules import Layer, Shape, register_layer


@register_layer(nn.Linear)
class LinearLayer(Layer):
    """z = W x (+ b) with W (out, in); dL/dW = k x^T, so K(k) = k (x) I_in and K^T K = ||k||^2 I."""

    kind = "linear"
    dense = True

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
    def reference_weight_matrix(self, weight):
        return weight.detach().to(torch.float64).numpy().copy()

    def reference_grad_matrix(self, k):
        kk = k.detach().to(torch.float64).numpy().reshape(-1)
        A = np.zeros((self.n_out * self.n_in, self.n_in))
        for j in range(self.n_out):
            for i in range(self.n_in):
                A[j * self.n_in + i, i] = kk[j]
        return A
