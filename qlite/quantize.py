"""`qlite quantize`: a 16/32-bit Qwen2 / Qwen2-MoE checkpoint -> an int4 or int8 one, streamed.

    quantize_checkpoint(src, out, bits=4, group_size=128, method="hqq")

Memory. The output's tensor names, shapes and dtypes are known before any weight is read: they
are the state dict of the model built on the `meta` device and passed through
`swap_to_quantized` -- exactly what `qlite.load` will expect. So every safetensors header is
written first and each tensor's bytes go straight to their place in the file. Source tensors
are read with plain file reads (no mmap: mapped pages would count as resident memory) and a big
matrix is read and quantized in row blocks of at most `ROW_BLOCK_ELEMENTS` (rows are
independent for RTN and HQQ: groups run along the input dimension). Routed experts, stored one
per expert in published checkpoints, are quantized expert by expert into their slice of the
stacked tensor. Peak memory is therefore a row block and its quantizer temporaries plus one
quantized matrix, whatever the model's size.

Atomicity. Everything is written into a temporary sibling directory `.OUT.tmp-*`, config.json
last, and renamed to OUT at the end; an interrupted run leaves no OUT (or the previous OUT, with
`force`), and the temporary directory is removed unless the process was killed outright.

What is quantized: every linear of attention, dense MLP, shared expert and the routed experts;
`lm_head` and the embedding unless listed in `keep_16bit`. Always kept in 16-bit: norms, biases,
the router (`mlp.gate`) and the shared-expert gate (one output row). Kept tensors are stored in
the source dtype if it is 16-bit, else in `dtype_16bit` (bfloat16 by default).

The `quantization` section of config.json (read back by `swap_to_quantized` via the loader):
    {"format": "qlite", "version": 1, "bits": 4, "group_size": 128, "method": "hqq",
     "symmetric": false, "keep_16bit": ["embed"], "dtype_16bit": "bfloat16"}
int8 is one symmetric scale per output channel: its group_size is null.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from qlite.checkpoint import DTYPES, ShardWriter, TensorInfo, nbytes_of
from qlite.errors import QliteError

FORMAT_VERSION = 1
SHARD_BYTES = 2_000_000_000  # at most 2 GB per output shard (a bigger tensor gets a shard alone)
ROW_BLOCK_ELEMENTS = 1 << 22  # read and quantize big matrices 4M weights (16 MB fp32) at a time
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
KEEPABLE = ("lm_head", "embed")
DEFAULT_KEEP = ("embed",)
# Linears that always stay 16-bit: the router and the one-row shared-expert gate.
ROUTER_NAMES = ("mlp.gate", "mlp.shared_expert_gate")
# Small files copied from the source directory beside the weights.
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
          "merges.txt", "added_tokens.json", "tokenizer.model", "generation_config.json",
          "chat_template.json", "chat_template.jinja", "LICENSE", "README.md")

Progress = Callable[..., None]  # (stage, done, total) and optionally tensors=(done, total)

_DTYPES_16 = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def available_methods() -> tuple[str, ...]:
    from qlite.quant.formats import METHODS
    return tuple(METHODS)


def best_method() -> str:
    """The default: the error-minimising calibration-free method when there is one."""
    methods = available_methods()
    return "hqq" if "hqq" in methods else methods[0]


# ---------------------------------------------------------------------------------------------
# Which modules are quantized: one rule, used by the job and by swap_to_quantized.

def _keep(qcfg: dict) -> set[str]:
    return set(qcfg.get("keep_16bit") or ())


def quantized_targets(model: nn.Module, qcfg: dict):
    """[(module name, module)] of the 16-bit model that the quantization replaces:
    nn.Linear (not router, not shared-expert gate, lm_head unless kept), the routed experts,
    and the embedding unless kept."""
    from qlite.model import Experts
    keep = _keep(qcfg)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            out.append((name, m))
        elif isinstance(m, nn.Linear):
            if any(name.endswith(r) for r in ROUTER_NAMES):
                continue
            if name == "lm_head" and "lm_head" in keep:
                continue
            out.append((name, m))
        elif isinstance(m, nn.Embedding) and "embed" not in keep:
            out.append((name, m))
    return out


def _quantized_module(module: nn.Module, qcfg: dict, dtype=torch.float32) -> nn.Module:
    """The empty (meta) quantized counterpart of one target module; `dtype` is the activation
    dtype (what a quantized embedding returns)."""
    from qlite.model import Experts
    bits, g, sym = qcfg["bits"], qcfg.get("group_size") or 128, bool(qcfg.get("symmetric"))
    if isinstance(module, Experts):
        e, two_i, d = module.gate_up_proj.shape
        return _make_experts(e, d, two_i // 2, bits, g, sym)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module.num_embeddings, module.embedding_dim, bits, g, sym, dtype)
    return _make_linear(module.in_features, module.out_features,
                        module.bias is not None, bits, g, sym)


def swap_to_quantized(model: nn.Module, qcfg: dict, dtype=torch.float32) -> nn.Module:
    """Replace, in place, the target modules of a (meta-device) model by empty quantized ones,
    so the loader can fill them by state-dict name from a checkpoint `quantize_checkpoint`
    wrote. `qcfg` is config.json's `quantization` section; `dtype` the activation dtype."""
    check_qcfg(qcfg, "config.json")
    with torch.device("meta"):
        for name, module in quantized_targets(model, qcfg):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    _quantized_module(module, qcfg, dtype))
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, nn.Linear):
        raise QliteError("config.json: a quantized lm_head needs tie_word_embeddings false")
    return model


def check_qcfg(qcfg: dict, where: str):
    if not isinstance(qcfg, dict) or qcfg.get("format") != "qlite":
        raise QliteError(f"{where}: quantization section is not a qlite one: {qcfg!r}")
    if qcfg.get("version") != FORMAT_VERSION:
        raise QliteError(f"{where}: quantization format version {qcfg.get('version')!r}; this "
                         f"qlite reads version {FORMAT_VERSION}")
    if qcfg.get("bits") not in BITS:
        raise QliteError(f"{where}: quantization bits={qcfg.get('bits')!r} (4 or 8)")
    if qcfg["bits"] == 4 and qcfg.get("group_size") not in GROUP_SIZES:
        raise QliteError(f"{where}: quantization group_size={qcfg.get('group_size')!r}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                   method: str | None = None, keep_16bit=DEFAULT_KEEP, symmetric: bool = False,
                   dtype_16bit: str | torch.dtype | None = None) -> nn.Module:
    """Quantize a loaded 16/32-bit model in memory, in place, with the same rules and quantizer
    as `quantize_checkpoint` (the whole matrix at once, no files). With `dtype_16bit`, the
    tensors that stay unquantized are rounded through that dtype as the checkpoint stores them,
    which makes the result equal to loading `quantize_checkpoint`'s output."""
    from qlite.model import Experts
    qcfg = {"format": "qlite", "version": FORMAT_VERSION, "bits": bits,
            "group_size": group_size if bits == 4 else None, "method": method or best_method(),
            "symmetric": bool(symmetric), "keep_16bit": _resolve_keep(keep_16bit)}
    check_qcfg(qcfg, "quantize_model")
    g, meth, sym = qcfg["group_size"] or 128, qcfg["method"], qcfg["symmetric"]
    if model.config.tie_word_embeddings and "lm_head" not in qcfg["keep_16bit"]:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(),
                                            requires_grad=False)
        model.config.tie_word_embeddings = False
    targets = quantized_targets(model, qcfg)
    for name, module in targets:
        dtype = next(module.parameters()).dtype
        device = next(module.parameters()).device
        with torch.device("meta"):
            new = _quantized_module(module, qcfg, dtype)

        def fill(mod, packed):  # as the loader does: packed tensors, scales, zeros keep theirs
            for buf, t in packed.items():
                mod._buffers[buf] = t.to(device)

        if isinstance(module, Experts):
            for part in ("gate_up_proj", "down_proj"):
                w = getattr(module, part)
                per = [quantize_matrix(w[e].float(), bits, g, meth, sym) for e in range(w.shape[0])]
                stacked = {b: torch.stack([p[b] for p in per]) for b in per[0]}
                fill(_expert_holder(new, part), stacked)
        else:
            fill(new, quantize_matrix(module.weight.float(), bits, g, meth, sym))
            if getattr(module, "bias", None) is not None:
                new._buffers["bias"] = module.bias.detach().to(dtype)
        for key, t in new.state_dict(keep_vars=True).items():
            if t.is_meta:
                raise QliteError(f"internal: {name}.{key} was not filled by quantize_model")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if dtype_16bit is not None:  # round what the checkpoint keeps in 16-bit as it stores it
        dt = _DTYPES_16[dtype_16bit] if isinstance(dtype_16bit, str) else dtype_16bit
        quantized = {name for name, _ in targets}
        with torch.no_grad():
            for key, t in model.state_dict(keep_vars=True).items():
                if t.is_floating_point() and (_owner(key, quantized) is None
                                              or key.endswith(".bias")):
                    t.copy_(t.to(dt).to(t.dtype))
    model.quantization = qcfg
    return model


# ---------------------------------------------------------------------------------------------
# The quantized embedding (the lookup of a few rows dequantizes only those rows).

class QuantEmbedding(nn.Module):
    """nn.Embedding on a quantized table, same packed layout as QuantLinear (rows = tokens)."""

    def __init__(self, num: int, dim: int, bits: int, group_size: int, symmetric: bool,
                 dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.dtype = dtype  # of the rows it returns: the model's activations
        self.bits, self.group_size = bits, group_size
        shapes = _packed_shapes(num, dim, bits, group_size, symmetric)
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        if "zeros" not in shapes:
            self.zeros = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from qlite.kernels.reference import dequantize
        flat = ids.flatten()
        q = self.qweight[flat]
        if self.bits == 8:
            s, z = self.scales[flat], None
        else:  # scales/zeros are [K // G, N]: tokens are the columns
            s = self.scales[:, flat]
            z = None if self.zeros is None else self.zeros[:, flat]
        w = dequantize(q, s, z, self.bits, self.group_size)  # float32
        return w.to(self.dtype).view(*ids.shape, self.embedding_dim)


# ---------------------------------------------------------------------------------------------
# Adapters to qlite.quant: the only place that knows its constructors and quantizer.

def _packed_shapes(n: int, k: int, bits: int, group_size: int, symmetric: bool):
    """Buffer name -> (shape, dtype) of one packed [N, K] matrix (qlite.quant.formats)."""
    if bits == 8:
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float16)}
    shapes = {"qweight": ((n, k // 2), torch.uint8),
              "scales": ((k // group_size, n), torch.float16)}
    if not symmetric:
        shapes["zeros"] = ((k // group_size, n), torch.float16)
    return shapes


def _make_linear(k, n, bias, bits, g, sym):
    from qlite.quant import QuantLinear
    return QuantLinear(k, n, bias=bias, bits=bits, group_size=g, symmetric=sym)


def _make_experts(e, d, i, bits, g, sym):
    from qlite.quant import QuantExperts
    return QuantExperts(e, d, i, bits=bits, group_size=g, symmetric=sym)


def _expert_holder(experts: nn.Module, part: str) -> nn.Module:
    """The submodule of QuantExperts holding `part`'s stacked packed buffers."""
    return getattr(experts, part)


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int, method: str,
                    symmetric: bool) -> dict[str, torch.Tensor]:
    """One float matrix [N, K] -> its packed buffers {qweight, scales[, zeros]}."""
    from qlite.quant.formats import quantize
    # The quantizers are plain torch: HQQ's iterations run far faster on a GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qt = quantize(w.to(device), bits=bits, group_size=group_size, symmetric=symmetric,
                  method=method)
    out = {"qweight": qt.qweight.cpu(), "scales": qt.scales.cpu()}
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.cpu()
    return out


def _row_dim(name: str, bits: int) -> int:
    """The dimension of a packed buffer that indexes the matrix's output rows (N)."""
    return -1 if bits == 4 and name in ("scales", "zeros") else 0


def quantize_rows(read_rows: Callable[[int, int], torch.Tensor], n: int, k: int, bits: int,
                  group_size: int, method: str, symmetric: bool) -> dict[str, torch.Tensor]:
    """Quantize an [N, K] matrix read in row blocks by `read_rows(r0, r1)` (float32)."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(k, 1))
    parts: dict[str, list] = {}
    for r0 in range(0, n, step):
        block = read_rows(r0, min(n, r0 + step))
        for name, t in quantize_matrix(block, bits, group_size, method, symmetric).items():
            parts.setdefault(name, []).append(t)
        del block
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts, dim=_row_dim(name, bits))
            for name, ts in parts.items()}


# ---------------------------------------------------------------------------------------------
# Reading the source: plain reads of byte ranges (no mmap).

class _Reader:
    def __init__(self, index: dict[str, TensorInfo]):
        self.index = index
        self.handles = {}

    def rows(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (along dim 0) of a source tensor, in its own dtype, freshly allocated."""
        src = self.index[name]
        dtype = src.torch_dtype
        shape = list(src.shape)
        row = nbytes_of(shape[1:], dtype)
        if r0 is None:
            r0, r1 = 0, shape[0] if shape else 1
        if shape:
            shape[0] = r1 - r0
        f = self.handles.get(src.file)
        if f is None:
            f = self.handles[src.file] = open(src.file, "rb", buffering=0)
        buf = bytearray((r1 - r0) * row)
        f.seek(src.start + r0 * row)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                raise QliteError(f"{src.file}: truncated at tensor {name!r}")
            got += n
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def close(self):
        for f in self.handles.values():
            f.close()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------
# Writing: headers first, then each tensor's bytes at its offset.

# ---------------------------------------------------------------------------------------------
# The job

def _progress_caller(progress):
    if progress is None:
        return lambda *a, **k: None
    try:
        takes = "tensors" in inspect.signature(progress).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return progress
    return lambda stage, done, total, tensors=None: progress(stage, done, total)


def _resolve_keep(keep_16bit) -> list[str]:
    if isinstance(keep_16bit, str):
        keep_16bit = [k for k in keep_16bit.split(",") if k.strip()]
    keep = []
    for k in keep_16bit or ():
        k = k.strip()
        if k in ("none", ""):
            continue
        if k not in KEEPABLE:
            raise QliteError(f"--keep-16bit {k!r}: choose from {', '.join(KEEPABLE)} (norms, "
                             f"biases and the router always stay 16-bit)")
        if k not in keep:
            keep.append(k)
    return keep


def _plan(model, qcfg, sources, where: Path):
    """[(module name, kind, model tensor keys)] and the checks that need the model."""
    from qlite.model import Experts
    g = qcfg["group_size"]
    jobs = []
    for name, m in quantized_targets(model, qcfg):
        if isinstance(m, Experts):
            dims = [("gate_up_proj", m.gate_up_proj.shape[-1]), ("down_proj", m.down_proj.shape[-1])]
        elif isinstance(m, nn.Embedding):
            dims = [("weight", m.embedding_dim)]
        else:
            dims = [("weight", m.in_features)]
        if qcfg["bits"] == 4:
            for part, k in dims:
                if k % g:
                    raise QliteError(f"--group-size {g} does not divide the input dimension {k} "
                                     f"of {name}.{part}")
        jobs.append((name, m))
    return jobs


def _source_of(src_dir: Path, work: Path, progress) -> Path:
    """A model directory for `src`: itself, or a GGUF file converted into `work`."""
    src = Path(src_dir).expanduser()
    if src.is_file() and src.suffix == ".gguf":
        from qlite.gguf import convert_gguf
        return convert_gguf(src, work / "source", progress)
    if not src.is_dir():
        raise QliteError(f"{src}: no such model directory or .gguf file")
    return src


def quantize_checkpoint(src, out, bits: int = 4, group_size: int | None = 128,
                        method: str | None = None, keep_16bit=DEFAULT_KEEP, force: bool = False,
                        progress: Progress | None = None, symmetric: bool = False,
                        dtype_16bit: str = "bfloat16") -> Path:
    """Quantize the Qwen2 / Qwen2-MoE checkpoint `src` (a model directory with single or
    sharded safetensors, a .gguf file, or "demo") into the new model directory `out`; return it.

    bits 4 (group-wise along the input dimension, `group_size` 32/64/128, asymmetric unless
    `symmetric`) or 8 (symmetric, per output channel; group_size ignored). `method`: one of
    `available_methods()`, default the best (HQQ). `keep_16bit`: any of "lm_head", "embed"
    (a list or "lm_head,embed"). Bad input raises QliteError before anything is written."""
    from qlite.config import config_from_dict
    from qlite.loader import check_tensors, tensor_sources
    from qlite.model import Qwen2

    # -- options
    if bits not in BITS:
        raise QliteError(f"--bits {bits}: choose 4 or 8")
    if bits == 4:
        group_size = 128 if group_size is None else int(group_size)
        if group_size not in GROUP_SIZES:
            raise QliteError(f"--group-size {group_size}: choose one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")
    else:
        group_size = None
    methods = available_methods()
    method = method or best_method()
    if method not in methods:
        raise QliteError(f"--method {method!r}: choose one of {', '.join(methods)}")
    keep = _resolve_keep(keep_16bit)
    if dtype_16bit not in _DTYPES_16:
        raise QliteError(f"dtype_16bit {dtype_16bit!r}: choose one of {', '.join(_DTYPES_16)}")
    out = Path(out).expanduser().absolute()
    if str(src) == "demo":  # as qlite.load("demo"): the demo model, pulled on first use
        from qlite.pull import pull_demo
        src = pull_demo(progress=progress)
    src_path = Path(src).expanduser().absolute()
    if out.exists() and not force:
        raise QliteError(f"{out}: already exists (use --force to replace it)")
    if out == src_path or src_path.is_relative_to(out) or out.is_relative_to(src_path):
        raise QliteError(f"{out}: the output must not be the source or inside it")
    if src_path.suffix != ".gguf":  # a GGUF's header is checked by the conversion
        _check_source_dir(src_path)
    call = _progress_caller(progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = reader = None
    try:
        tmp.chmod(0o755)
        src_dir = _source_of(src_path, tmp, progress)
        raw = json.loads((src_dir / "config.json").read_text())
        if raw.get("quantization"):
            raise QliteError(f"{src_dir}: is already quantized")
        cfg = config_from_dict(raw, str(src_dir / "config.json"))
        from qlite.checkpoint import read_checkpoint
        tensors = read_checkpoint(src_dir)
        with torch.device("meta"):
            model = Qwen2(cfg)
        sources = tensor_sources(model, tensors)
        check_tensors(model, sources, tensors, src_dir)

        # A tied lm_head to be quantized is untied: it is quantized from the embedding.
        untie = cfg.tie_word_embeddings and "lm_head" not in keep
        if untie:
            cfg.tie_word_embeddings = False
            sources["lm_head.weight"] = [("model.embed_tokens.weight", None)]
        qcfg = {"format": "qlite", "version": FORMAT_VERSION, "bits": bits,
                "group_size": group_size, "method": method, "symmetric": bool(symmetric),
                "keep_16bit": keep, "dtype_16bit": None}
        src_dtypes = {tensors[n].dtype for parts in sources.values() for n, _ in parts}
        keep_dtype = (DTYPES[next(iter(src_dtypes))] if len(src_dtypes) == 1
                      and next(iter(src_dtypes)) in ("BF16", "F16") else _DTYPES_16[dtype_16bit])
        qcfg["dtype_16bit"] = str(keep_dtype).removeprefix("torch.")
        jobs = _plan(model, qcfg, sources, src_dir)
        targets = {name for name, _ in jobs}

        qmodel = swap_to_quantized(_meta_copy(cfg), qcfg)
        out_state = qmodel.state_dict(keep_vars=True)
        entries = []
        for key, t in out_state.items():
            if cfg.tie_word_embeddings and key == "lm_head.weight":
                continue
            quantized = _owner(key, targets) and not key.endswith(".bias")
            dtype = t.dtype if not t.is_floating_point() or quantized else keep_dtype
            entries.append((key, tuple(t.shape), dtype))
        dtypes = dict((k, d) for k, _, d in entries)
        writer = ShardWriter(tmp, entries, SHARD_BYTES)
        reader = _Reader(tensors)

        total = sum(tensors[n].nbytes for key, parts in sources.items()
                    if not (cfg.tie_word_embeddings and key == "lm_head.weight")
                    for n, _ in parts)
        done, ndone = 0, 0
        ntotal = len(jobs) + sum(1 for k in sources if _owner(k, targets) is None
                                 and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
        call("quantizing", 0, total, tensors=(0, ntotal))
        jobs_by_name = dict(jobs)
        for name, m in jobs:  # quantized modules
            done += _quantize_module(name, m, qcfg, sources, reader, writer, dtypes)
            ndone += 1
            call("quantizing", done, total, tensors=(ndone, ntotal))
        for key, parts in sources.items():  # the rest: copied, cast to the 16-bit dtype
            if _owner(key, targets) is not None or (cfg.tie_word_embeddings
                                                    and key == "lm_head.weight"):
                continue
            writer.write(key, reader.rows(parts[0][0]).to(dtypes[key]))
            done += tensors[parts[0][0]].nbytes
            ndone += 1
            call("quantizing", done, total, tensors=(ndone, ntotal))
        del jobs_by_name
        reader.close()
        info = writer.close()
        writer = None

        for fname in COPIED:
            if (src_dir / fname).is_file():
                shutil.copy2(src_dir / fname, tmp / fname)
        raw["quantization"] = dict(qcfg, source_bytes=total, quantized_bytes=info["total_size"])
        raw["torch_dtype"] = qcfg["dtype_16bit"]
        if untie:
            raw["tie_word_embeddings"] = False
        shutil.rmtree(tmp / "source", ignore_errors=True)
        _write_json(tmp / "config.json", raw)  # last: a directory without it is no model
        if out.exists():  # force: replace the old output only now that the new one is whole
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        if reader is not None:
            reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_source_dir(src: Path):
    from qlite.config import load_config
    if not src.is_dir():
        raise QliteError(f"{src}: no such model directory or .gguf file")
    load_config(src)  # a QliteError for anything but Qwen2 / Qwen2-MoE


def _meta_copy(cfg):
    from qlite.model import Qwen2
    with torch.device("meta"):
        return Qwen2(cfg)


def _owner(key: str, targets: set[str]) -> str | None:
    """The quantized module a state-dict key belongs to (at any depth), if any."""
    mod = key.rpartition(".")[0]
    while mod:
        if mod in targets:
            return mod
        mod = mod.rpartition(".")[0]
    return None


def _quantize_module(name, m, qcfg, sources, reader: _Reader, writer: ShardWriter,
                     dtypes) -> int:
    """Quantize one target module from the source, writing its buffers; return source bytes."""
    from qlite.model import Experts
    bits, g, method, sym = qcfg["bits"], qcfg["group_size"] or 128, qcfg["method"], \
        qcfg["symmetric"]
    nbytes = 0
    if isinstance(m, Experts):
        for part in ("gate_up_proj", "down_proj"):
            parts = sources[f"{name}.{part}"]
            e_num = m.gate_up_proj.shape[0]
            if parts[0][1] is None:  # already stacked in the source
                src = parts[0][0]
                for e in range(e_num):
                    w = reader.rows(src, e, e + 1)[0].float()
                    _write_packed(writer, f"{name}.{part}", _quantize_tensor(w, qcfg), e)
                nbytes += reader.index[src].nbytes
                continue
            per = len(parts) // e_num
            for e in range(e_num):
                w = torch.cat([reader.rows(n).float() for n, _ in parts[e * per:(e + 1) * per]])
                _write_packed(writer, f"{name}.{part}", _quantize_tensor(w, qcfg), e)
                nbytes += sum(reader.index[n].nbytes for n, _ in parts[e * per:(e + 1) * per])
                del w
        return nbytes
    src = sources[f"{name}.weight"][0][0]
    n, k = reader.index[src].shape
    packed = quantize_rows(lambda r0, r1: reader.rows(src, r0, r1).float(), n, k, bits, g,
                           method, sym)
    _write_packed(writer, name, packed, None)
    nbytes += reader.index[src].nbytes
    if getattr(m, "bias", None) is not None:
        bsrc = sources[f"{name}.bias"][0][0]
        writer.write(f"{name}.bias", reader.rows(bsrc).to(dtypes[f"{name}.bias"]))
        nbytes += reader.index[bsrc].nbytes
    return nbytes


def _quantize_tensor(w: torch.Tensor, qcfg: dict) -> dict:
    """quantize_rows on a matrix already in memory (one expert's)."""
    return quantize_rows(lambda r0, r1: w[r0:r1], w.shape[0], w.shape[1], qcfg["bits"],
                         qcfg["group_size"] or 128, qcfg["method"], qcfg["symmetric"])


def _write_packed(writer, prefix, packed: dict, index):
    for buf, t in packed.items():
        if t is None:
            continue
        key = f"{prefix}.{buf}"
        writer.write(key, t.to(writer.where[key][4]), index)


def _write_json(file: Path, obj):
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
