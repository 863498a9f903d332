"""Expert offloading benchmark: synthetic int4 Qwen2-57B-A14B (24/16/12 GiB) and
Qwen1.5-MoE-A2.7B (4 GiB) on one GPU.

    python bench/bench_offload.py              # GPU: the full table -> bench/results/
    python bench/bench_offload.py --dry-run    # CPU: a tiny model through the same code
    python bench/bench_offload.py --simulate   # CPU: eviction policies on routing traces

The model is built on the meta device and every tensor is then filled with random values
directly in its final format (packed int4 experts, shared experts and attention; 16-bit norms,
routers and embedding), so no 114 GB 16-bit model ever exists. Routed experts are made in host
memory, the rest on the GPU, and the planner sizes the expert cache for each budget.

Per budget and routing it reports decode tok/s, prefill tok/s at 512 tokens, hit rate,
prefetch accuracy, copy bandwidth (measured with a plain pinned copy, and achieved by the
cache), and the floor: bytes copied per decoded token / measured bandwidth + the decode time of
the same model with every expert resident. Routing: "model" (random weights route almost
uniformly; speculative prefetch on and off), and replayed traces, "uniform" and "zipf" (per
layer a Zipf(s) expert popularity), with LRU and LRFU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlite.config import config_from_dict  # noqa: E402
from qlite.loader import set_tensor  # noqa: E402
from qlite.model import MoE, Qwen2  # noqa: E402
from qlite.offload import LRFU, LRU, ExpertCache, ExpertStore, Stats, offload_experts  # noqa: E402
from qlite.plan import fmt_bytes, make_plan  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {"qwen2-57b-a14b": ["24GiB", "16GiB", "12GiB"], "qwen1.5-moe-a2.7b": ["4GiB"]}
TINY = dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=1024, hidden_size=256,
            intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, num_experts=16,
            num_experts_per_tok=4, moe_intermediate_size=128,
            shared_expert_intermediate_size=256, tie_word_embeddings=False)


def qcfg(bits=4, group=128):
    from qlite.quant.swap import FORMAT_VERSION
    return {"format": "qlite", "version": FORMAT_VERSION, "bits": bits, "group_size": group,
            "method": "rtn", "symmetric": False, "keep_16bit": ["embed"]}


# --- a synthetic quantized model -------------------------------------------------------------

def _random(name: str, like: torch.Tensor, device, dtype, group: int) -> torch.Tensor:
    """Random values in the tensor's final format, scaled so activations stay O(1)."""
    shape = like.shape
    if like.dtype == torch.uint8:  # packed int4 codes
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    if like.dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    if name.endswith("zeros"):
        return torch.full(shape, 8.0, dtype=like.dtype, device=device)
    if name.endswith("scales"):  # int4 scales are [.., K // G, N]: codes - 8 have std ~4.6
        k = shape[-2] * group
        return torch.full(shape, 1 / (4.6 * math.sqrt(k)), dtype=like.dtype, device=device)
    if "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device) / math.sqrt(shape[-1])


def synthetic_model(raw: dict, plan, dtype, group: int) -> Qwen2:
    from qlite.quant.swap import QuantConfig, swap_to_quantized
    cfg = config_from_dict(dict(raw, quantization=qcfg(4, group)), "synthetic")
    with torch.device("meta"):
        model = Qwen2(cfg)
    swap_to_quantized(model, QuantConfig.from_dict(cfg.quantization), dtype)
    for key, t in model.state_dict(keep_vars=True).items():
        set_tensor(model, key, _random(key, t, plan.place(key), dtype, group))
    model.eval()
    return model


# --- measurements ----------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def h2d_bandwidth(device, nbytes=1 << 30, reps=5) -> float:
    """Bytes/s of a pinned host -> device copy (the ceiling the cache can reach)."""
    if device.type != "cuda":
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        src.fill_(1)
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        return nbytes * reps / (time.perf_counter() - t0)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    bw = nbytes * reps / (start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


class TraceRouter:
    """Replaces one MoE layer's route(): top-k experts drawn from a fixed per-layer popularity
    (uniform, or Zipf over a random ranking), weights 1/k. The prefetcher still guesses with
    the real router, so traces run without prefetch."""

    def __init__(self, num_experts, k, zipf_s, seed, device):
        g = torch.Generator().manual_seed(seed)
        rank = torch.randperm(num_experts, generator=g)
        p = (1.0 / (rank + 1.0) ** zipf_s) if zipf_s else torch.ones(num_experts)
        self.p, self.k, self.g = (p / p.sum()), k, g
        self.device = device

    def __call__(self, x):
        ids = torch.multinomial(self.p.expand(x.shape[0], -1), self.k, generator=self.g)
        w = torch.full(ids.shape, 1.0 / self.k, dtype=x.dtype)
        return ids.to(x.device), w.to(x.device)


def set_routing(model, routing: str, zipf_s: float, seed=0):
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            layer.mlp.__dict__.pop("route", None)  # back to the model's own router
            if routing != "model":
                layer.mlp.route = TraceRouter(layer.mlp.experts.num_experts, layer.mlp.top_k,
                                              zipf_s if routing == "zipf" else 0.0, seed + i,
                                              model.model.norm.weight.device)


@torch.inference_mode()
def run_tokens(model, prefill: int, decode: int, device, seed=0):
    """(prefill seconds, decode seconds, offload stats of the decode steps only)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)
    model.setup_cache(1, prefill + decode + 1)
    sync(device)
    t0 = time.perf_counter()
    logits = model(ids, start=0)
    tok = logits[0, -1].argmax().view(1, 1)
    sync(device)
    t1 = time.perf_counter()
    model.reset_offload_stats()
    for pos in range(prefill, prefill + decode):
        tok = model(tok, start=pos)[0, -1].argmax().view(1, 1)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, model.offload_stats()


def bench_model(name, raw, budgets, device, dtype, args, bw, rows):
    cfg = config_from_dict(dict(raw, quantization=qcfg(4, args.group_size)), name)
    context = min(args.context, cfg.max_position_embeddings)
    E = cfg.num_experts
    # Built once with every expert resident-capable store; re-planned per budget.
    full = make_plan(cfg, None, E, context, device, dtype)
    model = synthetic_model(raw, full, dtype, args.group_size)
    print(f"{name}: built", file=sys.stderr)

    def measure(plan, routing, policy, prefetch, label):
        offload_experts(model, plan, prefetch=prefetch, policy=policy)
        set_routing(model, routing, args.zipf)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run_tokens(model, 8, 4, device)  # warm-up: kernels autotune, caches fill
        pre_s, dec_s, st = run_tokens(model, args.prefill, args.decode, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        return dict(model=name, budget=label, slots=model.offload.caches[0].slots,
                    routing=routing, policy=policy, prefetch=prefetch,
                    decode_tok_s=args.decode / dec_s, prefill_tok_s=args.prefill / pre_s,
                    hit_rate=st["hit_rate"], prefetch_accuracy=st["prefetch_accuracy"],
                    prefetch_used=(st["prefetch_hits"] / st["prefetch_issued"]
                                   if st["prefetch_issued"] else 0.0),
                    bytes_per_token=st["bytes_copied"] / args.decode,
                    achieved_gb_s=st["bytes_copied"] / dec_s / 1e9,
                    stall_s_per_token=st["stall_seconds"] / args.decode, peak=peak)

    routings = [("model", "lrfu", True), ("model", "lrfu", False), ("uniform", "lru", False),
                ("uniform", "lrfu", False), ("zipf", "lru", False), ("zipf", "lrfu", False)]
    if args.quick:  # the model's own routing, prefetch on and off, at the first budget
        routings, budgets = routings[:2], budgets[:1]
    resident = {}
    for routing in ("model",) if args.quick else ("model", "uniform", "zipf"):
        r = measure(full, routing, "lrfu", False, "all resident")
        resident[routing] = 1 / r["decode_tok_s"]
        rows.append(r)
    for budget in budgets:
        plan = make_plan(cfg, budget, None, context, device, dtype)
        for routing, policy, prefetch in routings:
            r = measure(plan, routing, policy, prefetch,
                        budget if isinstance(budget, str) else fmt_bytes(budget))
            floor_s = r["bytes_per_token"] / bw + resident[routing]
            r["floor_tok_s"] = 1 / floor_s
            r["vs_floor"] = r["floor_tok_s"] / r["decode_tok_s"]
            r["budget_ok"] = device.type != "cuda" or r["peak"] <= plan.budget
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    model = None  # frees it (measure, which holds it, is done)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows, bw, device_name) -> str:
    head = ("| model | budget | slots | routing | policy | prefetch | decode tok/s | floor tok/s "
            "| x floor | prefill tok/s (512) | hit rate | guess acc | prefetch used | MB/token "
            "| achieved GB/s | stall ms/token | peak GiB |")
    out = [f"# Expert offloading, {device_name}, {datetime.date.today()}", "",
           f"Measured pinned host-to-device copy: {bw / 1e9:.1f} GB/s. Floor = bytes copied per "
           f"token / that bandwidth + the all-resident decode time of the same routing.", "",
           head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['budget']} | {r['slots']} | {r['routing']} | {r['policy']} | "
            f"{'on' if r['prefetch'] else 'off'} | {r['decode_tok_s']:.2f} | "
            f"{r.get('floor_tok_s', float('nan')):.2f} | {r.get('vs_floor', float('nan')):.2f} | "
            f"{r['prefill_tok_s']:.1f} | {100 * r['hit_rate']:.1f}% | "
            f"{100 * r['prefetch_accuracy']:.1f}% | {100 * r['prefetch_used']:.1f}% | "
            f"{r['bytes_per_token'] / 1e6:.1f} | {r['achieved_gb_s']:.2f} | "
            f"{1e3 * r['stall_s_per_token']:.2f} | {r['peak'] / 2 ** 30:.2f} |")
    return "\n".join(out) + "\n"


# --- eviction policies on traces (CPU, no weights) -------------------------------------------

def trace(num_experts, k, tokens, zipf_s, shift_every, seed):
    """Per-token expert sets of one layer: Zipf popularity over a ranking that is reshuffled
    every `shift_every` tokens (a topic change), uniform when zipf_s is 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, tokens, shift_every or tokens):
        rank = torch.randperm(num_experts, generator=g)
        p = 1.0 / (rank + 1.0) ** zipf_s
        n = min(shift_every or tokens, tokens - start)
        ids = torch.multinomial(p.expand(n, -1), k, generator=g)
        out += [sorted(r) for r in ids.tolist()]
    return out


def simulate(policy, calls, num_experts, slots) -> float:
    """Hit rate of the real ExpertCache on a trace (experts of 64 bytes)."""
    experts = nn.Module()
    experts.num_experts = num_experts
    experts.register_buffer("w", torch.zeros(num_experts, 64, dtype=torch.uint8))
    stats = Stats()
    cache = ExpertCache(ExpertStore(experts, pin=False), slots, "cpu", policy, stats)
    for needed in calls:
        cache.begin(needed)
        for e in needed:
            cache.acquire(e)
            cache.release(e)
        cache.end()
    return stats.hits / (stats.hits + stats.misses)


def belady(calls, slots) -> float:
    """Optimal offline eviction (evict the expert needed furthest ahead): the ceiling."""
    nxt_use, hits, total, cached = [], 0, 0, set()
    last = {}
    for i in range(len(calls) - 1, -1, -1):
        nxt_use.append({e: last.get(e, math.inf) for e in calls[i]})
        for e in calls[i]:
            last[e] = i
    nxt_use.reverse()
    future = {}
    for i, needed in enumerate(calls):
        for e in needed:
            total += 1
            hits += e in cached
        for e in needed:
            future[e] = nxt_use[i][e]
            cached.add(e)
        while len(cached) > slots:
            cached.remove(max((c for c in cached if c not in needed),
                              key=lambda c: future.get(c, math.inf)))
    return hits / total


def simulate_table(tokens: int) -> str:
    lines = [f"# Eviction policies on routing traces (CPU simulation of ExpertCache, "
             f"{datetime.date.today()})", "",
             f"Hit rate over {tokens} decode tokens of one layer; slots from the planner for the "
             f"int4 models at each budget (context 8192). LRFU lam=0.05 (the default) and lam=0.2; "
             f"Belady = optimal offline eviction, the ceiling.", "",
             "| model | budget | slots / experts | trace | LRU | LRFU 0.05 | LRFU 0.2 | Belady |",
             "|---|---|---|---|---|---|---|---|"]
    for name, budgets in MODELS.items():
        cfg = config_from_dict(dict(json.loads((FIXTURES / f"{name}.json").read_text()),
                                    quantization=qcfg()), name)
        for budget in budgets:
            slots = make_plan(cfg, budget, None, 8192, "cuda", torch.bfloat16).slots
            E, k = cfg.num_experts, cfg.num_experts_per_tok
            for label, s, shift in (("uniform", 0.0, 0), ("zipf 1.0", 1.0, 0),
                                    ("zipf 1.0, reshuffled every 256", 1.0, 256)):
                calls = trace(E, k, tokens, s, shift, seed=1)
                rates = [simulate(p, calls, E, slots) for p in (LRU(), LRFU(0.05), LRFU(0.2))]
                rates.append(belady(calls, slots))
                lines.append(f"| {name} | {budget} | {slots}/{E} | {label} | "
                             + " | ".join(f"{100 * r:.1f}%" for r in rates) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny synthetic model on the CPU through the same code (no GPU needed)")
    p.add_argument("--simulate", action="store_true",
                   help="only the eviction-policy simulation on traces (CPU)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the skewed trace")
    p.add_argument("--tokens", type=int, default=4000, help="trace length for --simulate")
    p.add_argument("--out", default=None, help="output file (default under bench/results/)")
    p.add_argument("--quick", action="store_true",
                   help="first budget only, the model's routing with prefetch on and off (bench/gpu.sh)")
    args = p.parse_args(argv)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)

    if args.simulate:
        text = simulate_table(args.tokens)
        out = Path(args.out or results / "offload_policies_sim.md")
    else:
        if args.dry_run:
            device, dtype = torch.device("cpu"), torch.float32
            args.prefill, args.decode, args.context = min(args.prefill, 32), min(args.decode, 8), 128
            args.group_size = 32
            # budgets holding a quarter and a half of the experts
            cfg = config_from_dict(dict(TINY, quantization=qcfg(4, 32)), "tiny")
            plan = make_plan(cfg, None, 1, args.context, device, dtype)
            per = plan.moe_layers * plan.expert_bytes
            models = {"tiny-moe": (TINY, [plan.fixed_bytes + per * n for n in (4, 8)])}
            name = "CPU dry run (tiny model, not a measurement)"
        else:
            if not torch.cuda.is_available():
                sys.exit("bench_offload: needs a CUDA GPU (use --dry-run or --simulate on a CPU)")
            device, dtype = torch.device("cuda"), torch.bfloat16
            models = {m: (json.loads((FIXTURES / f"{m}.json").read_text()), MODELS[m])
                      for m in args.models.split(",")}
            name = torch.cuda.get_device_name()
        bw = h2d_bandwidth(device, 1 << 26 if args.dry_run else 1 << 30)
        rows = []
        for m, (raw, budgets) in models.items():
            bench_model(m, raw, budgets, device, dtype, args, bw, rows)
        text = table(rows, bw, name)
        out = Path(args.out or results / ("offload_dryrun_cpu.md" if args.dry_run
                                          else f"offload_{name.replace(' ', '_')}.md"))
    out.write_text(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
