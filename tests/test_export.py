"""`qlite export --format gptq`: qlite int4 -> GPTQ v1 as vLLM / SGLang / gptqmodel read it.

The exported tensors are decoded here by an unpacker written from the published layout
(AutoGPTQ's / vLLM's: qweight int32 [K/8, N], nibble j of word [r, n] = input 8r + j, LSB first;
qzeros int32 [K/G, N/8], nibble j of word [g, c] = output 8c + j, storing zero - 1; scales fp16
[K/G, N]; w = (q - (z + 1)) * s), numpy only, not qlite's code.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import qlite
from qlite.cli import main
from qlite.errors import QliteError
from qlite.export import export_checkpoint
from qlite.kernels.reference import dequantize
from qlite.quantize import quantize_checkpoint

from conftest import save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def moe32(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe32x")
    save_tiny(path, moe=True, shared_expert_intermediate_size=64,
              chat_template="{{ messages[0]['content'] }}")
    return path


def gptq_decode(t: dict, prefix: str, group_size: int) -> np.ndarray:
    """float32 W [N, K] from a GPTQ v1 linear, straight from the published layout."""
    qweight = t[f"{prefix}.qweight"].view(np.uint32)
    qzeros = t[f"{prefix}.qzeros"].view(np.uint32)
    scales = t[f"{prefix}.scales"].astype(np.float32)
    g_idx = t[f"{prefix}.g_idx"]
    k8, n = qweight.shape
    q = np.zeros((k8 * 8, n), np.int64)
    for j in range(8):
        q[j::8] = (qweight >> np.uint32(4 * j)) & 15
    z = np.zeros((qzeros.shape[0], qzeros.shape[1] * 8), np.int64)
    for j in range(8):
        z[:, j::8] = (qzeros >> np.uint32(4 * j)) & 15
    assert (g_idx == np.arange(k8 * 8) // group_size).all()
    return ((q - (z[g_idx] + 1)).astype(np.float32) * scales[g_idx]).T


def _quantized(src, tmp_path, **kw):
    return quantize_checkpoint(src, tmp_path / "q", 4, kw.pop("group_size", 32), "rtn",
                               symmetric=True, **kw)


def test_dense_export_decodes_to_the_same_weights(tiny_dense, tmp_path):
    q = _quantized(tiny_dense[0], tmp_path)
    main(["export", str(q), str(tmp_path / "gptq"), "--format", "gptq"])
    out = tmp_path / "gptq"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["quantization_config"] | {"meta": None} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
        "static_groups": False, "true_sequential": True, "damp_percent": 0.05,
        "checkpoint_format": "gptq", "meta": None}
    assert (out / "tokenizer.json").read_bytes() == (q / "tokenizer.json").read_bytes()
    t = load_file(out / "model.safetensors")
    model = qlite.load(q, dtype="float32")
    linears = 0
    for name, m in model.named_modules():
        if hasattr(m, "qweight") and name != "lm_head":
            w = gptq_decode(t, name, 32)
            assert np.array_equal(w, m.dequantize().numpy()), name
            linears += 1
            if m.bias is not None:
                assert t[f"{name}.bias"].dtype == np.float16
                assert np.array_equal(t[f"{name}.bias"], m.bias.half().numpy())
    assert linears == 2 * 7
    # kept or dequantized to float16: norms, embedding, lm_head
    assert t["lm_head.weight"].dtype == np.float16
    assert np.array_equal(t["lm_head.weight"], model.lm_head.dequantize().half().numpy())
    assert np.array_equal(t["model.embed_tokens.weight"],
                          model.model.embed_tokens.weight.half().numpy())
    assert t["model.norm.weight"].dtype == np.float16


def test_moe_export_writes_experts_one_by_one(moe32, tmp_path):
    q = _quantized(moe32, tmp_path, keep_16bit="embed,lm_head")
    out = export_checkpoint(q, tmp_path / "gptq")
    t = load_file(out / "model.safetensors")
    model = qlite.load(q, dtype="float32")
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj
    from qlite.kernels.reference import dequantize
    w13 = dequantize(gate_up.qweight, gate_up.scales, None, 4, 32)
    w2 = dequantize(experts.down_proj.qweight, experts.down_proj.scales, None, 4, 32)
    p = "model.layers.1.mlp.experts"
    for e in range(8):
        assert np.array_equal(gptq_decode(t, f"{p}.{e}.gate_proj", 32), w13[e, :32].numpy())
        assert np.array_equal(gptq_decode(t, f"{p}.{e}.up_proj", 32), w13[e, 32:].numpy())
        assert np.array_equal(gptq_decode(t, f"{p}.{e}.down_proj", 32), w2[e].numpy())
    assert f"{p}.gate_up_proj.qweight" not in t
    shared = model.model.layers[1].mlp.shared_expert.up_proj
    assert np.array_equal(gptq_decode(t, "model.layers.1.mlp.shared_expert.up_proj", 32),
                          shared.dequantize().numpy())
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert_gate.weight",
                 "lm_head.weight"):
        assert t[name].dtype == np.float16
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=4, group_size=32, method="rtn"), "asymmetric int4.*symmetric=True"),
    (dict(bits=8, method="rtn"), "int8 checkpoint; GPTQ export takes int4"),
])
def test_refuses_what_gptq_cannot_hold(tiny_dense, tmp_path, kwargs, match):
    q = quantize_checkpoint(tiny_dense[0], tmp_path / "q", **kwargs)
    with pytest.raises(QliteError, match=match):
        export_checkpoint(q, tmp_path / "gptq")
    with pytest.raises(QliteError, match="not a qlite-quantized checkpoint"):
        export_checkpoint(tiny_dense[0], tmp_path / "gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_interrupted_export_leaves_nothing(tiny_dense, tmp_path):
    q = _quantized(tiny_dense[0], tmp_path)

    def interrupt(stage, done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(q, tmp_path / "gptq", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_quantize_straight_to_gptq(tiny_dense, tmp_path):
    """`qlite quantize --format gptq` = quantize --symmetric, then export; nothing else left."""
    main(["quantize", str(tiny_dense[0]), str(tmp_path / "direct"), "--group-size", "32",
          "--method", "rtn", "--format", "gptq"])
    q = quantize_checkpoint(tiny_dense[0], tmp_path / "q", 4, 32, "rtn", symmetric=True)
    two_steps = export_checkpoint(q, tmp_path / "two")
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (two_steps / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct", "q", "two"]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_export_then_qlites_gptq_import_gives_back_the_same_weights(which, tiny_dense, moe32,
                                                                   tmp_path):
    """qlite int4 -> `qlite export --format gptq` -> qlite.load (the GPTQ import,
    qlite/gptq_awq.py): every quantized matrix dequantizes to the same float32 weights bit for
    bit; every other tensor is the source's rounded to float16 (GPTQ's storage)."""
    src = tiny_dense[0] if which == "dense" else moe32
    q = _quantized(src, tmp_path, keep_16bit="embed,lm_head")
    out = export_checkpoint(q, tmp_path / "gptq")
    a, b = qlite.load(q, dtype="float32"), qlite.load(out, dtype="float32")
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    packed = [n[:-len(".qweight")] for n in bufs_a if n.endswith(".qweight")]
    assert packed == [n[:-len(".qweight")] for n in bufs_b if n.endswith(".qweight")]
    assert len(packed) == (14 if which == "dense" else sum(
        2 + 3 * (layer.mlp.shared_expert is not None) if hasattr(layer.mlp, "experts") else 3
        for layer in a.model.layers) + 4 * len(a.model.layers))
    for p in packed:
        wa, wb = (dequantize(bufs[p + ".qweight"], bufs[p + ".scales"], bufs.get(p + ".zeros"),
                             4, 32) for bufs in (bufs_a, bufs_b))
        assert torch.equal(wa, wb), p
    # the rest as GPTQ checkpoints keep it: float16 (embedding, lm_head, norms, biases)
    rest = [n for n in bufs_a | dict(a.named_parameters())
            if n.rpartition(".")[0] not in packed or n.endswith(".bias")]
    params_b = dict(b.named_parameters()) | bufs_b
    for n, t in (dict(a.named_parameters()) | bufs_a).items():
        if n in rest:
            assert torch.equal(params_b[n], t.half().float()), n
