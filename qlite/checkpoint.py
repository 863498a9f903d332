"""safetensors checkpoints: reading (single file or sharded, checked before any tensor is read)
and writing (streamed, one tensor at a time).

The header of a safetensors file lists every tensor's dtype, shape and byte range, so a missing,
unexpected, mis-shaped or truncated tensor is reported (naming the shard and tensor) before a
single weight is loaded, and a writer that knows every shape can write all headers first.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qlite.errors import QliteError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
          "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def nbytes_of(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass
class TensorInfo:
    name: str
    file: Path
    dtype: str          # the safetensors name: "F32", "BF16", "U8", ...
    shape: tuple[int, ...]
    nbytes: int
    start: int          # absolute byte offset of the data in the file

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _raw_header(file: Path) -> tuple[dict, int, int]:
    """(the header's JSON object, its length n, the file size): data starts at byte 8 + n."""
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
    if not isinstance(header, dict):
        raise QliteError(f"{file}: the safetensors header is not a JSON object")
    return header, n, size


def read_metadata(file: Path) -> dict:
    """The `__metadata__` of one safetensors file (str -> str; empty if none)."""
    meta = _raw_header(file)[0].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check it against the file before any tensor is read:
    each tensor's data_offsets must span exactly dtype x shape bytes, and the tensors must tile
    the data area (no overlap, no gap) up to the end of the file, as the format requires."""
    header, n, size = _raw_header(file)
    header.pop("__metadata__", None)
    tensors = {}
    for name, meta in header.items():
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise QliteError(f"{file}: tensor {name!r} has a malformed header entry {meta!r}")
        if dtype not in DTYPES:
            raise QliteError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = nbytes_of(shape, DTYPES[dtype])
        if end - begin != nbytes:
            raise QliteError(f"{file}: tensor {name!r} has data_offsets [{begin}, {end}] "
                             f"({end - begin} bytes) but {dtype} {list(shape)} takes {nbytes} bytes")
        tensors[name] = TensorInfo(name, file, dtype, shape, nbytes, 8 + n + begin)
    data_end, last = 0, None  # bytes of the data area covered so far, by tensors up to `last`
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        begin = t.start - 8 - n
        if begin < data_end:
            raise QliteError(f"{file}: tensor {t.name!r} (data_offsets [{begin}, "
                             f"{begin + t.nbytes}]) overlaps tensor {last.name!r}")
        if begin > data_end:
            raise QliteError(f"{file}: {begin - data_end} bytes before tensor {t.name!r} belong "
                             f"to no tensor")
        data_end, last = begin + t.nbytes, t
    if 8 + n + data_end > size:
        raise QliteError(f"{file}: truncated: tensor {last.name!r} ends at byte {8 + n + data_end}"
                         f" but the file has {size} bytes")
    if 8 + n + data_end < size:
        raise QliteError(f"{file}: {size - 8 - n - data_end} bytes after the last tensor belong "
                         f"to no tensor")
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


def check_run(model_dir: Path, run_id: str):
    """`qlite quantize` names its run in every shard's header (written first) and in
    config.json (written last, once every byte is on disk): shards of an interrupted run with a
    config.json copied beside them, or of two runs mixed, do not load."""
    for file in checkpoint_files(model_dir):
        if read_metadata(file).get("qlite_run") != run_id:
            raise QliteError(f"{file}: not written by the qlite quantize run that wrote "
                             f"config.json (an interrupted or mixed output: quantize again)")


def read_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards of a checkpoint."""
    tensors: dict[str, TensorInfo] = {}
    for file in checkpoint_files(model_dir):
        for name, info in read_header(file).items():
            if name in tensors:
                raise QliteError(f"{file}: tensor {name!r} also in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


class TensorReader:
    """Reads tensors, or row ranges of them, with plain file reads into memory torch allocates.
    No mmap: the file's pages do not stay resident beside what the caller keeps (a converted
    copy, a quantized matrix), and every tensor is aligned as torch aligns it, whatever its
    offset in the file (CPU kernels may round differently on misaligned data)."""

    def __init__(self, index: dict[str, TensorInfo]):
        self.index = index
        self.handles = {}

    def rows(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (along dim 0) of a tensor (all of it by default), in its own dtype."""
        src = self.index[name]
        shape = list(src.shape)
        if r0 is None:
            r0, r1 = 0, shape[0] if shape else 1
        if shape:
            shape[0] = r1 - r0
        out = torch.empty(shape, dtype=src.torch_dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        f = self.handles.get(src.file)
        if f is None:
            f = self.handles[src.file] = open(src.file, "rb", buffering=0)
        f.seek(src.start + r0 * (src.nbytes // max(src.shape[0], 1) if src.shape else 0))
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got:])
            if not n:
                raise QliteError(f"{src.file}: truncated at tensor {name!r}")
            got += n
        return out

    def keep_codes(self, name: str, q) -> dict | None:
        """A source whose codes can be kept as they are (a GGUF's 4-bit blocks, qlite/gguf.py's
        GGUFSource) returns them here; safetensors sources have none."""
        return None

    def close(self):
        for f in self.handles.values():
            f.close()
        self.handles.clear()


# Published MoE checkpoints store each routed expert apart; the model stacks them.
EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def tensor_sources(model: nn.Module, tensors: dict[str, TensorInfo]):
    """For each model tensor, where its data comes from: [(checkpoint name, row slice)].

    A stacked expert tensor missing from the checkpoint is gathered from per-expert tensors
    (`experts.E.gate_proj.weight` fills rows [:I] of `experts.gate_up_proj[E]`)."""
    sources = {}
    for key, t in model.state_dict(keep_vars=True).items():
        stem, _, part = key.rpartition(".")
        if key in tensors or part not in EXPERT_PARTS or not stem.endswith("experts"):
            sources[key] = [(key, None)]
            continue
        num, rows = t.shape[0], t.shape[1] // len(EXPERT_PARTS[part])
        sources[key] = [(f"{stem}.{e}.{name}.weight", (e, slice(i * rows, (i + 1) * rows)))
                        for e in range(num) for i, name in enumerate(EXPERT_PARTS[part])]
    return sources


def check_tensors(model: nn.Module, sources, tensors: dict[str, TensorInfo], where: Path):
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is."""
    params = model.state_dict(keep_vars=True)
    tied = model.config.tie_word_embeddings
    wanted = set()
    for key, parts in sources.items():
        if tied and key == "lm_head.weight":
            continue
        for name, index in parts:
            wanted.add(name)
            info = tensors.get(name)
            if info is None:
                raise QliteError(f"{where}: tensor {name!r} is missing from the checkpoint")
            shape = tuple(params[key].shape if index is None else params[key][index].shape)
            if info.shape != shape:
                raise QliteError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                 f"the config says {list(shape)}")
    extra = [n for n in tensors if n not in wanted and not _IGNORED.match(n)
             and not (tied and n == "lm_head.weight")]
    if extra:
        raise QliteError(f"{tensors[extra[0]].file}: unexpected tensor {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def set_tensor(model: nn.Module, key: str, value: torch.Tensor):
    """Put `value` in place of the parameter or buffer `key` of model (a meta placeholder)."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def write_json(file: Path, obj):
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def publish_dir(tmp: Path, out: Path):
    """Rename the finished output directory `tmp` to `out`. An existing `out` (a --force run)
    is moved aside and removed only now that the new one is whole."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / "x")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Writes a checkpoint whose tensor names, shapes and dtypes are known up front: every
    header first, then each tensor's bytes at its offset as it arrives, so only one tensor is
    ever held in memory. Shards of at most `shard_bytes` (a bigger tensor gets one alone); an
    index file when there are several. close() checks that every byte was written."""

    def __init__(self, out: Path, entries: list[tuple[str, tuple, torch.dtype]],
                 shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out = out
        shards, cur, size = [], [], 0
        for e in entries:
            n = nbytes_of(e[1], e[2])
            if cur and size + n > shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += n
        if cur:
            shards.append(cur)
        self.where: dict[str, tuple] = {}  # name -> (file, data start, nbytes, shape, dtype, fname)
        self.written: dict[str, int] = {}
        self.files = []
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
            for name, shape, dtype in shard:
                n = nbytes_of(shape, dtype)
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = open(out / fname, "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
            self.files.append((fname, f))
            for name, shape, dtype in shard:
                b, e = header[name]["data_offsets"]
                self.where[name] = (f, 8 + len(raw) + b, e - b, tuple(shape), dtype, fname)
                self.written[name] = 0

    def write(self, name: str, t: torch.Tensor, index: int | None = None):
        """Write tensor `name`, or its slice [index] along dim 0 (a stacked expert)."""
        f, start, nbytes, shape, dtype, _ = self.where[name]
        want = shape if index is None else shape[1:]
        if tuple(t.shape) != tuple(want) or t.dtype != dtype:
            raise QliteError(f"internal: {name}{'' if index is None else f'[{index}]'} is "
                             f"{t.dtype} {list(t.shape)}, the format says {dtype} {list(want)}")
        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
        f.seek(start + (0 if index is None else index * data.nbytes))
        f.write(memoryview(data))
        self.written[name] += data.nbytes

    def write_rows(self, name: str, t: torch.Tensor, r0: int):
        """Write rows r0 : r0 + len(t) (along dim 0) of tensor `name`: a big tensor in blocks."""
        f, start, nbytes, shape, dtype, _ = self.where[name]
        if tuple(t.shape[1:]) != tuple(shape[1:]) or t.dtype != dtype or r0 + len(t) > shape[0]:
            raise QliteError(f"internal: rows {r0}:{r0 + len(t)} of {name} are {t.dtype} "
                             f"{list(t.shape)}, the format says {dtype} {list(shape)}")
        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
        f.seek(start + r0 * (nbytes // shape[0]))
        f.write(memoryview(data))
        self.written[name] += data.nbytes

    def close(self) -> dict:
        for name, (_, _, nbytes, *_rest) in self.where.items():
            if self.written[name] != nbytes:
                raise QliteError(f"internal: tensor {name!r} got {self.written[name]} of "
                                 f"{nbytes} bytes")
        for _, f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        total = sum(w[2] for w in self.where.values())
        if len(self.files) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: w[5] for n, w in self.where.items()}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return {"total_size": total, "files": [f for f, _ in self.files]}

    def abort(self):
        for _, f in self.files:
            f.close()


def describe(path) -> str:
    """`qlite inspect`: architecture, parameter count, tensor dtypes and bytes on disk."""
    from collections import Counter
    from qlite.config import load_config
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise QliteError(f"{model_dir}: not a model directory (qlite inspect reads a directory "
                         "holding config.json and *.safetensors)")
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
    disk = sum(f.stat().st_size for f in files)
    lines = [f"{model_dir}",
             f"  architecture   {cfg.architecture}",
             f"  layers         {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
             f"{cfg.num_attention_heads} (kv {cfg.num_key_value_heads}), vocab {cfg.vocab_size}"]
    if cfg.is_moe:
        lines.append(f"  experts        {cfg.num_experts} routed (top {cfg.num_experts_per_tok}),"
                     f" shared {cfg.shared_expert_intermediate_size}")
    lines.append(f"  tensors        {len(tensors)} in {len(files)} file(s), "
                 f"{disk / 1e6:,.1f} MB on disk")
    for dtype in sorted(params):
        lines.append(f"  {dtype:<14} {params[dtype] / 1e6:,.1f}M elements, "
                     f"{nbytes[dtype] / 1e6:,.1f} MB")
    if cfg.quantization and "source" in cfg.quantization:  # GPTQ / AWQ, repacked at load
        src = cfg.quantization["source"]
        lines.append("  quantization   " + ", ".join(f"{k}={v}" for k, v in src.items()))
        lines.append(f"  loads as       qlite int{cfg.quantization['bits']}"
                     + (f" g{cfg.quantization['group_size']}" if cfg.quantization["bits"] == 4
                        else " per channel (requantized)")
                     + (" sym" if cfg.quantization["symmetric"] else ""))
    elif cfg.quantization:  # written by qlite quantize, with the source checkpoint's size
        q = {k: v for k, v in cfg.quantization.items()
             if k not in ("source_bytes", "quantized_bytes", "run_id")}
        lines.append("  quantization   " + ", ".join(f"{k}={v}" for k, v in q.items()))
        source = cfg.quantization.get("source_bytes")
        if source:
            lines.append(f"  bytes saved    {(source - disk) / 1e6:,.1f} MB: {disk / 1e6:,.1f} MB"
                         f" on disk for a {source / 1e6:,.1f} MB source "
                         f"({100 * disk / source:.0f}%)")
    return "\n".join(lines)
