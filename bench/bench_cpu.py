"""Demo-model speed on this CPU: prefill and decode tokens/s, same prompt, same run.

- qlite float32 and bfloat16 vs transformers at the same dtype (ratio printed);
- qlite int8 and int4 (g128; the quantizer does not change speed, RTN is used to save time),
  with float32 and bfloat16 activations, through the C CPU kernel (kernels/cpu_gemv.c) and,
  as "-torchops", through torch's packed ops instead;
- the kernels alone (`--only kernels`): one linear layer of each demo shape at M = 1, C kernel vs
  torch's ops vs a bf16 matmul, in µs and GB/s of weights read against the read bandwidth
  measured in the same run;
- llama.cpp (llama-cpp-python, a bench-only dependency) on the demo GGUF (Q4_K_M), same threads.

Prefill: one forward over the prompt (--prompt tokens of a stdlib file) into an empty cache.
Decode: --decode greedy steps of one token each after that prefill (tokens/s over those steps).
Each figure is the best of --repeat runs. Results go to bench/results/cpu.md.

    python bench/bench_cpu.py [--prompt 256 --decode 32 --repeat 2 --only qlite-fp32,llama.cpp]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlite  # noqa: E402

RUNNERS = ["qlite-fp32", "hf-fp32", "qlite-bf16", "hf-bf16", "qlite-int8-fp32", "qlite-int8-bf16",
           "qlite-int4-fp32", "qlite-int4-bf16", "qlite-int4-bf16-torchops", "llama.cpp",
           "qlite-bf16-compiled", "qlite-int8-bf16-compiled", "qlite-int4-bf16-compiled"]
# "-torchops": the same model with the C kernel switched off (torch's packed int4/int8 ops),
# as on a machine without a C compiler. "-compiled": decode_step under torch.compile
# (Qwen2.compile_decode); its compile time is measured cold (an empty compile cache) and warm
# (the cache on disk filled, torch's in-process state reset) and printed beside it.


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    return tokenizer.encode(text)[:n]


@torch.no_grad()
def run_qlite(model, ids, decode):
    """Prefill with prefill_row, then greedy decode_step calls, as qlite.generate runs them."""
    model.setup_cache(1, len(ids) + decode + 1)
    x = torch.tensor(ids)
    t0 = time.perf_counter()
    logits = model.prefill_row(0, x)
    t1 = time.perf_counter()
    tok = logits.argmax().view(1)
    pos = torch.tensor([len(ids)])
    out = [int(tok)]
    t2 = time.perf_counter()
    for _ in range(decode):
        tok = model.decode_step(tok, pos).argmax(dim=-1)
        pos += 1
        out.append(int(tok))
    t3 = time.perf_counter()
    return len(ids) / (t1 - t0), decode / (t3 - t2), out


@torch.no_grad()
def compile_seconds(model, ids, decode) -> tuple[float, float]:
    """(cold, warm) seconds that the first compiled decode step takes beyond a plain one:
    cold with an empty compile cache (a fresh TORCHINDUCTOR_CACHE_DIR), warm after
    torch._dynamo.reset() with that cache on disk (as a second process finds it)."""
    import tempfile
    import torch._dynamo
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlite-bench-compile-")
    out = []
    for _ in range(2):
        torch._dynamo.reset()
        model.compile_decode()
        model.setup_cache(1, len(ids) + decode + 1)
        tok = model.prefill_row(0, torch.tensor(ids)).argmax().view(1)
        pos = torch.tensor([len(ids)])
        times = []
        for _ in range(3):
            t = time.perf_counter()
            tok = model.decode_step(tok, pos).argmax(dim=-1)
            int(tok)
            times.append(time.perf_counter() - t)
            pos += 1
        out.append(times[0] - min(times[1:]))
    return out[0], out[1]


@torch.no_grad()
def without_c_kernel(fn, *args):
    from qlite.kernels import cpu_gemv
    saved = cpu_gemv.available
    cpu_gemv.available = lambda: False
    try:
        return fn(*args)
    finally:
        cpu_gemv.available = saved


def read_bandwidth(gib: float = 1.0) -> float:
    """GB/s of one pass summing a tensor far larger than the caches (all threads)."""
    a = torch.ones(int(gib * 2**30) // 8, dtype=torch.int64)
    a.sum()
    t = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.numel() * 8 / (time.perf_counter() - t) / 1e9


# (name, K, N) of the demo model's linears; lm_head is the only one larger than the caches.
KERNEL_SHAPES = [("q/o_proj", 896, 896), ("k/v_proj", 896, 128), ("gate/up_proj", 896, 4864),
                 ("down_proj", 4864, 896), ("lm_head", 896, 151936)]


@torch.no_grad()
def kernel_table() -> list[str]:
    from qlite.kernels import cpu_gemv
    from qlite.quant import QuantLinear
    bw = read_bandwidth()
    lines = [f"Kernels alone, M = 1, bfloat16 activations; read bandwidth measured here: "
             f"{bw:.1f} GB/s. µs (GB/s of weights read). Layers smaller than the caches can "
             f"beat the memory bandwidth; lm_head cannot.", "",
             "| layer (K -> N) | C int4 g128 | torch int4 | C int8 | torch int8 | bf16 matmul |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, k, n in KERNEL_SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        cells = []
        for bits in (4, 8):
            q = QuantLinear.from_linear(lin, bits, 128, "rtn")
            nbytes = q.qweight.numel() + q.scales.numel() * 2 + (0 if q.zeros is None else q.zeros.numel() * 2)
            for c_kernel in (True, False):
                f = (lambda: q(x)) if c_kernel else (lambda: without_c_kernel(q, x))
                sec = _time(f)
                cells.append(f"{sec * 1e6:.0f} ({nbytes / sec / 1e9:.1f})")
        w = lin.weight.to(torch.bfloat16)
        sec = _time(lambda: torch.nn.functional.linear(x, w))
        cells.append(f"{sec * 1e6:.0f} ({w.numel() * 2 / sec / 1e9:.1f})")
        lines.append(f"| {name} ({k} -> {n}) | " + " | ".join(cells) + " |")
    if not cpu_gemv.available():
        lines.append(f"\nThe C kernel was unavailable ({cpu_gemv.why_unavailable()}): both "
                     f"columns are torch's ops.")
    return lines


def _time(f, seconds: float = 0.3) -> float:
    """Best-of-5 mean seconds per call, each of the 5 runs about `seconds` long."""
    f()
    t = time.perf_counter()
    f()
    n = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def run_hf(model, ids, decode):
    from transformers import DynamicCache
    x = torch.tensor([ids])
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(x, past_key_values=cache, use_cache=True)
    t1 = time.perf_counter()
    tok = out.logits[0, -1].argmax()
    toks = [int(tok)]
    t2 = time.perf_counter()
    for _ in range(decode):
        out = model(tok.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[0, -1].argmax()
        toks.append(int(tok))
    t3 = time.perf_counter()
    return len(ids) / (t1 - t0), decode / (t3 - t2), toks


def run_llama(llm, ids, decode):
    import numpy as np
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    toks = [tok]
    t2 = time.perf_counter()
    for _ in range(decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(tok)
    t3 = time.perf_counter()
    return len(ids) / (t1 - t0), decode / (t3 - t2), toks


def make(name, model_dir, gguf, threads, ctx):
    """(callable(ids, decode) -> (prefill tok/s, decode tok/s, tokens), model); ctx is
    (prompt ids, decode steps)."""
    if name.startswith("qlite"):
        dtype = "bfloat16" if "bf16" in name else "float32"
        model = qlite.load(model_dir, dtype=dtype)
        if "-int" in name:
            from qlite.quant.swap import quantize_model
            bits = 8 if "int8" in name else 4
            quantize_model(model, bits=bits, group_size=128 if bits == 4 else None, method="rtn")
        if name.endswith("-torchops"):
            return (lambda ids, d: without_c_kernel(run_qlite, model, ids, d)), model
        if name.endswith("-compiled"):
            model.compile_seconds = compile_seconds(model, *ctx)
        return (lambda ids, d: run_qlite(model, ids, d)), model
    if name.startswith("hf"):
        from transformers import AutoModelForCausalLM
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        return (lambda ids, d: run_hf(model, ids, d)), model
    if name == "llama.cpp":
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise RuntimeError(f"llama-cpp-python is not installed ({e}); "
                               f"pip install llama-cpp-python (builds from source)") from None
        llm = Llama(model_path=str(gguf), n_ctx=len(ctx[0]) + ctx[1] + 8, n_threads=threads,
                    n_threads_batch=threads,
                    n_batch=512, logits_all=True, verbose=False)
        return (lambda ids, d: run_llama(llm, ids, d)), llm
    raise ValueError(name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", default=",".join(RUNNERS),
                   help="comma-separated runners, and/or kernels (all of them by default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qlite.loader import resolve_model_dir
    from qlite.pull import demo_gguf_path, pull_demo_gguf
    from qlite.tokenizer import Tokenizer
    model_dir = resolve_model_dir("demo")
    gguf = demo_gguf_path() if demo_gguf_path().is_file() else pull_demo_gguf()
    ids = prompt_ids(Tokenizer.from_dir(model_dir), args.prompt)

    results, compiles = {}, {}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if "kernels" in names or args.only == ",".join(RUNNERS):
        names = [n for n in names if n != "kernels"]
        results["kernels"] = kernel_table()
        print("\n".join(results["kernels"]), flush=True)
    for name in names:
        try:
            run, model = make(name, model_dir, gguf, args.threads, (ids, args.decode))
            best = None
            for _ in range(args.repeat):
                pre, dec, toks = run(ids, args.decode)
                best = (pre, dec, toks) if best is None else (max(best[0], pre),
                                                             max(best[1], dec), toks)
            results[name] = best
            if hasattr(model, "compile_seconds"):
                compiles[name] = model.compile_seconds
                print(f"{name:18s} compile: cold {model.compile_seconds[0]:.1f} s, warm "
                      f"{model.compile_seconds[1]:.1f} s", flush=True)
            del run, model
            print(f"{name:18s} prefill {best[0]:8.1f} tok/s   decode {best[1]:6.2f} tok/s",
                  flush=True)
        except Exception as e:
            results[name] = str(e)
            print(f"{name:18s} not run: {e}", flush=True)
        write_table(args, results, compiles)
    print(write_table(args, results, compiles))


def write_table(args, results, compiles) -> str:
    def ratio(a, b, i):
        ra, rb = results.get(a), results.get(b)
        if isinstance(ra, tuple) and isinstance(rb, tuple):
            return f"{ra[i] / rb[i]:.2f}x"
        return "–"

    lines = ["# CPU speed, demo model (Qwen2.5-Coder-0.5B-Instruct)", "",
             f"{datetime.date.today()} · {_cpu_name()} ({os.cpu_count()} cores, "
             f"{args.threads} threads), torch {torch.__version__} · prompt {args.prompt} tokens, "
             f"{args.decode} greedy decode steps, best of {args.repeat} · "
             f"`python bench/bench_cpu.py`", "",
             "| runner | prefill tok/s | decode tok/s | same first tokens as qlite-fp32 |",
             "|---|---:|---:|---|"]
    ref = results.get("qlite-fp32")
    for name, r in results.items():
        if name == "kernels":
            continue
        if not isinstance(r, tuple):
            lines.append(f"| {name} | – | – | not run: {r} |")
            continue
        same = "–" if not isinstance(ref, tuple) else \
            f"{sum(a == b for a, b in zip(r[2], ref[2]))}/{len(ref[2])}"
        lines.append(f"| {name} | {r[0]:.1f} | {r[1]:.2f} | {same} |")
    lines += ["", "Ratios (same run):", ""]
    for a, b in (("qlite-fp32", "hf-fp32"), ("qlite-bf16", "hf-bf16"),
                 ("qlite-int8-fp32", "llama.cpp"), ("qlite-int4-fp32", "llama.cpp"),
                 ("qlite-int8-bf16", "llama.cpp"), ("qlite-int4-bf16", "llama.cpp"),
                 ("qlite-int4-bf16", "qlite-int4-bf16-torchops"), ("qlite-int4-fp32", "qlite-fp32"),
                 ("qlite-bf16-compiled", "qlite-bf16"), ("qlite-int8-bf16-compiled", "qlite-int8-bf16"),
                 ("qlite-int4-bf16-compiled", "qlite-int4-bf16"),
                 ("qlite-int8-bf16-compiled", "llama.cpp"), ("qlite-int4-bf16-compiled", "llama.cpp")):
        if a in results and b in results:
            lines.append(f"- {a} / {b}: prefill {ratio(a, b, 0)}, decode {ratio(a, b, 1)}")
    if compiles:
        lines += ["", "Compile time of the decode step (first step beyond a plain one): " +
                  ", ".join(f"{n} cold {c:.1f} s / warm {w:.1f} s" for n, (c, w) in compiles.items())]
    if "kernels" in results:
        lines += [""] + results["kernels"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU's name and whether it has bf16 units: this project's machines differ between
    sessions (2-core AMD EPYCs with AVX2 only, or with AVX-512 BF16), and 16-bit figures with
    them."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from qlite.model import CPU_HALF_IS_SLOW
    return f"{name}, {'no bf16 units' if CPU_HALF_IS_SLOW else 'AVX-512 BF16'}"


if __name__ == "__main__":
    main()
