"""torch's own CUDA int4 matmul (tinygemm, aten._weight_int4pack_mm): a second backend for int4
weights, taken for a shape where it measures faster than qlite's kernels (kernels/ops.py
decides, once per GPU, triton version and shape; kernels/autotune.py keeps the record).

Its layout is not qlite's (quant/formats.py), so a weight that takes it is repacked, once, into
a second copy beside the original (the original still serves the other row counts and devices):
  codes   aten._convert_weight_to_int4pack takes uint8 [N, K / 2] with the EVEN k in the HIGH
          nibble (qlite keeps it in the low one: the bytes are nibble-swapped) and returns its
          tensor-core tiling, int32 [N / 8, K / (16 t), 32, t / 2] for t = 8, 4 or 2 k-tiles;
          as many bytes as qweight;
  scales  one bfloat16 tensor [K / G, N, 2] of (scale, offset), w = (q - 8) * scale + offset,
          so offset = (8 - zero) * scale (0 for symmetric int4): 4 bytes per group and row.
Scale and offset are rounded to bfloat16 (qlite keeps float16 scales and zeros: a relative error
up to 2^-9 of each, about 1/64 of a quantization step at the extreme codes). torch requires
bfloat16 activations, N % 8 == 0, K % 32 == 0 and G in 32..256; elsewhere qlite's kernels run.
"""
import torch

GROUPS = (32, 64, 128, 256)


def supports(x: torch.Tensor, n: int, k: int, bits: int, group_size: int) -> bool:
    return (bits == 4 and x.is_cuda and x.dtype == torch.bfloat16 and group_size in GROUPS
            and n % 8 == 0 and k % 32 == 0)


def inner_k_tiles(k: int) -> int:
    """k-tiles of 16 packed side by side per int32 group: 8 (16-byte loads) where K allows."""
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2


def swap_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """qlite's uint8 [N, K / 2] (even k low) -> the same codes with the even k high."""
    return (qweight << 4) | (qweight >> 4)


def scales_and_offsets(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """qlite's scales and zeros [K / G, N] -> torch's bfloat16 [K / G, N, 2] of (scale, offset)."""
    s = scales.float()
    offset = torch.zeros_like(s) if zeros is None else (8 - zeros.float()) * s
    return torch.stack([s, offset], dim=-1).to(torch.bfloat16).contiguous()


def pack(qweight, scales, zeros):
    """A qlite int4 weight on CUDA -> (codes, scales_and_offsets) for matmul."""
    k = qweight.shape[1] * 2
    codes = torch.ops.aten._convert_weight_to_int4pack(swap_nibbles(qweight).contiguous(), inner_k_tiles(k))
    return codes, scales_and_offsets(scales, zeros)


def matmul(x: torch.Tensor, packed, group_size: int) -> torch.Tensor:
    """x [M, K] bfloat16 (contiguous) @ W.T -> [M, N] bfloat16."""
    return torch.ops.aten._weight_int4pack_mm(x, packed[0], group_size, packed[1])
