"""Import benchmark: time and peak memory to take each downloadable format into qlite.

    python bench/bench_import.py                 # demo + synthetic A2.7B-shaped files -> bench/results/import.md
    python bench/bench_import.py --layers 1 --no-demo    # quicker

Measured, each in a fresh subprocess (peak RSS = its VmHWM, which includes the pages of
memory-mapped files it touched):
  - the demo GGUF (Qwen2.5-Coder-0.5B Q4_K_M): `convert-gguf` (bfloat16) and `quantize` to int4
    g32 (RTN: this measures the import path, not HQQ's optimisation);
  - a synthetic Qwen1.5-MoE-A2.7B-shaped qwen2moe GGUF (full widths: hidden 2048, 60 experts of
    1408, shared expert 5632, vocab 151936; `--layers` of its 24 layers; q4_k_m-like type mix:
    Q4_K experts gate/up and attention, Q5_0 expert down (1408 is no multiple of 256, llama.cpp's
    fallback), Q6_K shared down and output) -> `quantize` int4 g32 (Q4_K codes kept) and g128;
  - a synthetic GPTQ-Int4 checkpoint of the same shape (sym, g128, v1, per-expert tensors and
    placeholder biases as Qwen publishes) -> `qlite.load` on the CPU (repacked at load).
Random codes and finite fp16 scales: the work per byte is the real one, the outputs are noise.
The extrapolation to the full models scales the measured seconds per source byte to their
file sizes (Qwen2-57B-A14B: q4_k_m GGUF 34.9 GB, GPTQ-Int4 31.6 GB; A2.7B: 8.8 / 8.5 GB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

A27 = dict(hidden=2048, heads=16, kv=16, experts=60, used=4, moe=1408, shared=5632,
           vocab=151936, layers=24)
TINY = dict(hidden=256, heads=4, kv=4, experts=4, used=2, moe=128, shared=256, vocab=1000,
            layers=2)  # --tiny: the same code on small files (a check of the script)
FULL_BYTES = {"Qwen1.5-MoE-A2.7B GGUF q4_k_m": 8.8e9, "Qwen2-57B-A14B GGUF q4_k_m": 34.85e9,
              "Qwen1.5-MoE-A2.7B GPTQ-Int4": 8.5e9, "Qwen2-57B-A14B GPTQ-Int4": 31.6e9}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
kind, src, out = sys.argv[2], sys.argv[3], sys.argv[4]
import qlite  # imports (and the CPU kernel's build) outside the timed part
from qlite.gguf import convert_gguf
from qlite.kernels import cpu_gemv
from qlite.quantize import quantize_checkpoint
import torch
cpu_gemv.available()
with torch.device("meta"):  # torch's lazy imports on the first meta-device module
    torch.nn.Embedding(2, 2)
t = time.perf_counter()
if kind == "convert":
    convert_gguf(src, out)
elif kind.startswith("quantize"):
    quantize_checkpoint(src, out, 4, int(kind.split("-g")[1]), "rtn")
elif kind == "load":
    qlite.load(src, device="cpu")
seconds = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss": hwm * 1024}))
"""


def measure(kind, src, out):
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), kind, str(src), str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{kind} {src}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fp16_bytes(rng, shape, lo=1e-3, hi=1e-2):
    return rng.uniform(lo, hi, size=shape + (1,)).astype(np.float16).view(np.uint8)


def _blocks(rng, rows, cols, qtype):
    """Random valid blocks of a GGUF type for a [rows, cols] matrix (rows may be [E, r])."""
    import gguf
    rows = rows if isinstance(rows, tuple) else (rows,)
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=rows + (cols // elems, nbytes), dtype=np.uint8)
    name = qtype.name
    if name in ("Q4_0", "Q5_0", "Q8_0"):
        b[..., 0:2] = _fp16_bytes(rng, b.shape[:-1])
    elif name == "Q4_K":
        b[..., 0:2] = _fp16_bytes(rng, b.shape[:-1])
        b[..., 2:4] = _fp16_bytes(rng, b.shape[:-1])
    elif name == "Q6_K":
        b[..., 208:210] = _fp16_bytes(rng, b.shape[:-1])
    return b.reshape(rows + (-1,))


def write_synthetic_gguf(path: Path, layers: int, s=A27):
    import gguf
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["shared"])
    w.add_expert_feed_forward_length(s["moe"])
    w.add_expert_shared_feed_forward_length(s["shared"])
    w.add_expert_count(s["experts"])
    w.add_expert_used_count(s["used"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    from qlite.gguf import _byte_alphabet
    alpha = _byte_alphabet()
    tokens = [alpha[i] for i in range(256)] + [f"t{i}" for i in range(s["vocab"] - 256)]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([])
    h, e, mi, si, v = s["hidden"], s["experts"], s["moe"], s["shared"], s["vocab"]
    kvd = s["kv"] * h // s["heads"]

    def add(name, rows, cols, qtype):
        if qtype == Q.F32:
            w.add_tensor(name, (rng.standard_normal(rows if cols is None else (rows, cols)) * .02)
                         .astype(np.float32))
        else:
            w.add_tensor(name, _blocks(rng, rows, cols, qtype), raw_dtype=qtype)

    add("token_embd.weight", v, h, Q.Q4_K)
    add("output.weight", v, h, Q.Q6_K)
    add("output_norm.weight", h, None, Q.F32)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", h, None, Q.F32)
        add(p + "ffn_norm.weight", h, None, Q.F32)
        for n, rows, qt in (("attn_q", h, Q.Q4_K), ("attn_k", kvd, Q.Q4_K), ("attn_v", kvd, Q.Q6_K),
                            ("attn_output", h, Q.Q4_K)):
            add(p + n + ".weight", rows, h, qt)
            if n != "attn_output":
                add(p + n + ".bias", rows, None, Q.F32)
        add(p + "ffn_gate_inp.weight", e, h, Q.F32)
        add(p + "ffn_gate_exps.weight", (e, mi), h, Q.Q4_K)
        add(p + "ffn_up_exps.weight", (e, mi), h, Q.Q4_K)
        add(p + "ffn_down_exps.weight", (e, h), mi, Q.Q5_0)
        add(p + "ffn_gate_shexp.weight", si, h, Q.Q4_K)
        add(p + "ffn_up_shexp.weight", si, h, Q.Q4_K)
        add(p + "ffn_down_shexp.weight", h, si, Q.Q6_K)
        add(p + "ffn_gate_inp_shexp.weight", h, None, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_synthetic_gptq(out: Path, layers: int, s=A27, g=128):
    """Qwen's GPTQ-Int4 layout: sym (qzeros 0x77777777), v1, g_idx, zero placeholder biases."""
    import torch
    from safetensors.torch import save_file
    out.mkdir()
    gen = torch.Generator().manual_seed(0)
    h, e, mi, si, v = s["hidden"], s["experts"], s["moe"], s["shared"], s["vocab"]
    kvd = s["kv"] * h // s["heads"]
    shard, n_shard, index = {}, 0, {}

    def flush():
        nonlocal shard, n_shard
        if shard:
            n_shard += 1
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard = {}

    def linear(prefix, n, k, bias=None):
        shard[prefix + ".qweight"] = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n),
                                                   dtype=torch.int32, generator=gen)
        shard[prefix + ".qzeros"] = torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32)
        shard[prefix + ".scales"] = (torch.rand(k // g, n, generator=gen) * 0.01 + 1e-3).half()
        shard[prefix + ".g_idx"] = (torch.arange(k) // g).int()
        shard[prefix + ".bias"] = (torch.randn(n, generator=gen) * 0.02).half() if bias \
            else torch.zeros(n, dtype=torch.float16)

    shard["model.embed_tokens.weight"] = (torch.randn(v, h, generator=gen) * .02).half()
    shard["lm_head.weight"] = (torch.randn(v, h, generator=gen) * .02).half()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    flush()
    for i in range(layers):
        p = f"model.layers.{i}."
        shard[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for n, rows in (("q_proj", h), ("k_proj", kvd), ("v_proj", kvd)):
            linear(p + "self_attn." + n, rows, h, bias=True)
        linear(p + "self_attn.o_proj", h, h)
        shard[p + "mlp.gate.weight"] = (torch.randn(e, h, generator=gen) * .02).half()
        shard[p + "mlp.shared_expert_gate.weight"] = (torch.randn(1, h, generator=gen) * .02).half()
        linear(p + "mlp.shared_expert.gate_proj", si, h)
        linear(p + "mlp.shared_expert.up_proj", si, h)
        linear(p + "mlp.shared_expert.down_proj", h, si)
        for j in range(e):
            linear(f"{p}mlp.experts.{j}.gate_proj", mi, h)
            linear(f"{p}mlp.experts.{j}.up_proj", mi, h)
            linear(f"{p}mlp.experts.{j}.down_proj", h, mi)
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
           "vocab_size": v, "hidden_size": h, "intermediate_size": si, "num_hidden_layers": layers,
           "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
           "num_experts": e, "num_experts_per_tok": s["used"], "moe_intermediate_size": mi,
           "shared_expert_intermediate_size": si, "norm_topk_prob": False,
           "max_position_embeddings": 8192, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "torch_dtype": "float16",
           "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": g,
                                   "sym": True, "desc_act": False}}
    (out / "config.json").write_text(json.dumps(cfg))


def size_of(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic A2.7B files")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "import.md"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: check the script")
    args = ap.parse_args()
    shape = TINY if args.tiny else A27
    work = Path(tempfile.mkdtemp(prefix="qlite-import-", dir=args.work))
    rows = []  # (what, source bytes, seconds, peak rss, output bytes)
    try:
        jobs = []
        if not args.no_demo:
            from qlite.pull import demo_gguf_path, pull_demo
            pull_demo()
            demo = demo_gguf_path()
            jobs += [("demo GGUF -> convert-gguf (bf16)", "convert", demo),
                     ("demo GGUF -> quantize int4 g32 rtn", "quantize-g32", demo)]
        syn = work / "a27.gguf"
        write_synthetic_gguf(syn, args.layers, shape)
        tag = f"A2.7B-shaped GGUF ({args.layers} of 24 layers)"
        jobs += [(f"{tag} -> quantize int4 g32 rtn (Q4_K kept)", "quantize-g32", syn),
                 (f"{tag} -> quantize int4 g128 rtn", "quantize-g128", syn)]
        gptq = work / "a27-gptq"
        write_synthetic_gptq(gptq, args.layers, shape)
        jobs.append((f"A2.7B-shaped GPTQ-Int4 ({args.layers} of 24 layers) -> qlite.load (CPU)",
                     "load", gptq))
        for what, kind, src in jobs:
            out = work / "out"
            r = measure(kind, src, out)
            rows.append((what, size_of(src), r["seconds"], r["peak_rss"],
                         size_of(out) if out.exists() else 0))
            print(f"{what}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Import: time and peak memory ({datetime.date.today()}, "
             f"`python bench/bench_import.py --layers {args.layers}`)", "",
             "Shared 2-vCPU machine (other jobs running): compare rows within this run. Peak RSS "
             "includes touched pages of memory-mapped files.", "",
             "| import | source | seconds | MB/s of source | peak RSS | output |",
             "|---|---:|---:|---:|---:|---:|"]
    for what, src, sec, rss, out in rows:
        lines.append(f"| {what} | {src / 1e6:,.0f} MB | {sec:.1f} | {src / 1e6 / sec:,.0f} | "
                     f"{rss / 2**30:.2f} GiB | {out / 1e6:,.0f} MB |")
    lines += ["", "Extrapolated to whole files at the measured rate of the synthetic rows "
              "(time scales with bytes; peak memory does not: it is set by the largest tensor):", ""]
    rate = {r[0]: r[1] / r[2] for r in rows}
    g32 = next(v for k, v in rate.items() if "GGUF (" in k and "g32" in k)
    g128 = next(v for k, v in rate.items() if "GGUF (" in k and "g128" in k)
    load = next(v for k, v in rate.items() if "GPTQ" in k)
    for name, nbytes in FULL_BYTES.items():
        if "GGUF" in name:
            lines.append(f"- {name} ({nbytes / 1e9:.1f} GB): quantize int4 g32 "
                         f"~{nbytes / g32 / 60:.0f} min, g128 ~{nbytes / g128 / 60:.0f} min")
        else:
            lines.append(f"- {name} ({nbytes / 1e9:.1f} GB): qlite.load repack "
                         f"~{nbytes / load / 60:.1f} min")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
