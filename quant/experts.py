"""QuantExperts: the routed experts of one MoE layer, stacked and quantized.

Same interface as the model's dense Experts: forward(x [T, D], topk_ids [T, k],
topk_weights [T, k]) -> [T, D]. State-dict names (each tensor with a leading expert dim E):
    gate_up_proj.qweight / .scales / .zeros   weight [E, 2I, D]: rows [:I] gate, [I:] up
    down_proj.qweight / .scales / .zeros      weight [E, D, I]
with the per-weight layouts of quant/formats.py (zeros only for asymmetric int4). Every tensor
is contiguous with the expert first, so one expert's bytes of each tensor are one range.
"""
import torch
from torch import nn

from qlite.kernels import ops  # noqa: F401  (registers torch.ops.qlite.fused_moe)

from .formats import check_format, packed_shapes, quantize


class StackedQuantWeight(nn.Module):
    """E quantized weights [N, K] of one format, as buffers qweight, scales, zeros."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, bits: int, group_size: int,
                 symmetric: bool, device=None):
        super().__init__()
        check_format(bits, group_size, in_features, "experts")
        for name, (shape, dt) in packed_shapes(out_features, in_features, bits, group_size,
                                               symmetric).items():
            self.register_buffer(name, torch.empty(num_experts, *shape, dtype=dt, device=device))
        if bits == 8 or symmetric:
            self.register_buffer("zeros", None)

    def packed(self):
        return self.qweight, self.scales, self.zeros


class QuantExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False, device=None):
        """Empty buffers of the right shapes (device="meta" for a loader that assigns them)."""
        super().__init__()
        self.num_experts, self.hidden = num_experts, intermediate_size  # as the dense Experts
        self.dim = hidden_size
        self.bits, self.group_size = bits, group_size
        self.symmetric = symmetric or bits == 8
        e, d, i = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = StackedQuantWeight(e, 2 * i, d, bits, group_size, symmetric, device)
        self.down_proj = StackedQuantWeight(e, d, i, bits, group_size, symmetric, device)

    @classmethod
    def from_experts(cls, experts: nn.Module, bits: int = 4, group_size: int = 128, method: str = "hqq",
                     symmetric: bool = False) -> "QuantExperts":
        """From a dense Experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]), one expert at a time."""
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        e, two_i, d = gate_up.shape
        m = cls(e, d, two_i // 2, bits, group_size, symmetric, device=gate_up.device)
        for dst, w, name in ((m.gate_up_proj, gate_up, "gate_up_proj"), (m.down_proj, down, "down_proj")):
            for j in range(e):
                qt = quantize(w[j], bits, group_size, symmetric, method, f"experts.{name}[{j}]")
                dst.qweight[j].copy_(qt.qweight)
                dst.scales[j].copy_(qt.scales)
                if dst.zeros is not None:
                    dst.zeros[j].copy_(qt.zeros)
        return m

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]
        # One operator (kernels/ops.py): the fused Triton kernel on CUDA; on the CPU tokens
        # grouped by expert, only experts with tokens visited, float32 math, each expert's
        # matmuls by the C kernel where it takes them, else dequantized.
        return torch.ops.qlite.fused_moe(x.contiguous(), topk_ids, topk_weights,
                                         *self.gate_up_proj.packed(), *self.down_proj.packed(),
                                         self.bits, self.group_size or 0)
