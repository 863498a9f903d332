"""QuantLinear: an nn.Linear whose weight is int4 or int8 (formats in quant/formats.py).

State-dict names (the on-disk names of quantized checkpoints, one module = one prefix):
    <prefix>.qweight   int8 [N, K] or uint8 [N, K // 2]
    <prefix>.scales    float16 [N] (int8) or [K // G, N] (int4)
    <prefix>.zeros     float16 [K // G, N]; asymmetric int4 only
    <prefix>.bias      [N] in the model dtype; only if the layer has a bias
All are buffers, not parameters: nothing here trains.

forward dispatches on the device: CUDA -> Triton (decode kernel for M <= 16 rows, tiled GEMM
above); CPU -> the C kernel of kernels/cpu_gemv.c (AVX2; 1.3-2x torch's packed int4/int8 ops
per layer at M = 1, 1.4x in whole-model int4 decode), or without it (no compiler, int8 with
K % 32 != 0) torch's packed ops where they are fast and exact enough (bfloat16 activations, or
few rows), else the float32 reference.
"""
import torch
from torch import nn

from qlite.errors import QliteError
from qlite.kernels import cpu_gemv, reference
from qlite.kernels.gemm import qgemm
from qlite.kernels.gemv import qgemv

from .formats import check_format, packed_shapes, quantize

DECODE_MAX_M = 16  # rows up to which the decode kernel beats the tiled GEMM
_CPU_OP_MAX_M = 4  # torch's packed CPU matmuls are slower than dequantize + matmul above this,
#                    except in bfloat16 where they are vectorised (measured on an EPYC, torch 2.13)
_REF_CHUNK = 1 << 22  # the CPU reference dequantizes at most this many weights at a time


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
        self._cpu_pack = None  # torch's CPU int4 layout, built on first use (not saved)

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
        if x.is_cuda:
            args = (self.qweight, self.scales, self.zeros, self.bits, self.group_size)
            out = (qgemv if x2.shape[0] <= DECODE_MAX_M else qgemm)(x2, *args)
        elif cpu_gemv.supports(self.bits, self.in_features) and cpu_gemv.available():
            out = cpu_gemv.quant_matmul(x2, self.qweight, self.scales, self.zeros, self.bits,
                                        self.group_size, self.bias)  # the bias added inside
            return out.view(*x.shape[:-1], self.out_features)
        else:
            out = self._cpu_matmul(x2)
        if self.bias is not None:
            out += self.bias if self.bias.dtype == out.dtype else self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _cpu_matmul(self, x):
        if x.dtype == torch.bfloat16 or (x.shape[0] <= _CPU_OP_MAX_M and x.dtype in (torch.float32, torch.float16)):
            if self.bits == 8:
                return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self._cpu_pack_for(x.dtype)[1])
            if self.out_features % 16 == 0:  # the CPU int4 op packs N in blocks of 16
                packed, scale_zero = self._cpu_pack_for(x.dtype)
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scale_zero)
        m = x.shape[0]
        # The reference, a slice of output channels at a time to bound the float32 copy.
        rows = max(1, _REF_CHUNK // self.in_features)
        out = torch.empty(m, self.out_features, dtype=x.dtype)
        for i in range(0, self.out_features, rows):
            sl = slice(i, i + rows)
            out[:, sl] = reference.quant_matmul(
                x, self.qweight[sl], self.scales[sl] if self.bits == 8 else self.scales[:, sl],
                None if self.zeros is None else self.zeros[:, sl], self.bits, self.group_size)
        return out

    def _cpu_pack_for(self, dtype):
        """What torch's CPU ops take, built on first use in the activation dtype (a conversion
        per call costs more than the int8 matmul itself) and rebuilt if a buffer is written.
        int8: (qweight, scales). int4: codes re-packed in torch's layout (half a byte per weight
        beside qweight), and per group (scale, offset) with w = (code - 8) * scale + offset,
        i.e. offset = (8 - zero) * scale."""
        key = (dtype, self.qweight.data_ptr(), self.qweight._version, self.scales._version,
               None if self.zeros is None else self.zeros._version)
        if self._cpu_pack is None or self._cpu_pack[0] != key:
            if self.bits == 8:
                self._cpu_pack = (key, self.qweight, self.scales.to(dtype))
            else:
                codes = reference.unpack_int4(self.qweight).to(torch.int32)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
                s = self.scales.float()
                offset = torch.zeros_like(s) if self.zeros is None else (8 - self.zeros.float()) * s
                self._cpu_pack = (key, packed, torch.stack([s, offset], dim=-1).to(dtype))
        return self._cpu_pack[1], self._cpu_pack[2]
