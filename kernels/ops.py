"""The quantized matmuls as torch operators: torch.ops.qlite.quant_matmul and .fused_moe.

torch.compile sees each as one opaque call with a known output shape (the fake
implementations below), so it traces a whole layer without a graph break; inside, the launcher
of the tensors' device runs: Triton on CUDA (qgemv for M <= 16 rows, qgemm above), the C
kernel on the CPU where it takes the layer (cpu_gemv.supports), else the float32 reference.
Triton's autotuning happens on a launcher's first call for a shape: run a step eagerly before
capturing a graph. Layouts: qlite.quant.formats.
"""
import torch

from . import cpu_gemv, reference

DECODE_MAX_M = 16  # rows up to which the decode kernel beats the tiled GEMM (CUDA)
_REF_CHUNK = 1 << 22  # the CPU reference dequantizes at most this many weights at a time


def _reference_matmul(x, qweight, scales, zeros, bits, group_size):
    """The reference, a slice of output channels at a time to bound the float32 copy."""
    n = qweight.shape[0]
    rows = max(1, _REF_CHUNK // x.shape[1])
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for i in range(0, n, rows):
        sl = slice(i, i + rows)
        out[:, sl] = reference.quant_matmul(
            x, qweight[sl], scales[sl] if bits == 8 else scales[:, sl],
            None if zeros is None else zeros[:, sl], bits, group_size)
    return out


# Defined with torch.library.Library rather than @custom_op: a call costs ~7 µs of dispatch
# instead of ~24 (custom_op wraps each call in autograd and dynamo-disable layers), and decode
# makes ~170 of them a token. No autograd: these are inference kernels.
_lib = torch.library.Library("qlite", "DEF")
_lib.define("quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
            "int group_size, Tensor? bias) -> Tensor")
_lib.define("fused_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_qweight, "
            "Tensor w13_scales, Tensor? w13_zeros, Tensor w2_qweight, Tensor w2_scales, "
            "Tensor? w2_zeros, int bits, int group_size) -> Tensor")


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (contiguous) @ dequantized W.T (+ bias) -> [M, N] in x's dtype; group_size 0
    for int8 (one scale per output channel)."""
    if x.is_cuda:
        from .gemm import qgemm
        from .gemv import qgemv
        out = (qgemv if x.shape[0] <= DECODE_MAX_M else qgemm)(x, qweight, scales, zeros, bits,
                                                               group_size)
    elif x.device.type == "cpu" and cpu_gemv.supports(bits, x.shape[1]) and cpu_gemv.available():
        return cpu_gemv.quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    else:
        out = _reference_matmul(x, qweight, scales, zeros, bits, group_size)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


@torch.library.register_fake("qlite::quant_matmul", lib=_lib)
def _(x, qweight, scales, zeros, bits, group_size, bias):
    return x.new_empty(x.shape[0], qweight.shape[0])


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              w13_qweight: torch.Tensor, w13_scales: torch.Tensor, w13_zeros: torch.Tensor | None,
              w2_qweight: torch.Tensor, w2_scales: torch.Tensor, w2_zeros: torch.Tensor | None,
              bits: int, group_size: int) -> torch.Tensor:
    """Routed experts of one layer on stacked quantized weights (gate_up [E, 2I, D], down
    [E, D, I]): x [T, D], topk_ids/topk_weights [T, k] -> [T, D] in x's dtype. CUDA: the fused
    Triton kernel (routing sorted on the device, no host read). CPU: tokens grouped by expert,
    each expert's products by the C kernel where it takes them (a CPU tensor's routing is
    already on the host)."""
    w13 = (w13_qweight, w13_scales, w13_zeros)
    w2 = (w2_qweight, w2_scales, w2_zeros)
    if x.is_cuda:
        from .fused_moe import fused_moe as launch
        return launch(x.contiguous(), topk_ids, topk_weights, w13, w2, bits, group_size)
    hidden = w2_qweight.shape[2] * (2 if bits == 4 else 1)
    fast = cpu_gemv.supports(bits, x.shape[1]) and cpu_gemv.supports(bits, hidden) \
        and cpu_gemv.available()
    return reference.fused_moe(x, topk_ids, topk_weights, w13, w2, bits, group_size,
                               cpu_gemv.quant_matmul if fast else reference.quant_matmul)


@torch.library.register_fake("qlite::fused_moe", lib=_lib)
def _(x, topk_ids, topk_weights, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales,
      w2_zeros, bits, group_size):
    return torch.empty_like(x)


# One Python body for every device: it picks the launcher from the tensors' device itself.
_lib.impl("quant_matmul", quant_matmul, "CompositeExplicitAutograd")
_lib.impl("fused_moe", fused_moe, "CompositeExplicitAutograd")
