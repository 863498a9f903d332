"""The runtime seam of quantization: what a quantized Qwen2 is made of.

`QuantConfig` is config.json's `quantization` section, read and written here only:
    {"format": "qlite", "version": 1, "bits": 4, "group_size": 128, "method": "hqq",
     "symmetric": false, "keep_16bit": ["embed"], "dtype_16bit": "bfloat16"}
int8 is one symmetric scale per output channel: its group_size is null.

What is quantized (`quantized_targets`, the one rule): every linear of attention, dense MLP,
shared expert, the routed experts, `lm_head` and the embedding unless listed in `keep`. Always
kept in 16-bit: norms, biases, the router (`mlp.gate`) and the shared-expert gate (one row).

`swap_to_quantized` replaces those modules of a meta-device model by empty quantized ones, so
the loader fills them by state-dict name; `quantize_model` quantizes a loaded model in memory.
The offline job that writes quantized checkpoints is qlite/quantize.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from qlite.errors import QliteError
from qlite.kernels.reference import dequantize
from qlite.model import Experts

from .experts import QuantExperts
from .formats import BITS, GROUP_SIZES, METHODS, packed_shapes, quantize
from .linear import QuantLinear

FORMAT_VERSION = 1
KEEPABLE = ("lm_head", "embed")
# Linears that always stay 16-bit: the router and the one-row shared-expert gate.
ROUTER_NAMES = ("mlp.gate", "mlp.shared_expert_gate")
DTYPES_16 = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _keep_tuple(keep) -> tuple[str, ...]:
    """"lm_head,embed", ["embed"], "none" or () -> the tuple of kept names, checked."""
    if isinstance(keep, str):
        keep = keep.split(",")
    out = []
    for k in keep or ():
        k = k.strip()
        if k in ("none", ""):
            continue
        if k not in KEEPABLE:
            raise QliteError(f"keep_16bit {k!r}: choose from {', '.join(KEEPABLE)} (norms, "
                             f"biases and the router always stay 16-bit)")
        if k not in out:
            out.append(k)
    return tuple(out)


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized. group_size: 32, 64 or 128 for int4 (None: 128); None for int8
    (one scale per output channel), which refuses any other."""
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    method: str = "hqq"
    keep: tuple[str, ...] = ("embed",)
    dtype_16bit: str = "bfloat16"  # what the unquantized tensors are stored in

    def __post_init__(self):
        if self.bits not in BITS:
            raise QliteError(f"bits {self.bits!r}: choose 4 or 8")
        group = None
        if self.bits == 8 and self.group_size is not None:
            raise QliteError(f"group_size {self.group_size!r}: int8 has one scale per output "
                             "channel; a group size is for bits=4 only")
        if self.bits == 4:
            group = 128 if self.group_size is None else self.group_size
            if group not in GROUP_SIZES:
                raise QliteError(f"group_size {group!r}: choose one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")
        if self.dtype_16bit not in DTYPES_16:
            raise QliteError(f"dtype_16bit {self.dtype_16bit!r}: choose one of "
                             f"{', '.join(DTYPES_16)}")
        object.__setattr__(self, "group_size", group)
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        object.__setattr__(self, "keep", _keep_tuple(self.keep))

    def check_method(self):
        """The quantizer must exist to quantize (a checkpoint may name one it came from)."""
        if self.method not in METHODS:
            raise QliteError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")

    @classmethod
    def from_dict(cls, d, where: str = "config.json") -> QuantConfig:
        """Read config.json's `quantization` section; `where` names the file in errors."""
        if not isinstance(d, dict) or d.get("format") != "qlite":
            raise QliteError(f"{where}: quantization section is not a qlite one: {d!r}")
        if d.get("version") != FORMAT_VERSION:
            raise QliteError(f"{where}: quantization format version {d.get('version')!r}; this "
                             f"qlite reads version {FORMAT_VERSION}")
        if d.get("bits") == 4 and d.get("group_size") is None:
            raise QliteError(f"{where}: quantization group_size is missing for int4")
        try:
            return cls(bits=d.get("bits"), group_size=d.get("group_size"),
                       symmetric=bool(d.get("symmetric")), method=d.get("method", "hqq"),
                       keep=d.get("keep_16bit") or (),
                       dtype_16bit=d.get("dtype_16bit") or "bfloat16")
        except QliteError as e:
            raise QliteError(f"{where}: quantization {e}") from None

    def to_dict(self) -> dict:
        return {"format": "qlite", "version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group_size, "method": self.method,
                "symmetric": self.symmetric, "keep_16bit": list(self.keep),
                "dtype_16bit": self.dtype_16bit}


def quantized_targets(model: nn.Module, q: QuantConfig) -> list[tuple[str, nn.Module]]:
    """[(module name, module)] of the 16-bit model that the quantization replaces:
    nn.Linear (not router, not shared-expert gate, lm_head unless kept), the routed experts,
    and the embedding unless kept."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            out.append((name, m))
        elif isinstance(m, nn.Linear):
            if name.endswith(ROUTER_NAMES) or (name == "lm_head" and "lm_head" in q.keep):
                continue
            out.append((name, m))
        elif isinstance(m, nn.Embedding) and "embed" not in q.keep:
            out.append((name, m))
    return out


def owner(key: str, targets: set[str]) -> str | None:
    """The quantized module a state-dict key belongs to (at any depth), if any."""
    mod = key.rpartition(".")[0]
    while mod:
        if mod in targets:
            return mod
        mod = mod.rpartition(".")[0]
    return None


def quantized_module(module: nn.Module, q: QuantConfig, dtype=torch.float32) -> nn.Module:
    """The empty quantized counterpart of one target module (on the current default device);
    `dtype` is the activation dtype (what a quantized embedding returns)."""
    if isinstance(module, Experts):
        e, two_i, d = module.gate_up_proj.shape
        return QuantExperts(e, d, two_i // 2, q.bits, q.group_size, q.symmetric)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module.num_embeddings, module.embedding_dim, q.bits, q.group_size,
                              q.symmetric, dtype)
    return QuantLinear(module.in_features, module.out_features, module.bias is not None,
                       q.bits, q.group_size, q.symmetric)


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def swap_to_quantized(model: nn.Module, q: QuantConfig, dtype=torch.float32) -> nn.Module:
    """Replace, in place, the target modules of a (meta-device) model by empty quantized ones,
    so the loader can fill them by state-dict name from a quantized checkpoint. `dtype` is the
    activation dtype."""
    with torch.device("meta"):
        for name, module in quantized_targets(model, q):
            _replace(model, name, quantized_module(module, q, dtype))
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, nn.Linear):
        raise QliteError("config.json: a quantized lm_head needs tie_word_embeddings false")
    return model


def quantize_matrix(w: torch.Tensor, q: QuantConfig) -> dict[str, torch.Tensor]:
    """One float matrix [N, K] -> its packed buffers {qweight, scales[, zeros]} on the CPU."""
    # The quantizers are plain torch: HQQ's iterations run far faster on a GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qt = quantize(w.to(device), bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                  method=q.method)
    out = {"qweight": qt.qweight.cpu(), "scales": qt.scales.cpu()}
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.cpu()
    return out


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = None,
                   method: str = "hqq", keep_16bit=("embed",), symmetric: bool = False,
                   dtype_16bit: str | None = None) -> nn.Module:
    """Quantize a loaded 16/32-bit model in memory, in place, with the same rules and quantizer
    as qlite.quantize.quantize_checkpoint (the whole matrix at once, no files). With
    `dtype_16bit`, the tensors that stay unquantized are rounded through that dtype as the
    checkpoint stores them, which makes the result equal to loading the checkpoint."""
    q = QuantConfig(bits, group_size, symmetric, method, keep_16bit, dtype_16bit or "bfloat16")
    q.check_method()
    if model.config.tie_word_embeddings and "lm_head" not in q.keep:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(),
                                            requires_grad=False)
        model.config.tie_word_embeddings = False
    targets = quantized_targets(model, q)
    for name, module in targets:
        dtype = next(module.parameters()).dtype
        device = next(module.parameters()).device
        with torch.device("meta"):
            new = quantized_module(module, q, dtype)

        def fill(mod, packed):  # as the loader does: packed tensors, scales, zeros keep theirs
            for buf, t in packed.items():
                mod._buffers[buf] = t.to(device)

        if isinstance(module, Experts):
            for part in ("gate_up_proj", "down_proj"):
                w = getattr(module, part)
                per = [quantize_matrix(w[e].float(), q) for e in range(w.shape[0])]
                fill(getattr(new, part), {b: torch.stack([p[b] for p in per]) for b in per[0]})
        else:
            fill(new, quantize_matrix(module.weight.float(), q))
            if getattr(module, "bias", None) is not None:
                new._buffers["bias"] = module.bias.detach().to(dtype)
        for key, t in new.state_dict(keep_vars=True).items():
            if t.is_meta:
                raise QliteError(f"internal: {name}.{key} was not filled by quantize_model")
        _replace(model, name, new)
    if dtype_16bit is not None:  # round what the checkpoint keeps in 16-bit as it stores it
        dt = DTYPES_16[q.dtype_16bit]
        quantized = {name for name, _ in targets}
        with torch.no_grad():
            for key, t in model.state_dict(keep_vars=True).items():
                if t.is_floating_point() and (owner(key, quantized) is None
                                              or key.endswith(".bias")):
                    t.copy_(t.to(dt).to(t.dtype))
    model.config.quantization = q.to_dict()
    return model


class QuantEmbedding(nn.Module):
    """nn.Embedding on a quantized table, same packed layout as QuantLinear (rows = tokens);
    a lookup dequantizes only the rows it returns."""

    def __init__(self, num: int, dim: int, bits: int, group_size: int | None, symmetric: bool,
                 dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.dtype = dtype  # of the rows it returns: the model's activations
        self.bits, self.group_size = bits, group_size
        shapes = packed_shapes(num, dim, bits, group_size, symmetric)
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dt))
        if "zeros" not in shapes:
            self.zeros = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten()
        q = self.qweight[flat]
        if self.bits == 8:
            s, z = self.scales[flat], None
        else:  # scales/zeros are [K // G, N]: tokens are the columns
            s = self.scales[:, flat]
            z = None if self.zeros is None else self.zeros[:, flat]
        w = dequantize(q, s, z, self.bits, self.group_size)  # float32
        return w.to(self.dtype).view(*ids.shape, self.embedding_dim)
