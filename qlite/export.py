"""`qlite export SRC OUT --format gptq`: a symmetric qlite int4 checkpoint -> a GPTQ checkpoint
as vLLM, SGLang and transformers+gptqmodel read it (Qwen's *-GPTQ-Int4 layout).

    export_checkpoint(src, out, fmt="gptq")
    quantize_as_gptq(src, out, **quantize_checkpoint_options)   # `qlite quantize --format gptq`

Every quantized linear `P` keeps its codes and fp16 scales (quant/gptq_awq.qlite_to_gptq: the
same weight bit for bit) as `P.qweight` / `P.qzeros` / `P.scales` / `P.g_idx`, routed experts one
per expert (`mlp.experts.E.{gate,up,down}_proj`); the router, the shared-expert gate, norms, biases,
the embedding and lm_head are written in float16 (a quantized embedding or lm_head is
dequantized to float16). config.json gets `quantization_config` {quant_method gptq, bits 4,
group_size, sym true, desc_act false, checkpoint_format gptq} in place of qlite's section;
tokenizer files and the chat template are copied. desc_act false holds for `--method gptq`
sources too: their activation order used static groups (quant/gptq.py), so the weights are
stored in their own order with g_idx = k // G (`static_groups` says so in the config).

Streamed and atomic like `qlite quantize`: every header is written first, one tensor at a time
after, into `.OUT.tmp-*`, renamed to OUT at the end.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from qlite.checkpoint import ShardWriter, TensorReader, publish_dir, read_checkpoint, write_json
from qlite.errors import QliteError
from qlite.quant.gptq import PERCDAMP

FORMATS = ("gptq",)
_PACKED = ("qweight", "scales", "zeros")
_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _check_source(src: Path) -> dict:
    config = src / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QliteError(f"{config}: unreadable ({e})") from None
    q = raw.get("quantization")
    if not isinstance(q, dict) or q.get("format") != "qlite":
        raise QliteError(f"{config}: not a qlite-quantized checkpoint (no qlite `quantization` "
                         f"section): quantize it first with `qlite quantize --symmetric`")
    if q.get("bits") != 4:
        raise QliteError(f"{config}: int{q.get('bits')} checkpoint; GPTQ export takes int4")
    if not q.get("symmetric"):
        raise QliteError(f"{config}: asymmetric int4 (float zero points) has no exact GPTQ "
                         f"form; quantize with symmetric=True")
    return raw


def _plan(tensors):
    """[(output name, shape, dtype, how)] with how = ("copy", src) | ("dense", prefix) |
    ("expert", prefix, part, e, rows) | ("dequant", prefix)."""
    prefixes = {}
    for name in tensors:
        stem, _, leaf = name.rpartition(".")
        if leaf in _PACKED:
            prefixes.setdefault(stem, {})[leaf] = tensors[name]
    out = []
    for name, info in tensors.items():
        stem, _, leaf = name.rpartition(".")
        if stem in prefixes and leaf in _PACKED:
            continue
        out.append((name, info.shape, torch.float16 if info.torch_dtype.is_floating_point
                    else info.torch_dtype, ("copy", name)))
    for prefix, parts in prefixes.items():
        qw, sc = parts["qweight"], parts["scales"]
        if qw.dtype != "U8" or len(sc.shape) not in (2, 3):
            raise QliteError(f"{qw.file}: {prefix}.qweight is not int4 ({qw.dtype} "
                             f"{list(qw.shape)})")
        if prefix.endswith(("embed_tokens", "lm_head")):
            out.append((f"{prefix}.weight", (qw.shape[0], 2 * qw.shape[1]), torch.float16,
                        ("dequant", prefix)))
            continue
        *lead, n, half = qw.shape
        k, groups = 2 * half, sc.shape[-2]
        if lead:  # stacked experts: one GPTQ linear per expert and part
            stem, _, part = prefix.rpartition(".")
            names = _EXPERT_PARTS.get(part)
            if names is None or not stem.endswith("experts"):
                raise QliteError(f"{qw.file}: unexpected stacked tensor {prefix}.qweight")
            rows = n // len(names)
            for e in range(lead[0]):
                for i, leaf in enumerate(names):
                    out += _gptq_entries(f"{stem}.{e}.{leaf}", rows, k, groups,
                                         ("expert", prefix, e, slice(i * rows, (i + 1) * rows)))
        else:
            out += _gptq_entries(prefix, n, k, groups, ("dense", prefix))
    return out


def _gptq_entries(prefix, n, k, groups, how):
    if n % 8 or k % 8:
        raise QliteError(f"{prefix}: [{n}, {k}] does not pack into GPTQ words of 8")
    return [(f"{prefix}.qweight", (k // 8, n), torch.int32, how),
            (f"{prefix}.qzeros", (groups, n // 8), torch.int32, None),
            (f"{prefix}.scales", (groups, n), torch.float16, None),
            (f"{prefix}.g_idx", (k,), torch.int32, None)]


def export_checkpoint(src, out, fmt: str = "gptq", force: bool = False, progress=None) -> Path:
    """Write the qlite int4 symmetric checkpoint `src` as a `fmt` checkpoint in `out`."""
    from qlite.kernels.reference import dequantize
    from qlite.quant.gptq_awq import qlite_to_gptq
    from qlite.quantize import COPIED, SHARD_BYTES

    if fmt not in FORMATS:
        raise QliteError(f"fmt {fmt!r}: choose one of {', '.join(FORMATS)}")
    src = Path(src).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    if not src.is_dir():
        raise QliteError(f"{src}: no such model directory")
    raw = _check_source(src)
    if out.exists() and not force:
        raise QliteError(f"{out}: already exists (force=True replaces it)")
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise QliteError(f"{out}: the output must not be the source or inside it")
    q = raw.pop("quantization")
    g = q["group_size"]
    tensors = read_checkpoint(src)
    plan = _plan(tensors)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = reader = None
    try:
        tmp.chmod(0o755)
        writer = ShardWriter(tmp, [(name, shape, dtype) for name, shape, dtype, _ in plan],
                             SHARD_BYTES)
        reader = TensorReader(tensors)

        def packed(prefix, e=None):
            get = {leaf: (reader.rows(f"{prefix}.{leaf}") if e is None else
                          reader.rows(f"{prefix}.{leaf}", e, e + 1)[0])
                   for leaf in _PACKED if f"{prefix}.{leaf}" in tensors}
            return get["qweight"], get["scales"], get.get("zeros")

        work = [p for p in plan if p[3] is not None]
        for i, (name, shape, dtype, how) in enumerate(work):
            if how[0] == "copy":
                writer.write(name, reader.rows(how[1]).to(dtype))
            elif how[0] == "dequant":
                qw, sc, z = packed(how[1])
                writer.write(name, dequantize(qw, sc, z, 4, g).to(dtype))
            else:
                prefix = name.rpartition(".")[0]
                if how[0] == "dense":
                    qw, sc, z = packed(how[1])
                else:
                    _, stacked, e, rows = how
                    qw, sc, z = packed(stacked, e)
                    qw, sc = qw[rows], sc[:, rows]
                for leaf, t in qlite_to_gptq(qw, sc, z, g, prefix).items():
                    writer.write(f"{prefix}.{leaf}", t)
            if progress:
                progress("exporting", i + 1, len(work))
        reader.close()
        writer.close()
        writer = None

        for fname in COPIED:
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)
        raw["torch_dtype"] = "float16"
        if "dtype" in raw:  # transformers 5's name for it
            raw["dtype"] = "float16"
        raw["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": g, "sym": True, "desc_act": False,
            "static_groups": q.get("method") == "gptq", "true_sequential": True,
            "damp_percent": PERCDAMP,
            "checkpoint_format": "gptq", "meta": {"quantizer": ["qlite"],
                                                  "qlite_method": q.get("method")}}
        write_json(tmp / "config.json", raw)  # last: a directory without it is no model
        publish_dir(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        if reader is not None:
            reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantize_as_gptq(src, out, force: bool = False, progress=None, **options) -> Path:
    """`qlite quantize ... --format gptq`: quantize (symmetric int4) into a temporary qlite
    checkpoint beside `out`, export it to `out`, remove the temporary one."""
    from qlite.quantize import quantize_checkpoint
    if options.get("bits", 4) != 4:
        raise QliteError(f"bits {options['bits']}: the gptq format is int4 only")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QliteError(f"{out}: already exists (force=True replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.qlite-", dir=out.parent))
    try:
        q = quantize_checkpoint(src, work / "q", progress=progress, **dict(options, symmetric=True))
        return export_checkpoint(q, out, "gptq", force=force, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
