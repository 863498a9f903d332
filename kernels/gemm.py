"""Prefill kernel: out[M, N] = x[M, K] @ W.T for any M, W int4 or int8.

A tiled GEMM: each program computes a BLOCK_M x BLOCK_N tile, dequantizing the weight tile in
registers and feeding tl.dot with float32 accumulation. Programs are ordered in groups of
GROUP_M row-tiles so that neighbouring programs share weight tiles in L2.
"""
import torch
import triton
import triton.language as tl

from .autotune import Plans, dot_f32
from .dequant import dot_acc, load_weight_tile


@triton.jit
def qgemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = pid // per_group * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K,
                             BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K).to(x.dtype)
        acc = dot_acc(x, w, acc, DOT_F32)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tiles that compile for sm_90 without
# register spills in every format (the dequantized tile lives in registers beside the
# accumulator), each thread's share of a weight tile a whole 16-byte load (int4: BLOCK_N *
# BLOCK_K >= 1024 * num_warps), shared memory under sm_89's 99 KiB (bench/kernel_sass.py).
# The first is taken under the interpreter and when nothing was tuned.
_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in (
    (64, 64, 64, 4, 3), (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4),
    (32, 128, 32, 4, 4), (64, 128, 32, 4, 3), (64, 128, 64, 8, 3), (64, 256, 32, 8, 3), (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3))]


_plans = Plans("qgemm")


def qgemm(x, qweight, scales, zeros, bits: int, group_size: int, out=None, config=None):
    """x [M, K] (rows contiguous) -> [M, N] in x's dtype; accumulates in float32.
    config: force one of _CONFIGS' form (tests); else the plan chosen once per shape bucket."""
    M, K = x.shape
    N = qweight.shape[0]
    assert x.stride(1) == 1
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    m_bucket = min(1 << (M - 1).bit_length(), 1024)
    c = config
    if c is None:
        key = (m_bucket, N, K, bits, group_size, zeros is None, x.dtype, x.device)
        c = _plans.get(key)
        if c is None:
            cands = [c for c in _CONFIGS if c["BLOCK_M"] <= max(16, m_bucket)]  # no taller than M needs
            c = _plans.put(key, cands, lambda c: _run(c, x, qweight, scales, zeros, bits, group_size, out))
    _run(c, x, qweight, scales, zeros, bits, group_size, out)
    return out


def _run(c, x, qweight, scales, zeros, bits, group_size, out):
    M, K = x.shape
    N = out.shape[1]
    grid = (-(-M // c["BLOCK_M"]) * -(-N // c["BLOCK_N"]),)
    qgemm_kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, out,
                       M, N, K, x.stride(0), out.stride(0), BITS=bits,
                       GROUP=group_size if bits == 4 else 0, HAS_ZEROS=zeros is not None,
                       BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=8,
                       DOT_F32=dot_f32(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])


SIGNATURE = dict(x_ptr="*bf16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16",
                 M="i32", N="i32", K="i32", stride_xm="i32", stride_om="i32")


def sass_cases():
    return [dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=8, DOT_F32=False,
                 num_warps=c["num_warps"], num_stages=c["num_stages"], weights_per_iter=c["BLOCK_N"] * c["BLOCK_K"],
                 divisible=("N", "K", "stride_xm", "stride_om"),
                 label=f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}") for c in (_CONFIGS[0], _CONFIGS[6])]
