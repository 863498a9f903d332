"""GGUF Q4_0 / Q4_1 / Q4_K -> qlite int4 g32 keeping the codes (quant/gguf_q4.py), against
gguf-py's own dequantization (the reference reader). Q4_0 must be exact; Q4_1 / Q4_K within the
bound quant/formats.py and quant/gguf_q4.py state: 2^-11 * (|w| + |offset|) per weight from the
fp16 zero point (and Q4_K's fp16 d * sc), plus float32 rounding -> asserted as 2^-10 * (...)."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from qlite.kernels.reference import dequantize  # noqa: E402
from qlite.quant.gguf_q4 import gguf_q4_affine, gguf_q4_to_qlite  # noqa: E402

from test_gguf import _kquant_blocks  # noqa: E402

N, K = 24, 512


def blocks_of(qtype, rng):
    if qtype == Q.Q4_K:
        return _kquant_blocks(rng, N, K, qtype)
    x = (rng.standard_normal((N, K)) * 0.05 + rng.uniform(-0.02, 0.05, (N, 1))).astype(np.float32)
    return gguf.quants.quantize(x, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_codes_kept_within_the_stated_bound(qtype):
    rng = np.random.default_rng(int(qtype))
    blocks = blocks_of(qtype, rng)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
    qt = gguf_q4_to_qlite(blocks, qtype.name, K, symmetric=False)
    assert qt.group_size == 32 and qt.qweight.shape == (N, K // 2)
    got = dequantize(qt.qweight, qt.scales, qt.zeros, 4, 32)
    if qtype == Q.Q4_0:
        assert torch.equal(got, want)
        sym = gguf_q4_to_qlite(blocks, qtype.name, K, symmetric=True)
        assert sym.zeros is None and torch.equal(dequantize(sym.qweight, sym.scales, None, 4, 32), want)
        return
    _, _, offset = gguf_q4_affine(blocks, qtype.name, K)
    off = torch.from_numpy(np.repeat(np.abs(offset), 32, axis=1)).float()
    err = (got - want).abs()
    assert (err <= 2 ** -10 * (want.abs() + off) + 1e-12).all()
    assert err.max() > 0  # the fp16 zero point does round here: the bound is what is tested
    # versus requantizing: a 4-bit step is ~1/15 of a group's range
    assert err.max() < 1e-2 * (want.amax() - want.amin()) / 15


def test_constant_group():
    """d = 0 with m != 0 (a constant group): no scale maps the codes; codes 0 do."""
    blocks = blocks_of(Q.Q4_1, np.random.default_rng(0)).reshape(N, -1, 20)
    blocks[0, 0, 0:2] = np.zeros(1, np.float16).view(np.uint8)
    blocks[0, 0, 2:4] = np.full(1, -0.3, np.float16).view(np.uint8)
    blocks = blocks.reshape(N, -1)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q4_1).astype(np.float32))
    qt = gguf_q4_to_qlite(blocks, "Q4_1", K, symmetric=False)
    got = dequantize(qt.qweight, qt.scales, qt.zeros, 4, 32)
    assert (want[0, :32] == want[0, 0]).all()
    assert ((got[0, :32] - want[0, :32]).abs() <= 2 ** -10 * 0.3).all()


def test_no_map_returns_none():
    blocks = blocks_of(Q.Q4_1, np.random.default_rng(0))
    assert gguf_q4_to_qlite(blocks, "Q4_1", K, symmetric=True) is None  # offsets need zeros
    assert gguf_q4_to_qlite(blocks, "Q5_0", K, symmetric=False) is None
