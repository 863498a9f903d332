"""GPTQ and AWQ weight layouts <-> qlite's (quant/formats.py): pure tensor functions.

A linear layer W [N, K] (N outputs, K inputs) as the published checkpoints store it (int32
words, `bits` bits per code, codes LSB first, 32 / bits codes a word):

GPTQ (AutoGPTQ / GPTQModel, "gptq" v1 and "gptq_v2"):
    qweight  int32  [K * bits / 32, N]   packed along K: code j of word [r, n] is k = r * 32/bits + j
    qzeros   int32  [K / G, N * bits / 32]  packed along N: code j of word [g, c] is n = c * 32/bits + j
    scales   fp16   [K / G, N]
    g_idx    int32  [K]                  the group of each input feature (k // G unless act-order)
    w[n, k] = (q[k, n] - z[g, n]) * s[g, n],  g = g_idx[k];  z = stored + 1 in v1 (the zero point
    is stored minus one; the +1 is applied to each code, as AutoGPTQ's kernels do: a stored 15
    becomes 16, never a carry into the next code), z = stored in v2.
AWQ GEMM (AutoAWQ "gemm"):
    qweight  int32  [K, N / 8]           packed along N, code i of word [k, c] is n = 8c + ORDER[i]
    qzeros   int32  [K / G, N / 8]       the same interleaving
    scales   fp16   [K / G, N]
    w[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]

Both become qlite int4 [N, K // 2] with group-major fp16 scales/zeros, which is the same
arithmetic with the same numbers: the zero point is an integer (0..16) and float16 holds it
exactly, the scale is the checkpoint's own fp16. So the dequantized weight is equal bit for bit
in float32 (and in float16, which rounds the same exact product). Symmetric GPTQ (every zero
point 8) becomes qlite's symmetric int4 (implicit zero 8, no zeros tensor).

8-bit GPTQ has group-wise scales; qlite int8 is one scale per output channel, so `gptq_to_qlite`
dequantizes it and requantizes per channel (round to nearest): not exact, one extra rounding of
at most half an int8 step per weight (its cost is measured in BENCHMARKS.md).

Act-order (`desc_act`) checkpoints whose g_idx is not k // G would need the input features
permuted at run time; they are refused with one line (QliteError), never misread.

The other way, `qlite_to_gptq` (for `qlite export`): qlite symmetric int4 -> GPTQ v1 with the
same codes and scales (zero point 8), as vLLM, SGLang and transformers+gptqmodel read it.
"""
from __future__ import annotations

import torch

from qlite.errors import QliteError

from .formats import QuantizedTensor, check_format, pack_int4, quantize, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # code i of an AWQ word holds column 8c + AWQ_ORDER[i]
GPTQ_BITS = (4, 8)


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 codes [R * 32 / bits, C]: word [r, c] holds rows r*(32/bits) + j."""
    per = 32 // bits
    codes = (packed.unsqueeze(1) >> _shifts(bits, packed.device).view(1, per, 1)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 [R, C] -> int32 codes [R, C * 32 / bits]: word [r, c] holds columns c*(32/bits) +
    order[j] in its code j (order = identity for GPTQ, AWQ_ORDER for AWQ)."""
    per = 32 // bits
    codes = (packed.unsqueeze(2) >> _shifts(bits, packed.device).view(1, 1, per)) & ((1 << bits) - 1)
    if order is not None:  # code j is column order[j]: put it there
        codes = codes[..., torch.argsort(torch.tensor(order))]
    return codes.reshape(packed.shape[0], packed.shape[1] * per)


def _expect(t: torch.Tensor | None, shape, dtype, name: str, field: str):
    if t is None:
        raise QliteError(f"{name}: the checkpoint has no {field}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise QliteError(f"{name}.{field}: {t.dtype} {list(t.shape)}, expected "
                         f"{str(dtype).removeprefix('torch.')} {list(shape)}")


def check_g_idx(g_idx: torch.Tensor | None, k: int, group_size: int, name: str):
    """A g_idx is fine when it is the plain k // G (desc_act false, or act-order with static
    groups); anything else is an act-order permutation we do not apply."""
    if g_idx is None:
        return
    if g_idx.numel() != k:
        raise QliteError(f"{name}.g_idx: {g_idx.numel()} entries, expected {k}")
    plain = torch.arange(k, device=g_idx.device) // group_size
    if not torch.equal(g_idx.to(plain.dtype), plain):
        raise QliteError(f"{name}.g_idx: act-order (desc_act) group order is not supported; "
                         f"use a checkpoint quantized with desc_act false or static_groups true")


def gptq_codes(qweight, qzeros, scales, g_idx, bits: int, group_size: int, v1: bool = True,
               name: str = "weight"):
    """The checkpoint's own numbers: codes int32 [K, N], zero points int32 [K / G, N] (the +1
    of v1 applied), scales fp16 [K / G, N]."""
    if bits not in GPTQ_BITS:
        raise QliteError(f"{name}: GPTQ bits={bits} is not supported (4 or 8)")
    per = 32 // bits
    if qweight is None:
        raise QliteError(f"{name}: the checkpoint has no qweight")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    if k % group_size:
        raise QliteError(f"{name}: group_size {group_size} does not divide in_features {k}")
    _expect(qweight, (k // per, n), torch.int32, name, "qweight")
    _expect(qzeros, (k // group_size, -(-n // per)), torch.int32, name, "qzeros")
    _expect(scales, (k // group_size, n), torch.float16, name, "scales")
    check_g_idx(g_idx, k, group_size, name)
    codes = unpack_along_rows(qweight, bits)
    zeros = unpack_along_cols(qzeros, bits)[:, :n] + int(v1)
    return codes, zeros, scales


def awq_codes(qweight, qzeros, scales, group_size: int, name: str = "weight"):
    """codes int32 [K, N], zero points int32 [K / G, N], scales fp16 [K / G, N] of an AWQ GEMM
    4-bit weight."""
    if qweight is None:
        raise QliteError(f"{name}: the checkpoint has no qweight")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise QliteError(f"{name}: group_size {group_size} does not divide in_features {k}")
    _expect(qweight, (k, n // 8), torch.int32, name, "qweight")
    _expect(qzeros, (k // group_size, n // 8), torch.int32, name, "qzeros")
    _expect(scales, (k // group_size, n), torch.float16, name, "scales")
    return (unpack_along_cols(qweight, 4, AWQ_ORDER), unpack_along_cols(qzeros, 4, AWQ_ORDER),
            scales)


def codes_to_qlite(codes, zeros, scales, bits: int, group_size: int, symmetric: bool,
                   name: str = "weight") -> QuantizedTensor:
    """A checkpoint's (codes [K, N], integer zero points [K / G, N], fp16 scales [K / G, N]) ->
    qlite's packed format. 4-bit: the same numbers, repacked (exact). `symmetric`: every zero
    point must be 8, and qlite's symmetric int4 (no zeros tensor) is returned. 8-bit: dequantized
    and requantized per output channel (round to nearest)."""
    k, n = codes.shape
    if bits == 8:
        return quantize(dequantize_codes(codes, zeros, scales, group_size).T, bits=8,
                        method="rtn", name=name)
    check_format(4, group_size, k, name)
    if symmetric:
        bad = (zeros != 8).nonzero()
        if len(bad):
            g, col = bad[0].tolist()
            raise QliteError(f"{name}.qzeros: zero point {zeros[g, col].item()} at group {g}, "
                             f"column {col}, but the checkpoint says sym=true (zero point 8)")
    return QuantizedTensor(qweight=pack_int4(codes.T.contiguous()), scales=scales.contiguous(),
                           zeros=None if symmetric else zeros.to(torch.float16).contiguous(),
                           bits=4, group_size=group_size)


def dequantize_codes(codes, zeros, scales, group_size: int) -> torch.Tensor:
    """float32 [K, N]: (q - z) * s, the checkpoint's own dequantization (the oracle)."""
    z = zeros.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return (codes - z).float() * s


def gptq_to_qlite(qweight, qzeros, scales, g_idx=None, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, v1: bool = True, name: str = "weight") -> QuantizedTensor:
    """One GPTQ linear -> qlite's format (exact for 4-bit; see the module docstring)."""
    codes, zeros, scales = gptq_codes(qweight, qzeros, scales, g_idx, bits, group_size, v1, name)
    return codes_to_qlite(codes, zeros, scales, bits, group_size, symmetric, name)


def awq_to_qlite(qweight, qzeros, scales, group_size: int = 128,
                 name: str = "weight") -> QuantizedTensor:
    """One AWQ GEMM linear -> qlite's asymmetric int4 (exact)."""
    codes, zeros, scales = awq_codes(qweight, qzeros, scales, group_size, name)
    return codes_to_qlite(codes, zeros, scales, 4, group_size, False, name)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def qlite_to_gptq(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  group_size: int, name: str = "weight") -> dict[str, torch.Tensor]:
    """qlite symmetric int4 (qweight uint8 [N, K // 2], scales fp16 [K // G, N]) -> GPTQ v1
    {qweight, qzeros, scales, g_idx}: the same codes, scales and zero point 8, so the
    dequantized weight is the same bit for bit. Asymmetric qlite int4 has float zero points
    that GPTQ's integer zeros cannot hold: refused."""
    if zeros is not None:
        raise QliteError(f"{name}: asymmetric int4 (float zero points) has no exact GPTQ form; "
                         f"quantize with symmetric=True")
    codes = unpack_int4(qweight).to(torch.int64)  # [N, K]
    n, k = codes.shape
    if k % 8 or n % 8 or k % group_size:
        raise QliteError(f"{name}: [{n}, {k}] does not pack into GPTQ words of 8 (group {group_size})")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (codes.T.reshape(k // 8, 8, n) << shifts.view(1, 8, 1)).sum(1)  # along K
    zero_word = sum(7 << s for s in range(0, 32, 4))  # v1: 8 - 1 in every nibble
    return {"qweight": _to_int32(packed),
            "qzeros": _to_int32(torch.full((k // group_size, n // 8), zero_word, dtype=torch.int64)),
            "scales": scales.to(torch.float16).contiguous(),
            "g_idx": torch.arange(k, dtype=torch.int32) // group_size}


__all__ = ["AWQ_ORDER", "GPTQ_BITS", "unpack_along_rows", "unpack_along_cols", "gptq_codes",
           "awq_codes", "codes_to_qlite", "dequantize_codes", "gptq_to_qlite", "awq_to_qlite",
           "check_g_idx", "qlite_to_gptq"]
