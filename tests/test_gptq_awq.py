"""GPTQ / AWQ layouts -> qlite int4/int8 (quant/gptq_awq.py).

The packers below are written here from the published layouts (../shared/FACTS.md), in numpy
with Python loops over the code slots, independently of the code under test. The oracle is each
format's own dequantization w = (q - z) * s computed here in float32; the 4-bit conversions must
equal it bit for bit (the same fp16 scale times the same small integer is exact in float32).
"""
import re

import numpy as np
import pytest
import torch

from qlite.errors import QliteError
from qlite.kernels.reference import dequantize
from qlite.quant.gptq_awq import awq_to_qlite, gptq_to_qlite

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_gptq(codes, zeros, bits, v1):
    """codes [K, N] and true zero points [K/G, N] (ints) -> (qweight, qzeros) int32."""
    per, mask = 32 // bits, (1 << bits) - 1
    k, n = codes.shape
    qweight = np.zeros((k // per, n), dtype=np.uint32)
    for j in range(per):  # code j (LSB first) of word r is row r * per + j
        qweight |= (codes[j::per].astype(np.uint32) & mask) << np.uint32(bits * j)
    stored = (zeros - 1 if v1 else zeros).astype(np.int64) & mask  # v1 stores z - 1
    qzeros = np.zeros((zeros.shape[0], n // per), dtype=np.uint32)
    for j in range(per):  # code j of word c is column c * per + j
        qzeros |= stored[:, j::per].astype(np.uint32) << np.uint32(bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def pack_awq(x):
    """[R, N] codes -> [R, N/8] int32, code i of word c holding column 8c + ORDER[i]."""
    r, n = x.shape
    out = np.zeros((r, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= x[:, 8 * c + ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32))


def oracle(codes, zeros, scales, g):
    """float32 [N, K]: (q - z) * s per the format, from the unpacked numbers."""
    z = np.repeat(zeros, g, axis=0).astype(np.float32)
    s = np.repeat(scales.astype(np.float32), g, axis=0)
    return torch.from_numpy(((codes.astype(np.float32) - z) * s).T.copy())


def random_layer(rng, k, n, g, bits=4, sym=False):
    codes = rng.integers(0, 1 << bits, size=(k, n))
    if sym:
        zeros = np.full((k // g, n), 1 << (bits - 1))
    else:
        zeros = rng.integers(0, 1 << bits, size=(k // g, n))
        zeros[0, :3] = [0, (1 << bits) - 1, 1]  # the extremes, incl. v1's stored -1
    scales = rng.uniform(1e-3, 2e-2, size=(k // g, n)).astype(np.float16)
    scales[0, 0] = np.float16(6e-5)  # subnormal-adjacent and large fp16 scales too
    scales[-1, -1] = np.float16(3.5)
    return codes, zeros, scales


def qlite_weight(qt):
    return dequantize(qt.qweight, qt.scales, qt.zeros, qt.bits, qt.group_size)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_int4_exact(g, sym, v1):
    rng = np.random.default_rng(g + 2 * sym + v1)
    k, n = 256, 48
    codes, zeros, scales = random_layer(rng, k, n, g, sym=sym)
    qweight, qzeros = pack_gptq(codes, zeros, 4, v1)
    g_idx = torch.arange(k, dtype=torch.int32) // g
    qt = gptq_to_qlite(qweight, qzeros, torch.from_numpy(scales), g_idx, 4, g, sym, v1)
    assert (qt.zeros is None) == sym
    if v1:  # what v1 readers use: the stored z - 1 plus one, so a true 0 reads as 16
        zeros = ((zeros - 1) & 15) + 1
    want = oracle(codes, zeros, scales, g)
    assert torch.equal(qlite_weight(qt), want)
    assert torch.equal(dequantize(qt.qweight, qt.scales, qt.zeros, 4, g, torch.float16),
                       want.half())


def test_gptq_v1_stored_fifteen_is_sixteen():
    """v1 with a true zero point 0 stores (0 - 1) & 15 = 15; AutoGPTQ's kernels add 1 to the
    unpacked code and use 16 (no carry into the neighbouring code). We read it the same way."""
    k, n, g = 64, 8, 32
    codes = np.full((k, n), 3)
    stored = np.zeros((k // g, n), dtype=np.int64)
    stored[0, 0] = 15
    qweight, qzeros = pack_gptq(codes, stored, 4, v1=False)  # write the stored values as is
    scales = np.full((k // g, n), 0.5, dtype=np.float16)
    w = qlite_weight(gptq_to_qlite(qweight, qzeros, torch.from_numpy(scales), None, 4, g,
                                   v1=True)).T
    assert w[0, 0] == (3 - 16) * 0.5 and w[0, 1] == (3 - 1) * 0.5


@pytest.mark.parametrize("g", [32, 128])
def test_awq_exact(g):
    rng = np.random.default_rng(g)
    k, n = 256, 64
    codes, zeros, scales = random_layer(rng, k, n, g)
    qt = awq_to_qlite(pack_awq(codes), pack_awq(zeros), torch.from_numpy(scales), g)
    assert torch.equal(qlite_weight(qt), oracle(codes, zeros, scales, g))


def test_awq_against_autoawq():
    """AutoAWQ's own dequantization (awq/utils/packing_utils.py, pure torch), where autoawq is
    installed (`pip install --no-deps autoawq`; its dependency pins keep it out of our extras).
    Loaded by file path: the package's __init__ imports transformers models we do not need."""
    import importlib.util
    spec = importlib.util.find_spec("awq")
    if spec is None:
        pytest.skip("autoawq is not installed (an optional second implementation)")
    path = spec.submodule_search_locations[0] + "/utils/packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    rng = np.random.default_rng(7)
    k, n, g = 128, 64, 64
    codes, zeros, scales = random_layer(rng, k, n, g)
    qweight, qzeros, s = pack_awq(codes), pack_awq(zeros), torch.from_numpy(scales)
    theirs = mod.dequantize_gemm(qweight, qzeros, s, 4, g)  # fp16 [K, N]
    ours = qlite_weight(awq_to_qlite(qweight, qzeros, s, g))
    assert torch.equal(ours.T.half(), theirs)


def test_gptq_int8_requantized_within_half_a_step():
    """8-bit GPTQ (group-wise) becomes qlite int8 (per output channel): one extra rounding, at
    most half the per-channel step per weight."""
    rng = np.random.default_rng(3)
    k, n, g = 256, 32, 64
    codes, zeros, scales = random_layer(rng, k, n, g, bits=8, sym=True)
    qweight, qzeros = pack_gptq(codes, zeros, 8, v1=True)
    qt = gptq_to_qlite(qweight, qzeros, torch.from_numpy(scales), None, 8, g, True)
    assert qt.bits == 8 and qt.qweight.shape == (n, k)
    want = oracle(codes, zeros, scales, g)
    step = qt.scales.float().unsqueeze(1)
    assert ((qlite_weight(qt) - want).abs() <= step / 2 * 1.001).all()


def test_act_order_refused():
    rng = np.random.default_rng(0)
    k, n, g = 64, 8, 32
    codes, zeros, scales = random_layer(rng, k, n, g)
    qweight, qzeros = pack_gptq(codes, zeros, 4, True)
    g_idx = torch.from_numpy(rng.permutation(k) // g).int()
    with pytest.raises(QliteError, match=r"^layer\.g_idx: act-order"):
        gptq_to_qlite(qweight, qzeros, torch.from_numpy(scales), g_idx, 4, g, name="layer")


@pytest.mark.parametrize("case, match", [
    ("no_qzeros", r"^layer: the checkpoint has no qzeros$"),
    ("sym_zero", r"^layer\.qzeros: zero point 3 at group 0, column 0"),
    ("bits", r"GPTQ bits=3"),
    ("scales_shape", r"^layer\.scales: torch.float16 \[4, 8\], expected float16 \[2, 8\]"),
])
def test_bad_input_one_line(case, match):
    rng = np.random.default_rng(0)
    k, n, g = 64, 8, 32
    codes, zeros, scales = random_layer(rng, k, n, g, sym=True)
    if case == "sym_zero":
        zeros[0, 0] = 3
    qweight, qzeros = pack_gptq(codes, zeros, 4, True)
    s = torch.from_numpy(scales)
    args = dict(qweight=qweight, qzeros=qzeros, scales=s, bits=4, group_size=g, symmetric=True,
                name="layer")
    if case == "no_qzeros":
        args["qzeros"] = None
    if case == "bits":
        args["bits"] = 3
    if case == "scales_shape":
        args["scales"] = torch.cat([s, s])
    with pytest.raises(QliteError, match=match) as e:
        gptq_to_qlite(**args)
    assert "\n" not in str(e.value)


# --- checkpoints: qlite.load of a GPTQ / AWQ directory -------------------------------------------

def _rtn_codes(w, g, bits, sym):
    """A simple quantizer written here: w [N, K] float -> codes [K, N], zeros [K/G, N], fp16
    scales [K/G, N] (any valid numbers would do; these keep the model sensible)."""
    n, k = w.shape
    wg = w.T.reshape(k // g, g, n).double()
    top = (1 << bits) - 1
    if sym:
        s = (wg.abs().amax(1) / (top // 2)).clamp(min=1e-4).half()
        z = torch.full_like(s, (top + 1) // 2, dtype=torch.int64)
    else:
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        s = ((hi - lo) / top).clamp(min=1e-4).half()
        z = (-lo / s.double()).round().clamp(0, top).long()
    q = (wg / s.double().unsqueeze(1) + z.unsqueeze(1)).round().clamp(0, top).long()
    return q.reshape(k, n).numpy(), z.numpy(), s.numpy()


def _is_quantized(name, shape):
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")))


def write_quantized_checkpoint(src, out, method="gptq", bits=4, g=32, sym=True, v1=True,
                               desc_act=False, placeholder_bias=True):
    """A published-style GPTQ / AWQ directory from the float checkpoint `src`: quantized linears
    as qweight/qzeros/scales(/g_idx), zero placeholder biases on linears without one, everything
    else fp16; returns {module: float32 [N, K] weight as the format dequantizes it}."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    sd = load_file(str(src / "model.safetensors"))
    out.mkdir()
    tensors, oracles = {}, {}
    for name, w in sd.items():
        if not _is_quantized(name, w.shape):
            tensors[name] = w.half()
            continue
        prefix = name[: -len(".weight")]
        codes, zeros, scales = _rtn_codes(w.float(), g, bits, sym)
        if method == "awq":
            tensors[prefix + ".qweight"] = pack_awq(codes)
            tensors[prefix + ".qzeros"] = pack_awq(zeros)
        else:
            tensors[prefix + ".qweight"], tensors[prefix + ".qzeros"] = pack_gptq(codes, zeros, bits, v1)
            if v1:
                zeros = ((zeros - 1) & ((1 << bits) - 1)) + 1
            g_idx = np.arange(w.shape[1]) // g
            if desc_act:
                g_idx = np.random.default_rng(0).permutation(g_idx)
            tensors[prefix + ".g_idx"] = torch.from_numpy(g_idx).int()
        tensors[prefix + ".scales"] = torch.from_numpy(scales)
        if placeholder_bias and prefix + ".bias" not in sd:
            tensors[prefix + ".bias"] = torch.zeros(w.shape[0], dtype=torch.float16)
        oracles[prefix] = oracle(codes, zeros, scales, g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = (
        {"quant_method": "awq", "bits": bits, "group_size": g, "zero_point": True, "version": "gemm"}
        if method == "awq" else
        {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym, "desc_act": desc_act,
         "checkpoint_format": "gptq" if v1 else "gptq_v2"})
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return oracles


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    """Tiny dense and MoE checkpoints whose dimensions all divide by 32."""
    from conftest import save_tiny
    dense = tmp_path_factory.mktemp("dense")
    moe = tmp_path_factory.mktemp("moe")
    save_tiny(dense)
    save_tiny(moe, moe=True, shared_expert_intermediate_size=64)
    return {"dense": dense, "moe": moe}


def _reference_model(src, oracles):
    """transformers' model with the format's dequantized weights and fp16-rounded others."""
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    sd = ref.state_dict()
    with torch.no_grad():
        for name, p in sd.items():
            p.copy_(p.half().float())
        for prefix, w in oracles.items():
            m = prefix.split(".mlp.experts.")
            if len(m) == 2:  # transformers stacks experts: gate_up_proj [E, 2I, D], down [E, D, I]
                e, part = m[1].split(".")
                base = m[0] + ".mlp.experts."
                if part == "down_proj":
                    sd[base + "down_proj"][int(e)].copy_(w)
                else:
                    i = w.shape[0]
                    rows = slice(0, i) if part == "gate_proj" else slice(i, 2 * i)
                    sd[base + "gate_up_proj"][int(e), rows].copy_(w)
            else:
                sd[prefix + ".weight"].copy_(w)
    return ref.eval()


def _weights_of(model):
    """{checkpoint module prefix: float32 weight} of a loaded qlite model."""
    from qlite.quant import QuantExperts, QuantLinear
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.dequantize()
        elif isinstance(m, QuantExperts):
            gu = dequantize(*m.gate_up_proj.packed(), m.bits, m.group_size)
            down = dequantize(*m.down_proj.packed(), m.bits, m.group_size)
            for e in range(m.num_experts):
                out[f"{name}.{e}.gate_proj"] = gu[e, :m.hidden]
                out[f"{name}.{e}.up_proj"] = gu[e, m.hidden:]
                out[f"{name}.{e}.down_proj"] = down[e]
    return out


@pytest.mark.parametrize("kind, method, bits, g, sym, v1", [
    ("dense", "gptq", 4, 32, True, True),    # Qwen's GPTQ-Int4 layout (g128 there; the tiny
    ("dense", "gptq", 4, 32, False, False),  # dims 64/96 take 32; g64/g128 are covered above)
    ("dense", "awq", 4, 32, False, True),
    ("moe", "gptq", 4, 32, True, True),     # Qwen2-57B-A14B-Instruct-GPTQ-Int4's layout
    ("moe", "awq", 4, 32, False, True),
])
def test_load_quantized_checkpoint_exact(float_dirs, tmp_path, kind, method, bits, g, sym, v1):
    """Every quantized weight equals the format's own dequantization bit for bit; logits and
    greedy ids as transformers with those weights (float32 both: 1e-4 is ~50x the gap seen)."""
    import qlite
    src = float_dirs[kind]
    oracles = write_quantized_checkpoint(src, tmp_path / "q", method, bits, g, sym, v1)
    model = qlite.load(tmp_path / "q", device="cpu", dtype="float32")
    got = _weights_of(model)
    assert set(got) == set(oracles)
    for name, w in oracles.items():
        assert torch.equal(got[name], w), name
    ref = _reference_model(src, oracles)
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-4
    prompt = ids[:1]
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False, top_k=None, top_p=None,
                        temperature=None)[0, prompt.shape[1]:].tolist()
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[prompt.shape[1]:] == want


def test_load_gptq_int8_requantized(float_dirs, tmp_path):
    """8-bit GPTQ loads as qlite int8 per channel: each weight within half a per-channel step
    of the checkpoint's own dequantization (the one extra rounding)."""
    import qlite
    oracles = write_quantized_checkpoint(float_dirs["dense"], tmp_path / "q", "gptq", 8, 32,
                                         sym=True)
    model = qlite.load(tmp_path / "q", device="cpu", dtype="float32")
    assert model.config.quantization["bits"] == 8
    for name, m in model.named_modules():
        if name in oracles:
            step = m.scales.float().unsqueeze(1)
            assert ((m.dequantize() - oracles[name]).abs() <= step / 2 * 1.001).all(), name


def _edit_config(path, **changes):
    import json
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(path, name):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    del sd[name]
    save_file(sd, str(path / "model.safetensors"))


def _set_tensor(path, name, value):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    sd[name] = value
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize("case, match", [
    ("method", r"config\.json: quantization_config\.quant_method 'bitnet' is not supported"),
    ("bits", r"config\.json: quantization_config\.bits 3 is not supported for gptq"),
    ("group", r"config\.json: quantization_config\.group_size -1 is not supported"),
    ("format", r"config\.json: quantization_config\.checkpoint_format 'marlin' is not supported"),
    ("qzeros", r"model\.safetensors: model\.layers\.0\.self_attn\.o_proj\.qweight: the "
               r"checkpoint has no qzeros$"),
    ("act_order", r"model\.safetensors: model\.layers\.0\.self_attn\.q_proj\.qweight\.g_idx: "
                  r"act-order \(desc_act\) group order is not supported"),
    ("bias", r"model\.safetensors: model\.layers\.1\.mlp\.down_proj\.bias: nonzero bias"),
    ("extra", r"model\.safetensors: model\.layers\.0\.foo\.weight: unexpected tensor$"),
])
def test_bad_checkpoint_one_line(float_dirs, tmp_path, case, match):
    import qlite
    q = tmp_path / "q"
    write_quantized_checkpoint(float_dirs["dense"], q, "gptq", 4, 32, sym=True,
                               desc_act=case == "act_order")
    if case == "method":
        _edit_config(q, quant_method="bitnet")
    elif case == "bits":
        _edit_config(q, bits=3)
    elif case == "group":
        _edit_config(q, group_size=-1)
    elif case == "format":
        _edit_config(q, checkpoint_format="marlin")
    elif case == "qzeros":
        _drop_tensor(q, "model.layers.0.self_attn.o_proj.qzeros")
    elif case == "bias":
        _set_tensor(q, "model.layers.1.mlp.down_proj.bias", torch.ones(64, dtype=torch.float16))
    elif case == "extra":
        _set_tensor(q, "model.layers.0.foo.weight", torch.ones(2, dtype=torch.float16))
    before = sorted(p.name for p in q.iterdir())
    with pytest.raises(QliteError, match=match) as e:
        qlite.load(q, device="cpu")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in q.iterdir()) == before  # nothing written


def test_inspect_plan_and_offload_take_a_gptq_moe(float_dirs, tmp_path, capsys):
    """`qlite inspect` names the source format, `qlite plan` plans it, and expert offloading
    (2 slots per layer, CPU bookkeeping) gives the same logits as all experts resident."""
    import qlite
    from qlite.cli import main
    q = tmp_path / "q"
    write_quantized_checkpoint(float_dirs["moe"], q, "gptq", 4, 32, sym=True)
    main(["inspect", str(q)])
    out = capsys.readouterr().out
    assert "quant_method=gptq, bits=4, group_size=32, sym=True, desc_act=False" in out
    assert "loads as       qlite int4 g32 sym" in out and "I32" in out
    main(["plan", "--model", str(q), "--expert-slots", "2"])
    out = capsys.readouterr().out
    assert "int4 weights" in out and "routed experts: 2 of 8 per layer" in out
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = qlite.load(q, device="cpu", dtype="float32")(ids)
        off = qlite.load(q, device="cpu", dtype="float32", expert_slots=2)(ids)
    assert torch.equal(full, off)


def test_inspect_and_plan_a_gguf_file(tmp_path, capsys):
    tg = pytest.importorskip("test_gguf", reason="needs the GGUF test helpers")
    from qlite.cli import main
    src = tg.write_tiny_moe_gguf(tmp_path / "moe.gguf")
    main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert "format         GGUF (qwen2moe)" in out
    assert "experts        4 routed (top 2), size 64, shared 128" in out
    # the file's type mix: Q8_0 holds 8.5 bits a weight (34 bytes per 32), Q4_0 4.5
    assert re.search(r"Q8_0 +\d+ tensors, .* \(8\.50 bits/weight\)", out)
    assert re.search(r"Q4_0 +\d+ tensors, .* \(4\.50 bits/weight\)", out)
    main(["plan", "--model", str(src), "--expert-slots", "1"])
    out = capsys.readouterr().out
    assert "moe.gguf: int4 weights" in out and "routed experts: 1 of 4 per layer" in out


def test_quantize_refuses_a_gptq_source(float_dirs, tmp_path):
    from qlite.quantize import quantize_checkpoint
    write_quantized_checkpoint(float_dirs["dense"], tmp_path / "q", "gptq", 4, 32)
    with pytest.raises(QliteError, match=r"q: is already quantized$"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()
