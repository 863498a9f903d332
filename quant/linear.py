"""QuantLinear: an nn.Linear whose weight is int4 or int8 (formats in quant/formats.py).

State-dict names (the on-disk names of quantized checkpoints, one module = one prefix):
    <prefix>.qweight   int8 [N, K] or uint8 [N, K // 2]
    <prefix>.scales    float16 [N] (int8) or [K // G, N] (int4)
    <prefix>.zeros     float16 [K // G, N]; asymmetric int4 only
    <prefix>.bias      [N] in the model dtype; only if the layer has a bias
All are buffers, not parameters: nothing here trains.

forward calls torch.ops.qlite.quant_matmul (kernels/ops.py), which dispatches on the device:
CUDA -> Triton (decode kernel for M <= 16 rows, tiled GEMM above); CPU -> the C kernel of
kernels/cpu_gemv.c (AVX2; 1.3-2x torch's packed int4/int8 ops per layer at M = 1, 1.4x in
whole-model int4 decode), else the float32 reference. Where the C kernel cannot take a layer
(no compiler, int8 with K % 32 != 0), `prepare_cpu` (the loader calls it) packs the weight for
torch's CPU ops, used where they are fast and exact enough (bfloat16 activations, or few rows).
"""
import torch
from torch import nn

from qlite.errors import QliteError
from qlite.kernels import cpu_gemv, ops, reference  # noqa: F401  (ops: registers torch.ops.qlite.*)

from .formats import check_format, packed_shapes, quantize

_CPU_OP_MAX_M = 4  # torch's packed CPU matmuls are slower than dequantize + matmul above this,
#                    except in bfloat16 where they are vectorised (measured on an EPYC, torch 2.13)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False, device=None, dtype=torch.bfloat16):
        """Empty buffers of the right shapes (device="meta" for a loader that assigns them);
        dtype is the bias dtype."""
        super().__init__()
        check_format(bits, group_size, in_features, "QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.symmetric = symmetric or bits == 8
        for name, (shape, dt) in packed_shapes(out_features, in_features, bits, group_size,
                                               self.symmetric).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        if self.symmetric:
            self.register_buffer("zeros", None)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self._cpu_pack = None  # (dtype, weight, scales) for torch's CPU ops: see prepare_cpu

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, method: str = "hqq",
                    symmetric: bool = False, name: str = "weight") -> "QuantLinear":
        w = linear.weight.detach()
        qt = quantize(w, bits, group_size, symmetric, method, name)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                symmetric, device=w.device, dtype=w.dtype)
        m.qweight.copy_(qt.qweight)
        m.scales.copy_(qt.scales)
        if m.zeros is not None:
            m.zeros.copy_(qt.zeros)
        if m.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return reference.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def extra_repr(self) -> str:
        kind = f"int{self.bits}"
        if self.bits == 4:
            kind += f" g{self.group_size}" + (" sym" if self.symmetric else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~170 times a token for a 0.5B model: keep the Python path short.
        if x.shape[-1] != self.in_features:
            raise QliteError(f"QuantLinear expects {self.in_features} input features, got {x.shape[-1]}")
        x2 = x.reshape(-1, self.in_features).contiguous()
        pack = self._cpu_pack
        if pack is not None and pack[0] == x.dtype and not x.is_cuda and (
                x.dtype == torch.bfloat16 or x2.shape[0] <= _CPU_OP_MAX_M):
            out = self._torch_cpu_matmul(x2, pack)
        else:
            out = torch.ops.qlite.quant_matmul(x2, self.qweight, self.scales, self.zeros,
                                               self.bits, self.group_size or 0, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _torch_cpu_matmul(self, x, pack):
        _, weight, scales = pack
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(x, weight, scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, self.group_size, scales)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out

    def prepare_cpu(self, dtype: torch.dtype):
        """Pack the weight for torch's CPU ops in activation dtype `dtype`, where the C kernel
        cannot take this layer (built here, once, not during a forward: a compiled graph must
        not see it change). int8: (qweight, scales). int4: codes re-packed in torch's layout
        (half a byte per weight beside qweight), and per group (scale, offset) with
        w = (code - 8) * scale + offset, i.e. offset = (8 - zero) * scale. Call it again after
        writing the buffers."""
        self._cpu_pack = None
        if self.qweight.is_cuda or (cpu_gemv.supports(self.bits, self.in_features)
                                    and cpu_gemv.available()):
            return
        if self.bits == 8:
            if self.qweight.data_ptr() % 64:  # torch's int8 op crashes on a weight mapped from
                self.qweight = self.qweight.clone()  # a file at an unaligned offset (2.13)
            self._cpu_pack = (dtype, self.qweight, self.scales.to(dtype))
        elif self.out_features % 16 == 0:  # the CPU int4 op packs N in blocks of 16
            codes = reference.unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            s = self.scales.float()
            offset = torch.zeros_like(s) if self.zeros is None else (8 - self.zeros.float()) * s
            self._cpu_pack = (dtype, packed, torch.stack([s, offset], dim=-1).to(dtype))


# Linear layers left in 16-bit by default: the MoE router and the shared-expert gate (tiny,
# and routing is sensitive to them). lm_head is kept unless asked for: see quantize_model_linears.
DEFAULT_SKIP = ("mlp.gate", "mlp.shared_expert_gate")


def quantize_model_linears(model: nn.Module, bits: int = 4, group_size: int = 128, method: str = "hqq",
                           symmetric: bool = False, skip=DEFAULT_SKIP, quantize_lm_head: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear of model by a QuantLinear, except those whose qualified
    name ends with an entry of skip (e.g. "mlp.gate" matches "model.layers.3.mlp.gate") and
    lm_head unless quantize_lm_head. Embeddings are nn.Embedding and are never touched here.
    Returns model."""
    skip = tuple(skip) + (() if quantize_lm_head else ("lm_head",))
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, bits, group_size, method, symmetric, name))
    return model
