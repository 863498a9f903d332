"""Where GPTQ's perplexity gain comes from: the GPTQ checkpoint that bench/bench_quality.py wrote
(its --gptq-cache), with some of its matrices swapped for round to nearest's (or the 16-bit
model's), each variant scored as bench_quality.py scores (the same files and tokens).

    python bench/bench_gptq_swap.py --files 4 --threads 2
    python bench/bench_gptq_swap.py --swap "rtn:lm_head" --swap "16bit:down_proj"

A swap is SOURCE:PATTERNS: the modules whose name ends with one of the comma-separated patterns
(or, for `layers=A-B`, every matrix of decoder layers A..B) taken from SOURCE (gptq, rtn or
16bit) into the --base model (default: the GPTQ checkpoint).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402
import qlite  # noqa: E402

DEFAULT_SWAPS = ("", "16bit:lm_head", "rtn:lm_head", "rtn:q_proj,k_proj,v_proj,o_proj",
                 "rtn:gate_proj,up_proj", "rtn:down_proj", "rtn:layers=0-3",
                 "rtn:layers=20-23")


def _matrices(model):
    return {n: m for n, m in model.named_modules()
            if n == "lm_head" or n.endswith(("_proj",)) and "layers." in n}


def _selected(names, patterns):
    out = []
    for pat in patterns:
        if pat.startswith("layers="):
            a, b = (int(v) for v in pat[7:].split("-"))
            out += [n for n in names if n.startswith("model.layers.")
                    and a <= int(n.split(".")[2]) <= b]
        else:
            out += [n for n in names if n.endswith(pat)]
    return sorted(set(out))


def _swap(model, names, source):
    for n in names:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, source.get_submodule(n))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--variant", default="int4-g128-gptq", help="bench_quality's GPTQ variant")
    p.add_argument("--rtn", default="int4-g128-rtn", help="bench_quality's RTN variant")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calibration-tokens", type=int, default=None)
    p.add_argument("--gptq-cache", default="~/.cache/qlite/bench")
    p.add_argument("--swap", action="append", help="SOURCE:PATTERNS (repeatable)")
    p.add_argument("--base", default="gptq", choices=["gptq", "rtn", "16bit"],
                   help="the model the swaps go into (a fresh one for each)")
    args = p.parse_args(argv)
    for swap in args.swap or ():
        src, colon, pats = swap.partition(":")
        if swap and (src not in ("gptq", "rtn", "16bit") or not colon or not pats):
            p.error(f"--swap {swap!r}: expected SOURCE:PATTERNS, SOURCE one of gptq, rtn, 16bit")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calibration_tokens is None:
        from qlite.calibrate import DEFAULT_TOKENS
        args.calibration_tokens = DEFAULT_TOKENS
    from qlite.loader import resolve_model_dir
    from qlite.tokenizer import Tokenizer
    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_dir(model_dir)
    seqs = [torch.tensor(tok.encode(text)[:args.tokens])
            for _, text in bench_quality.stdlib_texts(args.files)]
    ckpt, _ = bench_quality.gptq_checkpoint(args.variant, bench_quality.VARIANTS[args.variant][1],
                                            model_dir, args)
    kind, opts = bench_quality.VARIANTS[args.rtn]
    make = {"gptq": lambda: qlite.load(ckpt, dtype="float32"),
            "16bit": lambda: bench_quality.build("16bit", {}, model_dir, "float32"),
            "rtn": lambda: bench_quality.build(kind, opts, model_dir, "float32")}
    sources = {"16bit": make["16bit"]()}  # the swaps' donors, each built once when first needed
    base, _ = bench_quality.perplexity(sources["16bit"], seqs)
    print(f"16bit ppl {base:.4f}", flush=True)
    label = {"gptq": args.variant, "rtn": args.rtn, "16bit": "16bit"}[args.base]
    for swap in args.swap or DEFAULT_SWAPS:
        model = make[args.base]()
        what = f"{label} as is"
        if swap:
            src, _, pats = swap.partition(":")
            if src not in sources:
                sources[src] = make[src]()
            names = _selected(list(_matrices(model)), pats.split(","))
            _swap(model, names, sources[src])
            what = f"{label}, {src} for {pats} ({len(names)} matrices)"
        t0 = time.time()
        ppl, _ = bench_quality.perplexity(model, seqs)
        print(f"| {what} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {time.time() - t0:.0f}s |",
              flush=True)
        del model


if __name__ == "__main__":
    main()
