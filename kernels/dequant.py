"""The weight-tile loader and the dot step shared by the matmul and MoE kernels (layouts:
qlite.quant.formats)."""
import triton
import triton.language as tl


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
def dot_acc(a, w, acc, DOT_F32: tl.constexpr):
    """acc + a @ w.T. With DOT_F32 the operands go up to float32 and multiply as 3xTF32, a
    float32-accurate product on tensor cores (see autotune.dot_f32 for when)."""
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc
