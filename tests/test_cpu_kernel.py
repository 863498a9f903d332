"""The C int4/int8 kernel of the CPU decode path (kernels/cpu_gemv.c) against the PyTorch reference.

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


# (bits, group_size, symmetric); K: three groups for int4; for int8 both ways of grouping x
# (K % 128 == 0: groups of 128, else of 32).
FORMATS = [(4, 32, False), (4, 64, False), (4, 128, False), (4, 128, True), (8, None, True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f[0]}" + (f"-g{f[1]}" if f[1] else "")
                         + ("-sym" if f[2] and f[0] == 4 else ""))
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
def test_kernel_matches_reference(fmt, dt, gen):
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    bits, group_size, symmetric = fmt
    dtype = getattr(torch, dt)
    for k in ((3 * group_size,) if bits == 4 else (256, 96)):
        qt = quantize(torch.randn(N, k, generator=gen) * 0.05, bits, group_size or 128, symmetric, "rtn")
        bias = torch.randn(N, generator=gen).to(dtype)
        for m in (1, 3, 4, 5, 9):  # rows go four at a time: one, a full four, remainders
            x = torch.randn(m, k, generator=gen).to(dtype)
            x[0, :32] *= 100  # an outlier group: the other groups keep their own scale
            ref = reference.quant_matmul(x.float(), qt.qweight, qt.scales, qt.zeros, bits, group_size)
            for b in (None, bias):
                out = torch.full((m, N), float("nan"), dtype=dtype)
                cpu_gemv.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, bits, group_size, b, out=out)
                want = ref if b is None else ref + b.float()
                err = ((out.float() - want).abs().max() / want.abs().max()).item()
                assert err <= TOL[dt], (k, m, b is not None, err)


def test_all_zero_activations_give_the_bias(gen):
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    for bits in (4, 8):
        qt = quantize(torch.randn(N, 64, generator=gen), bits, 32, False, "rtn")
        bias = torch.randn(N, generator=gen)
        out = cpu_gemv.quant_matmul(torch.zeros(2, 64), qt.qweight, qt.scales, qt.zeros, bits, 32, bias)
        assert torch.equal(out, bias.expand(2, N))  # an all-zero group must not divide by zero


def test_int8_layer_with_k_off_32_is_refused():
    assert not cpu_gemv.supports(8, 333) and cpu_gemv.supports(8, 320) and cpu_gemv.supports(4, 96)
    if cpu_gemv.available():
        with pytest.raises(ValueError, match="K=333"):
            cpu_gemv.quant_matmul(torch.zeros(1, 333), torch.zeros(4, 333, dtype=torch.int8),
                                  torch.ones(4, dtype=torch.float16), None, 8, None)


def test_switched_off_kernel_says_why(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_why", None)
    monkeypatch.setenv("QLITE_CPU_KERNEL", "0")
    assert not cpu_gemv.available()
    assert cpu_gemv.why_unavailable() == "QLITE_CPU_KERNEL=0"
    with pytest.raises(RuntimeError, match="QLITE_CPU_KERNEL=0"):
        cpu_gemv.quant_matmul(torch.zeros(1, 32), torch.zeros(4, 16, dtype=torch.uint8),
                              torch.ones(1, 4, dtype=torch.float16), None, 4, 32)


def test_non_contiguous_weights_are_refused(gen):
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    qt = quantize(torch.randn(64, 64, generator=gen), 4, 32, False, "rtn")
    with pytest.raises(ValueError, match="contiguous"):  # every other row: a strided view
        cpu_gemv.quant_matmul(torch.zeros(1, 64), qt.qweight[::2], qt.scales[:, ::2],
                              qt.zeros[:, ::2], 4, 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_reach_the_output(bad, gen):
    """As in a float matmul: a NaN or inf in a row of x makes that row's outputs non-finite
    (the int16 scaling must not turn it into ordinary numbers), other rows stay exact."""
    if not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    for bits in (4, 8):
        qt = quantize(torch.randn(N, 64, generator=gen), bits, 32, False, "rtn")
        x = torch.randn(2, 64, generator=gen)
        x[0, 5] = bad
        out = cpu_gemv.quant_matmul(x, qt.qweight, qt.scales, qt.zeros, bits, 32)
        assert not out[0].isfinite().any()
        ref = reference.quant_matmul(x[1:], qt.qweight, qt.scales, qt.zeros, bits, 32)
        assert ((out[1:] - ref).abs().max() / ref.abs().max()).item() <= TOL["float32"]
