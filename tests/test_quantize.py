"""`qlite quantize`: the streamed int4/int8 checkpoint, its loading, errors, atomicity, memory.

The bound on logits against the fp32 reference (tiny random models, 2 layers, dim 64):
int8 per-channel rounding is ~0.5% of each weight's scale (absmax/127/sqrt(12) of a Gaussian
row, absmax ~ 2.5 sigma), the 16-bit rounding of kept tensors adds ~0.2%; measured ~0.5-1% on
logits -> bound 2%. int4 with groups of 32 has a step of (range/15): ~8% per weight; measured
~10-12% -> bound 20%. The exact check is the proof that the files round-trip: the loaded model
equals, bit for bit, the same model quantized in memory by qlite.quant's own helpers.
"""
import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import qlite
from qlite.errors import QliteError
from qlite.quant.swap import quantize_model
from qlite.quantize import quantize_checkpoint

from conftest import save_tiny

IDS = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """Tiny MoE whose dimensions all divide by 32 (the shared expert's 48 in TINY_MOE does not)."""
    path = tmp_path_factory.mktemp("moe32")
    return path, save_tiny(path, moe=True, shared_expert_intermediate_size=64)


def _reference(src, bits, group_size, method, symmetric=False, quantize_lm_head=True):
    """The model quantized in memory by qlite.quant's modules, module by module here (not by
    qlite.quantize nor quant/swap.py's rule), with the unquantized tensors rounded through
    bfloat16 as the checkpoint stores them."""
    from qlite.model import Experts
    from qlite.quant import QuantExperts, QuantLinear
    model = qlite.load(src, dtype="float32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith(("experts.gate_up_proj",
                                                            "experts.down_proj")) and \
                    not (name.endswith("weight") and _is_quantized_linear(model, name,
                                                                           quantize_lm_head)):
                p.data = p.bfloat16().float()  # fresh (aligned) memory, as the loader's cast makes
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and _is_quantized_linear(model, name + ".weight",
                                                                          quantize_lm_head)]
    for name, linear in linears:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                QuantLinear.from_linear(linear, bits, group_size or 128, method, symmetric, name))
    for layer in model.model.layers:
        if isinstance(getattr(layer.mlp, "experts", None), Experts):
            layer.mlp.experts = QuantExperts.from_experts(layer.mlp.experts, bits, group_size or 128,
                                                          method, symmetric)
    for module in model.modules():  # as qlite.load does: biases in the load dtype, scales
        for name, buf in module._buffers.items():  # and zeros stay float16
            if buf is not None and buf.is_floating_point() and name not in ("scales", "zeros"):
                module._buffers[name] = buf.float()
    return model


def _is_quantized_linear(model, pname, quantize_lm_head):
    mod = pname.rpartition(".")[0]
    if mod == "lm_head":
        return quantize_lm_head
    m = model.get_submodule(mod)
    return isinstance(m, torch.nn.Linear) and not mod.endswith(("mlp.gate", "shared_expert_gate"))


CASES = [(8, None, "rtn", False), (4, 32, "hqq", False), (4, 32, "rtn", False),
         (4, 32, "rtn", True)]


@pytest.mark.parametrize("bits, group_size, method, symmetric", CASES,
                         ids=["int8-rtn", "int4-g32-hqq", "int4-g32-rtn", "int4-g32-sym"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_quantized_checkpoint_loads_and_equals_in_memory_quantization(
        tiny_dense, moe_dir, tmp_path, moe, bits, group_size, method, symmetric):
    src, hf = moe_dir if moe else tiny_dense
    out = quantize_checkpoint(src, tmp_path / "q", bits, group_size, method,
                              symmetric=symmetric)
    model = qlite.load(out, dtype="float32")
    with torch.no_grad():
        got = model(IDS)
        exact = hf(IDS).logits
        ref = _reference(src, bits, group_size, method, symmetric)(IDS)
    assert torch.equal(got, ref)
    assert _rel(got, exact) < (0.02 if bits == 8 else 0.2)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["format"] == "qlite" and q["version"] == 1
    assert (q["bits"], q["group_size"], q["method"], q["symmetric"]) == (
        bits, group_size, method, symmetric)
    assert q["keep_16bit"] == ["embed"] and q["dtype_16bit"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert model.tokenizer is not None


def test_quantized_embedding_and_tied_head(tmp_path):
    """keep_16bit=() quantizes the embedding too; a tied lm_head is untied and quantized from
    the embedding. Equal to quantize_model in memory, close to the fp32 model."""
    src = tmp_path / "tied"
    hf = save_tiny(src, tie_word_embeddings=True)
    out = quantize_checkpoint(src, tmp_path / "q", 8, keep_16bit=())
    model = qlite.load(out, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization"]["keep_16bit"] == []
    ref = quantize_model(qlite.load(src, dtype="float32"), 8, keep_16bit=(),
                         dtype_16bit="bfloat16")
    with torch.no_grad():
        got = model(IDS)
        assert torch.equal(got, ref(IDS))
        assert _rel(got, hf(IDS).logits) < 0.02
    assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"


def test_keep_lm_head_and_bfloat16_activations(tiny_dense, tmp_path):
    src, hf = tiny_dense
    out = quantize_checkpoint(src, tmp_path / "q", 4, 32, "rtn", keep_16bit="lm_head,embed")
    model = qlite.load(out, dtype="bfloat16")
    from qlite.model import Linear
    assert type(model.lm_head) is Linear  # kept 16-bit
    with torch.no_grad():
        got = model(IDS)
    assert got.dtype == torch.bfloat16 and _rel(got.float(), hf(IDS).logits) < 0.2


def test_inspect_shows_the_format_and_the_bytes_saved(tiny_dense, tmp_path, capsys):
    from qlite.cli import main
    out = quantize_checkpoint(tiny_dense[0], tmp_path / "q", 4, 32, "rtn")
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "quantization   format=qlite" in text and "bits=4" in text and "group_size=32" in text
    saved = re.search(r"bytes saved\s+([\d.]+) MB: ([\d.]+) MB on disk for a ([\d.]+) MB", text)
    assert saved and float(saved[2]) < float(saved[3])


def test_sharded_output_and_sharded_source(moe_dir, tmp_path, monkeypatch):
    import qlite.quantize as Q
    src, _ = moe_dir
    monkeypatch.setattr(Q, "SHARD_BYTES", 40_000)
    monkeypatch.setattr(Q, "ROW_BLOCK_ELEMENTS", 1000)  # several row blocks per matrix
    a = quantize_checkpoint(src, tmp_path / "a", 4, 32, "rtn")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert all(f.stat().st_size < 60_000 for f in a.glob("*.safetensors"))
    # a sharded (already quantized) output is no source, but a sharded 16-bit one is
    monkeypatch.setattr(Q, "ROW_BLOCK_ELEMENTS", 1 << 24)
    b = quantize_checkpoint(src, tmp_path / "b", 4, 32, "rtn")
    with torch.no_grad():
        assert torch.equal(qlite.load(a, dtype="float32")(IDS), qlite.load(b, dtype="float32")(IDS))


def test_progress_reports_tensors_bytes_to_the_end(tiny_dense, tmp_path):
    calls = []
    quantize_checkpoint(tiny_dense[0], tmp_path / "q", 8,
                        progress=lambda stage, done, total, tensors=None:
                        calls.append((stage, done, total, tensors)))
    assert calls[0][1] == 0 and calls[-1][1] == calls[-1][2] > 0
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert calls[-1][3][0] == calls[-1][3][1] > 10
    plain = []  # a (stage, done, total) callback works too
    quantize_checkpoint(tiny_dense[0], tmp_path / "r", 8, progress=lambda *a: plain.append(a))
    assert plain[-1][1] == plain[-1][2]


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits 3"),
    (dict(bits=4, group_size=48), "group_size 48"),
    (dict(bits=4, group_size=128), "does not divide the input dimension 64"),
    (dict(bits=4, method="spqr"), "method 'spqr'"),
    (dict(bits=4, keep_16bit="router"), "keep_16bit 'router'"),
])
def test_bad_options_write_nothing(tiny_dense, tmp_path, kwargs, match):
    with pytest.raises(QliteError, match=match):
        quantize_checkpoint(tiny_dense[0], tmp_path / "q", **kwargs)
    assert not (tmp_path / "q").exists() and _no_leftovers(tmp_path)


def test_bad_sources_and_existing_output(tiny_dense, tmp_path):
    src = tiny_dense[0]
    with pytest.raises(QliteError, match="no such model directory"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "q", 8)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(QliteError, match="unsupported architecture"):
        quantize_checkpoint(llama, tmp_path / "q", 8)
    assert not (tmp_path / "q").exists()
    first = quantize_checkpoint(src, tmp_path / "q", 8)
    with pytest.raises(QliteError, match="already exists"):
        quantize_checkpoint(src, first, 4, 32)
    with pytest.raises(QliteError, match="already quantized"):
        quantize_checkpoint(first, tmp_path / "qq", 8)
    with pytest.raises(QliteError, match="must not be the source"):
        quantize_checkpoint(src, src / "inside", 8, force=True)
    assert json.loads((first / "config.json").read_text())["quantization"]["bits"] == 8
    quantize_checkpoint(src, first, 4, 32, force=True)  # --force replaces it
    assert json.loads((first / "config.json").read_text())["quantization"]["bits"] == 4
    assert _no_leftovers(tmp_path)


def test_interrupted_run_leaves_no_output(tiny_dense, tmp_path):
    src = tiny_dense[0]

    def interrupt(stage, done, total, tensors=None):
        if tensors[0] >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "q", 8, progress=interrupt)
    assert not (tmp_path / "q").exists() and _no_leftovers(tmp_path)
    # with --force over an existing output, the old one survives an interruption whole
    old = quantize_checkpoint(src, tmp_path / "q", 8)
    before = {f.name: f.read_bytes() for f in old.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, old, 4, 32, force=True, progress=interrupt)
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before
    assert _no_leftovers(tmp_path)


def test_killed_run_leaves_nothing_that_loads(tiny_dense, tmp_path):
    """SIGKILL mid-run: no output directory; the temporary one has no config.json."""
    marker = tmp_path / "started"
    code = textwrap.dedent(f"""
        import time
        from qlite.quantize import quantize_checkpoint
        def slow(stage, done, total, tensors=None):
            if tensors[0] == 5:
                open({str(marker)!r}, "w").close()
                time.sleep(60)
        quantize_checkpoint({str(tiny_dense[0])!r}, {str(tmp_path / "q")!r}, 8, progress=slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "q").exists()
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers and not any((p / "config.json").exists() for p in leftovers)
    with pytest.raises(QliteError):
        qlite.load(leftovers[0])


def test_gguf_source(tmp_path):
    tg = pytest.importorskip("test_gguf", reason="needs the GGUF test helpers")
    gguf_file = tg.write_tiny_gguf(tmp_path / "tiny.gguf")
    out = quantize_checkpoint(gguf_file, tmp_path / "q", 8)
    f32 = tmp_path / "f32"
    from qlite.gguf import convert_gguf
    convert_gguf(gguf_file, f32, dtype="float32")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = qlite.load(out, dtype="float32")(ids)
        ref = quantize_model(qlite.load(f32, dtype="float32"), 8, dtype_16bit="bfloat16")(ids)
    assert torch.equal(got, ref)
    assert _no_leftovers(tmp_path) and not (out / "source").exists()


def test_gguf_moe_source_keeps_4bit_codes(tmp_path):
    """qwen2moe GGUF -> int4 g32 straight from the file: tensors stored as Q4_0 / Q4_1 / Q4_K
    keep their codes (Q4_0 exactly: the dequantized weight equals gguf-py's), the others are
    quantized once from their float32 values, as quantize_model does in memory."""
    tg = pytest.importorskip("test_gguf", reason="needs the GGUF test helpers")
    import gguf as gguf_py
    from qlite.kernels.reference import dequantize
    gguf_file = tg.write_tiny_moe_gguf(tmp_path / "moe.gguf")
    out = quantize_checkpoint(gguf_file, tmp_path / "q", 4, 32, "rtn")
    assert _no_leftovers(tmp_path) and sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    q = json.loads((out / "config.json").read_text())["quantization"]
    # layer 0: attn_output Q4_K, experts gate Q4_K and up Q4_0 (stacked together), shared up
    # Q4_1; layer 1: attn_output Q4_K, shared down Q4_0
    assert q["gguf_codes_kept"] == 4 + 2 * tg.E
    model = qlite.load(out, dtype="float32")
    reader = gguf_py.GGUFReader(gguf_file)
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    want = torch.from_numpy(gguf_py.quants.dequantize(up.data, up.tensor_type).copy())
    experts = model.model.layers[0].mlp.experts
    got = dequantize(*experts.gate_up_proj.packed(), 4, 32)[:, tg.MOE_I:]
    assert torch.equal(got, want)  # Q4_0: the same weights, bit for bit
    f32 = tmp_path / "f32"
    from qlite.gguf import convert_gguf
    convert_gguf(gguf_file, f32, dtype="float32")
    ref = qlite.load(f32, dtype="float32")
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids), ref(ids)
    # int4 g32 on the tensors that were not 4-bit already: ~10% per weight (module docstring)
    assert _rel(a, b) < 0.2


MEMORY_SCRIPT = """
import json, resource, sys
import torch
from qlite.quant.swap import QuantConfig, quantize_matrix
from qlite.quantize import quantize_checkpoint
quantize_matrix(torch.randn(64, 128), QuantConfig(4, 128))  # lazy imports, allocator warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bits = int(sys.argv[3])
quantize_checkpoint(sys.argv[1], sys.argv[2], bits, 128 if bits == 4 else None, sys.argv[4])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth": (after - before) * 1024}))
"""


def _synthetic_checkpoint(path, layers=8, hidden=1024, inter=4096, vocab=8192, shard=100 << 20):
    """A Qwen2 checkpoint of random fp32 weights in several shards (~580 MB: 8 layers of 64 MB,
    embedding and lm_head of 32 MB); the largest tensor is 16 MB."""
    from safetensors.torch import save_file
    path.mkdir()
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab,
               hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        for n in "qkv":
            shapes[p + f"self_attn.{n}_proj.bias"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    g = torch.Generator().manual_seed(0)
    weight_map, cur, size, n = {}, {}, 0, 0
    names = list(shapes)
    for i, name in enumerate(names):
        cur[name] = torch.randn(shapes[name], generator=g) * 0.02
        size += cur[name].numel() * 4
        if size >= shard or i == len(names) - 1:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(cur, str(path / fname))
            weight_map.update({k: fname for k in cur})
            cur, size = {}, 0
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    largest = max(4 * torch.Size(s).numel() for s in shapes.values())
    return total, largest


@pytest.mark.parametrize("bits, method", [(4, "rtn"), (8, "rtn")])
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path, bits, method):
    total, largest = _synthetic_checkpoint(tmp_path / "src")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) >= 5
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "src"),
                          str(tmp_path / "q"), str(bits), method],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth"]
    # The rule is 2 GiB + 2x the largest tensor whatever the size; on this 580 MB model the
    # measured growth (a row block, its quantizer temporaries, one quantized matrix) must stay
    # far below the model: under 12x the largest tensor (192 MB) and a third of the model.
    assert growth < min(12 * largest, total / 3), (growth, largest, total)
    model = qlite.load(tmp_path / "q", dtype="float32")
    assert model.model.layers[7].mlp.down_proj.qweight.shape[0] == 1024


def test_demo_as_source_is_the_pulled_demo_model(tmp_path, monkeypatch):
    import qlite.pull
    src = tmp_path / "demo-model"
    save_tiny(src)
    pulled = []
    monkeypatch.setattr(qlite.pull, "pull_demo", lambda progress=None: pulled.append(1) or src)
    out = quantize_checkpoint("demo", tmp_path / "demo-int8", bits=8, method="rtn")
    assert pulled and json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert qlite.load(out, dtype="float32")(IDS).shape == (2, 19, 320)


def test_quantized_model_on_cpu_warns_once_without_the_c_kernel(tiny_dense, tmp_path,
                                                                 monkeypatch, capsys):
    import warnings
    from qlite.cli import main
    from qlite.kernels import cpu_gemv
    out = quantize_checkpoint(tiny_dense[0], tmp_path / "q", bits=8, method="rtn")
    if cpu_gemv.available():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning where the kernel works
            qlite.load(out, dtype="float32")
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_why", "no C compiler (cc/gcc) on PATH")
    from qlite.errors import QliteWarning
    with pytest.warns(QliteWarning, match=r"q: the CPU int4/int8 kernel is unavailable \(no C "
                                         r"compiler \(cc/gcc\) on PATH\); torch's slower ops"):
        model = qlite.load(out, dtype="float32")
    assert model(IDS).shape == (2, 19, 320)  # and it still runs, through torch's ops
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert "qlite: warning: " in err and "kernel is unavailable" in err
    assert err.count("unavailable") == 1
