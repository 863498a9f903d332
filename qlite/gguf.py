"""GGUF import: a llama.cpp qwen2 or qwen2moe GGUF -> an HF-style model directory
(bfloat16 by default; float32 only when asked, e.g. by the demo pull, which is checked against
transformers in float32).

The output is what `qlite.load` reads anyway (config.json, sharded safetensors, tokenizer.json,
tokenizer_config.json), so a GGUF model needs no loading path of its own. `qlite quantize` reads
the GGUF directly through `GGUFSource` (no intermediate directory). Both read each tensor's rows
with plain file reads and dequantize them in blocks, so memory stays at a block's size.

Reference: transformers' GGUF loader. It dequantizes every tensor with `gguf.quants.dequantize`
into float32 and only renames; q/k are NOT permuted (llama.cpp permutes q/k rows for the llama
architecture only), so neither do we. qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B) stacks the routed
experts (`ffn_{gate,up}_exps` [E, I, D], `ffn_down_exps` [E, D, I] in numpy order); they are
written per expert under the names published checkpoints use (`mlp.experts.E.gate_proj.weight`,
...), the shared-expert gate `ffn_gate_inp_shexp` [D] becomes `mlp.shared_expert_gate.weight`
[1, D], and the expert sizes come from `qwen2moe.expert_feed_forward_length` /
`expert_shared_feed_forward_length` (else from the tensor shapes). The tokenizer is rebuilt from
the vocabulary, merges and token types the file stores.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qlite.checkpoint import ShardWriter, write_json
from qlite.config import Config
from qlite.errors import QliteError

Progress = Callable[[str, int, int], None]

SHARD_BYTES = 1_000_000_000  # ≤ 1 GB per safetensors shard
ROW_BLOCK_ELEMENTS = 1 << 22  # dequantize at most 4M weights at a time (gguf-py's temporaries
#                               are several times the float32 block)

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
    # qwen2moe
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",  # [D] -> [1, D]
}
# Stacked routed experts: one GGUF tensor [E, ...] -> E tensors mlp.experts.<e>.<part>.weight
_EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Qwen2's pre-tokenizer split (the one in Qwen2's own tokenizer.json): digits one at a time.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a GGUF tensor name (for stacked experts, with `{e}` where the
    expert number goes), or None if it is not one we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2) in _EXPERT_NAMES:
        return f"model.layers.{m.group(1)}.mlp.experts.{{e}}.{_EXPERT_NAMES[m.group(2)]}.weight"
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
    """Config and tokenizer metadata of a qwen2 / qwen2moe GGUF."""
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise QliteError(f"{path}: missing GGUF metadata 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise QliteError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(qlite imports {' and '.join(map(repr, ARCHITECTURES))} GGUF files)")

    def need(key):
        value = _field(reader, key)
        if value is None:
            raise QliteError(f"{path}: missing GGUF metadata {key!r}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise QliteError(f"{path}: missing tensor 'token_embd.weight'")
    tokens = need("tokenizer.ggml.tokens")
    heads = int(need(f"{arch}.attention.head_count"))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = Config(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        hidden_size=int(need(f"{arch}.embedding_length")),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", 0)
                              if arch == "qwen2moe" else need(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(need(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        rms_norm_eps=_f32(need(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 32768)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=[] if eos is None else [int(eos)],
        torch_dtype="bfloat16",
    )
    if arch == "qwen2moe":
        _moe_metadata(reader, cfg, tensors, path)
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


def _moe_metadata(reader, cfg: Config, tensors: dict, path: Path):
    """qwen2moe's expert hyperparameters: metadata first, tensor shapes where it is silent
    (ggml shapes list the fastest dimension first: ffn_gate_exps is [D, I, E])."""
    def shape_of(name):
        t = tensors.get(name)
        return None if t is None else [int(d) for d in t.shape]

    gate = shape_of("blk.0.ffn_gate_exps.weight")
    shexp = shape_of("blk.0.ffn_gate_shexp.weight")
    experts = _field(reader, "qwen2moe.expert_count", gate and gate[2])
    used = _field(reader, "qwen2moe.expert_used_count")
    size = _field(reader, "qwen2moe.expert_feed_forward_length", gate and gate[1])
    shared = _field(reader, "qwen2moe.expert_shared_feed_forward_length", shexp and shexp[1])
    for key, value in (("expert_count", experts), ("expert_used_count", used),
                       ("expert_feed_forward_length", size)):
        if value is None:
            raise QliteError(f"{path}: missing GGUF metadata 'qwen2moe.{key}'")
    cfg.num_experts, cfg.num_experts_per_tok = int(experts), int(used)
    cfg.moe_intermediate_size = int(size)
    cfg.shared_expert_intermediate_size = int(shared or 0)
    cfg.norm_topk_prob = False  # llama.cpp's qwen2moe: softmax, top-k, no renormalisation
    cfg.intermediate_size = cfg.intermediate_size or cfg.moe_intermediate_size


def gguf_config(path: str | Path) -> Config:
    """The model config a GGUF file's metadata describes (no tensor data is read)."""
    path = Path(path)
    return read_metadata(_open(path), path)[0]


def describe_gguf(path: str | Path) -> str:
    """`qlite inspect FILE.gguf`: architecture, sizes, and the tensor type mix with its bytes."""
    from collections import Counter
    path = Path(path)
    reader = _open(path)
    cfg, _ = read_metadata(reader, path)
    count, nbytes, params = Counter(), Counter(), Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        count[kind] += 1
        nbytes[kind] += int(t.n_bytes)
        params[kind] += int(t.n_elements)
    lines = [f"{path}",
             f"  format         GGUF ({_field(reader, 'general.architecture')}), "
             f"{path.stat().st_size / 1e6:,.1f} MB on disk",
             f"  layers         {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
             f"{cfg.num_attention_heads} (kv {cfg.num_key_value_heads}), vocab {cfg.vocab_size}"]
    if cfg.is_moe:
        lines.append(f"  experts        {cfg.num_experts} routed (top {cfg.num_experts_per_tok}), "
                     f"size {cfg.moe_intermediate_size}, shared "
                     f"{cfg.shared_expert_intermediate_size}")
    lines.append(f"  tensors        {len(reader.tensors)}, "
                 f"{sum(params.values()) / 1e6:,.1f}M parameters")
    for kind, _ in nbytes.most_common():
        lines.append(f"  {kind:<14} {count[kind]} tensors, {params[kind] / 1e6:,.1f}M elements, "
                     f"{nbytes[kind] / 1e6:,.1f} MB ({8 * nbytes[kind] / params[kind]:.2f} "
                     f"bits/weight)")
    return "\n".join(lines)


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

@dataclass
class Entry:
    """One output tensor: its HF name and shape, the GGUF tensor it comes from, and for stacked
    experts the expert's index along the GGUF tensor's first (numpy) dimension."""
    name: str
    shape: tuple
    tensor: object  # gguf.ReaderTensor
    expert: int | None = None

    @property
    def source_bytes(self) -> int:
        n = int(self.tensor.n_bytes)
        return n if self.expert is None else n // int(self.tensor.data.shape[0])


def gguf_tensors(reader, cfg: Config, path: Path) -> list[Entry]:
    """Every output tensor of the file in HF order, checked against the config."""
    _check_types(reader, path)
    entries = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise QliteError(f"{path}: unexpected tensor {t.name!r} for a "
                             f"{cfg.architecture} model")
        # ggml lists dimensions fastest first; torch/numpy the other way round.
        shape = tuple(int(d) for d in reversed(t.shape))
        if "{e}" in name:
            entries += [Entry(name.format(e=e), shape[1:], t, e) for e in range(shape[0])]
        elif name.endswith("shared_expert_gate.weight"):
            entries.append(Entry(name, (1,) + shape, t))
        else:
            entries.append(Entry(name, shape, t))
    entries.sort(key=lambda e: _order(e.name))
    _check_tensors(cfg, {e.name: e.shape for e in entries}, path)
    return entries


def _check_types(reader, path: Path):
    """Every tensor type of the file can be dequantized, checked on one zero block of each
    before any work: the first tensor of a type we cannot read is named."""
    import gguf
    from gguf.quants import dequantize

    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type
        if kind in seen:
            continue
        seen.add(kind)
        elems, nbytes = gguf.GGML_QUANT_SIZES.get(kind, (1, 0))
        try:
            dequantize(np.zeros((1, nbytes * max(1, 256 // elems)), np.uint8), kind)
        except Exception:
            raise QliteError(f"{path}: tensor {t.name} has GGUF type {kind.name}, which qlite "
                             f"cannot read") from None


def _write_weights(source: "GGUFSource", path: Path, out: Path, dtype: torch.dtype,
                   progress: Progress | None):
    """Dequantize tensor by tensor (expert by expert) in row blocks, streaming each block
    straight into its shard: the shapes are known from the GGUF header, so every safetensors
    header can be written first and only one row block is ever held in memory."""
    entries = list(source.entries.values())
    writer = ShardWriter(out, [(e.name, e.shape, dtype) for e in entries], SHARD_BYTES)
    try:
        for done, entry in enumerate(entries, 1):
            if len(entry.shape) == 1:
                writer.write(entry.name, source.rows(entry.name).to(dtype))
            else:
                n, row = entry.shape[0], int(np.prod(entry.shape[1:]))
                step = max(1, ROW_BLOCK_ELEMENTS // row)
                for r0 in range(0, n, step):
                    block = source.rows(entry.name, r0, min(n, r0 + step))
                    writer.write_rows(entry.name, block.to(dtype), r0)
            if progress:
                progress("convert", done, len(entries))
        writer.close()
    except BaseException:
        writer.abort()
        raise


class GGUFSource:
    """A GGUF file read like a checkpoint, for `qlite quantize` (no intermediate directory):
    `index` maps each output tensor name to a TensorInfo (dtype "F32", the size of its GGUF
    bytes), `rows(name, r0, r1)` dequantizes rows r0:r1 to float32, reading just their bytes
    with plain file reads (no memory map: mapped pages would count as resident memory), and
    `keep_codes(name, qcfg)` gives a Q4_0 / Q4_1 / Q4_K tensor's own codes in qlite int4 g32
    (quant/gguf_q4.py) when the output format is int4 g32."""

    def __init__(self, path: str | Path):
        from qlite.checkpoint import TensorInfo
        self.path = Path(path)
        reader = _open(self.path)
        self.config, self.tok = read_metadata(reader, self.path)
        build_tokenizer(self.tok, self.path)  # its errors before any work
        self.entries = {e.name: e for e in gguf_tensors(reader, self.config, self.path)}
        self.index = {name: TensorInfo(name, self.path, "F32", e.shape, e.source_bytes, 0)
                      for name, e in self.entries.items()}
        self.kept = 0  # tensors whose GGUF codes were kept
        self._file = open(self.path, "rb", buffering=0)

    def _bytes(self, entry: Entry, r0: int, r1: int) -> np.ndarray:
        rows = max(1, int(np.prod(entry.shape[:-1])))
        row_bytes = entry.source_bytes // rows
        start = int(entry.tensor.data_offset) + (entry.expert or 0) * entry.source_bytes
        buf = bytearray((r1 - r0) * row_bytes)
        self._file.seek(start + r0 * row_bytes)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = self._file.readinto(view[got:])
            if not n:
                raise QliteError(f"{self.path}: truncated at tensor {entry.tensor.name}")
            got += n
        return np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, row_bytes)

    def rows(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        from gguf.quants import dequantize
        entry = self.entries[name]
        if r0 is None or len(entry.shape) == 1:
            r0, r1 = 0, max(1, int(np.prod(entry.shape[:-1])))
        t = entry.tensor
        try:
            w = dequantize(self._bytes(entry, r0, r1), t.tensor_type)
        except QliteError:
            raise
        except Exception as e:
            raise QliteError(f"{self.path}: cannot dequantize tensor {t.name} of type "
                             f"{t.tensor_type.name} ({e})") from None
        w = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
        return w.view(entry.shape) if len(entry.shape) == 1 else w.view(r1 - r0, *entry.shape[1:])

    def keep_codes(self, name: str, q) -> dict | None:
        """`q`: the output's QuantConfig."""
        from qlite.quant.gguf_q4 import TYPES, gguf_q4_to_qlite
        entry = self.entries[name]
        kind = entry.tensor.tensor_type.name
        if q.bits != 4 or q.group_size != 32 or kind not in TYPES or len(entry.shape) != 2:
            return None
        qt = gguf_q4_to_qlite(self._bytes(entry, 0, entry.shape[0]), kind, entry.shape[1],
                              q.symmetric)
        if qt is None:
            return None
        self.kept += 1
        return {"qweight": qt.qweight, "scales": qt.scales,
                **({} if qt.zeros is None else {"zeros": qt.zeros})}

    def write_tokenizer(self, out: Path):
        """tokenizer.json, tokenizer_config.json and generation_config.json into `out`."""
        write_tokenizer(out, self.tok, self.config, self.path)

    def close(self):
        self._file.close()


def write_tokenizer(out: Path, tok: dict, cfg: Config, path: Path):
    tokenizer, added = build_tokenizer(tok, path)
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, added, cfg))
    write_json(out / "generation_config.json", generation_config(tok, cfg))


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
    mi, si = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
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
        })
        if not cfg.is_moe_layer(layer):
            want.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                         p + "mlp.down_proj.weight": (h, i)})
            continue
        want[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        for e in range(cfg.num_experts):
            q = f"{p}mlp.experts.{e}."
            want.update({q + "gate_proj.weight": (mi, h), q + "up_proj.weight": (mi, h),
                         q + "down_proj.weight": (h, mi)})
        if si:
            q = p + "mlp.shared_expert."
            want.update({q + "gate_proj.weight": (si, h), q + "up_proj.weight": (si, h),
                         q + "down_proj.weight": (h, si), p + "mlp.shared_expert_gate.weight": (1, h)})
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
                 progress: Progress | None = None, dtype: str = "bfloat16") -> Path:
    """Write an HF-style directory for a qwen2 / qwen2moe GGUF file; return its path. Weights
    are stored in `dtype` (bfloat16 by default: no full-precision copy unless asked for).

    Written into a temporary sibling directory and renamed at the end, so `out_dir` either does
    not exist or holds the whole model. An existing non-empty `out_dir` is an error.
    """
    path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise QliteError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QliteError(f"{out}: already exists and is not empty; remove it or pick another "
                         f"output directory")
    source = GGUFSource(path)  # metadata, tokenizer and tensor checks before any output
    cfg, tok = source.config, source.tok
    cfg.torch_dtype = dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary directory
        _write_weights(source, path, tmp, DTYPES[dtype], progress)
        write_tokenizer(tmp, tok, cfg, path)
        write_json(tmp / "config.json", cfg.to_hf_dict())  # config.json last: it marks a model
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        source.close()
    return out

