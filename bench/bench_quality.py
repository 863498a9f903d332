"""Perplexity of the demo model on Python standard-library source: 16-bit vs qlite int8/int4
vs bitsandbytes NF4/int8 vs GPTQ, one markdown table under bench/results/.

The text is a fixed list of stdlib files read from the running Python (never copied into the
repository); each contributes its first --tokens tokens as one sequence. Every variant is the
same demo weights (float32 activations), quantized in memory with exactly the quantizer and
rules `qlite quantize` uses (qlite.quant.swap.quantize_model: lm_head quantized, embedding kept
16-bit), or converted by qlite.bnb.to_bitsandbytes (lm_head kept, bitsandbytes' default).
GPTQ variants are `qlite quantize --method gptq` checkpoints (same rules; calibrated on
qlite.calibrate's default stdlib files, disjoint from the scored ones) written under
--gptq-cache and reused when there with the same options (the notes column says so).

    python bench/bench_quality.py                      # all variants, 8 files x 1024 tokens
    python bench/bench_quality.py --files 4 --only 16bit,int8,int4-g128-rtn
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlite  # noqa: E402

STDLIB_FILES = ["json/decoder.py", "argparse.py", "textwrap.py", "difflib.py", "heapq.py",
                "fractions.py", "shlex.py", "dataclasses.py", "functools.py", "pathlib.py"]

# name -> (kind, options). kind: "16bit", "qlite" (quantize_model) or "bnb" (to_bitsandbytes)
VARIANTS = {
    "16bit": ("16bit", {}),
    "int8": ("qlite", dict(bits=8, method="rtn")),
    "int4-g128-rtn": ("qlite", dict(bits=4, group_size=128, method="rtn")),
    "int4-g128-hqq": ("qlite", dict(bits=4, group_size=128, method="hqq")),
    "int4-g64-rtn": ("qlite", dict(bits=4, group_size=64, method="rtn")),
    "int4-g64-hqq": ("qlite", dict(bits=4, group_size=64, method="hqq")),
    # lm_head kept 16-bit, as bitsandbytes keeps it: the same weights quantized as bnb's
    "int4-g128-rtn-head16": ("qlite", dict(bits=4, group_size=128, method="rtn",
                                           keep_16bit=("embed", "lm_head"))),
    "int4-g128-hqq-head16": ("qlite", dict(bits=4, group_size=128, method="hqq",
                                           keep_16bit=("embed", "lm_head"))),
    "int4-g128-gptq": ("gptq", dict(bits=4, group_size=128)),
    "int4-g128-gptq-sym": ("gptq", dict(bits=4, group_size=128, symmetric=True)),
    "int4-g64-gptq": ("gptq", dict(bits=4, group_size=64)),
    # 8-bit GPTQ's layout (RTN codes, sym, groups of 128, lm_head kept 16-bit as Qwen's
    # GPTQ-Int8 keeps it) as the checkpoint dequantizes it, and as qlite loads it: requantized
    # to int8 per channel (qlite.quant.gptq_awq). Float weights both: the format's cost alone.
    "gptq8-g128": ("gptq8", dict(requant=False)),
    "gptq8-g128-as-qlite-int8": ("gptq8", dict(requant=True)),
    "bnb-nf4": ("bnb", dict(bits=4)),
    "bnb-int8": ("bnb", dict(bits=8)),
}


def stdlib_texts(n_files: int) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in STDLIB_FILES[:n_files]:
        out.append((rel, (root / rel).read_text(encoding="utf-8")))
    return out


@torch.no_grad()
def perplexity(model, sequences: list[torch.Tensor]) -> tuple[float, int]:
    nll, count = 0.0, 0
    for ids in sequences:
        logits = model(ids[None])[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(nll / count), count


def gptq_checkpoint(name, opts, model_dir, args) -> tuple[Path, str]:
    """The variant's `qlite quantize --method gptq` output, written once under --gptq-cache."""
    from qlite.quantize import quantize_checkpoint
    from qlite.quant.gptq import VERSION
    out = Path(args.gptq_cache).expanduser() / f"{name}-{args.calibration_tokens}tok-{VERSION}"
    if (out / "config.json").is_file():
        return out, "cached checkpoint"
    t0 = time.time()
    quantize_checkpoint(model_dir, out, method="gptq", calibration_tokens=args.calibration_tokens,
                        force=True, **opts)
    return out, f"GPTQ {time.time() - t0:.0f}s"


def build(kind, opts, model_dir, dtype):
    model = qlite.load(model_dir, dtype=dtype)
    if kind == "qlite":
        from qlite.quant.swap import quantize_model
        quantize_model(model, dtype_16bit="bfloat16", **opts)
    elif kind == "bnb":
        from qlite.bnb import to_bitsandbytes
        to_bitsandbytes(model, **opts)
    elif kind == "gptq8":
        _gptq8(model, **opts)
    return model


def _gptq8(model, requant: bool, group: int = 128):
    from qlite.quant.gptq_awq import codes_to_qlite, dequantize_codes
    from qlite.quant.swap import ROUTER_NAMES
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) or name == "lm_head" or name.endswith(ROUTER_NAMES):
                continue
            w = m.weight.float().T  # [K, N], GPTQ's orientation
            k, n = w.shape
            s = (w.view(k // group, group, n).abs().amax(1) / 127).clamp(min=1e-8).half()
            q = (w.view(k // group, group, n) / s.float().unsqueeze(1)).round().clamp(-128, 127)
            codes, zeros = (q + 128).long().view(k, n), torch.full_like(s, 128, dtype=torch.long)
            w8 = (codes_to_qlite(codes, zeros, s, 8, group, True).dequantize() if requant
                  else dequantize_codes(codes, zeros, s, group).T)
            m.weight.copy_(w8.to(m.weight.dtype))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo", help="model directory (default: the demo model)")
    p.add_argument("--files", type=int, default=8, help=f"stdlib files (≤ {len(STDLIB_FILES)})")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per file")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calibration-tokens", type=int, default=None,
                   help="GPTQ variants (default: qlite/calibrate.py's DEFAULT_TOKENS)")
    p.add_argument("--gptq-cache", default="~/.cache/qlite/bench",
                   help="where GPTQ variants' checkpoints are written and reused")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.md"))
    args = p.parse_args(argv)
    if args.calibration_tokens is None:
        from qlite.calibrate import DEFAULT_TOKENS
        args.calibration_tokens = DEFAULT_TOKENS
    if args.threads:
        torch.set_num_threads(args.threads)
    from qlite.loader import resolve_model_dir
    model_dir = resolve_model_dir(args.model)
    from qlite.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    texts = stdlib_texts(args.files)
    seqs = [torch.tensor(tok.encode(text)[:args.tokens]) for _, text in texts]

    rows, base = [], None
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        kind, opts = VARIANTS[name]
        t0 = time.time()
        how = "quantize"
        try:
            if kind == "gptq":
                ckpt, how = gptq_checkpoint(name, opts, model_dir, args)
                model = qlite.load(ckpt, dtype=args.dtype)
            else:
                model = build(kind, opts, model_dir, args.dtype)
        except Exception as e:  # bitsandbytes unusable here, say so in the table
            rows.append((name, None, None, f"not run: {e}"))
            print(f"{name:16s} not run: {e}", flush=True)
            write_table(args, rows, base, texts, seqs)
            continue
        t1 = time.time()
        ppl, count = perplexity(model, seqs)
        t2 = time.time()
        base = ppl if name == "16bit" else base
        weights = _weight_bytes(model)
        del model
        rows.append((name, ppl, weights, f"{how}, load {t1 - t0:.0f}s, eval {t2 - t1:.0f}s"
                     if kind == "gptq" else f"quantize {t1 - t0:.0f}s, eval {t2 - t1:.0f}s"))
        delta = "" if base is None or name == "16bit" else f" ({100 * (ppl / base - 1):+.2f}%)"
        print(f"{name:16s} ppl {ppl:.4f}{delta}  [{rows[-1][3]}]", flush=True)
        write_table(args, rows, base, texts, seqs)

    print(write_table(args, rows, base, texts, seqs))


def write_table(args, rows, base, texts, seqs) -> str:
    """The markdown table of the rows so far, written to args.out (after every variant)."""
    lines = ["# Perplexity, demo model (Qwen2.5-Coder-0.5B-Instruct from its Q4_K_M GGUF)",
             "",
             f"{datetime.date.today()} · {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores), torch {torch.__version__}, activations {args.dtype} · "
             f"{len(seqs)} stdlib files × first {args.tokens} tokens "
             f"({sum(s.numel() - 1 for s in seqs)} predicted tokens): "
             f"{', '.join(r for r, _ in texts)}",
             "",
             "`16bit` keeps the float32 weights of the GGUF import; qlite variants quantize every "
             "linear, experts and lm_head included (embedding kept 16-bit, norms and router "
             "always); bnb variants keep lm_head (bitsandbytes' default). GPTQ variants are "
             f"`qlite quantize --method gptq` checkpoints calibrated on {args.calibration_tokens} "
             "tokens of other stdlib files (qlite/calibrate.py). "
             "`python bench/bench_quality.py`",
             "",
             "| variant | perplexity | vs 16-bit | weights in memory | notes |",
             "|---|---:|---:|---:|---|"]
    for name, ppl, weights, note in rows:
        if ppl is None:
            lines.append(f"| {name} | – | – | – | {note} |")
            continue
        rel = "–" if base is None or name == "16bit" else f"{100 * (ppl / base - 1):+.2f}%"
        lines.append(f"| {name} | {ppl:.4f} | {rel} | {weights / 1e6:,.0f} MB | {note} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


if __name__ == "__main__":
    main()
