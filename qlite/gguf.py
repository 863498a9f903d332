"""GGUF import: turn a llama.cpp qwen2 GGUF into an HF-style float32 model directory.

The output is what `qlite.load` reads anyway (config.json, sharded safetensors, tokenizer.json,
tokenizer_config.json), so a GGUF model needs no loading path of its own.

Reference: transformers' GGUF loader. For qwen2 it dequantizes every tensor with
`gguf.quants.dequantize` into float32 and only renames; q/k are NOT permuted (llama.cpp permutes
q/k rows for the llama architecture only), so neither do we. The tokenizer is rebuilt from the
vocabulary, merges and token types the file stores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qlite.checkpoint import ShardWriter
from qlite.config import Config
from qlite.errors import QliteError

Progress = Callable[[str, int, int], None]

SHARD_BYTES = 1_000_000_000  # ≤ 1 GB per safetensors shard

# GGUF name (layer part) -> HF name. A `blk.N.` prefix becomes `model.layers.N.`.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Qwen2's pre-tokenizer split (the one in Qwen2's own tokenizer.json): digits one at a time.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a qwen2 GGUF tensor name, or None if it is not one we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


# ---------------------------------------------------------------------------------------------
# Reading

def _open(path: Path):
    """A GGUFReader, with every way a bad file can fail turned into one QliteError."""
    import gguf

    if not path.is_file():
        raise QliteError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # ValueError, struct.error, IndexError...: a short slice of the
        # memory map fails to reshape, so a truncated data section is caught here too
        raise QliteError(f"{path}: not a valid GGUF file, truncated or corrupt ({e})") from None
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x) -> float:
    # GGUF stores these as float32: keep its shortest repr, 1e-06 rather than 9.99999997e-07
    # (the difference is far below float32 resolution where they are used).
    return float(str(np.float32(x)))


def read_metadata(reader, path: Path) -> tuple[Config, dict]:
    """Config and tokenizer metadata of a qwen2 GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise QliteError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(qlite imports 'qwen2' GGUF files)")

    def need(key):
        value = _field(reader, key)
        if value is None:
            raise QliteError(f"{path}: missing GGUF metadata {key!r}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise QliteError(f"{path}: missing tensor 'token_embd.weight'")
    tokens = need("tokenizer.ggml.tokens")
    heads = int(need("qwen2.attention.head_count"))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = Config(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        hidden_size=int(need("qwen2.embedding_length")),
        intermediate_size=int(need("qwen2.feed_forward_length")),
        num_hidden_layers=int(need("qwen2.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "qwen2.attention.head_count_kv", heads)),
        rms_norm_eps=_f32(need("qwen2.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_field(reader, "qwen2.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "qwen2.context_length", 32768)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=[] if eos is None else [int(eos)],
        torch_dtype="float32",
    )
    tok = {
        "tokens": tokens,
        "merges": _field(reader, "tokenizer.ggml.merges", []),
        "token_type": _field(reader, "tokenizer.ggml.token_type", []),
        "model": _field(reader, "tokenizer.ggml.model"),
        "pre": _field(reader, "tokenizer.ggml.pre"),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "padding_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return cfg, tok


# ---------------------------------------------------------------------------------------------
# Tokenizer

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the spelling byte-level BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(tok: dict, path: Path):
    """A `tokenizers.Tokenizer` for a GGUF byte-level BPE (`gpt2`) vocabulary with Qwen2's
    pre-tokenizer. Returns (tokenizer, added-token entries for tokenizer_config.json)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors

    if tok["model"] != "gpt2":
        raise QliteError(f"{path}: tokenizer model {tok['model']!r} is not supported "
                         f"(qlite builds byte-level BPE, 'gpt2')")
    if tok["pre"] not in (None, "qwen2"):
        raise QliteError(f"{path}: pre-tokenizer {tok['pre']!r} is not supported (expected 'qwen2')")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(t: str) -> str:
        # Every token should already be in the byte alphabet; respell any that is not, as
        # transformers does, so that ids stay where the file puts them.
        return t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))

    tokens = tok["tokens"]
    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                     byte_fallback=False)
    t = Tokenizer(bpe)
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|>...) become special added tokens, user-defined ones
    # (<tool_call>) plain added tokens, so that both stay whole in text. A control token spelled
    # outside the byte alphabet is a llama.cpp mislabel; transformers skips it, so do we.
    types = tok["token_type"] or []
    special = [tokens[i] for i, ty in enumerate(types)
               if ty == _CONTROL and set(tokens[i]) <= alphabet]
    user = [tokens[i] for i, ty in enumerate(types) if ty == _USER_DEFINED]
    t.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    t.add_tokens([AddedToken(s, normalized=False, special=False) for s in user])
    added = {}
    for s, is_special in [(s, True) for s in special] + [(s, False) for s in user]:
        added[str(vocab[s])] = {"content": s, "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": is_special}
    return t, added


def _token(tok: dict, key: str) -> str | None:
    i = tok.get(key)
    return None if i is None or not 0 <= int(i) < len(tok["tokens"]) else tok["tokens"][int(i)]


def tokenizer_config(tok: dict, added: dict, cfg: Config) -> dict:
    out = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": tok["add_bos_token"],
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": _token(tok, "bos_token_id"),
        "eos_token": _token(tok, "eos_token_id"),
        "pad_token": _token(tok, "padding_token_id"),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": cfg.max_position_embeddings,
        "split_special_tokens": False,
    }
    if tok["chat_template"]:
        out["chat_template"] = tok["chat_template"]
    return out


def generation_config(tok: dict, cfg: Config) -> dict:
    # Chat models end a turn with eos (<|im_end|>) but may also emit <|endoftext|>; stop on both,
    # as Qwen's own generation_config.json does.
    eos = list(cfg.eos_token_id)
    tokens = tok["tokens"]
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos:
        eos.append(tokens.index("<|endoftext|>"))
    out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}
    pad = tok.get("padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


# ---------------------------------------------------------------------------------------------
# Weights

def _write_weights(reader, cfg: Config, path: Path, out: Path, progress: Progress | None):
    """Dequantize tensor by tensor, streaming each straight into its shard: the shapes are known
    from the GGUF header, so every safetensors header can be written first and only one
    dequantized tensor is ever held in memory."""
    from gguf.quants import dequantize

    entries = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise QliteError(f"{path}: unexpected tensor {t.name!r} for a qwen2 model")
        # ggml lists dimensions fastest first; torch/numpy the other way round.
        entries.append((name, tuple(int(d) for d in reversed(t.shape)), t))
    entries.sort(key=lambda e: _order(e[0]))
    _check_tensors(cfg, {name: shape for name, shape, _ in entries}, path)

    writer = ShardWriter(out, [(name, shape, torch.float32) for name, shape, _ in entries],
                         SHARD_BYTES)
    try:
        for done, (name, shape, t) in enumerate(entries, 1):
            try:
                w = dequantize(t.data, t.tensor_type)
            except Exception as e:
                raise QliteError(f"{path}: cannot dequantize tensor {t.name} of type "
                                 f"{t.tensor_type.name} ({e})") from None
            w = np.require(w, np.float32, ["C", "W"])  # F32 tensors come as read-only views
            if w.shape != shape:
                raise QliteError(f"{path}: tensor {t.name} dequantized to shape {w.shape}, "
                                 f"its header says {shape}")
            writer.write(name, torch.from_numpy(w))
            del w
            if progress:
                progress("convert", done, len(entries))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _order(name: str):
    """HF order: embeddings, layers in numeric order, final norm, lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed" in name else 2 if name == "model.norm.weight" else 3, 0, name)


def _check_tensors(cfg: Config, shapes: dict[str, tuple], path: Path):
    """Every tensor the config implies is there with its shape; say which one is not."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    want = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (v, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        want.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    for name, shape in want.items():
        if name not in shapes:
            raise QliteError(f"{path}: missing tensor for {name}")
        if tuple(shapes[name]) != shape:
            raise QliteError(f"{path}: tensor for {name} has shape {tuple(shapes[name])}, "
                             f"the metadata implies {shape}")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise QliteError(f"{path}: unexpected tensor {extra[0]} (block_count is "
                         f"{cfg.num_hidden_layers})")


# ---------------------------------------------------------------------------------------------

def convert_gguf(gguf_path: str | Path, out_dir: str | Path,
                 progress: Progress | None = None) -> Path:
    """Write an HF-style float32 directory for a qwen2 GGUF file; return its path.

    Written into a temporary sibling directory and renamed at the end, so `out_dir` either does
    not exist or holds the whole model. An existing non-empty `out_dir` is an error.
    """
    path, out = Path(gguf_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QliteError(f"{out}: already exists and is not empty; remove it or pick another "
                         f"output directory")
    reader = _open(path)
    cfg, tok = read_metadata(reader, path)
    tokenizer, added = build_tokenizer(tok, path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary directory
        _write_weights(reader, cfg, path, tmp, progress)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, added, cfg))
        _write_json(tmp / "generation_config.json", generation_config(tok, cfg))
        _write_json(tmp / "config.json", cfg.to_hf_dict())  # config.json last: it marks a model
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(file: Path, obj):
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
