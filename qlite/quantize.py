"""`qlite quantize`: a 16/32-bit Qwen2 / Qwen2-MoE checkpoint -> an int4 or int8 one, streamed.

    quantize_checkpoint(src, out, bits=4, group_size=128, method="hqq")

Memory. The output's tensor names, shapes and dtypes are known before any weight is read: they
are the state dict of the model built on the `meta` device and passed through
`swap_to_quantized` -- exactly what `qlite.load` will expect. So every safetensors header is
written first and each tensor's bytes go straight to their place in the file. Source tensors
are read with plain file reads (checkpoint.TensorReader: no mmap) and a big
matrix is read and quantized in row blocks of at most `ROW_BLOCK_ELEMENTS` (rows are
independent for RTN and HQQ: groups run along the input dimension). Routed experts, stored one
per expert in published checkpoints, are quantized expert by expert into their slice of the
stacked tensor. Peak memory is therefore a row block and its quantizer temporaries plus one
quantized matrix, whatever the model's size. `method="gptq"` instead runs the model on
calibration text, one decoder layer at a time (qlite/calibrate.py): one layer in float32 and its
Hessians at a time.

Atomicity. Everything is written into a temporary sibling directory `.OUT.tmp-PID-*`,
config.json last, and renamed to OUT at the end; an interrupted run (an exception, Ctrl-C,
SIGTERM) leaves no OUT (or the previous OUT, with `force`) and no temporary directory. A run
killed outright leaves its directory; the next run on OUT removes it once PID is gone. Each
run's id is in every shard's header and in config.json, and `qlite.load` checks they agree, so
shards that were never finished do not load even with a config.json copied beside them.

What is quantized, and the `quantization` section of config.json: quant/swap.py (the same
rule and QuantConfig that `qlite.load` reads back). Kept tensors are stored in the source dtype
if it is 16-bit, else in `dtype_16bit` (bfloat16 by default).
"""
from __future__ import annotations

import glob
import inspect
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import uuid
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from qlite.calibrate import DEFAULT_TOKENS, FALLBACK, calibration_ids, gptq_layers
from qlite.checkpoint import (DTYPES, ShardWriter, TensorReader, check_tensors, publish_dir, read_checkpoint,
                              tensor_sources, write_json)
from qlite.config import config_from_dict, load_config
from qlite.errors import QliteError, QliteWarning
from qlite.model import Experts, Qwen2
from qlite.quant.swap import (DTYPES_16, QuantConfig, owner, quantize_matrix, quantized_targets,
                              swap_to_quantized)

SHARD_BYTES = 2_000_000_000  # at most 2 GB per output shard (a bigger tensor gets a shard alone)
ROW_BLOCK_ELEMENTS = 1 << 22  # read and quantize big matrices 4M weights (16 MB fp32) at a time
# Small files copied from the source directory beside the weights.
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
          "merges.txt", "added_tokens.json", "tokenizer.model", "generation_config.json",
          "chat_template.json", "chat_template.jinja", "LICENSE", "README.md")
# What a model directory may hold, for force to replace it (besides *.safetensors).
MODEL_FILES = {"config.json", "model.safetensors.index.json", ".gitattributes", *COPIED}

Progress = Callable[..., None]  # (stage, done, total) and optionally tensors=(done, total)
CALIBRATED = ("gptq",)  # methods that run the model on calibration text (qlite/calibrate.py)


# ---------------------------------------------------------------------------------------------
# Quantizing a matrix read in row blocks

def _row_dim(name: str, bits: int) -> int:
    """The dimension of a packed buffer that indexes the matrix's output rows (N)."""
    return -1 if bits == 4 and name in ("scales", "zeros") else 0


def quantize_rows(read_rows: Callable[[int, int], torch.Tensor], n: int, k: int,
                  q: QuantConfig) -> dict[str, torch.Tensor]:
    """Quantize an [N, K] matrix read in row blocks by `read_rows(r0, r1)` (float32)."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(k, 1))
    parts: dict[str, list] = {}
    for r0 in range(0, n, step):
        block = read_rows(r0, min(n, r0 + step))
        for name, t in quantize_matrix(block, q).items():
            parts.setdefault(name, []).append(t)
        del block
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts, dim=_row_dim(name, q.bits))
            for name, ts in parts.items()}


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


def _check_group_size(model: nn.Module, q: QuantConfig):
    """Every quantized matrix's input dimension must divide into groups."""
    if q.bits != 4:
        return
    for name, m in quantized_targets(model, q):
        if isinstance(m, Experts):
            dims = [("gate_up_proj", m.gate_up_proj.shape[-1]), ("down_proj", m.down_proj.shape[-1])]
        elif isinstance(m, nn.Embedding):
            dims = [("weight", m.embedding_dim)]
        else:
            dims = [("weight", m.in_features)]
        for part, k in dims:
            if k % q.group_size:
                raise QliteError(f"group_size {q.group_size} does not divide the input dimension "
                                 f"{k} of {name}.{part}")


def quantize_checkpoint(src, out, bits: int = 4, group_size: int | None = None,
                        method: str = "hqq", keep_16bit=("embed",), force: bool = False,
                        progress: Progress | None = None, symmetric: bool = False,
                        dtype_16bit: str = "bfloat16", calibration=None,
                        calibration_tokens: int | None = None) -> Path:
    """Quantize the Qwen2 / Qwen2-MoE checkpoint `src` (a model directory with single or
    sharded safetensors, a .gguf file, or "demo") into the new model directory `out`; return it.

    bits 4 (group-wise along the input dimension, `group_size` 32/64/128, default 128,
    asymmetric unless `symmetric`) or 8 (symmetric, per output channel: no group_size).
    `method`: "hqq" (the default) or "rtn". `keep_16bit`: any of "lm_head", "embed" (a list or
    "lm_head,embed"). `method="gptq"` (int4 only) runs the model on `calibration` (a text file;
    default: Python standard-library sources) for `calibration_tokens` tokens
    (qlite/calibrate.py). Bad input raises QliteError before anything is written."""
    q = QuantConfig(bits, group_size, symmetric, method or "hqq", keep_16bit, dtype_16bit)
    if q.method in CALIBRATED:
        if q.bits != 4:
            raise QliteError(f"method {q.method}: int4 only, got bits {q.bits}")
    else:
        q.check_method()
        if calibration is not None or calibration_tokens is not None:
            raise QliteError(f"calibration: only with method {' or '.join(CALIBRATED)}")
    out = Path(out).expanduser().absolute()
    if str(src) == "demo":  # as qlite.load("demo"): the demo model, pulled on first use
        from qlite.pull import pull_demo
        src = pull_demo(progress=progress)
    src_path = Path(src).expanduser().absolute()
    if out.exists() and not force:
        raise QliteError(f"{out}: already exists (force=True replaces it)")
    if out.exists():
        _check_replaceable(out)
    if out == src_path or src_path.is_relative_to(out) or out.is_relative_to(src_path):
        raise QliteError(f"{out}: the output must not be the source or inside it")
    if src_path.suffix != ".gguf":  # a GGUF's header is checked by the conversion
        if not src_path.is_dir():
            raise QliteError(f"{src_path}: no such model directory or .gguf file")
        load_config(src_path)  # a QliteError for anything but Qwen2 / Qwen2-MoE
    call = _progress_caller(progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    run_id = uuid.uuid4().hex
    writer = reader = None
    restore = _sigterm_as_exit()
    try:
        tmp.chmod(0o755)
        if src_path.suffix == ".gguf":  # read straight from the GGUF, tensor by tensor
            from qlite.gguf import GGUFSource
            reader = GGUFSource(src_path)
            src_dir, cfg = src_path, reader.config
            raw = cfg.to_hf_dict()
            reader.write_tokenizer(tmp)  # the output's; calibration (gptq) reads it from there
            tok_dir = tmp
        else:
            src_dir = src_path
            raw = json.loads((src_dir / "config.json").read_text())
            if raw.get("quantization") or raw.get("quantization_config"):
                raise QliteError(f"{src_dir}: is already quantized")
            cfg = config_from_dict(raw, str(src_dir / "config.json"))
            reader = TensorReader(read_checkpoint(src_dir))
            tok_dir = src_dir
        tensors = reader.index
        with torch.device("meta"):
            model = Qwen2(cfg)
        sources = tensor_sources(model, tensors)
        check_tensors(model, sources, tensors, src_dir)

        # A tied lm_head to be quantized is untied: it is quantized from the embedding.
        untie = cfg.tie_word_embeddings and "lm_head" not in q.keep
        if untie:
            cfg.tie_word_embeddings = False
            sources["lm_head.weight"] = [("model.embed_tokens.weight", None)]
        src_dtypes = {tensors[n].dtype for parts in sources.values() for n, _ in parts}
        keep_dtype = (DTYPES[next(iter(src_dtypes))] if len(src_dtypes) == 1
                      and next(iter(src_dtypes)) in ("BF16", "F16") else DTYPES_16[dtype_16bit])
        q = QuantConfig(q.bits, q.group_size, q.symmetric, q.method, q.keep,
                        str(keep_dtype).removeprefix("torch."))
        _check_group_size(model, q)
        jobs = quantized_targets(model, q)
        targets = {name for name, _ in jobs}

        with torch.device("meta"):
            qmodel = swap_to_quantized(Qwen2(cfg), q)
        entries = []
        for key, t in qmodel.state_dict(keep_vars=True).items():
            if cfg.tie_word_embeddings and key == "lm_head.weight":
                continue
            quantized = owner(key, targets) and not key.endswith(".bias")
            dtype = t.dtype if not t.is_floating_point() or quantized else keep_dtype
            entries.append((key, tuple(t.shape), dtype))
        dtypes = {k: d for k, _, d in entries}
        writer = ShardWriter(tmp, entries, SHARD_BYTES, {"qlite_run": run_id})

        total = sum(tensors[n].nbytes for key, parts in sources.items()
                    if not (cfg.tie_word_embeddings and key == "lm_head.weight")
                    for n, _ in parts)
        done, ndone = 0, 0
        ntotal = len(jobs) + sum(1 for k in sources if owner(k, targets) is None
                                 and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
        call("quantizing", 0, total, tensors=(0, ntotal))
        calibrated, calib_stats = set(), None
        if q.method in CALIBRATED:
            calibrated, calib_stats = _calibrated(tok_dir, cfg, targets, q, sources, reader,
                                                  writer, dtypes, calibration,
                                                  calibration_tokens, call)
            ndone += len(calibrated)
        for name, m in jobs:  # quantized modules
            if name in calibrated:
                done += sum(tensors[n].nbytes for key, parts in sources.items()
                            if owner(key, {name}) for n, _ in parts)
                continue
            mq = replace(q, method=FALLBACK) if q.method in CALIBRATED else q  # the embedding
            done += _quantize_module(name, m, mq, sources, reader, writer, dtypes)
            ndone += 1
            call("quantizing", done, total, tensors=(ndone, ntotal))
        for key, parts in sources.items():  # the rest: copied, cast to the 16-bit dtype
            if owner(key, targets) is not None or (cfg.tie_word_embeddings
                                                   and key == "lm_head.weight"):
                continue
            _copy(reader, parts[0][0], writer, key, dtypes[key])
            done += tensors[parts[0][0]].nbytes
            ndone += 1
            call("quantizing", done, total, tensors=(ndone, ntotal))
        reader.close()
        info = writer.close()
        writer = None

        if src_dir.is_dir():
            for fname in COPIED:
                if (src_dir / fname).is_file():
                    shutil.copy2(src_dir / fname, tmp / fname)
        raw["quantization"] = dict(q.to_dict(), source_bytes=total,
                                   quantized_bytes=info["total_size"], run_id=run_id)
        if calib_stats:
            raw["quantization"]["calibration"] = calib_stats
        if not src_dir.is_dir():  # a GGUF: how many tensors kept their codes
            raw["quantization"]["gguf_codes_kept"] = reader.kept
        raw["torch_dtype"] = q.dtype_16bit
        if untie:
            raw["tie_word_embeddings"] = False
        write_json(tmp / "config.json", raw)  # last: a directory without it is no model
        publish_dir(tmp, out)  # force: the old output goes only now
    except BaseException:
        if writer is not None:
            writer.abort()
        if reader is not None:
            reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore()
    return out


def _calibrated(src_dir, cfg, targets, q, sources, reader, writer, dtypes, calibration,
                calibration_tokens, call):
    """GPTQ the decoder layers (and lm_head): qlite/calibrate.py. Returns the modules done and
    the quantization section's `calibration` entry."""
    from qlite.tokenizer import Tokenizer
    ids, text = calibration_ids(Tokenizer.from_dir(src_dir), calibration,
                                calibration_tokens or DEFAULT_TOKENS)
    stage = f"GPTQ on {ids.numel()} tokens, layers"
    call(stage, 0, cfg.num_hidden_layers + 1)
    done, stats = gptq_layers(cfg, targets, q, sources, reader, writer, dtypes, ids,
                              lambda i, n, _elapsed: call(stage, i, n))
    call(stage, cfg.num_hidden_layers + 1, cfg.num_hidden_layers + 1)
    return done, dict(stats, text=text)


def _sigterm_as_exit():
    """Until the returned function is called, SIGTERM (what timeout, systemd and docker stop
    send) ends the job like Ctrl-C: the cleanup runs, then the process exits with 143. Only the
    main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(out: Path):
    """What a killed run on the same output left, `.OUT.tmp-PID-*` (and `.OUT.old-PID-*`, the
    previous output while force replaced it), goes when process PID is gone, with a warning.
    A previous output caught between the two renames of a replacement is put back."""
    for kind in ("tmp", "old"):
        for path in map(Path, glob.glob(os.path.join(glob.escape(str(out.parent)),
                                                     f".{glob.escape(out.name)}.{kind}-*"))):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if _alive(int(pid) if pid.isdigit() else None):
                continue
            if kind == "old" and not out.exists() and (path / "x").is_dir():
                os.rename(path / "x", out)
                what = f"put back {out}, which an interrupted run was replacing"
            else:
                what = "removed what an interrupted run left"
            shutil.rmtree(path, ignore_errors=True)
            warnings.warn(f"{path}: {what}", QliteWarning, stacklevel=3)


def _check_replaceable(out: Path):
    """force replaces a model directory (config.json, safetensors weights, the files copied
    beside them) and nothing else: not a file, not a folder holding anything of the user's."""
    why = None
    if not out.is_dir():
        why = "it is not a directory"
    else:
        names = {p.name for p in out.iterdir()}
        foreign = sorted(n for n in names - MODEL_FILES if not n.endswith(".safetensors"))
        if foreign:
            why = f"{foreign[0]!r} is not part of a model directory"
        elif "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            why = "it has no config.json and safetensors weights"
    if why:
        raise QliteError(f"{out}: not replaced: {why} (force=True replaces only a model directory)")


def _quantize_module(name, m, q: QuantConfig, sources, reader: TensorReader, writer: ShardWriter,
                     dtypes) -> int:
    """Quantize one target module from the source, writing its buffers; return source bytes."""
    nbytes = 0
    if isinstance(m, Experts):
        for part in ("gate_up_proj", "down_proj"):
            parts = sources[f"{name}.{part}"]
            e_num = m.gate_up_proj.shape[0]
            if parts[0][1] is None:  # already stacked in the source
                src = parts[0][0]
                for e in range(e_num):
                    w = reader.rows(src, e, e + 1)[0].float()
                    _write_packed(writer, f"{name}.{part}", _quantize_tensor(w, q), e)
                nbytes += reader.index[src].nbytes
                continue
            per = len(parts) // e_num
            for e in range(e_num):
                names = [n for n, _ in parts[e * per:(e + 1) * per]]
                kept = [reader.keep_codes(n, q) for n in names]
                if all(kept):  # gate and up rows stacked, as quantizing their concatenation
                    packed = {b: torch.cat([k[b] for k in kept], dim=_row_dim(b, q.bits))
                              for b in kept[0]}
                else:
                    packed = _quantize_tensor(torch.cat([reader.rows(n).float() for n in names]),
                                              q)
                _write_packed(writer, f"{name}.{part}", packed, e)
                nbytes += sum(reader.index[n].nbytes for n in names)
                del packed
        return nbytes
    src = sources[f"{name}.weight"][0][0]
    n, k = reader.index[src].shape
    packed = reader.keep_codes(src, q) or quantize_rows(
        lambda r0, r1: reader.rows(src, r0, r1).float(), n, k, q)
    _write_packed(writer, name, packed, None)
    nbytes += reader.index[src].nbytes
    if getattr(m, "bias", None) is not None:
        bsrc = sources[f"{name}.bias"][0][0]
        writer.write(f"{name}.bias", reader.rows(bsrc).to(dtypes[f"{name}.bias"]))
        nbytes += reader.index[bsrc].nbytes
    return nbytes


def _copy(reader, src: str, writer: ShardWriter, key: str, dtype: torch.dtype):
    """A kept tensor, cast to its 16-bit dtype, in row blocks (an embedding can be the
    biggest tensor of the model)."""
    shape = reader.index[src].shape
    if len(shape) < 2:
        writer.write(key, reader.rows(src).to(dtype))
        return
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        writer.write_rows(key, reader.rows(src, r0, min(shape[0], r0 + step)).to(dtype), r0)


def _quantize_tensor(w: torch.Tensor, q: QuantConfig) -> dict:
    """quantize_rows on a matrix already in memory (one expert's)."""
    return quantize_rows(lambda r0, r1: w[r0:r1], w.shape[0], w.shape[1], q)


def _write_packed(writer, prefix, packed: dict, index):
    for buf, t in packed.items():
        key = f"{prefix}.{buf}"
        writer.write(key, t.to(writer.where[key][4]), index)

