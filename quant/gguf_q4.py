"""GGUF 4-bit blocks (Q4_0, Q4_1, Q4_K) -> qlite int4 g32 without a second rounding of the codes.

Each of these types stores, per group of 32 consecutive inputs of a row, 4-bit codes q and an
affine map w = q * scale + offset:
    Q4_0  block of 32: d fp16, 16 bytes of codes; w = (q - 8) * d           (scale d, offset -8d)
    Q4_1  block of 32: d, m fp16, 16 bytes;        w = q * d + m
    Q4_K  super-block of 256: d, dmin fp16, 12 bytes of 6-bit (sc, mn) for its 8 groups of 32,
          128 bytes of codes;                      w = q * (d * sc) - dmin * mn
In every block the byte j of a 32-code run holds code j in its low nibble and code j + 16 (Q4_0,
Q4_1) / j + 32 of the next run (Q4_K: 64 codes per 32 bytes) in its high nibble.

qlite int4 stores w = (q - zero) * scale with fp16 scale and zero (quant/formats.py), so
scale = the block's scale and zero = -offset / scale. What fp16 storage changes:
    Q4_0: nothing: scale = d is already fp16, zero = 8. Exact, bit for bit.
    Q4_1, Q4_K: zero (and, for Q4_K, d * sc, which needs up to 17 significant bits) are rounded
          to fp16: a relative error of at most 2^-11 on each, so per weight
          |w_qlite - w_gguf| <= 2^-11 * (|w| + |offset|) (+ float32 rounding), a few 1e-4 of the
          group's range -- far below the 4-bit step (1/15 of the range) a requantization adds.
A group with a zero scale but a nonzero offset o (constant weights) gets codes 0, zero point
-8 sign(o) and scale |o| / 8 (the same bound). A zero point beyond fp16's range has no such
map: `gguf_q4_to_qlite` returns None and the caller requantizes the tensor.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import QuantizedTensor, pack_int4

GROUP = 32
TYPES = ("Q4_0", "Q4_1", "Q4_K")  # gguf.GGMLQuantizationType names
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
_BLOCK_ELEMS = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 256}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float64)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def gguf_q4_affine(blocks: np.ndarray, type_name: str, k: int):
    """Rows of GGUF blocks [N, K / elems * bytes] (uint8) -> codes uint8 [N, K], and per group
    of 32 the float64 scale and offset [N, K / 32] with w = q * scale + offset exactly."""
    n = blocks.shape[0]
    b = blocks.reshape(n, k // _BLOCK_ELEMS[type_name], _BLOCK_BYTES[type_name])
    if type_name == "Q4_0":
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:18]).reshape(n, k), d, -8.0 * d
    if type_name == "Q4_1":
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return _nibbles(b[..., 4:20]).reshape(n, k), d, m
    if type_name != "Q4_K":
        raise ValueError(type_name)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    s = b[..., 4:16].astype(np.int64)  # [N, S, 12]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    qs = b[..., 16:144].reshape(n, -1, 4, 32)  # 4 runs of 32 bytes = 64 codes each
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [N, S, 4, 64]: groups 2r, 2r + 1
    return codes.reshape(n, k), (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)


def gguf_q4_to_qlite(blocks: np.ndarray, type_name: str, k: int,
                     symmetric: bool) -> QuantizedTensor | None:
    """A GGUF 4-bit tensor's rows -> qlite int4 g32 with the same codes (see the module
    docstring for what changes), or None where no such map exists: Q4_1 / Q4_K into a
    symmetric format, or a zero point fp16 cannot hold."""
    if type_name not in TYPES or (symmetric and type_name != "Q4_0"):
        return None
    codes, scale, offset = gguf_q4_affine(blocks, type_name, k)
    # A constant group (scale 0, offset o): codes 0 and zero point -8 sign(o) with scale |o| / 8.
    const = (scale == 0) & (offset != 0)
    if const.any():
        codes = codes.reshape(*scale.shape, GROUP)
        codes[const] = 0
        codes = codes.reshape(-1, k)
        scale = np.where(const, np.abs(offset) / 8, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale != 0, -offset / scale, 0.0)
    if np.any(np.abs(zero) > 65504) or np.any(np.abs(scale) > 65504):
        return None
    scales = torch.from_numpy(scale.T.astype(np.float16).copy())
    zeros = None if symmetric else torch.from_numpy(zero.T.astype(np.float16).copy())
    return QuantizedTensor(pack_int4(torch.from_numpy(np.ascontiguousarray(codes))), scales, zeros,
                           4, GROUP)
