"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for one linear layer, into qlite's int4 format (quant/formats.py).

GPTQ minimises the layer's output error ||X W^T - X Q^T||^2 over the calibration inputs X rather
than the weight error ||W - Q||^2. With H = 2 X^T X / n (the Hessian of that error in one row
of W), it quantizes the input columns k = 0..K-1 in order and, after each, spreads the column's
rounding error over the columns not yet quantized in proportion to the inverse Hessian:

    err = (W[:, k] - Q[:, k]) / Hinv[k, k]
    W[:, k+1:] -= err (x) Hinv[k, k+1:]

where Hinv is the upper Cholesky factor of H^-1 (each step then needs only its own row). The
updates are applied lazily: within a block of 128 columns one column at a time, to the rest of
the matrix once per block (one matmul). H is damped by 1% of its mean diagonal; an input column
that never saw a non-zero value gets H[k, k] = 1 (its weights are still quantized, and neither
give nor take error feedback).

Group parameters are computed when the loop reaches a group's first column, from that group's
weights as the earlier feedback left them (no static groups, no activation reordering), and are
rounded to float16 first so the codes and the feedback use exactly the stored values:
  symmetric   scale = 2 max|w| / 15, zero point 8 (codes - 8 in [-8, 7]), GPTQ's convention
  asymmetric  scale = (max - min) / 15 over the group's range widened to include 0, integer
              zero = round(-min / scale) (so it converts to GPTQ's integer zeros)

    h = Hessian(k); h.add(x) for each batch of inputs [..., K]
    qt = gptq_quantize(weight [N, K], h.matrix(), group_size=128, symmetric=True)
"""
from __future__ import annotations

import torch

from qlite.errors import QliteError

from .formats import GROUP_SIZES, QuantizedTensor, pack_int4

BLOCK = 128  # columns per lazy update; a multiple of every group size
PERCDAMP = 0.01
_MIN_SCALE = 1e-6


class Hessian:
    """Running H = 2 X^T X / n of a linear layer's inputs, summed in float32 on `device`."""

    def __init__(self, in_features: int, device="cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, self.sum.shape[0])
        if x.shape[0] == 0:
            return
        x = x.to(self.sum.device, torch.float32)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """float32 [K, K]; all zeros before any input."""
        return self.sum * (2 / max(self.tokens, 1))


def _group_params(w: torch.Tensor, symmetric: bool):
    """Scale and zero point [N, 1] of the groups w [N, G], float16-exact values in float32."""
    if symmetric:
        s = (w.abs().amax(-1, keepdim=True) * (2 / 15)).clamp(min=_MIN_SCALE)
        return s.half().float(), torch.full_like(s, 8.0)
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=_MIN_SCALE).half().float()
    return s, (-lo / s).round().clamp(0, 15)


def _inverse_cholesky(h: torch.Tensor, where: str) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (U^T U = H^-1, H damped), growing the damping if H
    is not positive definite numerically. With J the order reversal and J H J = L L^T,
    U = J L^-1 J: one factorisation and one triangular inverse (2/3 K^3 flops, not 5/3 K^3
    for cholesky, cholesky_inverse, cholesky)."""
    damp = PERCDAMP * h.diagonal().mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        low, info = torch.linalg.cholesky_ex((h + damp * eye).flip(0, 1))
        if info.item() == 0:
            return torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
        damp *= 10
    raise QliteError(f"{where}: the calibration Hessian is not positive definite even damped")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
                  symmetric: bool = True, name: str = "weight") -> QuantizedTensor:
    """GPTQ of weight [N, K] with its inputs' Hessian [K, K] -> int4 QuantizedTensor (qlite's
    layout). Runs on the weight's device in float32."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QliteError(f"{name}: expected a 2-D float weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    if group_size not in GROUP_SIZES:
        raise QliteError(f"group_size must be one of {GROUP_SIZES}, got {group_size} ({name})")
    if k % group_size:
        raise QliteError(f"group_size {group_size} does not divide in_features {k} of {name}")
    if tuple(hessian.shape) != (k, k):
        raise QliteError(f"{name}: Hessian {tuple(hessian.shape)} does not match {k} inputs")
    dev = weight.device
    w = weight.float().clone()
    h = hessian.to(dev, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    hinv = _inverse_cholesky(h, name)
    del h

    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)
    scales = torch.empty(k // group_size, n, dtype=torch.float32, device=dev)
    zeros = torch.empty_like(scales)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        w1 = w[:, b0:b1].clone()
        err = torch.empty_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # a group starts: its parameters from the current weights
                s, z = _group_params(w1[:, i:i + group_size], symmetric)
                scales[col // group_size], zeros[col // group_size] = s[:, 0], z[:, 0]
            q = (w1[:, i:i + 1] / s + z).round().clamp(0, 15)
            codes[:, col] = q[:, 0].to(torch.uint8)
            e = (w1[:, i] - (q[:, 0] - z[:, 0]) * s[:, 0]) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return QuantizedTensor(pack_int4(codes), scales.half(), None if symmetric else zeros.half(),
                           4, group_size)


__all__ = ["Hessian", "gptq_quantize", "BLOCK", "PERCDAMP"]
