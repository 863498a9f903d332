"""Decode kernel: out[M, N] = x[M, K] @ W.T for M <= 16, W int4 or int8, bound by weight bytes.

M <= 4 (CUDA cores). Each program owns BLOCK_N output channels and one slice of K. A thread
loads 16 bytes of a weight row at a time (4 int32 words, 32 int4 or 16 int8 weights), keeps a
float32 accumulator per word in registers and reduces across threads once, after the loop.
int4 with 16-bit activations runs the per-word arithmetic in 16-bit pairs (one inline-PTX
block, `_dot8`): a word w holds k = 8c + i in nibble i (formats.py), so
    (w >> 4p) & 0x000F000F | 0x43004300   (bf16; 0x64006400 for fp16)
gives the two 16-bit floats 128 + n for k = 8c + p and 8c + p + 4 in one LOP3 (the
magic-number trick of Marlin and GemLite); subtracting 136 (1032) leaves n - 8 exactly, and
four packed FMAs against the activation pairs (x[8c + p], x[8c + p + 4]) (PRMTs, shared by
every row of a thread) give the word's partial sum, converted to float32 once. The group's
scale multiplies that once per word, and the zero point is folded in through the sum of the
activations: sum_k (n_k - z) s x_k = s sum_k (n_k - 8) x_k + s (8 - z) sum_k x_k. The only
rounding beyond a float32 dot is the 16-bit pair sums of four products each.
float32 activations (and the interpreter, which runs no PTX) take the same path in float32.
int8: bytes become floats through 0x4B000000 | (q ^ 0x80) (2^23 + q + 128), one FADD away
from q; the per-channel scale is applied once, at the end.

M in 5..16 multiplies on tensor cores (tl.dot), the weight tile dequantized in registers; int4
with 16-bit activations from M = 3 (compiled; the interpreter keeps the float32 tile), by
kernels/dequant.py's load_weight_tile16: the same LOP3 trick gives 16-bit pairs, scaled in 16 bits,
W's rows the MMA's M dimension (out.T = W @ x.T: 64-row tiles take Hopper's wgmma), the zero
point folded in through per-group sums of x in float32 (zero_point_share).

Split-K (SPLIT_K > 1): each program writes its float32 partial sums to a workspace and bumps
a per-tile counter; the program that arrives last sums the partials and writes the output,
and resets the counter to 0 for the next call: one launch, nothing to zero beforehand.
"""
import torch
import triton
import triton.language as tl

from .autotune import Plans, dot_f32, interpreting
from .dequant import dot_acc, load_weight_tile, load_weight_tile16, zero_point_share

_BF16_PAIRS = """{
.reg .b32 a0, a1, a2, a3, s, one;
mov.b64 {a0, a1}, $5;
mov.b64 {a2, a3}, $6;
prmt.b32 $0, a0, a2, 0x5410;
prmt.b32 $1, a0, a2, 0x7632;
prmt.b32 $2, a1, a3, 0x5410;
prmt.b32 $3, a1, a3, 0x7632;
mov.b32 one, %(one)s;
fma.rn.%(t)s s, $0, one, $1;
fma.rn.%(t)s s, s, one, $2;
fma.rn.%(t)s s, s, one, $3;
%(cvt)s
}"""
_CVT = {  # 16-bit pair SRC -> float32 DST = lo + hi
    "bf16x2": "{ .reg .b32 lo, hi; shl.b32 lo, SRC, 16; and.b32 hi, SRC, 0xFFFF0000; add.f32 DST, lo, hi; }",
    "f16x2": "{ .reg .b16 l16, h16; .reg .f32 lo, hi; mov.b32 {l16, h16}, SRC; cvt.f32.f16 lo, l16; "
             "cvt.f32.f16 hi, h16; add.f32 DST, lo, hi; }",
}
_DOT8 = """{
.reg .b32 h, d, acc, t, one, bias, zero;
mov.b32 one, %(one)s;
mov.b32 bias, %(bias)s;
mov.b32 zero, 0;
lop3.b32 h, $1, 0x000F000F, %(magic)s, 0xEA;
fma.rn.%(t)s d, h, one, bias;
fma.rn.%(t)s acc, d, $2, zero;
shr.b32 t, $1, 4;
lop3.b32 h, t, 0x000F000F, %(magic)s, 0xEA;
fma.rn.%(t)s d, h, one, bias;
fma.rn.%(t)s acc, d, $3, acc;
shr.b32 t, $1, 8;
lop3.b32 h, t, 0x000F000F, %(magic)s, 0xEA;
fma.rn.%(t)s d, h, one, bias;
fma.rn.%(t)s acc, d, $4, acc;
shr.b32 t, $1, 12;
lop3.b32 h, t, 0x000F000F, %(magic)s, 0xEA;
fma.rn.%(t)s d, h, one, bias;
fma.rn.%(t)s acc, d, $5, acc;
%(cvt)s
}"""
# (magic 128 or 1024 as a pair, 1.0 pair, -(magic + 8) pair)
_CONST = {"bf16x2": ("0x43004300", "0x3F803F80", "0xC308C308"),
          "f16x2": ("0x64006400", "0x3C003C00", "0xE408E408")}


def _asm(t):
    magic, one, bias = _CONST[t]
    pairs = _BF16_PAIRS % dict(t=t, one=one, cvt=_CVT[t].replace("SRC", "s").replace("DST", "$4"))
    dot = _DOT8 % dict(t=t, magic=magic, one=one, bias=bias, cvt=_CVT[t].replace("SRC", "acc").replace("DST", "$0"))
    return pairs, dot


_PAIRS_BF16, _DOT8_BF16 = (tl.constexpr(a) for a in _asm("bf16x2"))
_PAIRS_F16, _DOT8_F16 = (tl.constexpr(a) for a in _asm("f16x2"))


@triton.jit
def _pairs(xa, xb, F16: tl.constexpr):
    """Activation words of one weight word (xa: k = 8c..8c+3, xb: 8c+4..8c+7, int64) -> the
    pairs (x[8c+p], x[8c+p+4]) for p = 0..3 as int32, and the sum of the eight as float32."""
    if F16:
        return tl.inline_asm_elementwise(_PAIRS_F16, "=r,=r,=r,=r,=f,l,l", [xa, xb],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32),
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_PAIRS_BF16, "=r,=r,=r,=r,=f,l,l", [xa, xb],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32),
                                     is_pure=True, pack=1)


@triton.jit
def _dot8(w, p0, p1, p2, p3, F16: tl.constexpr):
    """sum over the 8 nibbles of w of (n - 8) * x, in 16-bit pairs, as float32."""
    if F16:
        return tl.inline_asm_elementwise(_DOT8_F16, "=f,r,r,r,r,r", [w, p0, p1, p2, p3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_DOT8_BF16, "=f,r,r,r,r,r", [w, p0, p1, p2, p3],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_f16(ptrs, ASM: tl.constexpr):
    """float16 values at ptrs, as float32. With ASM, a plain ld.global per element: the
    values then stay in the layout of their consumers (tl.load would give them a coalesced
    layout of their own and a shared-memory round trip per iteration back to the tile's)."""
    if ASM:
        h = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs.to(tl.int64, bitcast=True)],
                                      dtype=tl.int16, is_pure=True, pack=1)
        return h.to(tl.float16, bitcast=True).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _to_f32(h, F16: tl.constexpr):
    """Low 16 bits of an int32 (a bf16 or fp16 bit pattern) -> float32."""
    if F16:
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (h << 16).to(tl.float32, bitcast=True)


@triton.jit
def _split_k_finish(out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, SPLIT_K: tl.constexpr):
    """After this program's partials are in the workspace: the last of a tile's SPLIT_K
    programs to arrive sums them into out and resets the tile's counter."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        total = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
        for s in range(SPLIT_K):
            total += tl.load(ws_ptr + s * M * N + tile, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=ok)
        tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K: tl.constexpr):
    """Store acc [BLOCK_M, BLOCK_N] (float32): to out, or with split-K through the workspace."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=ok)
        _split_k_finish(out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, SPLIT_K)


@triton.jit
def _row_out(res, m, out_ptr, ws_ptr, offs_n, M, N, pid_k, SPLIT_K: tl.constexpr):
    """Row m's result [BLOCK_N] to out, or to the workspace slab of slice pid_k."""
    ok = (offs_n < N) & (tl.full(offs_n.shape, m, tl.int32) < M)
    if SPLIT_K == 1:
        tl.store(out_ptr + m * N + offs_n, res.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, res, mask=ok)


@triton.jit
def _int4_step(acc, w, x_ptr, kw, offs_c, s, sz, PAIRS: tl.constexpr, F16: tl.constexpr,
               HAS_ZEROS: tl.constexpr):
    """acc [BLOCK_N, C] += the int4 words w [BLOCK_N, C] (k = 8 * (kw + c) + nibble) times one
    row of x, scaled by s [BLOCK_N, 1], with sz = s * (8 - zero) [BLOCK_N, 1]. Rows of x past M
    are never passed: the caller clamps them to row M - 1, whose results it does not store."""
    if PAIRS:
        x64 = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        xa = tl.load(x64 + 2 * (kw + offs_c))
        xb = tl.load(x64 + 2 * (kw + offs_c) + 1)
        p0, p1, p2, p3, xs = _pairs(xa, xb, F16)
        t = _dot8(w, p0[None, :], p1[None, :], p2[None, :], p3[None, :], F16)
    else:  # float32 arithmetic: float32 activations, and the interpreter
        t = tl.zeros(w.shape, dtype=tl.float32)
        xs = tl.zeros(offs_c.shape, dtype=tl.float32)
        for p in tl.static_range(4):
            xo = 8 * (kw + offs_c) + p
            x_lo = tl.load(x_ptr + xo).to(tl.float32)
            x_hi = tl.load(x_ptr + xo + 4).to(tl.float32)
            n_lo = ((w >> (4 * p)) & 0xF).to(tl.float32) - 8.0
            n_hi = ((w >> (4 * p + 16)) & 0xF).to(tl.float32) - 8.0
            t += n_lo * x_lo[None, :] + n_hi * x_hi[None, :]
            xs += x_lo + x_hi
    acc += t * s
    if HAS_ZEROS:
        acc += xs[None, :] * sz
    return acc


@triton.jit
def _int8_step(acc, w, x_ptr, kw, offs_c):
    """acc [BLOCK_N, C] += the int8 words w (k = 4 * (kw + c) + byte) times one row of x.
    A byte q becomes the float 2^23 + q + 128 (0x4B000000 | (q ^ 0x80)), less 2^23 + 128."""
    u = w ^ -2139062144  # 0x80808080
    for b in tl.static_range(4):
        q = (((u >> (8 * b)) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        xv = tl.load(x_ptr + 4 * (kw + offs_c) + b).to(tl.float32)
        acc += q * xv[None, :]
    return acc


@triton.jit
def qgemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, ITERS,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, PAIRS: tl.constexpr, F16: tl.constexpr):
    """CUDA-core decode, M <= BLOCK_M, BLOCK_M in (1, 2, 4), one accumulator per row of x.
    Program (pid_n, pid_k) covers rows pid_n * BLOCK_N + [0, BLOCK_N) and K tiles
    [pid_k * ITERS, (pid_k + 1) * ITERS). BLOCK_K divides K, and for int4 the group (a tile lies
    in one group): no masks along K, so weight loads stay whole 16-byte vectors. Every tensor
    is [BLOCK_N, C] or a broadcast slice of it, so the weights never change layout."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # rows past N re-read row N - 1: loads stay unmasked
    C: tl.constexpr = BLOCK_K // 8 if BITS == 4 else BLOCK_K // 4  # int32 words per row per tile
    offs_c = tl.arange(0, C)
    qw32 = qw_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    kw_row = K // 8 if BITS == 4 else K // 4  # words per row
    w_rows = tl.multiple_of(rows * kw_row, 4)  # rows start 16-byte aligned (K % 32 or 64 == 0)
    it_lo = pid_k * ITERS
    it_hi = tl.minimum(it_lo + ITERS, K // BLOCK_K)
    acc0 = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        kw = it * C
        w = tl.load(qw32 + w_rows[:, None] + (kw + offs_c)[None, :])
        if BITS == 4:
            g = kw // (GROUP // 8)
            s = _load_f16(s_ptr + g * N + rows, PAIRS)[:, None]
            sz = s
            if HAS_ZEROS:
                sz = s * (8.0 - _load_f16(z_ptr + g * N + rows, PAIRS)[:, None])
            acc0 = _int4_step(acc0, w, x_ptr, kw, offs_c, s, sz, PAIRS, F16, HAS_ZEROS)
            if BLOCK_M > 1:
                acc1 = _int4_step(acc1, w, x_ptr + tl.minimum(1, M - 1) * stride_xm, kw, offs_c, s, sz,
                                  PAIRS, F16, HAS_ZEROS)
            if BLOCK_M > 2:
                acc2 = _int4_step(acc2, w, x_ptr + tl.minimum(2, M - 1) * stride_xm, kw, offs_c, s, sz,
                                  PAIRS, F16, HAS_ZEROS)
                acc3 = _int4_step(acc3, w, x_ptr + tl.minimum(3, M - 1) * stride_xm, kw, offs_c, s, sz,
                                  PAIRS, F16, HAS_ZEROS)
        else:
            acc0 = _int8_step(acc0, w, x_ptr, kw, offs_c)
            if BLOCK_M > 1:
                acc1 = _int8_step(acc1, w, x_ptr + tl.minimum(1, M - 1) * stride_xm, kw, offs_c)
            if BLOCK_M > 2:
                acc2 = _int8_step(acc2, w, x_ptr + tl.minimum(2, M - 1) * stride_xm, kw, offs_c)
                acc3 = _int8_step(acc3, w, x_ptr + tl.minimum(3, M - 1) * stride_xm, kw, offs_c)
    scale = tl.load(s_ptr + rows).to(tl.float32) if BITS == 8 else 1.0  # int8: per channel, once
    # The one cross-thread reduction of each row, then out (or the split-K workspace).
    _row_out(tl.sum(acc0, axis=1) * scale, 0, out_ptr, ws_ptr, offs_n, M, N, pid_k, SPLIT_K)
    if BLOCK_M > 1:
        _row_out(tl.sum(acc1, axis=1) * scale, 1, out_ptr, ws_ptr, offs_n, M, N, pid_k, SPLIT_K)
    if BLOCK_M > 2:
        _row_out(tl.sum(acc2, axis=1) * scale, 2, out_ptr, ws_ptr, offs_n, M, N, pid_k, SPLIT_K)
        _row_out(tl.sum(acc3, axis=1) * scale, 3, out_ptr, ws_ptr, offs_n, M, N, pid_k, SPLIT_K)
    if SPLIT_K > 1:
        _split_k_finish(out_ptr, ws_ptr, cnt_ptr, tl.arange(0, BLOCK_M), offs_n, M, N, pid_n, SPLIT_K)


@triton.jit
def qgemv_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, ITERS,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr, TILE16: tl.constexpr = False,
                     F16: tl.constexpr = False):
    """Tensor-core decode for the rows qgemv_kernel does not take (BLOCK_M = 16): weight tiles
    dequantized in registers, float32 accumulation, the same split-K finish. TILE16 (int4, F16 or
    bfloat16 activations): load_weight_tile16 and out.T = W @ x.T (see the module docstring)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    it_lo = pid_k * ITERS
    it_hi = tl.minimum(it_lo + ITERS, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    accT = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        k0 = it * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        if BITS == 4 and TILE16:  # W's rows as the MMA's M dimension (accT = W @ x.T): rows of x are few
            w = load_weight_tile16(qw_ptr, s_ptr, offs_n, k0, N, K, GROUP, BLOCK_N, BLOCK_K, F16)
            accT = tl.dot(w, tl.trans(x), accT)
            if HAS_ZEROS:
                acc += zero_point_share(x, s_ptr, z_ptr, offs_n, k0, N, K, GROUP, BLOCK_K)
        else:
            w = load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K,
                                 BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K).to(x.dtype)
            acc = dot_acc(x, w, acc, DOT_F32)
    if BITS == 4 and TILE16:
        acc += tl.trans(accT)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


# ---- launcher -----------------------------------------------------------------------------------

CUDA_CORE_MAX_M = 4  # above: tensor cores
TILE16_CUDA_CORE_MAX_M = 2  # int4 with 16-bit activations: from 3 rows the tensor-core tile is cheaper


def _cdiv(a, b):
    return -(-a // b)


def _int8_block_k(bits, k):
    """int8 on CUDA cores takes whole tiles of K; 0 if no tile size divides K (-> tl.dot)."""
    return next((b for b in (256, 128, 64) if k % b == 0), 0) if bits == 8 else 1


def _cuda_cores(m, k, bits, tile16):
    """Whether m rows take the CUDA-core kernel (else tensor cores). tile16: int4 weights with
    16-bit activations, compiled (kernels/dequant.py's load_weight_tile16)."""
    return m <= (TILE16_CUDA_CORE_MAX_M if tile16 else CUDA_CORE_MAX_M) and _int8_block_k(bits, k) > 0


def configs(m, n, k, bits, group_size, sms, tile16=False):
    """The short whitelist for one shape, best guess first: (BLOCK_N, BLOCK_K, num_warps) with a
    split of K that brings the grid to about two waves of the SMs."""
    if _cuda_cores(m, k, bits, tile16):
        bk = min(group_size, 128) if bits == 4 else _int8_block_k(bits, k)  # int4: one group a tile
        # A 4-warp program covers `cover` rows with one 16-byte word quad per thread; each
        # thread then holds r rows (r x 16 bytes in flight, the activations shared by the r).
        cover = 512 * (8 if bits == 4 else 4) // bk
        tiles = [(r * cover, bk, 4) for r in (4, 2, 1)]
    elif tile16:  # W's rows are the MMA's M dimension: 64 or more for Hopper's wgmma
        tiles = [(128, 64, 4), (64, 128, 4), (64, 64, 4)]
    else:
        tiles = [(32, 128, 4), (64, 64, 4), (16, 256, 4)]
    out = []
    for bn, bk, warps in tiles:
        k_tiles = _cdiv(k, bk)
        split = max(1, min(k_tiles, 16, (2 * sms) // max(1, _cdiv(n, bn))))
        iters = _cdiv(k_tiles, split)
        out.append(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=_cdiv(k_tiles, iters), num_warps=warps))
    return out


_plans = Plans("qgemv")
# device -> (float32 workspace, int32 counters kept at zero by the kernels). Allocated (and grown)
# on a split-K call's first use: run each shape once before capturing a CUDA graph, as a warm-up
# does, so the graph does not capture their allocation and zero-fill.
_scratch: dict = {}


def _workspace(device, floats, tiles):
    ws, cnt = _scratch.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _scratch[device] = (ws, cnt)
    return ws, cnt


def qgemv(x, qweight, scales, zeros, bits: int, group_size: int, out=None, config=None):
    """x [M, K] (M <= 16, rows contiguous) -> [M, N] in x's dtype; accumulates in float32.
    config: force one (dict of BLOCK_N, BLOCK_K, SPLIT_K, num_warps), as tests do."""
    M, K = x.shape
    N = qweight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    key = (M, N, K, bits, group_size, zeros is None, x.dtype, x.device)
    plan = None if config is not None else _plans.get(key)
    if plan is None:
        plans = _plan(x, qweight, N, K, bits, group_size, zeros, config)
        plan = plans[0] if config is not None else \
            _plans.put(key, plans, lambda p: _launch(p, x, qweight, scales, zeros, out))
    _launch(plan, x, qweight, scales, zeros, out)
    return out


def _plan(x, qweight, N, K, bits, group_size, zeros, config):
    """Everything of a launch but the tensors: (kernel, grid, scratch sizes, kwargs), per config."""
    M = x.shape[0]
    assert M <= 16 and x.stride(1) == 1, "qgemv: rows of x must be contiguous"
    tile16 = bits == 4 and x.dtype != torch.float32 and not interpreting()
    cuda_cores = _cuda_cores(M, K, bits, tile16)
    assert not cuda_cores or M == 1 or x.stride(0) % 4 == 0, "qgemv: rows of x must start 8-byte aligned"
    group = group_size if bits == 4 else 0
    sms = _sms(x.device)
    cands = [config] if config is not None else configs(M, N, K, bits, group_size, sms, tile16)
    plans = []
    for c in cands:
        bn, bk, split = c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"]
        k_tiles = _cdiv(K, bk)
        iters = _cdiv(k_tiles, split)
        split = _cdiv(k_tiles, iters)  # no empty slices
        grid = (_cdiv(N, bn), split)
        kw = dict(BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                  num_warps=c["num_warps"])
        if cuda_cores:
            assert bits == 8 or group_size % bk == 0, "qgemv: BLOCK_K must divide the group"
            kw.update(BLOCK_M=1 if M == 1 else 2 if M == 2 else 4,
                      PAIRS=x.dtype != torch.float32 and not interpreting(), F16=x.dtype == torch.float16)
            kernel = qgemv_kernel
        else:
            # No software pipelining: with it the weight tile goes through cp.async 8 bytes at a
            # time; without, through 16-byte loads (bench/kernel_sass.py), and occupancy hides latency.
            kw.update(BLOCK_M=16, DOT_F32=dot_f32(x.dtype), num_stages=1, F16=x.dtype == torch.float16,
                      TILE16=tile16)
            kernel = qgemv_dot_kernel
        stride = x.stride(0) if M > 1 else K
        plans.append((kernel, grid, split * M * N if split > 1 else 0, grid[0], iters, stride, kw))
    return plans


def _launch(plan, x, qweight, scales, zeros, out):
    kernel, grid, ws_floats, tiles, iters, stride, kw = plan
    M, K = x.shape
    N = out.shape[1]
    ws, cnt = _workspace(x.device, ws_floats, tiles) if ws_floats else (out, out)
    kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, out, ws, cnt,
                 M, N, K, stride, iters, **kw)


_sm_count: dict = {}


def _sms(device):
    n = _sm_count.get(device)
    if n is None:
        n = _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 8
    return n


# ---- what bench/kernel_sass.py compiles -----------------------------------------------------------

SIGNATURE = dict(x_ptr="*bf16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16", ws_ptr="*fp32",
                 cnt_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", ITERS="i32")


def sass_cases(bits, group_size):
    """Constexprs of the configs bench/kernel_sass.py compiles: the whitelist's first tiles at
    M = 1, 2, 4, 16 for a 3584 x 3584 shape on 132 SMs, 16-bit activations (TILE16: the caller
    turns it off for float32)."""
    out = []
    tile16 = bits == 4
    for m in (1, 2, 4, 16):
        for c in configs(m, 3584, 3584, bits, group_size or 128, 132, tile16)[:3]:
            base = dict(BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], SPLIT_K=c["SPLIT_K"], num_warps=c["num_warps"],
                        num_stages=3, divisible=("N", "K", "stride_xm"),
                        label=f"M{m}-{c['BLOCK_N']}x{c['BLOCK_K']}s{c['SPLIT_K']}")
            if _cuda_cores(m, 3584, bits, tile16):
                out.append(dict(base, kernel="qgemv_kernel", BLOCK_M=m, PAIRS=True, F16=False))
            else:
                out.append(dict(base, kernel="qgemv_dot_kernel", BLOCK_M=16, DOT_F32=False, num_stages=1,
                                TILE16=tile16, F16=False))
    return out
