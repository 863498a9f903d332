"""qlite's quantized weight formats, and the quantizers that produce them.

A weight W [N, K] (N output channels, K input features, as nn.Linear stores it) becomes:

int8: symmetric, one scale per output channel
    qweight  int8     [N, K]        W[n, k] ~= qweight[n, k] * scales[n]; codes in [-127, 127]
    scales   float16  [N]

int4: groups of G consecutive k (G = 32, 64 or 128, default 128; G must divide K)
    qweight  uint8    [N, K // 2]   packed along K: byte j of row n holds k = 2j in its low
                                    nibble and k = 2j + 1 in its high nibble; codes in [0, 15]
    scales   float16  [K // G, N]   group-major: the scales of one group for consecutive output
    zeros    float16  [K // G, N]   channels are contiguous, so a tile of N reads them in one load
    W[n, k] ~= (code - zeros[k // G, n]) * scales[k // G, n]
    zeros is a float zero point in code units (HQQ optimises it as a float). Symmetric int4
    has no zeros tensor: the zero point is 8 and codes - 8 lie in [-8, 7].

Why this layout: a GPU thread loading 16 contiguous bytes of a row gets 32 consecutive k of
one output channel, neighbouring threads take the next 16 bytes, so a warp reads whole 128-byte
lines; every row starts 16-byte aligned because G >= 32 divides K. Scales and zeros are float16
whatever the activation dtype (the kernels convert to float32).

The GPU kernels read this layout as it is (no repack at load): viewed as int32 words, word c of
a row holds k = 8c + i in nibble i, so (word >> 4p) & 0x000F000F puts k = 8c + p and 8c + p + 4
in the two 16-bit halves, the pair the decode kernel dequantizes at once (kernels/gemv.py);
the tensor-core tiles split each word into its 8 codes in the thread that loaded it
(kernels/dequant.py), so every kernel loads weights 16 bytes at a time. A copy, not a
replacement: for a shape where torch's tinygemm int4 matmul measured faster (CUDA, bfloat16
activations; kernels/ops.py), the weight also gets tinygemm's layout (kernels/tinygemm.py:
nibble-swapped, tensor-core-tiled codes and bfloat16 (scale, offset) pairs), a second copy of
its codes.

Imported formats land in this layout (their own codes, no second rounding):
  GPTQ / AWQ int4 (quant/gptq_awq.py): integer zero points and fp16 scales, which float16 holds
       exactly: the dequantized weight equals the checkpoint's own bit for bit in float32.
       8-bit GPTQ (group-wise scales) is requantized to int8 per channel: one extra rounding.
  GGUF Q4_0 / Q4_1 / Q4_K as int4 g32 (quant/gguf_q4.py): Q4_0 exactly (zero 8, its fp16 d).
       Q4_1 / Q4_K have a float offset per group: zero = -offset / scale, rounded to fp16 (and
       Q4_K's scale d * sc too), which moves each weight by at most 2^-11 * (|w| + |offset|),
       a few 1e-4 of the group's range against the 1/15 a requantization step would add
       (bound asserted in tests/test_gguf_q4.py).

Stacked experts carry a leading expert dimension on every tensor ([E, N, K // 2], [E, K // G, N],
...); each expert's bytes are contiguous.

Quantizers (`method`):
  rtn  round to nearest: int4 asymmetric takes the group's min..max (widened to include 0, so
       the zero point stays in [0, 15] where float16 holds it exactly); symmetric takes absmax.
  hqq  calibration-free error minimisation, the default: HQQ's half-quadratic optimisation of
       the zero point (lp-norm 0.7 proximal steps, Badri & Shaji 2023), then alternating
       least-squares refits of scale and zero. Symmetric formats have no zero point, so they get
       the least-squares refit of the scale only. Each group keeps the best (scale, zero) seen,
       starting from RTN's, so its squared error is never above RTN's.
  gptq calibrated (quant/gptq.py): minimises the layer's output error on calibration inputs,
       column by column with error feedback; needs the inputs' Hessian, so it is not a
       `quantize()` method. Symmetric scales are 2 max|w| / 15 (GPTQ's), asymmetric zero
       points integers.
"""
import math
from dataclasses import dataclass

import torch

from qlite.errors import QliteError
from qlite.kernels.reference import dequantize as _dequantize
from qlite.kernels.reference import unpack_int4

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "hqq")
_ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # quantize in row chunks of ~16M weights to bound memory
_MIN_SCALE = 1e-6  # well inside float16's range


@dataclass
class QuantizedTensor:
    """The packed tensors of one quantized weight (layouts in the module docstring)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int  # int4 only; int8 is per channel

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return _dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)


def check_format(bits: int, group_size: int, in_features: int, name: str = "weight"):
    if bits not in BITS:
        raise QliteError(f"bits must be 4 or 8, got {bits} ({name})")
    if bits == 4:
        if group_size not in GROUP_SIZES:
            raise QliteError(f"group_size must be one of {GROUP_SIZES}, got {group_size} ({name})")
        if in_features % group_size:
            raise QliteError(f"group_size {group_size} does not divide in_features {in_features} of {name}")


def packed_shapes(n: int, k: int, bits: int, group_size: int | None,
                  symmetric: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Buffer name -> (shape, dtype) of one packed weight [N, K] (the layouts above): the one
    statement of them that modules, the quantize job and the memory planner all read."""
    if bits == 8:
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float16)}
    shapes = {"qweight": ((n, k // 2), torch.uint8),
              "scales": ((k // group_size, n), torch.float16)}
    if not symmetric:
        shapes["zeros"] = ((k // group_size, n), torch.float16)
    return shapes


def packed_bytes(n: int, k: int, bits: int, group_size: int | None, symmetric: bool = False) -> int:
    """Bytes of one packed weight [N, K]: every tensor of packed_shapes."""
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in packed_shapes(n, k, bits, group_size, symmetric).values())


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., N, K] integer codes in 0..15 -> [..., N, K // 2] uint8 (low nibble = even k)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             method: str = "hqq", name: str = "weight") -> QuantizedTensor:
    """Quantize weight [N, K] (any float dtype, any device) to the packed format."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QliteError(f"{name}: expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    if method not in METHODS:
        raise QliteError(f"method must be one of {METHODS}, got {method!r} ({name})")
    n, k = weight.shape
    check_format(bits, group_size, k, name)
    rows = max(1, _ROWS_PER_CHUNK_ELEMENTS // k)
    parts = [_quantize_rows(weight[i:i + rows].float(), bits, group_size, symmetric or bits == 8, method)
             for i in range(0, n, rows)]
    qweight = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts], dim=-1)
    zeros = None if parts[0][2] is None else torch.cat([p[2] for p in parts], dim=-1)
    return QuantizedTensor(qweight, scales, zeros, bits, group_size)


def _quantize_rows(w, bits, group_size, symmetric, method):
    n, k = w.shape
    g = k if bits == 8 else group_size
    w = w.view(n, k // g, g)
    if symmetric:
        qmax = 127 if bits == 8 else 7
        s = _f16((w.abs().amax(-1, keepdim=True) / qmax).clamp(min=_MIN_SCALE))
        if method == "hqq":
            s = _refit_scale(w, s, qmax)
        codes = (w / s).round().clamp(-qmax - (bits == 4), qmax)
        if bits == 8:
            return codes.to(torch.int8).view(n, k), s.view(n).half(), None
        return pack_int4((codes + 8).view(n, k)), s.view(n, -1).T.contiguous().half(), None
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    s = _f16(((hi - lo) / 15).clamp(min=_MIN_SCALE))
    z = _f16(-lo / s)
    if method == "hqq":
        z = _hqq_zero(w, s, z)
        s, z = _refit_affine(w, s, z)
    codes = (w / s + z).round().clamp(0, 15)
    return (pack_int4(codes.view(n, k)), s.view(n, -1).T.contiguous().half(),
            z.view(n, -1).T.contiguous().half())


def _f16(t):
    """Round to the float16 that will be stored, so codes are chosen for the stored values."""
    return t.clamp(-65504, 65504).half().float()


def _affine_error(w, s, z):
    return ((w / s + z).round().clamp(0, 15).sub(z).mul(s).sub(w)).square().sum(-1, keepdim=True)


def _hqq_zero(w, s, z, iters=20, lp=0.7, beta=10.0, kappa=1.01):
    """HQQ: with the scale fixed, alternate a proximal (lp < 1) split of the residual into a
    sparse outlier part e, and the zero point that best explains w - e; keep each group's best.
    Works in code units (w / s) since s is fixed; errors are compared per group."""
    ws = w / s

    def residual(z):  # (w - dequantized) / s, and the group's squared error in code units
        r = ws - (ws + z).round().clamp(0, 15) + z
        return r, r.square().sum(-1, keepdim=True)

    r, best = residual(z)
    best_z, last = z, best.sum()
    for _ in range(iters):
        # The shrink keeps only |residual| above beta^(-1 / (2 - lp)) (in weight units); with
        # typical weights no residual is that large and the step is a plain mean.
        r_w = r * s
        if (r_w.abs() > beta ** (-1 / (2 - lp))).any():
            e = r_w.sign() * torch.relu(r_w.abs() - r_w.abs().clamp(min=1e-8).pow(lp - 1) / beta)
            r = r - e / s
        z = _f16(z - r.mean(-1, keepdim=True))  # = mean(q - (w - e) / s)
        beta *= kappa
        r, err = residual(z)
        better = err < best
        best_z, best = torch.where(better, z, best_z), torch.where(better, err, best)
        if err.sum() >= last:  # HQQ's stopping rule: the whole tensor stopped improving
            break
        last = err.sum()
    return best_z


def _refit_affine(w, s, z, iters=10):
    """Alternate: codes for (s, z), then the least-squares (s, z) for those codes."""
    best_s, best_z, best = s, z, _affine_error(w, s, z)
    for _ in range(iters):
        q = (w / best_s + best_z).round().clamp(0, 15)
        qm, wm = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
        var = (q - qm).square().mean(-1, keepdim=True)
        s = ((q - qm) * (w - wm)).mean(-1, keepdim=True) / var.clamp(min=1e-12)
        ok = (var > 0) & (s > _MIN_SCALE)
        s = _f16(torch.where(ok, s, best_s))
        z = _f16(torch.where(ok, qm - wm / s, best_z))
        err = _affine_error(w, s, z)
        better = err < best
        if not better.any():
            break
        best_s, best_z, best = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                torch.where(better, err, best))
    return best_s, best_z


def _refit_scale(w, s, qmax, iters=10):
    """Symmetric: alternate codes for s and the least-squares s for those codes."""
    lo = -qmax - (qmax == 7)  # int4 reaches -8

    def error(s):
        return ((w / s).round().clamp(lo, qmax).mul(s).sub(w)).square().sum(-1, keepdim=True)

    s = s.clamp(min=_MIN_SCALE)
    best_s, best = s, error(s)
    for _ in range(iters):
        q = (w / best_s).round().clamp(lo, qmax)
        qq = q.square().sum(-1, keepdim=True)
        s = _f16(torch.where(qq > 0, (q * w).sum(-1, keepdim=True) / qq.clamp(min=1), best_s).clamp(min=_MIN_SCALE))
        err = error(s)
        better = err < best
        if not better.any():
            break
        best_s, best = torch.where(better, s, best_s), torch.where(better, err, best)
    return best_s


def dequantize(qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    """The float weight a QuantizedTensor stands for: the reference every kernel must match."""
    return qt.dequantize(dtype)


__all__ = ["QuantizedTensor", "quantize", "dequantize", "pack_int4", "unpack_int4", "check_format",
           "packed_shapes", "packed_bytes", "BITS", "GROUP_SIZES", "METHODS"]
