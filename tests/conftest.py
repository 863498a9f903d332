"""Shared fixtures: tiny random Qwen2 / Qwen2-MoE checkpoints saved by transformers (the
reference), and the real demo model, pulled once per test session."""
import pytest
import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, norm_topk_prob=False,
                decoder_sparse_step=1, mlp_only_layers=[])


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A real byte-level BPE tokenizer (Qwen2's pre-tokenizer pieces) trained on a standard
    library source file: 256 byte tokens, merges up to 317 ids, then the ChatML specials."""
    import inspect
    import json as json_module
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=317, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(json_module.decoder)] * 2, trainer)
    tok.add_special_tokens(SPECIALS)
    return tok


def save_tokenizer(path, chat_template=None):
    from pathlib import Path
    import json
    tiny_tokenizer().save(str(Path(path) / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(cfg))


def save_tiny(path, moe=False, seed=0, chat_template=None, **overrides):
    """Save a random transformers Qwen2(-MoE) model with `overrides` and a tiny tokenizer to
    `path`; return the transformers model (the reference)."""
    import transformers
    torch.manual_seed(seed)
    params = dict(TINY_MOE if moe else TINY, **overrides)
    if moe:
        cfg = transformers.Qwen2MoeConfig(**params)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**params)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF initialises biases and norms to constants: make them random
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.eval()
    model.save_pretrained(path)
    save_tokenizer(path, chat_template)
    return model


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dense")
    return path, save_tiny(path)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_moe")
    return path, save_tiny(path, moe=True)


@pytest.fixture(scope="session")
def demo_dir():
    """The real demo model (pulled and converted on first use, then cached)."""
    from qlite.pull import pull_demo
    return pull_demo()


@pytest.fixture(scope="session")
def demo_gguf(demo_dir):
    from qlite.pull import demo_gguf_path
    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    """The demo model loaded once per run, float32 on the CPU."""
    import qlite
    return qlite.load(demo_dir, dtype="float32")


@pytest.fixture(scope="session")
def demo_reference(demo_gguf):
    """(model, tokenizer) from transformers' own GGUF loader on the demo file, float32: the
    reference for weights, token ids and greedy output (loaded once: ~60 s on 2 cores)."""
    import transformers
    kw = dict(gguf_file=demo_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_gguf.parent), dtype=torch.float32, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(demo_gguf.parent), **kw)
    return model, tok


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: extra threads only add synchronisation,
    which on a loaded 2-core runner costs seconds per call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
