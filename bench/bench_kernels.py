"""Kernel table on a CUDA GPU: qlite int4/int8 vs torch fp16 (cuBLAS) vs torch's tinygemm int4 vs
bitsandbytes NF4/int8.

    python bench/bench_kernels.py            # the whole table -> bench/results/kernels_<gpu>_<date>.md
    python bench/bench_kernels.py --quick    # two shapes, M in {1, 16}: a smoke run

Shapes are Qwen2-57B-A14B's (K -> N). Times are medians of triton.testing.do_bench (after a
warm-up call that also autotunes). Effective GB/s counts the bytes a kernel must move (weights,
scales/zeros, activations in and out) and is set against a device-to-device copy measured in
the same run (read + write bytes / time), the practical ceiling of a memory-bound kernel.
The fused MoE rows time one decode step of a layer: top-8 of 64 experts, 3584 -> 2560 -> 3584.
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(3584, 3584), (3584, 512), (3584, 2560), (2560, 3584), (3584, 20480), (20480, 3584), (3584, 151936)]
MS = [1, 4, 16, 64, 256, 1024]


def bench(fn):
    import triton
    fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def copy_bandwidth():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3  # GB/s


def packed_random(n, k, bits, group_size=128):
    """A QuantLinear with random codes: speed does not depend on the values."""
    from qlite.quant import QuantLinear
    q = QuantLinear(k, n, bias=False, bits=bits, group_size=group_size, device="cuda")
    if bits == 8:
        q.qweight.copy_(torch.randint(-127, 128, q.qweight.shape, dtype=torch.int8, device="cuda"))
    else:
        q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, dtype=torch.uint8, device="cuda"))
        q.zeros.copy_(torch.rand_like(q.zeros, dtype=torch.float32) * 15)
    q.scales.copy_(torch.rand_like(q.scales, dtype=torch.float32) * 0.01)
    return q


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def bnb_linears(bnb, w16):
    """NF4 (blocks of 64) and LLM.int8 (no outlier threshold) linears on the same weights."""
    n, k = w16.shape
    nf4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float16, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(w16.cpu(), requires_grad=False, quant_type="nf4")
    nf4 = nf4.cuda()
    i8 = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
    i8.weight = bnb.nn.Int8Params(w16.cpu(), requires_grad=False, has_fp16_weights=False)
    i8 = i8.cuda()
    return {"bnb nf4": (nf4, nbytes(nf4.weight) + nbytes(nf4.weight.quant_state.absmax)),
            "bnb int8": (i8, nbytes(i8.weight) + n * 4)}


def linear_rows(shapes, ms, bw):
    from qlite.kernels import tinygemm
    rows = []
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed, or no CUDA build
        bnb = None
    for k, n in shapes:
        w16 = torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
        impls = {"fp16": (lambda x, w=w16: x @ w.T, nbytes(w16))}
        for bits in (4, 8):
            q = packed_random(n, k, bits)
            impls[f"qlite int{bits}"] = (q, nbytes(q.qweight, q.scales, q.zeros))
            if bits == 4:  # torch's tinygemm on the same weight (kernels/tinygemm.py), bf16 activations
                pack = tinygemm.pack(q.qweight, q.scales, q.zeros)
                impls["tinygemm int4"] = (lambda x, p=pack: tinygemm.matmul(x, p, 128), nbytes(*pack))
        if bnb is not None:
            try:
                impls.update(bnb_linears(bnb, w16))
            except Exception as exc:
                print(f"bitsandbytes {k}->{n}: {type(exc).__name__}: {exc}", file=sys.stderr)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            fp16_us = None
            xb = x.bfloat16()
            for name, (fn, wbytes) in impls.items():
                xin = xb if name.startswith("tinygemm") else x
                try:
                    us = bench(lambda: fn(xin))
                except Exception as exc:  # report, keep going
                    print(f"{name} {k}->{n} M={m}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                fp16_us = us if name == "fp16" else fp16_us
                gbs = (wbytes + nbytes(x) + m * n * 2) / us / 1e3
                rows.append(dict(kernel=name, shape=f"{k}->{n}", M=m, us=round(us, 2), GBs=round(gbs, 1),
                                 pct_copy=round(100 * gbs / bw, 1),
                                 vs_fp16=round(fp16_us / us, 2) if fp16_us else None))
                print(rows[-1], flush=True)
        del impls
        torch.cuda.empty_cache()
    return rows


def moe_rows(bw, E=64, topk=8, D=3584, inter=2560):
    from qlite.kernels.fused_moe import fused_moe
    rows = []
    for bits in (4, 8):
        g13, d2 = packed_random(2 * inter, D, bits), packed_random(D, inter, bits)  # one expert
        # E experts stacked: the same random expert repeated (speed does not depend on values)
        w13 = tuple(None if t is None else t.unsqueeze(0).expand(E, *t.shape).contiguous()
                    for t in (g13.qweight, g13.scales, g13.zeros))
        w2 = tuple(None if t is None else t.unsqueeze(0).expand(E, *t.shape).contiguous()
                   for t in (d2.qweight, d2.scales, d2.zeros))
        per_expert = nbytes(*w13) // E + nbytes(*w2) // E
        for m in (1, 16):
            x = torch.randn(m, D, dtype=torch.float16, device="cuda")
            ids = torch.stack([torch.randperm(E, device="cuda")[:topk] for _ in range(m)])
            wts = torch.rand(m, topk, device="cuda").softmax(-1)
            active = ids.unique().numel()
            us = bench(lambda: fused_moe(x, ids, wts, w13, w2, bits, 128))
            gbs = (active * per_expert) / us / 1e3
            rows.append(dict(kernel=f"qlite fused MoE int{bits}", shape=f"E{E} top{topk} {D}->{inter}->{D}",
                             M=m, us=round(us, 2), GBs=round(gbs, 1), pct_copy=round(100 * gbs / bw, 1),
                             vs_fp16=None, active_experts=active))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="the whole table (the default)")
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU (none found); nothing written")
    shapes, ms = (SHAPES[:2], [1, 16]) if args.quick else (SHAPES, MS)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{gpu}: device-to-device copy {bw:.0f} GB/s")
    rows = linear_rows(shapes, ms, bw) + moe_rows(bw)
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernels_{gpu.replace(' ', '_')}_{date}")
    meta = dict(gpu=gpu, date=date, torch=torch.__version__, copy_GBs=round(bw, 1))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Kernel timings: {gpu}, {date}, torch {torch.__version__}\n\n"
                f"Device-to-device copy: {bw:.0f} GB/s. Activations fp16. int4 = group 128 asymmetric.\n"
                f"GB/s = bytes moved / time; % copy = that against the copy; x fp16 = fp16 time / time.\n\n"
                "| kernel | K->N | M | µs | GB/s | % copy | x fp16 |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['kernel']} | {r['shape']} | {r['M']} | {r['us']} | {r['GBs']} | {r['pct_copy']} | "
                    f"{r['vs_fp16'] if r['vs_fp16'] is not None else ''} |\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
