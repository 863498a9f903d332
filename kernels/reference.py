"""Plain-PyTorch references of every kernel in this folder.

They are the test oracle and the CPU path, so they favour the obvious over the fast: weights
are dequantized to float32 and the matmul runs in float32, whatever the activation dtype.
The packed layouts are documented in qlite.quant.formats.
"""
import torch
import torch.nn.functional as F


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """[..., N, K // 2] uint8 -> [..., N, K] uint8 in 0..15 (low nibble = even k)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten(-2)


def dequantize(qweight, scales, zeros, bits: int, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Packed weight (optionally with a leading expert dimension) -> float [..., N, K]."""
    if bits == 8:
        return qweight.to(dtype) * scales.to(dtype).unsqueeze(-1)
    q = unpack_int4(qweight).to(dtype)
    *lead, n, k = q.shape
    q = q.view(*lead, n, k // group_size, group_size)
    s = scales.to(dtype).transpose(-1, -2).unsqueeze(-1)  # [..., N, K // G, 1]
    z = 8.0 if zeros is None else zeros.to(dtype).transpose(-1, -2).unsqueeze(-1)
    return ((q - z) * s).view(*lead, n, k)


def quant_matmul(x, qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype; the reference of qgemv and qgemm."""
    w = dequantize(qweight, scales, zeros, bits, group_size)
    return (x.float() @ w.T).to(x.dtype)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Sort the (token, slot) pairs of a layer by expert and pad each expert's run to a multiple
    of block_m, so that every block of block_m rows belongs to one expert.

    topk_ids [T, k] -> (sorted_ids, expert_ids, num_padded):
      sorted_ids [P]  index into topk_ids.flatten() (t * k + j); padding holds T * k
      expert_ids [P // block_m]  the expert of each block; blocks past num_padded hold -1
      num_padded [1]  rows in use (a tensor: no host sync, so it can be captured in a graph)
    P = T*k + min(E, T*k) * (block_m - 1) rounded up to block_m, an upper bound of the padding.
    """
    flat = topk_ids.flatten()
    numel = flat.numel()
    active = min(num_experts, numel)
    size = -(-(numel + active * (block_m - 1)) // block_m) * block_m
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(numel, device=flat.device) - (counts.cumsum(0) - counts)[expert]
    sorted_ids = torch.full((size,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, size, block_m, device=flat.device)
    expert_ids = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    expert_ids = torch.where(block_start < ends[-1], expert_ids, -1)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def fused_moe(x, topk_ids, topk_weights, w13, w2, bits: int, group_size: int,
              matmul=quant_matmul) -> torch.Tensor:
    """Routed experts on quantized stacked weights; the reference of kernels.fused_moe.fused_moe.

    x [T, D]; topk_ids, topk_weights [T, k]; w13 = (qweight, scales, zeros) of gate_up_proj
    [E, 2I, D]; w2 likewise of down_proj [E, D, I]. Returns [T, D] in x's dtype:
    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j].
    Tokens are grouped by expert and only experts that received tokens are visited. `matmul`
    (quant_matmul's signature) does each expert's products in float32: the CPU path passes
    cpu_gemv's kernel.
    """
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13[0].shape[0]).tolist()
    k = topk_ids.shape[1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tok = slots // k
        h = matmul(x[tok].float(), *(t if t is None else t[e] for t in w13), bits, group_size)
        gate, up = h.chunk(2, dim=-1)
        y = matmul(F.silu(gate) * up, *(t if t is None else t[e] for t in w2), bits, group_size)
        out.index_add_(0, tok, y * topk_weights.flatten()[slots, None].float())
    return out.to(x.dtype)
