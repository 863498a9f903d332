"""The stages of bench/gpu.sh, one Python entry each (bench/gpu.sh runs each under its own timeout):

    python bench/gpu_stages.py preflight|smoke|kernels|decode|offload [--out DIR] [--dry-run]

preflight  versions, GPU name, SM count, which optional packages import
smoke      every kernel path against kernels/reference.py with the launchers' fixed first
           configs (no tuning), outputs poisoned with NaN first: qgemv at M = 1, 3, 5, 16 and
           forced split-K, qgemm at M = 64, 256, int8 and int4 sym/asym, N = 77 (not a multiple
           of any tile), fused MoE at T = 1, 16, and quantized experts offloaded to a 6-slot
           device cache in grouped mode (T = 1, 3, 16; equal to the resident experts on CUDA),
           and int4 through torch's tinygemm after qlite's repack (CUDA only)
kernels    µs and % of the copy bandwidth (measured in the same run) on Qwen2-57B-A14B's shapes
           and lm_head, M in {1, 16, 256}: qlite int4/int8, fp16 cuBLAS, torch's tinygemm int4
           (_weight_int4pack_mm), bitsandbytes NF4 where it imports, and qlite's int4 operator
           with the backend it chose (kernels/ops.py); inputs rotated over 4 sets
decode     whole-model decode of synthetic int4 models, demo-shaped (0.5B) and 7B-shaped:
           tok/s and the weight bytes read per token against the copy bandwidth
offload    bench/bench_offload.py --quick on the 57B-A14B: all resident, then 24 GiB (prefetch on, off)

--dry-run runs each stage's code on CPU tensors at tiny shapes with the references standing in
for the kernels (CI checks the plumbing; its numbers mean nothing). Each stage appends its
lines to DIR/<stage>.txt as they come (DIR: $OUT, else /tmp/qlite-gpu).
"""
import argparse
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("preflight", "smoke", "kernels", "decode", "offload")
SHAPES_57B = [(3584, 3584), (3584, 512), (3584, 2560), (2560, 3584), (3584, 20480), (20480, 3584)]  # K -> N
LM_HEAD = (3584, 151936)


class Log:
    """print, and append to OUT/<stage>.txt at once (a timeout keeps what came before it)."""

    def __init__(self, out, stage):
        os.makedirs(out, exist_ok=True)
        self.dir = out
        self.path = os.path.join(out, f"{stage}.txt")

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _rand_weight(lead, n, k, bits, g, has_zeros, device, gen=None):
    if bits == 8:
        qw = torch.randint(-127, 128, (*lead, n, k), dtype=torch.int8, generator=gen)
        s = (torch.rand(*lead, n, generator=gen) * 0.02 + 0.002).half()
        z = None
    else:
        qw = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, generator=gen)
        s = (torch.rand(*lead, k // g, n, generator=gen) * 0.1 + 0.01).half()
        z = (torch.rand(*lead, k // g, n, generator=gen) * 15).half() if has_zeros else None
    return tuple(t if t is None else t.to(device) for t in (qw, s, z))


def _err(out, ref):
    if torch.isnan(out).any():
        return float("inf")
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


# ---- stages ------------------------------------------------------------------------------------

def preflight(log, dry):
    import triton
    log("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        log("gpu", p.name, "sms", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1),
            "cuda", torch.version.cuda)
    else:
        log("gpu none (dry run)" if dry else "gpu none")
    for mod in ("bitsandbytes", "transformers", "safetensors", "gguf"):
        try:
            m = __import__(mod)
            log("import", mod, getattr(m, "__version__", "?"))
        except Exception as exc:
            log("import", mod, "FAILED", type(exc).__name__, str(exc)[:100])
    from qlite.kernels import fused_moe, gemm, gemv  # noqa: F401  (the kernels import)
    log("import qlite.kernels ok")


def smoke(log, dry):
    from qlite.kernels import reference
    from qlite.kernels.fused_moe import fused_moe
    from qlite.kernels.gemm import qgemm
    from qlite.kernels.gemv import configs, qgemv

    device = torch.device("cpu" if dry else "cuda")
    gen = torch.Generator().manual_seed(int(time.time()))
    tol = {torch.float32: 1e-3, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # tests/test_kernels.py
    fails = 0
    formats = ((4, 128, True), (4, 128, False), (4, 32, True), (8, 0, False))
    formats = formats[:1] if dry else formats  # a dry run checks the plumbing only
    shapes = ((77, 384),) if dry else ((77, 384), (1000, 1024))
    weights = {(f, s): _rand_weight((), *s, *f, device, gen) for f in formats for s in shapes}
    # bfloat16 first, every path, then the other dtypes: a timeout cuts the least important
    for dt in (torch.bfloat16,) if dry else (torch.bfloat16, torch.float16, torch.float32):
        for (bits, g, z), (n, k) in weights:
            w = weights[(bits, g, z), (n, k)]
            fmt = f"int{bits}" + (f"-g{g}-{'asym' if z else 'sym'}" if bits == 4 else "")
            for m, kind, split in ((1, "qgemv", 0), (3, "qgemv", 0), (5, "qgemv", 0), (16, "qgemv", 0),
                                   (1, "qgemv", 3), (16, "qgemv", 2), (64, "qgemm", 0), (256, "qgemm", 0)):
                x = torch.randn(m, k, generator=gen).to(dt).to(device)
                ref = reference.quant_matmul(x.float(), *w, bits, g)
                out = torch.full((m, n), float("nan"), dtype=dt, device=device)
                cfg = dict(configs(m, n, k, bits, g or 128, 132)[0], SPLIT_K=split) if split else None
                if dry:
                    out.copy_(reference.quant_matmul(x, *w, bits, g))
                else:
                    (qgemv if kind == "qgemv" else qgemm)(x, *w, bits, g, out=out, config=cfg)
                e = _err(out, ref)
                ok = e <= tol[dt]
                fails += not ok
                log(f"{'PASS' if ok else 'FAIL'} {kind} {fmt} M={m} N={n} K={k} split={split} "
                    f"{str(dt)[6:]} err={e:.2e}")
        if dt != torch.bfloat16:
            continue
        for bits, g, z in formats:
            fmt = f"int{bits}" + (f"-g{g}-{'asym' if z else 'sym'}" if bits == 4 else "")
            e_, topk, d, inter = 16, 4, 256, 128
            w13 = _rand_weight((e_,), 2 * inter, d, bits, g, z, device, gen)
            w2 = _rand_weight((e_,), d, inter, bits, g, z, device, gen)
            for t in (1, 16):
                x = torch.randn(t, d, generator=gen).to(torch.bfloat16).to(device)
                ids = torch.stack([torch.randperm(e_, generator=gen)[:topk] for _ in range(t)]).to(device)
                wts = torch.rand(t, topk, generator=gen).softmax(-1).to(device)
                ref = reference.fused_moe(x.float(), ids, wts, w13, w2, bits, g)
                out = torch.full((t, d), float("nan"), dtype=x.dtype, device=device)
                out.copy_(ref) if dry else fused_moe(x, ids, wts, w13, w2, bits, g, out=out)
                e = _err(out, ref)
                fails += e > 3.2e-2
                log(f"{'PASS' if e <= 3.2e-2 else 'FAIL'} fused_moe {fmt} T={t} bfloat16 err={e:.2e}")
            fails += _grouped_offload(log, device, fmt, bits, g, z, gen)
            if bits == 4 and not dry:  # torch's tinygemm through qlite's repack (kernels/tinygemm.py)
                fails += _tinygemm(log, device, fmt, g, z, gen)
    log(f"smoke: {fails} failures")
    return fails == 0


def _grouped_offload(log, device, fmt, bits, g, z, gen):
    """Quantized experts served from a device cache of 6 slots in grouped mode (qlite/offload.py:
    expert ids remapped to slot ids, one fused call over the slots) against the reference, and
    on CUDA bit for bit against the resident experts (the grouped path's promise). The slots
    are poisoned first (0xFF bytes: NaN scales), every call's experts fit the slots, and each
    call draws a new set of 6 of the 16 experts, so slots are evicted and refilled. T = 16
    (64 pairs) takes the batched kernel, T = 1 and 3 the decode kernel. Returns the failures."""
    from qlite.kernels import reference
    from qlite.offload import LRFU, ExpertCache, ExpertStore, OffloadedExperts, Stats
    from qlite.quant.experts import QuantExperts

    e_, topk, d, inter, slots = 16, 4, 256, 128, 6
    experts = QuantExperts(e_, d, inter, bits, g, symmetric=not z, device=device)
    w13 = _rand_weight((e_,), 2 * inter, d, bits, g, z, device, gen)
    w2 = _rand_weight((e_,), d, inter, bits, g, z, device, gen)
    for dst, src in ((experts.gate_up_proj, w13), (experts.down_proj, w2)):
        for t, v in zip(dst.packed(), src):
            if t is not None:
                t.copy_(v)
    cuda = device.type == "cuda"
    stats = Stats()
    cache = ExpertCache(ExpertStore(experts, pin=cuda), slots, device, LRFU(), stats,
                        torch.cuda.Stream(device) if cuda else None)
    cache.buf.fill_(255)
    off = OffloadedExperts(experts, cache, grouped=True)
    fails = 0
    for t in (1, 3, 16):
        pool = torch.randperm(e_, generator=gen)[:slots]
        ids = torch.stack([pool[torch.randperm(slots, generator=gen)[:topk]] for _ in range(t)]).to(device)
        wts = torch.rand(t, topk, generator=gen).softmax(-1).to(device)
        x = torch.randn(t, d, generator=gen).to(torch.bfloat16).to(device)
        ref = reference.fused_moe(x.float(), ids, wts, w13, w2, bits, g)
        with torch.inference_mode():
            out = off(x, ids, wts)
            exact = torch.equal(out, experts(x, ids, wts)) if cuda else None
        e = _err(out, ref)
        ok = e <= 3.2e-2 and exact is not False
        fails += not ok
        log(f"{'PASS' if ok else 'FAIL'} grouped-offload {fmt} T={t} slots={slots} bfloat16 err={e:.2e}"
            + ("" if exact is None else f" equal-to-resident={exact}") + f" misses={stats.misses}")
    return fails


def _tinygemm(log, device, fmt, g, z, gen):
    """The tinygemm backend forced (kernels/ops.py: repack on first use), against the reference;
    its bfloat16 scales and offsets keep it within the bfloat16 bound. Returns the failures."""
    from qlite.kernels import ops, reference
    from qlite.kernels.gemv import qgemv

    n, k = 1000, 1024
    w = _rand_weight((), n, k, 4, g, z, device, gen)
    fails = 0
    for m in (1, 16, 64):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
        try:
            out = ops.backend_matmul("tinygemm", x, *w, g, qgemv)
            e = _err(out, reference.quant_matmul(x.float(), *w, 4, g))
        except Exception as exc:
            e, msg = float("inf"), f" {type(exc).__name__}: {str(exc)[:100]}"
        else:
            msg = ""
        fails += not e <= 1.6e-2
        log(f"{'PASS' if e <= 1.6e-2 else 'FAIL'} tinygemm {fmt} M={m} N={n} K={k} bfloat16 err={e:.2e}{msg}")
    return fails


def _timer(dry):
    if dry:
        def bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        return bench
    import triton

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    return bench


def kernels(log, dry):
    from qlite.kernels import ops, reference, tinygemm
    from qlite.kernels.gemm import qgemm
    from qlite.kernels.gemv import qgemv

    device = torch.device("cpu" if dry else "cuda")
    bench = _timer(dry)
    shapes = [(256, 96), (128, 64)] if dry else SHAPES_57B + [LM_HEAD]
    ms = (1, 16) if dry else (1, 16, 256)
    if dry:
        bw = 1.0
    else:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e3  # GB/s, read + write
    log(f"copy bandwidth {bw:.0f} GB/s; columns: kernel K N M µs %copy-bandwidth")
    try:
        import bitsandbytes as bnb
    except Exception:
        bnb = None
    for k, n in shapes:
        w16 = (torch.randn(n, k, device=device) / math.sqrt(k)).half()
        qs = {b: _rand_weight((), n, k, b, 128 if b == 4 else 0, True, device) for b in (4, 8)}
        tiny = nf4 = None
        if not dry:
            try:  # torch's tinygemm on qlite's repack of the same weight (kernels/tinygemm.py)
                tiny = tinygemm.pack(*qs[4])
                x1 = torch.randn(1, k, device=device, dtype=torch.bfloat16)
                e = _err(tinygemm.matmul(x1, tiny, 128), reference.quant_matmul(x1.float(), *qs[4], 4, 128))
                log(f"tinygemm {k}x{n} matches the reference: err={e:.2e} (its bf16 scales round once more)")
            except Exception as exc:
                log(f"tinygemm unavailable: {type(exc).__name__}: {str(exc)[:120]}")
            if bnb is not None:
                try:
                    nf4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float16, quant_type="nf4")
                    nf4.weight = bnb.nn.Params4bit(w16.cpu(), requires_grad=False, quant_type="nf4")
                    nf4 = nf4.to(device)
                except Exception as exc:
                    log(f"bitsandbytes NF4 unavailable: {type(exc).__name__}: {str(exc)[:120]}")
                    nf4 = None
        for m in ms:
            xs = [torch.randn(m, k, device=device).to(torch.float16 if dry else torch.bfloat16) for _ in range(4)]
            xh = [x.half() for x in xs]
            it = iter(range(1 << 30))

            def rot(fn, inputs):  # a fresh input each call: 4 sets rotate
                return lambda: fn(inputs[next(it) % 4])

            rows = {}
            for b in (4, 8):
                qw, s, z = qs[b]
                zz = z if b == 4 else None
                g = 128 if b == 4 else 0
                nbytes = sum(t.numel() * t.element_size() for t in (qw, s, zz) if t is not None) + 4 * m * (k + n)
                if dry:
                    fn = rot(lambda x: reference.quant_matmul(x, qw, s, zz, b, g), xs)
                else:
                    fn = rot(lambda x: (qgemv if m <= 16 else qgemm)(x, qw, s, zz, b, g), xs)
                rows[f"qlite-int{b}"] = (bench(fn), nbytes)
            rows["fp16-cublas"] = (bench(rot(lambda x: x @ w16.T, xh)), 2 * n * k + 4 * m * (k + n))
            if tiny is not None:
                rows["tinygemm-int4"] = (bench(rot(lambda x: tinygemm.matmul(x, tiny, 128), xs)),
                                         n * k // 2 + tiny[1].numel() * 2)
                # the operator a model calls: the backend it chose for this shape (QLITE_TUNE=1)
                op = rot(lambda x: torch.ops.qlite.quant_matmul(x, *qs[4], 4, 128, None), xs)
                op()
                use = ops._backend.get((ops._rows(m), n, k, 128, False, torch.bfloat16, xs[0].device)) or "?"
                rows[f"qlite-op-int4({use})"] = (bench(op), rows["qlite-int4"][1])
            if nf4 is not None:
                rows["bnb-nf4"] = (bench(rot(nf4, xh)), n * k // 2 + n * k // 64 * 4)
            for name, (us, nbytes) in rows.items():
                log(f"{name} {k} {n} {m} {us:.1f} {100 * nbytes / us / 1e3 / bw:.0f}%")
    return True


DENSE = {  # Qwen2-0.5B (the demo's shape) and Qwen2-7B
    "demo-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}
TINY_DENSE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


def decode(log, dry):
    from bench_offload import _random, qcfg, sync

    from qlite.config import config_from_dict
    from qlite.loader import set_tensor
    from qlite.model import Qwen2
    from qlite.quant.swap import QuantConfig, swap_to_quantized

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    models = {"tiny": TINY_DENSE} if dry else DENSE
    bw = None
    if not dry:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bench = _timer(False)
        bw = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e3
        del src, dst
    for name, shape in models.items():
        raw = dict(shape, architectures=["Qwen2ForCausalLM"], max_position_embeddings=4096,
                   tie_word_embeddings=False)
        q = qcfg(4, 32 if dry else 128)
        cfg = config_from_dict(dict(raw, quantization=q), name)
        with torch.device("meta"):
            model = Qwen2(cfg)
        swap_to_quantized(model, QuantConfig.from_dict(cfg.quantization), dtype)
        weight_bytes = 0
        for key, t in model.state_dict(keep_vars=True).items():
            v = _random(key, t, device, dtype, q["group_size"])
            set_tensor(model, key, v)
            if "embed" not in key:
                weight_bytes += v.numel() * v.element_size()
        model.eval()
        steps = 4 if dry else 64
        model.setup_cache(1, 16 + steps + 1)
        with torch.inference_mode():
            for warm in (True, False):  # the first pass compiles (and with QLITE_TUNE=1 tunes)
                ids = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
                tok = model(ids, start=0)[0, -1].argmax().view(1, 1)
                sync(device)
                t = time.perf_counter()
                for pos in range(16, 16 + (2 if warm else steps)):
                    tok = model(tok, start=pos)[0, -1].argmax().view(1, 1)
                sync(device)
        tok_s = steps / (time.perf_counter() - t)
        pct = f"{100 * weight_bytes * tok_s / 1e9 / bw:.0f}% of copy bandwidth" if bw else "(dry run)"
        log(f"decode {name} int4 eager: {tok_s:.1f} tok/s, {weight_bytes / 1e9:.2f} GB weights a token, {pct}")
        from qlite.kernels import ops
        picks = list(ops._backend._mem.values())
        log(f"int4 backend so far: tinygemm for {picks.count('tinygemm')} of {len(picks)} shapes (kernels/ops.py)")
        del model
    return True


def offload(log, dry):
    import bench_offload
    args = ["--quick"] + (["--dry-run", "--prefill", "4", "--decode", "2"] if dry else
                          ["--models", "qwen2-57b-a14b", "--prefill", "64", "--decode", "16"])
    out = os.path.join(log.dir, "offload.md")
    bench_offload.main(args + ["--out", out])
    log(f"offload table written to {out}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny shapes, references as kernels")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/qlite-gpu"))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"gpu_stages {args.stage}: needs a CUDA GPU (or --dry-run)")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    ok = globals()[args.stage](Log(args.out, args.stage), args.dry_run)
    sys.exit(0 if ok in (None, True) else 1)


if __name__ == "__main__":
    main()
