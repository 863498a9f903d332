"""GGUF import against transformers' own GGUF loader (the reference): same tensors, same ids.

A tiny random qwen2 GGUF is written here with gguf-py, in every tensor type we claim to read;
the real demo model is checked under `-m demo`.
"""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from qlite.checkpoint import checkpoint_files  # noqa: E402
from qlite.config import load_config  # noqa: E402
from qlite.errors import QliteError  # noqa: E402
from qlite.gguf import convert_gguf  # noqa: E402

# hidden and intermediate are multiples of 256, the K-quant block size
H, I, HEADS, KV, LAYERS = 256, 512, 4, 2, 2
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = [
    "Hello, world! It's 2024 and we're testing 12345 tokens.",
    "你好，世界！今天天气怎么样？",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass",
    "Emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 and mixed 中文 English 😀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<tool_call>{\"a\": 1}</tool_call>",
    "  leading and trailing spaces   \r\n\n\nend",
]


def tiny_vocab():
    """A byte-level BPE (Qwen2 split) trained on a little mixed text, then Qwen's specials."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from qlite.gguf import QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog"] * 5,
                            trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens)
    for special, ty in [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3),
                        ("<tool_call>", 4), ("</tool_call>", 4), ("[PAD0]", 5)]:
        tokens.append(special)
        types.append(ty)
    return tokens, merges, types


def _kquant_blocks(rng, rows, cols, qtype):
    """Random but valid K-quant bytes (gguf-py cannot quantize to K types): random payload,
    small finite float16 scales where the block keeps them."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = lambda n: rng.uniform(1e-3, 1e-2, size=(rows, cols // block_elems, n)) \
        .astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        b[..., 0:4] = scale(2)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        b[..., 208:210] = scale(1)
    return b.reshape(rows, -1)


def add(writer, rng, name, shape, qtype):
    x = rng.standard_normal(shape).astype(np.float32) * 0.05
    if qtype == Q.F32:
        writer.add_tensor(name, x)
    elif qtype == Q.F16:
        writer.add_tensor(name, x.astype(np.float16))
    elif qtype in (Q.Q4_K, Q.Q6_K):
        writer.add_tensor(name, _kquant_blocks(rng, *shape, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)


def write_tiny_gguf(path, arch="qwen2", tied=False, seed=0):
    """A random qwen2 GGUF using F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    V, kv = len(tokens), KV * H // HEADS
    add(w, rng, "token_embd.weight", (V, H), Q.Q4_K)
    if not tied:
        add(w, rng, "output.weight", (V, H), Q.Q6_K)
    add(w, rng, "output_norm.weight", (H,), Q.F32)
    kinds = [dict(q=Q.Q8_0, k=Q.Q5_0, v=Q.F16, o=Q.Q4_0, gate=Q.Q5_1, up=Q.Q4_1, down=Q.Q6_K),
             dict(q=Q.BF16, k=Q.Q8_0, v=Q.Q5_0, o=Q.Q4_K, gate=Q.Q8_0, up=Q.F16, down=Q.Q5_0)]
    for layer, t in enumerate(kinds[:LAYERS]):
        p = f"blk.{layer}."
        add(w, rng, p + "attn_norm.weight", (H,), Q.F32)
        add(w, rng, p + "ffn_norm.weight", (H,), Q.F32)
        add(w, rng, p + "attn_q.weight", (H, H), t["q"])
        add(w, rng, p + "attn_q.bias", (H,), Q.F32)
        add(w, rng, p + "attn_k.weight", (kv, H), t["k"])
        add(w, rng, p + "attn_k.bias", (kv,), Q.F32)
        add(w, rng, p + "attn_v.weight", (kv, H), t["v"])
        add(w, rng, p + "attn_v.bias", (kv,), Q.F32)
        add(w, rng, p + "attn_output.weight", (H, H), t["o"])
        add(w, rng, p + "ffn_gate.weight", (I, H), t["gate"])
        add(w, rng, p + "ffn_up.weight", (I, H), t["up"])
        add(w, rng, p + "ffn_down.weight", (H, I), t["down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def converted_tensors(out):
    tensors = {}
    for shard in checkpoint_files(out):  # the index's shards, or the single file
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def assert_same_weights(out, ref_model):
    ours = converted_tensors(out)
    ref = ref_model.state_dict()
    tied = ref_model.config.tie_word_embeddings
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, ref[name]), name


def assert_same_ids(out, ref_tok, texts):
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == ref_tok(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_transformers(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    calls = []
    out = convert_gguf(src, tmp_path / "out", progress=lambda *a: calls.append(a),
                       dtype="float32")

    n_tensors = 3 + 12 * LAYERS - tied
    assert calls[-1] == ("convert", n_tensors, n_tensors) and len(calls) == n_tensors
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    assert_same_weights(out, ref)

    cfg = load_config(out)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id"):
        assert getattr(cfg, key) == getattr(ref.config, key), key
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.torch_dtype == "float32"

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert_same_ids(out, ref_tok, TEXTS)
    # A deliberate difference: like Qwen2's own tokenizer.json we NFC-normalize first;
    # transformers' GGUF tokenizer (and llama.cpp) do not, so only decomposed text differs.
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert ours.encode("cafe\u0301").ids == ours.encode("caf\u00e9").ids
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE
    assert (tc["eos_token"], tc["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    specials = {v["content"]: v["special"] for v in tc["added_tokens_decoder"].values()}
    assert specials == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True,
                        "<tool_call>": False, "</tool_call>": False}
    # transformers reads the directory back the same way
    ours_hf = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hi 你好"}]
    assert (ours_hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_shards_stay_under_the_limit(tmp_path, monkeypatch):
    import qlite.gguf
    monkeypatch.setattr(qlite.gguf, "SHARD_BYTES", 600_000)
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(src, tmp_path / "out", dtype="float32")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    # a shard holds tensors up to the limit, or a single bigger tensor alone
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        total = sum(4 * int(np.prod(s)) for s in sizes)
        assert total <= 600_000 or len(sizes) == 1
    assert len(converted_tensors(out)) == 3 + 12 * LAYERS


def test_unsupported_architecture(tmp_path):
    src = write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(QliteError, match=r"llama\.gguf.*'llama'"):
        convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.3, 0.999])
def test_truncated_file(tmp_path, keep):
    data = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(QliteError, match=r"cut\.gguf"):
        convert_gguf(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "full.gguf"]


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a gguf" * 10)
    with pytest.raises(QliteError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "out")
    with pytest.raises(QliteError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_refuses_non_empty_output(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QliteError, match="not empty"):
        convert_gguf(src, out)
    assert (out / "keep.txt").read_text() == "mine"


# --- the real demo model ---------------------------------------------------------------------
DEMO_TEXTS = TEXTS + [
    "Qwen2.5-Coder 是一个代码模型。它能写 Python、C++ 和 Rust！🚀🔥",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n",
    "naïve café — “quotes” … ½ ≠ ∞ 日本語のテキスト 한국어 텍스트 🤖💡🎉",
    "<|endoftext|><|fim_prefix|>def add(a, b):<|fim_suffix|><|fim_middle|>",
]


@pytest.mark.demo
def test_demo_weights_match_transformers(demo_dir, demo_reference):
    model, _ = demo_reference
    assert_same_weights(demo_dir, model)
    assert load_config(demo_dir).tie_word_embeddings is False  # output.weight is its own tensor


@pytest.mark.demo
def test_demo_tokens_and_template_match_transformers(demo_dir, demo_reference):
    transformers = pytest.importorskip("transformers")
    _, ref_tok = demo_reference
    assert_same_ids(demo_dir, ref_tok, DEMO_TEXTS)

    tc = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert (tc["eos_token"], tc["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    ours = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    msgs = [{"role": "user", "content": "Write quicksort in Python."}]
    text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                    "helpful assistant.<|im_end|>\n<|im_start|>user\nWrite quicksort in "
                    "Python.<|im_end|>\n<|im_start|>assistant\n")
    assert text == ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# --- qwen2moe ----------------------------------------------------------------------------------
E, MOE_I, SHARED_I = 4, 64, 128


def write_tiny_moe_gguf(path, seed=1, bad_type=False):
    """A random qwen2moe GGUF (2 layers, 4 experts, top 2, shared expert), stacked expert
    tensors in K-quant, legacy-quant and float types. Expert sizes are not transformers'
    Qwen2MoeConfig defaults (1408 / 5632), so a reader that ignores the metadata fails."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_expert_feed_forward_length(MOE_I)
    w.add_expert_shared_feed_forward_length(SHARED_I)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    V, kv = len(tokens), KV * H // HEADS
    add(w, rng, "token_embd.weight", (V, H), Q.Q8_0)
    add(w, rng, "output.weight", (V, H), Q.Q6_K)
    add(w, rng, "output_norm.weight", (H,), Q.F32)
    kinds = [dict(gate=Q.Q4_K, up=Q.Q4_0, down=Q.Q8_0, sgate=Q.Q5_0, sup=Q.Q4_1, sdown=Q.F16),
             dict(gate=Q.Q8_0, up=Q.F16, down=Q.Q5_1, sgate=Q.Q6_K, sup=Q.Q8_0, sdown=Q.Q4_0)]
    for layer, t in enumerate(kinds):
        p = f"blk.{layer}."
        for name, shape, ty in [
                ("attn_norm.weight", (H,), Q.F32), ("ffn_norm.weight", (H,), Q.F32),
                ("attn_q.weight", (H, H), Q.Q8_0), ("attn_q.bias", (H,), Q.F32),
                ("attn_k.weight", (kv, H), Q.Q5_0), ("attn_k.bias", (kv,), Q.F32),
                ("attn_v.weight", (kv, H), Q.F16), ("attn_v.bias", (kv,), Q.F32),
                ("attn_output.weight", (H, H), Q.Q4_K),
                ("ffn_gate_inp.weight", (E, H), Q.F32),
                ("ffn_gate_shexp.weight", (SHARED_I, H), t["sgate"]),
                ("ffn_up_shexp.weight", (SHARED_I, H), t["sup"]),
                ("ffn_down_shexp.weight", (H, SHARED_I), t["sdown"]),
                ("ffn_gate_inp_shexp.weight", (H,), Q.F32)]:
            if bad_type and layer == 1 and name == "ffn_norm.weight":  # I32: no float map
                w.add_tensor(p + name, np.ones(shape, dtype=np.int32))
                continue
            add(w, rng, p + name, shape, ty)
        for name, shape, ty in [("ffn_gate_exps.weight", (E, MOE_I, H), t["gate"]),
                                ("ffn_up_exps.weight", (E, MOE_I, H), t["up"]),
                                ("ffn_down_exps.weight", (E, H, MOE_I), t["down"])]:
            if ty in (Q.Q4_K, Q.Q6_K):
                raw = _kquant_blocks(rng, E * shape[1], shape[2], ty)
                w.add_tensor(p + name, raw.reshape(E, shape[1], -1), raw_dtype=ty)
            else:
                add(w, rng, p + name, shape, ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_qwen2moe_gguf_matches_transformers(tmp_path):
    """Same weights (float32, bit for bit), same logits, same greedy token ids as
    transformers' GGUF loader, with the expert sizes its qwen2moe mapping ignores set by hand
    (FACTS.md)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import qlite
    src = write_tiny_moe_gguf(tmp_path / "moe.gguf")
    out = convert_gguf(src, tmp_path / "out", dtype="float32")
    cfg = load_config(out)
    assert cfg.is_moe and (cfg.num_experts, cfg.num_experts_per_tok) == (E, 2)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (MOE_I, SHARED_I)
    assert cfg.norm_topk_prob is False

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="moe.gguf", dtype=torch.float32,
        moe_intermediate_size=MOE_I, shared_expert_intermediate_size=SHARED_I)
    assert ref.config.norm_topk_prob is False
    ours = converted_tensors(out)
    ref_sd = ref.state_dict()
    for layer in range(2):  # transformers stacks the experts in memory (gate rows first)
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = ref_sd.pop(p + "gate_up_proj"), ref_sd.pop(p + "down_proj")
        for e in range(E):
            ref_sd[f"{p}{e}.gate_proj.weight"] = gate_up[e, :MOE_I]
            ref_sd[f"{p}{e}.up_proj.weight"] = gate_up[e, MOE_I:]
            ref_sd[f"{p}{e}.down_proj.weight"] = down[e]
    assert set(ours) == set(ref_sd)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref_sd[name]), name

    model = qlite.load(out, device="cpu", dtype="float32")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
    # float32 both, summation order differs: logits are O(1); 1e-4 is ~100x the measured gap
    assert (got - want).abs().max().item() < 1e-4
    prompt = ids[:1]
    want_ids = ref.generate(prompt, max_new_tokens=8, do_sample=False, top_k=None, top_p=None,
                            temperature=None)[0, prompt.shape[1]:].tolist()
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[prompt.shape[1]:] == want_ids


def test_convert_defaults_to_bfloat16(tmp_path):
    """No full-precision copy unless asked: the default output is bfloat16, the float32 values
    rounded once."""
    src = write_tiny_moe_gguf(tmp_path / "moe.gguf")
    out = convert_gguf(src, tmp_path / "bf16")
    full = convert_gguf(src, tmp_path / "f32", dtype="float32")
    assert load_config(out).torch_dtype == "bfloat16"
    a, b = converted_tensors(out), converted_tensors(full)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == torch.bfloat16 and torch.equal(a[name], b[name].bfloat16()), name
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(out) < 0.51 * size(full)


def test_unreadable_tensor_type_one_line_nothing_written(tmp_path):
    from qlite.quantize import quantize_checkpoint
    src = write_tiny_moe_gguf(tmp_path / "bad.gguf", bad_type=True)
    for run in (lambda: convert_gguf(src, tmp_path / "out"),
                lambda: quantize_checkpoint(src, tmp_path / "out", 4, 32, "rtn")):
        with pytest.raises(QliteError, match=r"^\S*bad\.gguf: tensor blk\.1\.ffn_norm\.weight has "
                                             r"GGUF type I32, which qlite cannot read$"):
            run()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_gptq_from_a_gguf_equals_gptq_from_its_float32_conversion(tmp_path):
    """`qlite quantize FILE.gguf OUT --method gptq` reads the GGUF tensor by tensor (no
    converted copy on disk) and calibrates exactly as it does from the float32 conversion of
    the same file: the same codes, scales and zeros, bit for bit."""
    import inspect
    import json.decoder

    from qlite.cli import main
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    text = tmp_path / "calib.txt"
    text.write_text(inspect.getsource(json.decoder))
    opts = ["--method", "gptq", "--group-size", "32", "--calibration", str(text),
            "--calibration-tokens", "512"]
    main(["quantize", str(src), str(tmp_path / "from-gguf"), *opts])
    conv = convert_gguf(src, tmp_path / "f32", dtype="float32")
    main(["quantize", str(conv), str(tmp_path / "from-dir"), *opts])
    q = json.loads((tmp_path / "from-gguf" / "config.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["tokens"] == 512
    a, b = converted_tensors(tmp_path / "from-gguf"), converted_tensors(tmp_path / "from-dir")
    assert set(a) == set(b) and any(k.endswith(".qweight") for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
