"""GPTQ's options compared one matrix at a time on the demo model: a cheap proxy for the
perplexity table (bench/bench_quality.py), minutes instead of an hour per variant.

The 16-bit demo model runs over qlite/calibrate.py's default calibration text while hooks sum
the input Hessian H = 2 X^T X / n of a few layers' linears (q/k/v share q_proj's, gate/up
gate_proj's) and of lm_head, saved at each --tokens count; then over the files the quality
bench scores (bench_quality.STDLIB_FILES, --files x 1024 tokens), whose inputs X are kept.
Each variant quantizes each matrix W from the Hessian, and the table gives the relative output
error on the scored text ||X (W - Q)^T||^2 / ||X W^T||^2 as a fraction of round to nearest's
(qlite's `rtn`, the same group size, asymmetric). Held-out text from the calibration files
themselves flatters GPTQ (bench/results/quality.md): score on other text.

    python bench/bench_gptq_layers.py                          # layers 1,8,16,23; 4096,16384
    python bench/bench_gptq_layers.py --layers 8 --tokens 8192 --variants rtn,default
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
from qlite import calibrate  # noqa: E402
from qlite.quant.formats import quantize  # noqa: E402
from qlite.quant.gptq import gptq_quantize  # noqa: E402

NO_CLIP = dict(shrinks=(1.0,))
VARIANTS = {  # name -> gptq_quantize options (None: round to nearest)
    "rtn": None,
    "plain-damp01": dict(act_order=False, percdamp=0.01, **NO_CLIP),  # the paper's GPTQ
    "actorder-damp01": dict(act_order=True, percdamp=0.01, **NO_CLIP),
    "clip-damp01": dict(act_order=False, percdamp=0.01),
    "actorder-clip-damp01": dict(act_order=True, percdamp=0.01),
    "intzero": dict(integer_zero=True, refit=False),  # the second round's default
    "floatzero": dict(refit=False),
    "default": dict(),  # quant/gptq.py's defaults
}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


@torch.no_grad()
def capture(model, layers, counts, files, lm_head):
    """{matrix name: (W, {tokens: H}, X of the scored text)}"""
    ids, _ = calibrate.calibration_ids(model.tokenizer, tokens=max(counts))
    seq = calibrate.SEQ_LEN
    mods = {f"{i}.{n}": model.model.layers[i].get_submodule(n) for i in layers for n in LINEARS}
    if lm_head:
        mods["lm_head"] = model.lm_head
    sums = {k: torch.zeros(m.in_features, m.in_features) for k, m in mods.items()}
    hs = {k: {} for k in mods}
    xs = {k: [] for k in mods}
    phase = {"train": True}

    def hook(k):
        def f(mod, args):
            x = args[0].reshape(-1, mod.in_features).float()
            if phase["train"]:
                sums[k].addmm_(x.T, x)
            else:
                xs[k].append(x.clone())
        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in mods.items()]
    rows = max(counts) // seq
    for r in range(rows):
        model(ids[r:r + 1])
        for c in counts:
            if (r + 1) * seq == c:
                for k in mods:
                    hs[k][c] = sums[k] * (2 / c)
    phase["train"] = False
    for _, text in bench_quality.stdlib_texts(files):
        model(torch.tensor(model.tokenizer.encode(text)[:1024])[None])
    for h in handles:
        h.remove()
    return {k: (mods[k].weight.detach().float().clone(), hs[k], torch.cat(xs[k])) for k in mods}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--layers", default="1,8,16,23")
    p.add_argument("--tokens", default="4096,16384", help="calibration token counts")
    p.add_argument("--files", type=int, default=4, help="scored stdlib files (x 1024 tokens)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lm-head", action="store_true", help="lm_head too (slow: 151936 rows)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gptq_layers.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from qlite.loader import resolve_model_dir
    model = qlite.load(resolve_model_dir(args.model), dtype="float32")
    counts = sorted(int(t) for t in args.tokens.split(","))
    if any(c % calibrate.SEQ_LEN for c in counts):
        raise SystemExit(f"token counts must be multiples of {calibrate.SEQ_LEN}")
    t0 = time.time()
    mats = capture(model, [int(i) for i in args.layers.split(",")], counts, args.files,
                   args.lm_head)
    print(f"captured in {time.time() - t0:.0f}s", flush=True)
    del model
    g, names = args.group_size, [v for v in args.variants.split(",") if v]
    rtn = {}
    lines = ["| matrix | " + " | ".join(f"{v} ({c})" for v in names if v != "rtn" for c in counts)
             + " |", "|---|" + "---:|" * (len(counts) * (len(names) - ("rtn" in names)))]
    for k, (w, hs, x) in mats.items():
        ref = (x @ w.T).norm() ** 2

        def err(q):
            return ((x @ (w - q).T).norm() ** 2 / ref).item()
        rtn[k] = err(quantize(w, 4, g, False, "rtn").dequantize())
        cells = []
        for v in names:
            if VARIANTS[v] is None:
                continue
            for c in counts:
                e = err(gptq_quantize(w, hs[c], g, False, k, **VARIANTS[v]).dequantize())
                cells.append(f"{e / rtn[k]:.2f}")
                print(f"{k:22s} {v:22s} {c:6d} {e / rtn[k]:.3f} of rtn ({rtn[k]:.5f})", flush=True)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    text = "\n".join([f"Output error on the scored text / RTN's, g{g} asym, `{' '.join(sys.argv)}`", ""]
                     + lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
