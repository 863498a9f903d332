"""`qlite serve` under concurrent clients: aggregate decode throughput and time to first token.

    python bench/bench_server.py                       # demo model, 1/4/8 clients -> bench/results/
    python bench/bench_server.py --dtype bfloat16 --device cuda --out bench/results/server-gpu.md

Starts `qlite serve` as a subprocess (the server as a user runs it), warms it up with one
request, then for each client count N starts N streamed chat completions at once (different
prompts, greedy, max_tokens each) with the official `openai` client, one thread per client.
A `--max-batch 1` server's single stream comes first: the baseline a batching server is for.

Per round: aggregate decode tok/s = tokens decoded / time in decode steps (the server's /stats:
what batching speeds up; newcomers' prefills run between decode steps and are not in it), rows
per decode step, total tok/s = all tokens / wall time (prefills and queueing included), and
time to first token (mean and worst; N prefills run one after another). Ratios are against the
faster 1-client round of the same run: on a busy machine absolute numbers move, ratios within
one run much less.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_cpu  # noqa: E402  (its machine line)

PROMPTS = [
    "Write a Python function that merges two sorted lists, with a docstring and tests.",
    "Explain the difference between a process and a thread, with examples.",
    "Write a C function that reverses a linked list and explain each step.",
    "Write a Python class for an LRU cache with get and put, and explain it.",
    "Write a bash script that finds the ten largest files under a directory.",
    "Explain how a hash map handles collisions, with Python code.",
    "Write a JavaScript function that debounces another function, and explain it.",
    "Write a SQL query for the second highest salary per department, and explain it.",
]


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qlite", "serve", "--model", args.model, "--port", "0",
           "--max-batch", str(max_batch), "--context", str(args.context)]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("qlite serve: http"):
            return proc, line.split()[2]
    raise SystemExit(f"qlite serve exited ({proc.wait()}) before it was ready")


def one_client(client, model, prompt, max_tokens, t0, out):
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    out.append(dict(ttft=first - t0, first=first, end=time.perf_counter(), tokens=tokens))


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as r:
        return json.load(r)


def run_round(client, url, model, n, max_tokens) -> dict:
    before = server_stats(url)
    results, t0 = [], time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(client, model, PROMPTS[i % len(PROMPTS)],
                                                         max_tokens, t0, results))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server_stats(url)
    delta = {k: after[k] - before[k] for k in ("decode_rows", "decode_steps", "decode_seconds")}
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return dict(clients=n, tokens=tokens, wall=end - t0,
                decode=delta["decode_rows"] / delta["decode_seconds"],
                rows=delta["decode_rows"] / delta["decode_steps"],
                total=tokens / (end - t0), ttft_mean=sum(ttfts) / n, ttft_max=max(ttfts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", default="1,4,8", help="comma list of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads "
                   "(OMP_NUM_THREADS; default: torch's choice)")
    p.add_argument("--note", default="", help="a sentence for the result file (the load)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server-cpu.md"))
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for max_batch, clients in [(1, [1]), (max(args.clients), args.clients)]:
        proc, url = start_server(args, max_batch)
        try:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
            model = client.models.list().data[0].id
            run_round(client, url, model, 1, 8)  # warm-up
            for n in clients:
                rows.append(dict(run_round(client, url, model, n, args.max_tokens),
                                 max_batch=max_batch))
                print(rows[-1], flush=True)
            stats = server_stats(url)
        finally:
            proc.terminate()
            proc.wait()
    base = max((r for r in rows if r["clients"] == 1), key=lambda r: r["decode"])
    lines = [
        f"# qlite serve: concurrent clients ({datetime.date.today()})", "",
        f"`{shlex.join(['python', 'bench/bench_server.py', *sys.argv[1:]])}`", "",
        f"Model {args.model}, device {args.device or 'default'}, dtype {args.dtype or 'default'}, "
        f"greedy chat, max_tokens {args.max_tokens}, --context {args.context}, "
        f"{args.threads or 'default'} torch threads. "
        f"Machine: {bench_cpu._cpu_name()}, {os.cpu_count()} CPUs as seen by the process"
        f". {args.note + ' ' if args.note else ''}Ratios are against the faster 1-client "
        "round of the same run (a --max-batch 1 server decodes one row a step; a --max-batch "
        f"{max(args.clients)} one the rows up to its last busy one, rounded up to a power of "
        "two).", "",
        "| --max-batch | clients | tokens | wall s | aggregate decode tok/s | x 1 client "
        "| rows per step | total tok/s | TTFT mean s | TTFT worst s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['tokens']} | {r['wall']:.1f} "
                     f"| {r['decode']:.1f} | {r['decode'] / base['decode']:.2f} | {r['rows']:.2f} "
                     f"| {r['total']:.1f} | {r['ttft_mean']:.2f} | {r['ttft_max']:.2f} |")
    per_step = stats["decode_rows"] / max(stats["decode_steps"], 1)
    lines += ["", f"The --max-batch {max(args.clients)} server's statistics after the run: "
              f"decode steps {stats['decode_steps']}, rows per step {per_step:.2f} on average, "
              f"{stats['max_rows']} at most.", ""]
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
