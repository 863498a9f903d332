"""Qwen2 / Qwen2-MoE configuration: one dataclass, read from an HF config.json.

Both key styles found in the wild are read here and nowhere else: transformers 4 writes
`rope_theta`, transformers 5 writes `rope_parameters: {"rope_type": "default", "rope_theta": ...}`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qlite.errors import QliteError

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
IMPORTED_METHODS = ("gptq", "awq")  # quantization_config.quant_method that qlite.load repacks
IMPORTED_GROUP_SIZES = (32, 64, 128)
PREFILL_CHUNK = 512  # prompt tokens per forward in a prefill (the planner sizes workspace for it)
# Activation dtypes by the names qlite.load(dtype=...) and the CLI's --dtype take.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device: torch.device, quantized: bool = False) -> torch.dtype:
    """The activation dtype. By default bfloat16 on CUDA; on the CPU float32 for 16-bit
    weights (exact), bfloat16 for quantized ones (torch's packed int4/int8 matmuls take it)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" or quantized else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise QliteError(f"dtype {dtype!r}: choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    architecture: str = "Qwen2ForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"
    # Qwen2-MoE only
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Written by `qlite quantize`; None for a 16-bit checkpoint.
    quantization: dict | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.architecture == "Qwen2MoeForCausalLM"

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen2-MoE's rule: a layer is sparse unless listed in mlp_only_layers, every
        `decoder_sparse_step`-th layer counting from 1."""
        return (self.is_moe and self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def to_hf_dict(self) -> dict:
        """The config.json this config was read from, in the transformers-4 key style."""
        d = asdict(self)
        d["architectures"] = [d.pop("architecture")]
        d["model_type"] = "qwen2_moe" if self.is_moe else "qwen2"
        d["use_sliding_window"] = False
        if d["quantization"] is None:
            del d["quantization"]
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                      "mlp_only_layers"):
                del d[k]
        return d


def _rope_theta(raw: dict):
    if "rope_theta" in raw:
        return raw["rope_theta"]
    return (raw.get("rope_parameters") or {}).get("rope_theta")


def imported_quantization(hf: dict, where: str) -> dict:
    """qlite's `quantization` section for a GPTQ / AWQ checkpoint's `quantization_config`
    (how qlite/gptq_awq.py loads it, the source parameters under "source"); a QliteError naming
    the field for anything it cannot load exactly (or, 8-bit GPTQ, as stated there)."""
    method = hf.get("quant_method")
    if method not in IMPORTED_METHODS:
        raise QliteError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                         f"(qlite loads {', '.join(IMPORTED_METHODS)})")
    bits = hf.get("bits", hf.get("w_bit"))
    group = hf.get("group_size", hf.get("q_group_size"))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise QliteError(f"{where}: quantization_config.bits {bits!r} is not supported for "
                         f"{method} ({'4 or 8' if method == 'gptq' else '4'})")
    if group not in IMPORTED_GROUP_SIZES:
        raise QliteError(f"{where}: quantization_config.group_size {group!r} is not supported "
                         f"(one of {', '.join(map(str, IMPORTED_GROUP_SIZES))})")
    source = {"quant_method": method, "bits": bits, "group_size": group}
    if method == "gptq":
        fmt = hf.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QliteError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not "
                             f"supported (gptq, gptq_v2)")
        if hf.get("lm_head"):
            raise QliteError(f"{where}: quantization_config.lm_head true (a quantized lm_head) "
                             f"is not supported")
        sym = bool(hf.get("sym", True))
        source.update(sym=sym, desc_act=bool(hf.get("desc_act", False)),
                      checkpoint_format=fmt)
    else:
        version = str(hf.get("version", "gemm")).lower()
        if version != "gemm":
            raise QliteError(f"{where}: quantization_config.version {version!r} is not "
                             f"supported (AWQ 'gemm' packing)")
        if not hf.get("zero_point", True):
            raise QliteError(f"{where}: quantization_config.zero_point false is not supported")
        sym = False
        source.update(version=version, zero_point=True)
    return {"format": "qlite", "version": 1, "bits": bits,
            "group_size": group if bits == 4 else None, "method": method,
            "symmetric": sym or bits == 8, "keep_16bit": ["embed", "lm_head"], "source": source}


def config_from_dict(raw: dict, source: str = "config.json") -> Config:
    """Build a Config from a parsed config.json; `source` names the file in errors. Every size
    is checked here (a positive integer), so a bad field is named before any tensor is made."""
    if not isinstance(raw, dict):
        raise QliteError(f"{source}: not a JSON object of settings (found a "
                         f"{type(raw).__name__})")
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else {
        "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}.get(raw.get("model_type"))
    if arch not in ARCHITECTURES:
        raise QliteError(f"{source}: unsupported architecture {arch or raw.get('model_type')!r} "
                         f"(qlite runs {', '.join(ARCHITECTURES)})")

    for rope in (raw.get("rope_scaling"), raw.get("rope_parameters")):
        kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if kind != "default":
            raise QliteError(f"{source}: rope scaling {kind!r} is not supported yet")
    if raw.get("use_sliding_window"):
        raise QliteError(f"{source}: use_sliding_window=true (sliding_window="
                         f"{raw.get('sliding_window')}) is not supported yet")

    def integer(key, low=1, default=None):
        value = raw.get(key, default)
        if value is None:
            raise QliteError(f"{source}: missing field {key!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise QliteError(f"{source}: {key}={value!r} must be an integer >= {low}")
        return value

    def positive(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise QliteError(f"{source}: {key}={value!r} must be a positive number")
        return float(value)

    heads = integer("num_attention_heads")
    eos = raw.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    if not isinstance(eos, list) or not all(isinstance(i, int) and i >= 0 for i in eos):
        raise QliteError(f"{source}: eos_token_id={raw.get('eos_token_id')!r} must be a token id "
                         "or a list of them")
    moe = arch == "Qwen2MoeForCausalLM"
    cfg = Config(
        architecture=arch,
        vocab_size=integer("vocab_size"),
        hidden_size=integer("hidden_size"),
        intermediate_size=integer("intermediate_size", low=0 if moe else 1),
        num_hidden_layers=integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=integer("num_key_value_heads", default=heads),
        rms_norm_eps=positive("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
        rope_theta=positive("rope_theta", _rope_theta(raw) or 10000.0),
        max_position_embeddings=integer("max_position_embeddings", default=32768),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=list(eos),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        quantization=raw.get("quantization") or (
            imported_quantization(raw["quantization_config"], source)
            if raw.get("quantization_config") else None),
    )
    if cfg.quantization is not None and not isinstance(cfg.quantization, dict):
        raise QliteError(f"{source}: quantization={cfg.quantization!r} must be an object")
    if cfg.hidden_size % heads or heads % cfg.num_key_value_heads:
        raise QliteError(f"{source}: num_attention_heads={heads} must divide hidden_size="
                         f"{cfg.hidden_size} and be a multiple of num_key_value_heads="
                         f"{cfg.num_key_value_heads}")
    if cfg.is_moe:
        cfg.num_experts = integer("num_experts")
        cfg.num_experts_per_tok = integer("num_experts_per_tok")
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise QliteError(f"{source}: num_experts_per_tok={cfg.num_experts_per_tok} is more "
                             f"than num_experts={cfg.num_experts}")
        cfg.moe_intermediate_size = integer("moe_intermediate_size")
        cfg.shared_expert_intermediate_size = integer("shared_expert_intermediate_size", low=0,
                                                      default=0)
        cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", False))
        cfg.decoder_sparse_step = integer("decoder_sparse_step", default=1)
        layers = raw.get("mlp_only_layers") or []
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise QliteError(f"{source}: mlp_only_layers={layers!r} must be a list of layer "
                             "numbers")
        cfg.mlp_only_layers = list(layers)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read config.json from a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise QliteError(f"{file}: no config.json found (is this a model directory?)")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise QliteError(f"{file}: cannot read ({e.strerror})") from None
    if data[:4] == b"GGUF":
        raise QliteError(f"{file}: a GGUF file, not a config.json (convert it first: "
                         f"qlite convert-gguf {file} OUT)")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise QliteError(f"{file}: not a config.json (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise QliteError(f"{file}: not valid JSON ({e})") from None
    return config_from_dict(raw, str(file))
