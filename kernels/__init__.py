"""Triton kernels for int4/int8 weights and their plain-PyTorch references (reference.py).

qgemv   decode: x [M <= 16, K] @ W.T, split-K
qgemm   prefill: tiled GEMM, weight tiles dequantized in registers
fused_moe  routed experts of a layer: gate/up + SiLU*mul, then down, on stacked weights
cpu_gemv   int4 matmul on the CPU (AVX2), a small C kernel built on first use (no GPU needed)
ops        torch.ops.qlite.quant_matmul / fused_moe: the above as torch operators (torch.compile)
tinygemm   torch's CUDA int4 matmul on a repacked copy: a second backend ops picks per shape
Layouts are documented in qlite.quant.formats. This package imports only torch and triton.
"""
