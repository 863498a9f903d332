"""Fused MoE on quantized stacked expert weights: two launches of one kernel per layer.

Decode (at most DECODE_MAX_SLOTS (token, slot) pairs) takes moe_gemv_kernel: one program per
slot and tile of output channels, on CUDA cores with the machinery of kernels.gemv (16-byte
weight loads, 16-bit-pair int4 arithmetic, one reduction after the loop); no sorting of slots
by expert, so a decode step is two kernels and the final sum. Larger batches take the path below.

The (token, slot) pairs of a layer are sorted by expert and padded so that each block of
BLOCK_M rows belongs to one expert (moe_align_block_size). Launch 1 multiplies the gathered
tokens by their expert's gate and up rows and stores silu(gate) * up; launch 2 multiplies that
by the expert's down rows and scales by the routing weight. The k contributions of each token
are then summed. Every expert that received tokens is served by the same two launches.
"""
import torch
import triton
import triton.language as tl

from .autotune import Plans, dot_f32, interpreting
from .dequant import dot_acc, load_weight_tile, load_weight_tile16, zero_point_share
from .gemv import _int4_step, _int8_block_k, _int8_step, _load_f16, _sms, configs as gemv_configs
from .reference import moe_align_block_size

DECODE_MAX_SLOTS = 16


@triton.jit
def moe_gemv_kernel(a_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ids_ptr, rw_ptr, N, K, stride_am, stride_qe, stride_se,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, GATE_UP: tl.constexpr,
                    A_ROW_DIV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PAIRS: tl.constexpr, F16: tl.constexpr):
    """Program (pid_n, slot): expert e = ids[slot], a = a[slot // A_ROW_DIV] ([K], contiguous).
    GATE_UP: out[slot, n] = silu(a . W_e[n]) * (a . W_e[N + n]); else out[slot, n] = rw[slot] * (a . W_e[n]),
    for n in pid_n * BLOCK_N + [0, BLOCK_N). BLOCK_K divides K (and the group)."""
    pid_n = tl.program_id(0)
    slot = tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    qw32 = (qw_ptr + e * stride_qe).to(tl.pointer_type(tl.int32), bitcast=True)
    s_ptr += e * stride_se
    z_ptr += e * stride_se
    a_row = a_ptr + (slot // A_ROW_DIV) * stride_am
    n_rows = 2 * N if GATE_UP else N  # rows of the expert's weight (the stride of a scale group)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    C: tl.constexpr = BLOCK_K // 8 if BITS == 4 else BLOCK_K // 4
    offs_c = tl.arange(0, C)
    kw_row = K // 8 if BITS == 4 else K // 4
    w_rows = tl.multiple_of(rows * kw_row, 4)
    up_rows = tl.multiple_of((rows + N) * kw_row, 4)
    acc = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    for it in range(0, K // BLOCK_K):
        kw = it * C
        w = tl.load(qw32 + w_rows[:, None] + (kw + offs_c)[None, :])
        if BITS == 4:
            g = kw // (GROUP // 8)
            s = _load_f16(s_ptr + g * n_rows + rows, PAIRS)[:, None]
            sz = s
            if HAS_ZEROS:
                sz = s * (8.0 - _load_f16(z_ptr + g * n_rows + rows, PAIRS)[:, None])
            acc = _int4_step(acc, w, a_row, kw, offs_c, s, sz, PAIRS, F16, HAS_ZEROS)
            if GATE_UP:
                w = tl.load(qw32 + up_rows[:, None] + (kw + offs_c)[None, :])
                s = _load_f16(s_ptr + g * n_rows + N + rows, PAIRS)[:, None]
                sz = s
                if HAS_ZEROS:
                    sz = s * (8.0 - _load_f16(z_ptr + g * n_rows + N + rows, PAIRS)[:, None])
                acc_up = _int4_step(acc_up, w, a_row, kw, offs_c, s, sz, PAIRS, F16, HAS_ZEROS)
        else:
            acc = _int8_step(acc, w, a_row, kw, offs_c)
            if GATE_UP:
                w = tl.load(qw32 + up_rows[:, None] + (kw + offs_c)[None, :])
                acc_up = _int8_step(acc_up, w, a_row, kw, offs_c)
    res = tl.sum(acc, axis=1)
    if BITS == 8:
        res *= tl.load(s_ptr + rows).to(tl.float32)
    if GATE_UP:
        up = tl.sum(acc_up, axis=1)
        if BITS == 8:
            up *= tl.load(s_ptr + N + rows).to(tl.float32)
        res = res * tl.sigmoid(res) * up
    else:
        res *= tl.load(rw_ptr + slot).to(tl.float32)
    tl.store(out_ptr + slot * N + offs_n, res.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def moe_matmul_kernel(a_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, rw_ptr,
                      sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                      num_slots, N, K, stride_am, stride_qe, stride_se,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      GATE_UP: tl.constexpr, A_ROW_DIV: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_F32: tl.constexpr, TILE16: tl.constexpr = False, F16: tl.constexpr = False):
    """GATE_UP: out[slot, :N] = silu(a @ W[:N].T) * (a @ W[N:2N].T), a = x[slot // topk].
    else:       out[slot, :N] = rw[slot] * (a @ W.T), a = h[slot]. W is expert_ids[block]'s.
    TILE16 (int4, 16-bit activations): the weight tile in 16 bits and W's rows as the MMA's M
    dimension, as kernels.gemv.qgemv_dot_kernel does."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # the grid is sized for the worst padding; this block is past the real rows
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    qw_ptr += e * stride_qe
    s_ptr += e * stride_se
    z_ptr += e * stride_se
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    rows = slots // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_rows = 2 * N if GATE_UP else N  # rows of the expert's weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    accT = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    accT_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & (offs_k < K)[None, :], other=0.0)
        # Lanes past N read the up rows in the gate tile; they are never stored.
        if BITS == 4 and TILE16:
            w = load_weight_tile16(qw_ptr, s_ptr, offs_n, k0, n_rows, K, GROUP, BLOCK_N, BLOCK_K, F16)
            accT = tl.dot(w, tl.trans(a), accT)
            if HAS_ZEROS:
                acc += zero_point_share(a, s_ptr, z_ptr, offs_n, k0, n_rows, K, GROUP, BLOCK_K)
            if GATE_UP:
                w = load_weight_tile16(qw_ptr, s_ptr, offs_n + N, k0, n_rows, K, GROUP, BLOCK_N, BLOCK_K, F16)
                accT_up = tl.dot(w, tl.trans(a), accT_up)
                if HAS_ZEROS:
                    acc_up += zero_point_share(a, s_ptr, z_ptr, offs_n + N, k0, n_rows, K, GROUP, BLOCK_K)
        else:
            w = load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, n_rows, K,
                                 BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K).to(a.dtype)
            acc = dot_acc(a, w, acc, DOT_F32)
            if GATE_UP:
                w = load_weight_tile(qw_ptr, s_ptr, z_ptr, offs_n + N, k0, n_rows, K,
                                     BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K).to(a.dtype)
                acc_up = dot_acc(a, w, acc_up, DOT_F32)
    if BITS == 4 and TILE16:
        acc += tl.trans(accT)
        if GATE_UP:
            acc_up += tl.trans(accT_up)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < n_rows, other=0.0).to(tl.float32)[None, :]
        if GATE_UP:
            acc_up *= tl.load(s_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        acc *= tl.load(rw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + slots[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < N)[None, :])


# Tiles that compile for sm_90 without register spills in every format (two weight tiles and
# two accumulators live in registers in the gate/up launch), each thread's share of a weight
# tile a whole 16-byte load (int4: BLOCK_N * BLOCK_K >= 1024 * num_warps), and shared memory
# under sm_89's 99 KiB (bench/kernel_sass.py). The first is taken under the interpreter and
# when nothing was tuned.
_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for m, n, k, w, s in (
    (16, 64, 64, 4, 4), (16, 32, 128, 4, 4), (32, 128, 64, 8, 3), (32, 64, 128, 8, 3), (64, 64, 64, 4, 3),
    (64, 128, 64, 8, 3), (128, 64, 128, 8, 2))]


def _tile16(bits, dtype, c, compiled=False):
    """Whether the batched kernel takes the 16-bit int4 tile: 16-bit activations, compiled, and
    16-row tiles (sm_90: gate/up 8.5 -> 7.2 instructions per weight asymmetric, 8.2 -> 5.6
    symmetric; at 64 rows the float32 zero-point term costs more than it saves, 7.4 -> 8.3)."""
    return bits == 4 and dtype != torch.float32 and (compiled or not interpreting()) and c["BLOCK_M"] <= 16


def _launch(a, w, out, rw, align, num_slots, n, k, a_row_div, gate_up, bits, group_size, c):
    qweight, scales, zeros = w
    sorted_ids, expert_ids, num_padded = align
    grid = (expert_ids.numel(), -(-n // c["BLOCK_N"]))
    moe_matmul_kernel[grid](a, qweight, scales, zeros if zeros is not None else scales, out, rw,
                            sorted_ids, expert_ids, num_padded, num_slots, n, k, a.stride(0),
                            qweight.stride(0), scales.stride(0), BITS=bits,
                            GROUP=group_size if bits == 4 else 0, HAS_ZEROS=zeros is not None,
                            GATE_UP=gate_up, A_ROW_DIV=a_row_div, BLOCK_M=c["BLOCK_M"],
                            BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], DOT_F32=dot_f32(a.dtype),
                            TILE16=_tile16(bits, a.dtype, c),
                            F16=a.dtype == torch.float16, num_warps=c["num_warps"], num_stages=c["num_stages"])


_plans = Plans("fused_moe")


def _decode_launch(a, w, out, ids, rw, n, k, a_row_div, gate_up, bits, group_size):
    """moe_gemv_kernel over every slot, a CUDA-core tile of kernels.gemv's whitelist for an
    [n, k] weight at M = 1, without split-K (the slots fill the grid)."""
    qweight, scales, zeros = w
    # The first tile (most rows per thread) that still gives every SM a program, else the smallest.
    tiles = gemv_configs(1, n, k, bits, group_size or 128, 1)
    c = next((t for t in tiles if -(-n // t["BLOCK_N"]) * ids.numel() >= _sms(a.device)),
             min(tiles, key=lambda t: t["BLOCK_N"]))
    grid = (-(-n // c["BLOCK_N"]), ids.numel())
    moe_gemv_kernel[grid](a, qweight, scales, zeros if zeros is not None else scales, out, ids, rw, n, k,
                          a.stride(0), qweight.stride(0), scales.stride(0), BITS=bits,
                          GROUP=group_size if bits == 4 else 0, HAS_ZEROS=zeros is not None, GATE_UP=gate_up,
                          A_ROW_DIV=a_row_div, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                          PAIRS=a.dtype != torch.float32 and not interpreting(), F16=a.dtype == torch.float16,
                          num_warps=c["num_warps"])


def fused_moe(x, topk_ids, topk_weights, w13, w2, bits: int, group_size: int, out=None, config=None):
    """Routed experts of one layer; same contract as reference.fused_moe.

    x [T, D] (rows contiguous); topk_ids, topk_weights [T, k]; w13 = (qweight, scales, zeros)
    of gate_up_proj [E, 2I, D], w2 likewise of down_proj [E, D, I]. Returns [T, D] in x's dtype.
    """
    T, D = x.shape
    k = topk_ids.shape[1]
    E = w13[0].shape[0]
    inter = w2[0].shape[2] * (2 if bits == 4 else 1)  # I
    num_slots = T * k
    if out is None:
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    rw = topk_weights.reshape(-1).contiguous()
    h = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_slots, D, dtype=torch.float32, device=x.device)
    if num_slots <= DECODE_MAX_SLOTS and config is None and _int8_block_k(bits, D) and _int8_block_k(bits, inter):
        ids = topk_ids.reshape(-1).contiguous()
        _decode_launch(x, w13, h, ids, rw, inter, D, k, True, bits, group_size)
        _decode_launch(h, w2, y, ids, rw, D, inter, 1, False, bits, group_size)
        torch.sum(y.view(T, k, D), dim=1, out=out) if out.dtype == torch.float32 else out.copy_(y.view(T, k, D).sum(1))
        return out
    per_expert = 1 << (max(1, num_slots // min(E, num_slots)) - 1).bit_length()

    def run(c):
        align = moe_align_block_size(topk_ids, c["BLOCK_M"], E)
        _launch(x, w13, h, rw, align, num_slots, inter, D, k, True, bits, group_size, c)
        _launch(h, w2, y, rw, align, num_slots, D, inter, 1, False, bits, group_size, c)
        torch.sum(y.view(T, k, D), dim=1, out=out) if out.dtype == torch.float32 else out.copy_(y.view(T, k, D).sum(1))

    c = config
    if c is None:
        key = (min(1 << (num_slots - 1).bit_length(), 4096), E, D, inter, bits, group_size, w13[2] is None,
               x.dtype, x.device)
        c = _plans.get(key)
        if c is None:
            c = _plans.put(key, [c for c in _CONFIGS if c["BLOCK_M"] <= max(16, per_expert)], run)
    run(c)
    return out

SIGNATURE = dict(a_ptr="*bf16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16", rw_ptr="*fp32",
                 sorted_ids_ptr="*i32", expert_ids_ptr="*i32", num_padded_ptr="*i32", num_slots="i32",
                 N="i32", K="i32", stride_am="i32", stride_qe="i32", stride_se="i32")


DECODE_SIGNATURE = dict(a_ptr="*bf16", qw_ptr="*u8", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*bf16", ids_ptr="*i64",
                        rw_ptr="*fp32", N="i32", K="i32", stride_am="i32", stride_qe="i32", stride_se="i32")


def sass_cases(bits=4, group_size=128):
    """The decode kernel (gate/up and down of the 57B's experts, 3584 <-> 2560) and two tiles of
    the batched kernel."""
    out = []
    for gu, (n, k) in ((True, (2560, 3584)), (False, (3584, 2560))):
        c = gemv_configs(1, n, k, bits, group_size or 128, 1)[0]
        out.append(dict(kernel="moe_gemv_kernel", BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GATE_UP=gu,
                        A_ROW_DIV=8 if gu else 1, PAIRS=True, F16=False, num_warps=c["num_warps"], num_stages=3,
                        weights_per_iter=c["BLOCK_N"] * c["BLOCK_K"] * (2 if gu else 1),
                        divisible=("N", "K", "stride_am", "stride_qe", "stride_se"),
                        label=f"decode-{c['BLOCK_N']}x{c['BLOCK_K']}"))
    for c in (_CONFIGS[0], _CONFIGS[5]):  # the default tile, and a prefill-sized one
        for gu in (True, False):
            out.append(dict(kernel="moe_matmul_kernel", BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                            BLOCK_K=c["BLOCK_K"], GATE_UP=gu, A_ROW_DIV=8 if gu else 1, DOT_F32=False,
                            TILE16=_tile16(bits, torch.bfloat16, c, compiled=True), F16=False,
                            num_warps=c["num_warps"], num_stages=c["num_stages"],
                            weights_per_iter=c["BLOCK_N"] * c["BLOCK_K"] * (2 if gu else 1),
                            divisible=("N", "K", "stride_am", "stride_qe", "stride_se"),
                            label=f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"))
    return out
