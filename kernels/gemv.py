"""Decode kernel: out[M, N] = x[M, K] @ W.T for M <= 16, W int4 or int8.

Each program owns BLOCK_N output channels and one of SPLIT_K slices of K, streams its weight
rows once and serves all M rows with them. Decode is bound by weight bytes, so the tile is
wide along K (whole 16-byte loads per thread) and split-K keeps the GPU full when N is small.
M <= 4 multiplies on CUDA cores (a broadcast product and a row sum); M up to 16 uses tl.dot,
where CUDA cores would turn compute-bound.
"""
import torch
import triton
import triton.language as tl

from .autotune import dot_f32, pick
from .dequant import dot_acc, load_weight_tile


@triton.jit
def qgemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K,
                             BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K)
        if USE_DOT:
            w = w.to(x.dtype)
            acc = dot_acc(x, w, acc, DOT_F32)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # SPLIT_K > 1 writes float32 partial sums, one [M, N] slab per slice.
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# (BLOCK_N, BLOCK_K, num_warps). On CUDA cores a thread holds BLOCK_M * BLOCK_N * BLOCK_K /
# (32 * num_warps) products; tiles keeping that <= 32 stay near 128 registers on sm_90.
_TILES = [(16, 256, 4), (32, 128, 4), (8, 512, 4), (32, 256, 8), (64, 128, 8), (16, 512, 8),
          (16, 128, 4), (8, 256, 4), (16, 256, 8), (8, 128, 4), (16, 128, 8), (8, 256, 8)]


def _configs(block_m, n, k, device):
    tiles = [t for t in _TILES if block_m == 16 or block_m * t[0] * t[1] <= 32 * 32 * t[2]]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    # Split K only while the grid is short of a few waves, and never into empty slices.
    return [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=w) for bn, bk, w in tiles
            for split in (1, 2, 4, 8)
            if split == 1 or (triton.cdiv(n, bn) * split <= 8 * sms and split <= triton.cdiv(k, bk))]


def qgemv(x, qweight, scales, zeros, bits: int, group_size: int, out=None, config=None):
    """x [M, K] (M <= 16, rows contiguous) -> [M, N] in x's dtype; accumulates in float32."""
    M, K = x.shape
    N = qweight.shape[0]
    assert M <= 16 and x.stride(1) == 1
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = triton.next_power_of_2(M) if M <= 4 else 16

    def run(c):
        split = c["SPLIT_K"]
        dst = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, c["BLOCK_N"]), split)
        qgemv_kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, dst,
                           M, N, K, x.stride(0), BITS=bits, GROUP=group_size if bits == 4 else 0,
                           HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=c["BLOCK_N"],
                           BLOCK_K=c["BLOCK_K"], SPLIT_K=split, USE_DOT=block_m == 16,
                           DOT_F32=dot_f32(x.dtype), num_warps=c["num_warps"])
        if split > 1:
            torch.sum(dst, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(dst.sum(0))

    configs = _configs(block_m, N, K, x.device)
    key = ("qgemv", block_m, N, K, bits, group_size, zeros is not None, x.dtype)
    run(config or pick(key, configs, run))  # config: force one (tests)
    return out

SIGNATURE = dict(x_ptr="*bf16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16",
                 M="i32", N="i32", K="i32", stride_xm="i32")


def sass_cases():
    """Constexprs of the configs bench/kernel_sass.py compiles (the first tiles of each M)."""
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, USE_DOT=bm == 16, DOT_F32=False, num_warps=w,
                 num_stages=3, weights_per_iter=bn * bk, divisible=("N", "K", "stride_xm"),
                 label=f"M{bm}-{bn}x{bk}") for bm in (1, 4, 16) for bn, bk, w in _TILES[:3]]
