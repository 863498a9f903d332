"""Quantized formats, quantizers, QuantLinear and QuantExperts on the CPU (CUDA cases marked)."""
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qlite.errors import QliteError
from qlite.kernels import cpu_gemv, reference
from qlite.quant import QuantExperts, QuantLinear, dequantize, quantize
from qlite.quant.swap import QuantConfig, quantized_targets
from qlite.quant.formats import pack_int4, unpack_int4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


FORMATS = [(4, 32, False), (4, 64, False), (4, 128, False), (4, 128, True), (8, 128, True)]


def _fmt(f):
    bits, g, sym = f
    return "int8" if bits == 8 else f"int4-g{g}-{'sym' if sym else 'asym'}"


@pytest.fixture
def gen():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def _weights(gen, n=96, k=512):
    return {"gaussian": torch.randn(n, k, generator=gen) * 0.02,
            # Student-t with 3 degrees of freedom: heavy tails, like real LLM weights
            "heavy-tailed": torch.distributions.StudentT(3.0).sample((n, k)) * 0.02}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_int4_pack_unpack_round_trip_is_exact(gen):
    codes = torch.randint(0, 16, (3, 7, 64), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)  # low nibble = even k


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
def test_shapes_and_dtypes_follow_the_documented_layout(fmt):
    bits, g, sym = fmt
    qt = quantize(torch.randn(48, 256), bits, g, sym, "rtn")
    if bits == 8:
        assert (qt.qweight.dtype, qt.qweight.shape, qt.scales.shape) == (torch.int8, (48, 256), (48,))
        assert qt.zeros is None
    else:
        assert (qt.qweight.dtype, qt.qweight.shape, qt.scales.shape) == (torch.uint8, (48, 128), (256 // g, 48))
        assert (qt.zeros is None) == sym and (sym or qt.zeros.shape == (256 // g, 48))
    assert qt.scales.dtype == torch.float16


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
def test_rtn_error_is_at_most_half_a_step(fmt, gen):
    bits, g, sym = fmt
    for w in _weights(gen).values():
        qt = quantize(w, bits, g, sym, "rtn")
        err = (dequantize(qt) - w).abs()
        if bits == 8:
            step = qt.scales.float()[:, None].expand_as(w)
        else:
            step = qt.scales.float().T.repeat_interleave(g, dim=1)
        # half a step, plus float16 rounding of the stored scale/zero (codes reach 15 steps)
        assert (err <= step * (0.5 + 16 * 2 ** -11) + 1e-7).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
def test_hqq_error_is_no_worse_than_rtn(fmt, gen):
    bits, g, sym = fmt
    for name, w in _weights(gen).items():
        e_rtn = (dequantize(quantize(w, bits, g, sym, "rtn")) - w).square().sum()
        e_hqq = (dequantize(quantize(w, bits, g, sym, "hqq")) - w).square().sum()
        assert e_hqq <= e_rtn, name
        if bits == 4:  # and clearly better at 4 bits (about 12-20% less squared error)
            assert e_hqq <= 0.95 * e_rtn, name


def test_constant_and_zero_groups_quantize_exactly_enough():
    w = torch.cat([torch.zeros(2, 128), torch.full((2, 128), 0.3), torch.full((2, 128), -1e-3)])
    for bits, g, sym in FORMATS:
        for method in ("rtn", "hqq"):
            deq = dequantize(quantize(w, bits, g, sym, method))
            assert torch.isfinite(deq).all()
            assert (deq - w).abs().max() <= 2e-3 * 0.3


def test_bad_options_raise_qlite_errors():
    w = torch.randn(8, 96)
    with pytest.raises(QliteError, match="bits"):
        quantize(w, bits=3)
    with pytest.raises(QliteError, match="group_size"):
        quantize(w, bits=4, group_size=48)
    with pytest.raises(QliteError, match="does not divide in_features 96 of layers.0.q_proj"):
        quantize(w, bits=4, group_size=64, name="layers.0.q_proj")
    with pytest.raises(QliteError, match="method"):
        quantize(w, bits=8, method="gptq")
    with pytest.raises(QliteError, match="2-D"):
        quantize(torch.randn(4, 4, 4))
    with pytest.raises(QliteError, match="group_size"):
        QuantLinear(100, 8, bits=4, group_size=64)


# ---- QuantLinear --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
@pytest.mark.parametrize("n", [64, 77])  # 77: torch's CPU int4 op needs N % 16 == 0 -> fallback
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-kernel", "torch-ops"])
def test_quant_linear_cpu_paths_match_reference(fmt, n, dt, c_kernel, gen, monkeypatch):
    bits, g, sym = fmt
    if c_kernel and not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    if not c_kernel:  # as on a machine without a C compiler
        monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    dtype = getattr(torch, dt)
    lin = nn.Linear(256, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, 256, generator=gen) * 0.05)
    q = QuantLinear.from_linear(lin, bits, g, "rtn", sym)
    q.prepare_cpu(dtype)  # as the loader does: torch's packed ops where the C kernel is not
    assert (q._cpu_pack is None) == (c_kernel or (bits == 4 and n % 16 != 0))
    tol = {"float32": 1e-4, "bfloat16": 1.6e-2, "float16": 2e-3}[dt]
    for m in (1, 3, 16):  # the torch packed ops (small M / bfloat16) and the reference
        x = torch.randn(2, m, 256, generator=gen).to(dtype)
        out = q(x)
        assert out.shape == (2, m, n) and out.dtype == dtype
        ref = x.float() @ q.dequantize().T + lin.bias.detach()
        assert _rel(out, ref) <= tol, m


def test_quant_linear_buffers_are_the_state_dict_and_load_on_meta(gen):
    lin = nn.Linear(128, 32, bias=True).to(torch.bfloat16)
    for bits, g, sym in FORMATS:
        q = QuantLinear.from_linear(lin, bits, g, "rtn", sym)
        sd = q.state_dict()
        expect = {"qweight", "scales", "bias"} | ({"zeros"} if bits == 4 and not sym else set())
        assert set(sd) == expect and list(q.parameters()) == []
        assert sd["bias"].dtype == torch.bfloat16
        empty = QuantLinear(128, 32, True, bits, g, sym, device="meta", dtype=torch.bfloat16)
        assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in sd.items()}
        empty.load_state_dict(sd, assign=True)
        x = torch.randn(3, 128, generator=gen, dtype=torch.bfloat16)
        assert torch.equal(empty(x), q(x))


def test_quant_linear_cpu_cache_follows_new_weights(gen):
    a = QuantLinear.from_linear(nn.Linear(128, 32), 4, 32)
    b = QuantLinear.from_linear(nn.Linear(128, 32), 4, 32)
    x = torch.randn(1, 128, generator=gen, dtype=torch.bfloat16)
    a(x)  # builds a's CPU int4 pack
    a.load_state_dict(b.state_dict())  # copies into a's buffers in place
    assert torch.equal(a(x), b(x))


def test_safetensors_round_trip(tmp_path, gen):
    lin = nn.Linear(256, 48)
    q = QuantLinear.from_linear(lin, 4, 64)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    back = QuantLinear(256, 48, True, 4, 64, device="meta", dtype=torch.float32)
    back.load_state_dict(load_file(tmp_path / "q.safetensors"), assign=True)
    x = torch.randn(5, 256, generator=gen)
    assert torch.equal(back(x), q(x))

    ex = QuantExperts.from_experts(DenseExperts(4, 128, 64, gen), 8)
    save_file(ex.state_dict(), tmp_path / "e.safetensors")
    back = QuantExperts(4, 128, 64, 8, device="meta")
    back.load_state_dict(load_file(tmp_path / "e.safetensors"), assign=True)
    ids, w = torch.randint(0, 4, (5, 2), generator=gen), torch.rand(5, 2, generator=gen)
    x = torch.randn(5, 128, generator=gen)
    assert torch.equal(back(x, ids, w), ex(x, ids, w))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(64, 64)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(64, 4, bias=False)  # the MoE router
        self.mlp.shared_expert_gate = nn.Linear(64, 1, bias=False)
        self.mlp.shared_expert = nn.Module()
        self.mlp.shared_expert.gate_proj = nn.Linear(64, 128, bias=False)
        self.input_layernorm = nn.LayerNorm(64)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 64)
        self.layers = nn.ModuleList([TinyBlock(), TinyBlock()])
        self.lm_head = nn.Linear(64, 10, bias=False)


def test_quantized_targets_skip_router_norms_and_what_is_kept():
    names = {n for n, _ in quantized_targets(TinyModel(), QuantConfig(4, 32, keep=("embed",)))}
    assert names == {f"layers.{i}.{m}" for i in (0, 1)
                     for m in ("self_attn.q_proj", "mlp.shared_expert.gate_proj")} | {"lm_head"}
    names = {n for n, _ in quantized_targets(TinyModel(), QuantConfig(8, keep="lm_head"))}
    assert "embed_tokens" in names and "lm_head" not in names
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate", "layernorm")) for n in names)


# ---- QuantExperts -------------------------------------------------------------------------

def DenseExperts(e, d, i, gen):
    """The model's dense experts (qlite.model.Experts: the interface QuantExperts implements)."""
    from qlite.model import Experts
    dense = Experts(e, d, i)
    with torch.no_grad():
        dense.gate_up_proj.copy_(torch.randn(e, 2 * i, d, generator=gen) * 0.05)
        dense.down_proj.copy_(torch.randn(e, d, i, generator=gen) * 0.05)
    return dense


def token_by_token(dense, x, topk_ids, topk_weights):
    """The plainest oracle of the experts interface."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = topk_ids[t, j]
            gate, up = (dense.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += topk_weights[t, j] * (dense.down_proj[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c-kernel", "dequantized"])
def test_quant_experts_equal_dense_experts_on_dequantized_weights(fmt, c_kernel, gen, monkeypatch):
    bits, g, sym = fmt
    if c_kernel and not cpu_gemv.available():
        pytest.skip(f"C kernel unavailable: {cpu_gemv.why_unavailable()}")
    if not c_kernel:
        monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    e, d, i, t, k = 8, 128, 64 if g <= 64 else 128, 7, 2
    dense = DenseExperts(e, d, i, gen)
    q = QuantExperts.from_experts(dense, bits, g, "rtn", sym)
    sd = q.state_dict()
    assert set(sd) == {f"{p}.{n}" for p in ("gate_up_proj", "down_proj")
                       for n in ("qweight", "scales") + (("zeros",) if bits == 4 and not sym else ())}
    assert all(v.shape[0] == e and v.is_contiguous() for v in sd.values())
    with torch.no_grad():
        dense.gate_up_proj.copy_(reference.dequantize(*q.gate_up_proj.packed(), bits, g))
        dense.down_proj.copy_(reference.dequantize(*q.down_proj.packed(), bits, g))
    x = torch.randn(t, d, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    ids[0] = ids[1]  # two tokens on the same experts
    w = torch.rand(t, k, generator=gen).softmax(-1)
    with torch.no_grad():
        ref = dense(x, ids, w)
        assert _rel(token_by_token(dense, x, ids, w), ref) <= 1e-5
    # The C kernel takes activations as int16 per group (about 5e-5 relative, two chained
    # products); the dequantized path is float32 throughout.
    assert _rel(q(x, ids, w), ref) <= (2e-4 if c_kernel else 1e-5)
    assert _rel(q(x.bfloat16(), ids, w), ref) <= 1.6e-2


# ---- CUDA ---------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt)
def test_cuda_quant_linear_and_experts_match_cpu(fmt, gen):
    bits, g, sym = fmt
    q = QuantLinear.from_linear(nn.Linear(512, 320), bits, g, "hqq", sym)
    x = torch.randn(4, 9, 512, generator=gen)
    ref = q(x)
    qc = q.cuda()
    for dt, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)):
        assert _rel(qc(x.to(dt).cuda()).cpu(), ref) <= tol
        assert _rel(qc(x[:, :1].to(dt).cuda()).cpu(), ref[:, :1]) <= tol
    ex = QuantExperts.from_experts(DenseExperts(16, 256, 128, gen), bits, g, "rtn", sym)
    x, ids = torch.randn(20, 256, generator=gen), torch.randint(0, 16, (20, 4), generator=gen)
    w = torch.rand(20, 4, generator=gen)
    ref = ex(x, ids, w)
    assert _rel(ex.cuda()(x.cuda(), ids.cuda(), w.cuda()).cpu(), ref) <= 1e-3
