"""The rule of a 2-D convolution (nn.Conv2d): z = conv2d(x, W) (+ b), any kernel, stride, padding, dilation."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from .rules import Layer, Shape, register_layer

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


    def reference_weight_matrix(self, weight):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        C, H, W = self.in_shape
        Fo, Ho, Wo = self.out_shape
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

    def reference_grad_matrix(self, k):
        kk = k.detach().to(torch.float64).numpy().reshape(self.out_shape)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        C, H, W = self.in_shape
        Fo, Ho, Wo = self.out_shape
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
