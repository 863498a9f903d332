"""Reading safetensors checkpoints: single file or sharded, checked before any tensor is read.

The header of a safetensors file lists every tensor's dtype, shape and byte range, so a missing,
unexpected, mis-shaped or truncated tensor is reported (naming the shard and tensor) before a
single weight is loaded.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qlite.errors import QliteError


@dataclass
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header; fail on a file shorter than its header says."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QliteError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise QliteError(f"{file}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QliteError(f"{file}: unreadable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, meta in header.items():
        begin, end = meta["data_offsets"]
        data_end = max(data_end, end)
        tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), end - begin)
    if 8 + n + data_end > size:
        last = max(tensors.values(), key=lambda t: header[t.name]["data_offsets"][1])
        raise QliteError(f"{file}: truncated: tensor {last.name!r} ends at byte {8 + n + data_end}"
                         f" but the file has {size} bytes")
    return tensors


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, from the shard index if there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise QliteError(f"{index}: not a valid shard index ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise QliteError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QliteError(f"{model_dir}: no safetensors weights found")
    return files


def read_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards of a checkpoint."""
    tensors: dict[str, TensorInfo] = {}
    for file in checkpoint_files(model_dir):
        for name, info in read_header(file).items():
            if name in tensors:
                raise QliteError(f"{file}: tensor {name!r} also in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def describe(path) -> str:
    """`qlite inspect`: architecture, parameter count, tensor dtypes and bytes on disk."""
    from collections import Counter
    from qlite.config import load_config
    model_dir = Path(path)
    cfg = load_config(model_dir)
    tensors = read_checkpoint(model_dir)
    params = Counter()
    nbytes = Counter()
    for t in tensors.values():
        n = 1
        for s in t.shape:
            n *= s
        params[t.dtype] += n
        nbytes[t.dtype] += t.nbytes
    files = checkpoint_files(model_dir)
    lines = [f"{model_dir}",
             f"  architecture   {cfg.architecture}",
             f"  layers         {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
             f"{cfg.num_attention_heads} (kv {cfg.num_key_value_heads}), vocab {cfg.vocab_size}"]
    if cfg.is_moe:
        lines.append(f"  experts        {cfg.num_experts} routed (top {cfg.num_experts_per_tok}),"
                     f" shared {cfg.shared_expert_intermediate_size}")
    lines.append(f"  tensors        {len(tensors)} in {len(files)} file(s), "
                 f"{sum(f.stat().st_size for f in files) / 1e6:,.1f} MB on disk")
    for dtype in sorted(params):
        lines.append(f"  {dtype:<14} {params[dtype] / 1e6:,.1f}M elements, "
                     f"{nbytes[dtype] / 1e6:,.1f} MB")
    if cfg.quantization:
        q = cfg.quantization
        lines.append("  quantization   " + ", ".join(f"{k}={v}" for k, v in q.items()))
    return "\n".join(lines)
