"""`qlite serve` under concurrent clients: aggregate decode throughput and time to first token.

    python bench/bench_server.py                       # demo model, 1/4/8 clients -> bench/results/
    python bench/bench_server.py --dtype bfloat16 --device cuda --out bench/results/server-gpu.md

Starts `qlite serve` as a subprocess (the server as a user runs it), warms it up with one
request, then for each client count N starts N streamed chat completions at once (different
prompts, greedy, max_tokens each) with the official `openai` client, one thread per client.

Per round: aggregate decode tok/s = tokens after each client's first / (last finish - first
first token), the round's total tok/s (all tokens / wall time, prefills included), and time to
first token (mean and worst). The ratio to the 1-client round of the same run is the figure
that matters: on a busy machine absolute numbers move, ratios within one run much less.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent

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


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qlite", "serve", "--model", args.model, "--port", "0",
           "--max-batch", str(max(args.clients)), "--context", str(args.context)]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
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


def run_round(client, model, n, max_tokens) -> dict:
    results, t0 = [], time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(client, model, PROMPTS[i % len(PROMPTS)],
                                                         max_tokens, t0, results))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(r["end"] for r in results)
    decode_window = end - min(r["first"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return dict(clients=n, tokens=tokens, wall=end - t0,
                decode=sum(r["tokens"] - 1 for r in results) / decode_window,
                total=tokens / (end - t0), ttft_mean=sum(ttfts) / n, ttft_max=max(ttfts))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", default="1,4,8", help="comma list of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--note", default="", help="a sentence for the result file (the machine's load)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "server-cpu.md"))
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    proc, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        run_round(client, model, 1, 8)  # warm-up
        rows = []
        for n in args.clients:
            rows.append(run_round(client, model, n, args.max_tokens))
            print(rows[-1], flush=True)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as r:
            stats = json.load(r)
    finally:
        proc.terminate()
        proc.wait()
    base = rows[0]
    lines = [
        f"# qlite serve: concurrent clients ({datetime.date.today()})", "",
        f"`python bench/bench_server.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
        f"Model {args.model}, device {args.device or 'default'}, dtype {args.dtype or 'default'}, "
        f"greedy chat, max_tokens {args.max_tokens}, --max-batch {max(args.clients)}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs as seen by the process"
        f". {args.note + ' ' if args.note else ''}Ratios are against the 1-client round of "
        "the same run.", "",
        "| clients | tokens | wall s | aggregate decode tok/s | x 1 client | total tok/s "
        "| TTFT mean s | TTFT worst s |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['tokens']} | {r['wall']:.1f} | {r['decode']:.1f} "
                     f"| {r['decode'] / base['decode']:.2f} | {r['total']:.1f} "
                     f"| {r['ttft_mean']:.2f} | {r['ttft_max']:.2f} |")
    lines += ["", f"Server statistics after the run: decode steps {stats['decode_steps']}, "
              f"rows per step {stats['decode_rows'] / max(stats['decode_steps'], 1):.2f} on "
              f"average, {stats['max_rows']} at most.", ""]
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
