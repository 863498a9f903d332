"""The C int4 kernel of the CPU decode path (kernels/cpu_gemv.c) against the PyTorch reference.

Error = max|out - ref| / max|ref|, ref in float32, with the same bounds as the Triton kernels
(tests/test_kernels.py): float32 1e-3, bfloat16 1.6e-2, float16 2e-3. The kernel takes each
group of activations as int16 times a scale (error at most 2^-16 of the group's largest |x|,
about 1e-5 of the output here), so float32 lands near 5e-5, well inside its bound; the 16-bit
bounds are the output rounding. Outputs are filled with NaN first, so an unwritten row fails.
"""
import random
import shutil

import pytest
import torch

from qlite.kernels import cpu_gemv, reference
from qlite.quant.formats import quantize

TOL = {"float32": 1e-3, "bfloat16": 1.6e-2, "float16": 2e-3}
N = 77  # odd: the threads' share of rows is uneven


def _machine_can_build() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and bool(
        shutil.which("cc") or shutil.which("gcc"))


def test_kernel_is_built_where_the_machine_can_build_it():
    if not _machine_can_build():
        pytest.skip("no AVX2 or no C compiler: QuantLinear keeps torch's int4 op here")
    assert cpu_gemv.available(), cpu_gemv.why_unavailable()


@pytest.fixture
def gen():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, False), (128, False), (128, True)])
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
def test_int4_kernel_matches_reference(group_size, symmetric, dt, gen):
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    dtype = getattr(torch, dt)
    k = 3 * group_size
    qt = quantize(torch.randn(N, k, generator=gen) * 0.05, 4, group_size, symmetric, "rtn")
    bias = torch.randn(N, generator=gen).to(dtype)
    for m in (1, 3, 4, 5, 9):  # the kernel takes rows four at a time: one, a full four, remainders
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = reference.quant_matmul(x.float(), qt.qweight, qt.scales, qt.zeros, 4, group_size)
        for b in (None, bias):
            out = torch.full((m, N), float("nan"), dtype=dtype)
            cpu_gemv.int4_gemv(x, qt.qweight, qt.scales, qt.zeros, group_size, b, out=out)
            want = ref if b is None else ref + b.float()
            err = ((out.float() - want).abs().max() / want.abs().max()).item()
            assert err <= TOL[dt], (m, b is not None, err)


def test_all_zero_activations_give_the_bias(gen):
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    qt = quantize(torch.randn(N, 64, generator=gen), 4, 32, False, "rtn")
    bias = torch.randn(N, generator=gen)
    out = cpu_gemv.int4_gemv(torch.zeros(2, 64), qt.qweight, qt.scales, qt.zeros, 32, bias)
    assert torch.equal(out, bias.expand(2, N))  # an all-zero group must not divide by zero


def test_switched_off_kernel_says_why(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_why", None)
    monkeypatch.setenv("QLITE_CPU_KERNEL", "0")
    assert not cpu_gemv.available()
    assert cpu_gemv.why_unavailable() == "QLITE_CPU_KERNEL=0"
    with pytest.raises(RuntimeError, match="QLITE_CPU_KERNEL=0"):
        cpu_gemv.int4_gemv(torch.zeros(1, 32), torch.zeros(4, 16, dtype=torch.uint8),
                           torch.ones(1, 4, dtype=torch.float16), None, 32)
