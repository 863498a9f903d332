"""The quantized matmuls as torch operators: torch.ops.qlite.quant_matmul and .fused_moe.

torch.compile sees each as one opaque call with a known output shape (the fake
implementations below), so it traces a whole layer without a graph break; inside, the launcher
of the tensors' device runs: Triton on CUDA (qgemv for M <= 16 rows, qgemm above), the C
kernel on the CPU where it takes the layer (cpu_gemv.supports), else the float32 reference.
Triton's autotuning happens on a launcher's first call for a shape: run a step eagerly before
capturing a graph. Layouts: qlite.quant.formats.

int4 with bfloat16 activations on CUDA has a second backend, torch's tinygemm
(kernels/tinygemm.py). Which one runs is decided per shape (row bucket, N, K, group, format) as
a launcher's config is (kernels/autotune.py): the choice recorded for this GPU and triton
version, else with QLITE_TUNE=1 both timed once (never inside a graph capture) and the faster
recorded, else qlite's kernels. A weight gets tinygemm's copy only when a shape of it chose
tinygemm (`_packs`, dropped with the weight).
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_gemv, reference, tinygemm
from .autotune import Plans

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
        out = _cuda_matmul(x, qweight, scales, zeros, bits, group_size)
    elif x.device.type == "cpu" and cpu_gemv.supports(bits, x.shape[1]) and cpu_gemv.available():
        return cpu_gemv.quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
    else:
        out = _reference_matmul(x, qweight, scales, zeros, bits, group_size)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


_backend = Plans("int4-backend")  # shape key -> "triton" or "tinygemm"
_packs = WeakIdKeyDictionary()  # qweight -> its tinygemm copy (tinygemm.pack)


def _rows(m: int) -> int:
    """The row bucket of a backend choice: exact through the decode sizes, then powers of 2."""
    return m if m <= DECODE_MAX_M else min(1 << (m - 1).bit_length(), 1024)


def _cuda_matmul(x, qweight, scales, zeros, bits, group_size):
    from .gemm import qgemm
    from .gemv import qgemv
    launch = qgemv if x.shape[0] <= DECODE_MAX_M else qgemm
    n, k = qweight.shape[0], x.shape[1]
    if not tinygemm.supports(x, n, k, bits, group_size):
        return launch(x, qweight, scales, zeros, bits, group_size)
    key = (_rows(x.shape[0]), n, k, group_size, zeros is None, x.dtype, x.device)
    use = _backend.get(key) or choose_backend(key, x, qweight, scales, zeros, group_size, launch)
    return backend_matmul(use, x, qweight, scales, zeros, group_size, launch)


def choose_backend(key, x, qweight, scales, zeros, group_size, launch) -> str:
    """The backend for key (see the module docstring), remembered by _backend. Inside a CUDA
    graph capture nothing is timed nor remembered: qlite's kernels run."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "triton"
    had_pack = qweight in _packs
    launch(x, qweight, scales, zeros, 4, group_size)  # its own config first: then one launch is timed

    def run(name):
        return backend_matmul(name, x, qweight, scales, zeros, group_size, launch)

    use = _backend.put(key, ["triton", "tinygemm"], run)
    if use != "tinygemm" and not had_pack:
        _packs.pop(qweight, None)  # made only to be timed
    return use


def backend_matmul(use, x, qweight, scales, zeros, group_size, launch):
    """x @ W.T by the backend `use`; tinygemm's copy of the weight is made on its first use
    (outside a graph capture; inside one, qlite's kernel stands in)."""
    if use == "tinygemm":
        pack = _packs.get(qweight)
        if pack is None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            pack = _packs[qweight] = tinygemm.pack(qweight, scales, zeros)
        if pack is not None:
            return tinygemm.matmul(x, pack, group_size)
    return launch(x, qweight, scales, zeros, 4, group_size)


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
