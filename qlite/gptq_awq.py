"""Loading GPTQ and AWQ checkpoints as published (Qwen's *-GPTQ-Int4 / -Int8 / -AWQ, dense and
MoE): repacked into qlite's format at load, module by module, no file written.

config.json carries `quantization_config` ({"quant_method": "gptq", "bits": 4, "group_size": 128,
"sym": true, "desc_act": false, ...} or {"quant_method": "awq", "version": "gemm",
"zero_point": true, ...}). qlite.config (`imported_quantization`) turns it into qlite's own `quantization` section (what
`swap_to_quantized`, the planner and offloading read) with the source parameters kept under
"source"; `load_weights` fills the quantized model from the checkpoint:

- every quantized linear `P` (`P.qweight`, `P.qzeros`, `P.scales`, GPTQ's `P.g_idx`) through
  `qlite.quant.gptq_awq` (4-bit: exact, the dequantized weight equal bit for bit in float32;
  8-bit GPTQ: requantized per output channel, see there); per-expert tensors
  (`mlp.experts.E.gate_proj`, ...) are stacked into QuantExperts' [E, ...] buffers;
- `P.bias` where the model has a bias (q/k/v); the zero placeholder biases GPTQ writes on
  o_proj and the MLP linears are checked to be zero and dropped (a nonzero one is an error);
- everything else (embedding, lm_head, norms, router, shared-expert gate; fp16 in the files)
  as the plain loader does: cast to the activation dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from qlite.checkpoint import read_checkpoint, set_tensor
from qlite.errors import QliteError

Progress = Callable[[str, int, int], None]


def is_imported(qcfg: dict | None) -> bool:
    return bool(qcfg) and isinstance(qcfg.get("source"), dict)


class _Tensors:
    """Name -> tensor from the checkpoint's shards (memory-mapped, read on demand)."""

    def __init__(self, model_dir: Path):
        self.index = read_checkpoint(model_dir)
        self.handles = {}
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor | None:
        info = self.index.get(name)
        if info is None:
            return None
        if info.file not in self.handles:
            self.handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        self.used.add(name)
        return self.handles[info.file].get_tensor(name)

    def where(self, name: str) -> str:
        info = self.index.get(name)
        return f"{info.file.name}: {name}" if info else name

    def nbytes(self, names) -> int:
        return sum(self.index[n].nbytes for n in names if n in self.index)


def _convert(tensors: _Tensors, prefix: str, src: dict, symmetric: bool):
    """One checkpoint linear `prefix` -> QuantizedTensor in qlite's format."""
    from qlite.quant.gptq_awq import awq_to_qlite, gptq_to_qlite
    where = tensors.where(prefix + ".qweight")
    get = tensors.get
    if get(prefix + ".qweight") is None:
        plain = prefix + ".weight"
        raise QliteError(f"{tensors.where(plain) if plain in tensors.index else prefix}: "
                         f"expected a {src['quant_method'].upper()} quantized linear "
                         f"({prefix}.qweight), the checkpoint has none")
    if src["quant_method"] == "awq":
        return awq_to_qlite(get(prefix + ".qweight"), get(prefix + ".qzeros"),
                            get(prefix + ".scales"), src["group_size"], name=where)
    return gptq_to_qlite(get(prefix + ".qweight"), get(prefix + ".qzeros"), get(prefix + ".scales"),
                         get(prefix + ".g_idx"), src["bits"], src["group_size"], symmetric,
                         v1=src["checkpoint_format"] == "gptq", name=where)


def _check_placeholder_bias(tensors: _Tensors, prefix: str):
    bias = tensors.get(prefix + ".bias")
    if bias is not None and bias.count_nonzero():
        raise QliteError(f"{tensors.where(prefix + '.bias')}: nonzero bias on a layer that has "
                         f"none in Qwen2 (only zero placeholders are accepted)")


def load_weights(model: nn.Module, model_dir: Path, place: Callable[[str], object],
                 dtype: torch.dtype, progress: Progress | None = None):
    """Fill a meta-device model already passed through `swap_to_quantized` (with the section
    `imported_quantization` made) from a GPTQ / AWQ checkpoint. `place(key)` gives each model tensor's
    device, as for the plain loader."""
    from qlite.quant import QuantExperts, QuantLinear
    qcfg = model.config.quantization
    src, sym = qcfg["source"], qcfg["symmetric"]
    tensors = _Tensors(model_dir)
    total = sum(i.nbytes for i in tensors.index.values())
    tied = model.config.tie_word_embeddings
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, (QuantLinear, QuantExperts))}
    done = 0

    def tick(names):
        nonlocal done
        done += tensors.nbytes(names)
        if progress:
            progress("loading weights", done, total)

    for name, m in quantized.items():
        if isinstance(m, QuantLinear):
            qt = _convert(tensors, name, src, sym)
            _fill(m, name, qt, place, tensors)
            if m.bias is not None:
                bias = tensors.get(name + ".bias")
                if bias is None:
                    raise QliteError(f"{model_dir}: tensor {name + '.bias'!r} is missing from "
                                     f"the checkpoint")
                set_tensor(m, "bias", bias.to(place(name + ".bias"), dtype))
            else:
                _check_placeholder_bias(tensors, name)
            tick([f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")])
            continue
        # QuantExperts: per-expert linears stacked, gate rows before up rows
        for part, pieces in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            holder = getattr(m, part)
            bufs = {b: torch.empty(t.shape, dtype=t.dtype, device=place(f"{name}.{part}.{b}"))
                    for b, t in holder._buffers.items() if t is not None}
            for e in range(m.num_experts):
                qts = []
                for piece, rows in zip(pieces, (m.hidden, m.hidden) if part == "gate_up_proj" else (m.dim,)):
                    prefix = f"{name}.{e}.{piece}"
                    qts.append(_convert(tensors, prefix, src, sym))
                    cols = m.dim if part == "gate_up_proj" else m.hidden
                    _check_shape(qts[-1], rows, cols, tensors.where(prefix + ".qweight"))
                    _check_placeholder_bias(tensors, prefix)
                    tick([f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")])
                bufs["qweight"][e] = torch.cat([q.qweight for q in qts])
                bufs["scales"][e] = torch.cat([q.scales for q in qts], dim=-1)
                if "zeros" in bufs:
                    bufs["zeros"][e] = torch.cat([q.zeros for q in qts], dim=-1)
            for b, t in bufs.items():
                set_tensor(holder, b, t)

    # Everything else: as the plain loader, floating-point tensors in the activation dtype.
    for key, t in model.state_dict(keep_vars=True).items():
        if not t.is_meta or (tied and key == "lm_head.weight"):
            continue
        value = tensors.get(key)
        if value is None:
            raise QliteError(f"{model_dir}: tensor {key!r} is missing from the checkpoint")
        if tuple(value.shape) != tuple(t.shape):
            raise QliteError(f"{tensors.where(key)} has shape {list(value.shape)}, the config "
                             f"says {list(t.shape)}")
        module_name, _, attr = key.rpartition(".")
        set_tensor(model.get_submodule(module_name), attr,
             value.to(place(key), dtype if value.is_floating_point() else value.dtype))
        tick([key])
    extra = [n for n in tensors.index if n not in tensors.used and not n.endswith("inv_freq")
             and not (tied and n == "lm_head.weight")]
    if extra:
        raise QliteError(f"{tensors.where(extra[0])}: unexpected tensor"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    tensors.handles.clear()


def _check_shape(qt, n: int, k: int, where: str):
    got = (qt.qweight.shape[0], qt.qweight.shape[1] * (2 if qt.bits == 4 else 1))
    if got != (n, k):
        raise QliteError(f"{where}: the quantized weight is {list(got)} (out, in), the config "
                         f"says {[n, k]}")


def _fill(m: nn.Module, name: str, qt, place, tensors: _Tensors):
    _check_shape(qt, m.out_features, m.in_features, tensors.where(name + ".qweight"))
    for buf in ("qweight", "scales", "zeros"):
        value = getattr(qt, buf)
        want = getattr(m, buf)
        if (value is None) != (want is None):
            raise QliteError(f"internal: {name}.{buf} presence differs from the model")
        if value is None:
            continue
        set_tensor(m, buf, value.to(place(f"{name}.{buf}")))
