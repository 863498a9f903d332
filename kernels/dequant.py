"""The weight-tile loaders and the dot step shared by the matmul and MoE kernels (layouts:
qlite.quant.formats): load_weight_tile (float32, any format), load_weight_tile16 (int4 in the
activations' 16-bit type, without the zero point) with zero_point_share (the zero point's part
of the product)."""
import triton
import triton.language as tl

# An int4 word (k = 8c + i in nibble i) and the scale of its group as a 16-bit pair -> its 8
# weights (n - 8) * s as 16-bit pairs in k order. Each (w >> 4p) & 0x000F000F | magic holds
# 128 + n (1024 + n for float16) for k = 8c + p and 8c + p + 4 (the decode kernel's trick,
# kernels/gemv.py); one FMA takes off 136 (1032), exactly, one multiplies by the scale (one
# rounding), and PRMTs put the halves in k order.
_TILE_ASM = """{
.reg .b32 t, one, bias, nz, r0, r1, r2, r3;
mov.b32 one, %(one)s;
mov.b32 bias, %(bias)s;
mov.b32 nz, 0x80008000;
lop3.b32 r0, $4, 0x000F000F, %(magic)s, 0xEA;
shr.b32 t, $4, 4;
lop3.b32 r1, t, 0x000F000F, %(magic)s, 0xEA;
shr.b32 t, $4, 8;
lop3.b32 r2, t, 0x000F000F, %(magic)s, 0xEA;
shr.b32 t, $4, 12;
lop3.b32 r3, t, 0x000F000F, %(magic)s, 0xEA;
fma.rn.%(t)s r0, r0, one, bias;
fma.rn.%(t)s r1, r1, one, bias;
fma.rn.%(t)s r2, r2, one, bias;
fma.rn.%(t)s r3, r3, one, bias;
fma.rn.%(t)s r0, r0, $12, nz;
fma.rn.%(t)s r1, r1, $12, nz;
fma.rn.%(t)s r2, r2, $12, nz;
fma.rn.%(t)s r3, r3, $12, nz;
prmt.b32 $0, r0, r1, 0x5410;
prmt.b32 $1, r2, r3, 0x5410;
prmt.b32 $2, r0, r1, 0x7632;
prmt.b32 $3, r2, r3, 0x7632;
}"""
TILE_BF16 = tl.constexpr(_TILE_ASM % dict(t="bf16x2", magic="0x43004300", one="0x3F803F80", bias="0xC308C308"))
TILE_F16 = tl.constexpr(_TILE_ASM % dict(t="f16x2", magic="0x64006400", one="0x3C003C00", bias="0xE408E408"))


@triton.jit
def _nibbles(w):
    """int32 words [R, C] -> their nibbles [R, C * 8], nibble i of word c at 8c + i. A tree of
    joins keeps each word's 8 values in the thread that loaded it."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    even = tl.join(tl.join(w & 0xF, (w >> 16) & 0xF), tl.join((w >> 8) & 0xF, (w >> 24) & 0xF)).reshape(R, C * 4)
    odd = tl.join(tl.join((w >> 4) & 0xF, (w >> 20) & 0xF), tl.join((w >> 12) & 0xF, (w >> 28) & 0xF)).reshape(R, C * 4)
    return tl.join(even, odd).reshape(R, C * 8)


@triton.jit
def load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0 + BLOCK_K] as float32 [BLOCK_N, BLOCK_K]; zero outside N and K.

    int8 rows come back unscaled: their per-channel scale is applied once to the accumulator.
    int4 is dequantized here, in registers; BLOCK_K and GROUP are powers of two, so a tile
    holds whole groups (BLOCK_K >= GROUP) or lies inside one (BLOCK_K < GROUP).
    """
    n_ok = offs_n < N
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + offs_n[:, None] * K + offs_k[None, :],
                    mask=n_ok[:, None] & (offs_k < K)[None, :], other=0)
        return q.to(tl.float32)
    else:
        # Rows are K // 8 int32 words (K % 32 == 0: rows start 16-byte aligned); nibble i of
        # word c is k = 8c + i (formats.py).
        C: tl.constexpr = BLOCK_K // 8
        offs_c = k0 // 8 + tl.arange(0, C)
        kw = tl.multiple_of(K // 8, 4)
        qw32 = qw_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        wv = tl.load(qw32 + offs_n[:, None] * kw + offs_c[None, :],
                     mask=n_ok[:, None] & (offs_c < kw)[None, :], other=0)
        GPT: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP  # groups per tile
        offs_g = k0 // GROUP + tl.arange(0, GPT)
        sz_off = offs_g[None, :] * N + offs_n[:, None]
        sz_ok = n_ok[:, None] & (offs_g < K // GROUP)[None, :]
        # Scale 0 outside K makes the padded codes vanish.
        s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
        q = _nibbles(wv).reshape(BLOCK_N, GPT, BLOCK_K // GPT).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
            w = (q - z) * s
        else:
            w = (q - 8.0) * s
        return w.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _eight(t):
    """[R, C] -> [R, C * 8], each value repeated 8 times in the thread that holds it."""
    R: tl.constexpr = t.shape[0]
    C: tl.constexpr = t.shape[1]
    t = tl.join(t, t)
    t = tl.join(t, t)
    return tl.join(t, t).reshape(R, C * 8)


@triton.jit
def load_weight_tile16(qw_ptr, s_ptr, offs_n, k0, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, F16: tl.constexpr):
    """int4 W[offs_n, k0:k0 + BLOCK_K] without its zero point, (code - 8) * scale, in the
    activations' 16-bit type [BLOCK_N, BLOCK_K] (_TILE_ASM); zero outside N and K. The caller
    adds the zero point's share, sum_k x_k * s * (8 - zero), for asymmetric weights."""
    n_ok = offs_n < N
    C: tl.constexpr = BLOCK_K // 8
    offs_c = k0 // 8 + tl.arange(0, C)
    kw = tl.multiple_of(K // 8, 4)
    qw32 = qw_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    ok = n_ok[:, None] & (offs_c < kw)[None, :]
    wv = tl.load(qw32 + offs_n[:, None] * kw + offs_c[None, :], mask=ok, other=0)
    # each word's scale (a word lies in one group); 0 outside K makes the padded codes vanish
    s = tl.load(s_ptr + (offs_c // (GROUP // 8))[None, :] * N + offs_n[:, None], mask=ok, other=0.0)
    if F16:
        w = tl.inline_asm_elementwise(TILE_F16, "=r,=r,=r,=r" + ",r" * 12, [_eight(wv), _eight(s)],
                                      dtype=tl.float16, is_pure=True, pack=8)
    else:
        w = tl.inline_asm_elementwise(TILE_BF16, "=r,=r,=r,=r" + ",r" * 12, [_eight(wv), _eight(s.to(tl.bfloat16))],
                                      dtype=tl.bfloat16, is_pure=True, pack=8)
    return w


@triton.jit
def zero_point_share(x, s_ptr, z_ptr, offs_n, k0, N, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k x[m, k] * s[g, n] * (8 - z[g, n]) over this tile's k, [BLOCK_M, BLOCK_N] float32:
    what load_weight_tile16 leaves out of asymmetric weights (x is zero outside K)."""
    GPT: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP
    offs_g = k0 // GROUP + tl.arange(0, GPT)
    off = offs_g[:, None] * N + offs_n[None, :]
    ok = (offs_g < K // GROUP)[:, None] & (offs_n < N)[None, :]
    sz = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32) * \
        (8.0 - tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32))  # [GPT, BLOCK_N]
    xg = tl.sum(x.to(tl.float32).reshape(x.shape[0], GPT, BLOCK_K // GPT), axis=2)  # [BLOCK_M, GPT]
    return tl.sum(xg[:, :, None] * sz[None, :, :], axis=1)


@triton.jit
def dot_acc(a, w, acc, DOT_F32: tl.constexpr):
    """acc + a @ w.T. With DOT_F32 the operands go up to float32 and multiply as 3xTF32, a
    float32-accurate product on tensor cores (see autotune.dot_f32 for when)."""
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc
