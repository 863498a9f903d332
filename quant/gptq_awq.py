"""GPTQ and AWQ weight layouts <-> qlite's (quant/formats.py): pure tensor functions.

GPTQ ("gptq" v1, as vLLM, SGLang and transformers+gptqmodel read it), a linear W [N, K]:
    qweight  int32  [K / 8, N]      packed along K: nibble j (LSB first) of word [r, n] is k = 8r + j
    qzeros   int32  [K / G, N / 8]  packed along N: nibble j of word [g, c] is n = 8c + j; v1
                                    stores zero - 1 (0x77777777 for symmetric 4-bit)
    scales   fp16   [K / G, N]
    g_idx    int32  [K]             k // G (no act-order)
    w[n, k] = (q[k, n] - z[g, n]) * s[g, n]
"""
from __future__ import annotations

import torch

from qlite.errors import QliteError

from .formats import unpack_int4


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
