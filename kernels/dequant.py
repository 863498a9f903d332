"""The weight-tile loader and the dot step shared by the matmul and MoE kernels (layouts:
qlite.quant.formats)."""
import triton
import triton.language as tl


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
        # Rows are K // 2 bytes; a thread's 16 contiguous bytes hold 32 consecutive k.
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        # K % 32 == 0: rows start 16-byte aligned and the K mask is constant over 16 bytes.
        kb = tl.multiple_of(K // 2, 16)
        b = tl.load(qw_ptr + offs_n[:, None] * kb + offs_b[None, :],
                    mask=n_ok[:, None] & (offs_b < kb)[None, :], other=0)
        q = tl.join(b & 0xF, b >> 4).reshape(BLOCK_N, BLOCK_K).to(tl.float32)  # even k low nibble
        GPT: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP  # groups per tile
        offs_g = k0 // GROUP + tl.arange(0, GPT)
        sz_off = offs_g[None, :] * N + offs_n[:, None]
        sz_ok = n_ok[:, None] & (offs_g < K // GROUP)[None, :]
        # Scale 0 outside K makes the padded codes vanish.
        s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
        q = q.reshape(BLOCK_N, GPT, BLOCK_K // GPT)
        if HAS_ZEROS:
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            w = (q - z[:, :, None]) * s[:, :, None]
        else:
            w = (q - 8.0) * s[:, :, None]
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
