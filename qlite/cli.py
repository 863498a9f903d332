"""The `qlite` command. Errors of ours print as one line and exit with status 1."""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings

from qlite.errors import QliteError, QliteWarning
from qlite.generate import SamplingParams

SERVE_CONTEXT = 4096  # qlite serve's --context unless given (each batch row caches a context)


def progress_printer(stream=None):
    """A progress callback drawing one updating line per stage on `stream` (default: the
    sys.stderr of the moment it is called): percent, bytes (or counts), tensors when the job
    gives them (`qlite quantize` does), and an ETA. When the stream is not a terminal (a log
    file, a pipe) there is no carriage return: one plain line per quarter of each stage."""
    state = {"stage": None, "t0": 0.0, "t": 0.0, "quarter": -1}

    def show(stage: str, done: int, total: int, tensors=None):
        out = stream or sys.stderr
        tty = getattr(out, "isatty", lambda: False)()
        now = time.monotonic()
        if stage != state["stage"]:
            if state["stage"] is not None and tty:
                out.write("\n")
            state.update(stage=stage, t0=now, t=0.0, quarter=-1)
        elif tty and done < total and now - state["t"] < 0.1:
            return
        quarter = 4 if done >= total else int(4 * done / total) if total else 0
        if not tty:
            if quarter == state["quarter"]:
                return
            state["quarter"] = quarter
        state["t"] = now
        line = f"{stage}: {100.0 * done / total if total else 100.0:5.1f}%"
        if tensors:
            line += f"  {tensors[0]}/{tensors[1]} tensors"
        line += (f"  {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB" if total > 2**20
                 else f"  {done}/{total}")
        elapsed = now - state["t0"]
        if 0 < done < total and elapsed > 1:
            eta = elapsed * (total - done) / done
            line += f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        out.write(f"\r{line}   " if tty else line + "\n")
        if done >= total:
            if tty:
                out.write("\n")
            state["stage"] = None
        out.flush()

    return show


def _add_model_args(p):
    p.add_argument("--model", default="demo", help="model directory, or 'demo' (default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: "
                   "bfloat16; float32 for 16-bit weights on the cpu)")
    p.add_argument("--context", type=int, default=None, help="context window cap in tokens")
    p.add_argument("--backend", default="qlite", choices=["qlite", "bnb"],
                   help="bnb: bitsandbytes linears in place of qlite's (the baseline)")
    p.add_argument("--bnb-bits", type=int, default=4, choices=[4, 8],
                   help="with --backend bnb: NF4 (4) or int8 (8)")
    p.add_argument("--gpu-budget", default=None,
                   help="MoE: device memory for everything, with a unit (24GiB, 24GB); routed "
                        "experts beyond it stay in CPU memory and are cached on the device")
    p.add_argument("--expert-slots", type=int, default=None,
                   help="MoE: cached experts per layer (overrides the planner)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="MoE offloading: do not guess and copy the next layer's experts")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step under torch.compile (compiles at the first "
                        "token; see README for when it pays)")


def _load_options(args) -> dict:
    """The keyword arguments of qlite.load that the model options above give."""
    return dict(device=args.device, dtype=args.dtype, context=args.context,
                backend=args.backend, bnb_bits=args.bnb_bits, gpu_budget=args.gpu_budget,
                expert_slots=args.expert_slots, prefetch=args.prefetch,
                compile=args.compile)


def _add_sampling_args(p):
    d = SamplingParams()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args) -> dict:
    """The sampling options, checked (SamplingParams) before any model is loaded."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   seed=args.seed, stop=args.stop)
    SamplingParams(**options)
    return options


def _load(args):
    from qlite.loader import load
    return load(args.model, progress=progress_printer(), **_load_options(args))


def _print_offload_stats(model, stream=sys.stdout):
    stats = model.offload_stats()
    if stats:
        from qlite.offload import format_stats
        print(format_stats(stats), file=stream)


def cmd_generate(args):
    sampling = _sampling(args)
    model = _load(args)
    gen = model.generate(args.prompt, raw=args.raw, progress=progress_printer(), **sampling)
    for piece in gen:
        print(piece, end="", flush=True)
    print()
    if args.stats:
        _print_offload_stats(model)
    print(gen.stats.summary())


REPL_COMMANDS = {"/quit": "leave (also /exit, an empty line or Ctrl-D)",
                 "/reset": "forget the conversation (the system prompt stays)",
                 "/help": "this list"}


def cmd_repl(args):
    """A plain-text chat loop (the Textual TUI is `qlite chat`). A line that is one /word is a
    command, never chat text; "//text" sends "/text"."""
    sampling = _sampling(args)
    model = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the prompt as U+FFFD
        sys.stdin.reconfigure(errors="surrogateescape")
    print("qlite repl: /help for commands; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        word = line.strip()
        if re.fullmatch(r"/[A-Za-z]+", word):
            if word in ("/quit", "/exit"):
                break
            if word == "/reset":
                messages = list(system)
                print("[conversation cleared]", file=sys.stderr)
            elif word == "/help":
                for name, what in REPL_COMMANDS.items():
                    print(f"  {name:<8}{what}", file=sys.stderr)
                print("  //text  sends /text as a message", file=sys.stderr)
            else:
                print(f"[{word}: unknown command; try /help]", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        messages.append({"role": "user", "content": line})
        gen = model.generate(messages, progress=progress_printer(), **sampling)
        reply = ""
        try:
            for piece in gen:
                reply += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, keeps what came
            pass
        print()
        if gen.stats.dropped_messages:
            print(f"[{gen.stats.dropped_messages} oldest messages left out to fit the context]",
                  file=sys.stderr)
        if args.stats:
            _print_offload_stats(model, sys.stderr)
        print(f"[{gen.stats.summary()}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})


def cmd_chat(args):
    from qlite.loader import resolve_device, resolve_model_dir
    from qlite.tui import main as tui_main
    options = _load_options(args)
    resolve_device(options["device"])  # what can be checked before the app starts
    if args.model != "demo":
        from qlite.config import load_config
        load_config(resolve_model_dir(args.model))
    error = tui_main(args.model, device=options.pop("device"), dtype=options.pop("dtype"),
                     context=options.pop("context"), load_options=options)
    if error:  # the model did not load: the app showed why; say it again here, exit non-zero
        raise QliteError(error)


def cmd_serve(args):
    from qlite.server import MAX_QUEUE, Server, model_name
    model = _load(args)
    if args.context is None:  # every row of the batch holds a whole context in its cache
        model.max_context = min(model.max_context, SERVE_CONTEXT)
    queue = MAX_QUEUE if args.max_queue is None else args.max_queue
    server = Server(model, model_name(args.model), host=args.host, port=args.port,
                    api_key=args.api_key, max_batch=args.max_batch, max_queue=queue,
                    on_ready=lambda url: print(f"qlite serve: {url}/v1 (Ctrl-C to stop)",
                                               flush=True))
    server.serve()


def cmd_plan(args):
    from qlite.plan import plan_text
    print(plan_text(args.model, args.gpu_budget, bits=args.bits, context=args.context,
                    expert_slots=args.expert_slots, group_size=args.group_size,
                    dtype=args.dtype))


def cmd_quantize(args):
    from qlite.export import quantize_as_gptq
    from qlite.quantize import quantize_checkpoint
    job = quantize_as_gptq if args.format == "gptq" else quantize_checkpoint
    out = job(args.src, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
              keep_16bit=args.keep_16bit, force=args.force, symmetric=args.symmetric,
              progress=progress_printer(), calibration=args.calibration,
              calibration_tokens=args.calibration_tokens)
    print(out)


def cmd_export(args):
    from qlite.export import export_checkpoint
    print(export_checkpoint(args.src, args.out, fmt=args.fmt, force=args.force,
                            progress=progress_printer()))


def cmd_inspect(args):
    if args.path.endswith(".gguf"):
        from qlite.gguf import describe_gguf
        print(describe_gguf(args.path))
        return
    from qlite.checkpoint import describe
    print(describe(args.path))


def cmd_pull(args):
    if args.name != "demo":
        raise QliteError(f"qlite pull {args.name}: only 'demo' can be pulled (no model hub here)")
    from qlite.pull import pull_demo
    print(pull_demo(progress=progress_printer()))


def cmd_convert_gguf(args):
    from qlite.gguf import convert_gguf
    print(convert_gguf(args.gguf, args.out, progress=progress_printer(), dtype=args.dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt, streaming")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    p.add_argument("--stats", action="store_true", help="print expert-offloading statistics")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="the terminal chat (Textual)")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("repl", help="a plain-text chat loop")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print expert-offloading statistics")
    p.set_defaults(func=cmd_repl)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (batches requests)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests waiting for a row beyond those (default 64); more get 503")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="write an int4/int8 copy of a checkpoint")
    p.add_argument("src", help="model directory (safetensors), .gguf file, or demo")
    p.add_argument("out", help="new model directory")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size: 32, 64, 128 (default 128; int8 is per channel)")
    p.add_argument("--method", default=None,
                   help="rtn, hqq or gptq (calibrated, int4; default: hqq)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="gptq: calibration text (default: Python standard-library sources)")
    p.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                   help="gptq: calibration tokens (default: 16384)")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    p.add_argument("--format", default="qlite", choices=["qlite", "gptq"],
                   help="gptq: write a GPTQ checkpoint for vLLM/SGLang (implies --symmetric)")
    p.add_argument("--keep-16bit", default="embed",
                   help="comma list of lm_head,embed kept 16-bit, or none (default: embed)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a qlite int4 checkpoint as GPTQ (vLLM, SGLang)")
    p.add_argument("src", help="model directory written by qlite quantize --symmetric")
    p.add_argument("out", help="new model directory")
    p.add_argument("--format", dest="fmt", default="gptq", choices=["gptq"])
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="where an MoE model lives for a GPU budget")
    p.add_argument("--model", required=True, help="model directory, config.json or .gguf file")
    p.add_argument("--bits", type=int, default=None, choices=[4, 8, 16])
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--gpu-budget", default=None, help="with a unit: 24GiB or 24GB")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--expert-slots", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="architecture, parameters, dtypes, bytes on disk")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pull", help="download and convert the demo model")
    p.add_argument("name", choices=["demo"])
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert-gguf", help="GGUF file -> HF-style model directory")
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight dtype of the output (default bfloat16)")
    p.set_defaults(func=cmd_convert_gguf)
    return parser


def _show_warning(message, category, *args, _default=warnings.showwarning, **kwargs):
    if issubclass(category, QliteWarning):  # ours: one line, like errors
        print(f"qlite: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, *args, **kwargs)


def flag_message(message: str, parser: argparse.ArgumentParser) -> str:
    """Library errors name the Python parameter they blame, first (`gpu_budget 5 GiB: ...`,
    `gpu_budget/expert_slots: ...`) or as `force=True`; the CLI names its flags instead."""
    flags = {a.dest: a.option_strings[-1] for p in [parser, *_subparsers(parser)]
             for a in p._actions if a.option_strings and a.dest != "help"}
    head, sep, rest = message.partition(" ")
    words = head.rstrip(":").split("/")
    if all(w in flags for w in words):
        message = "/".join(flags[w] for w in words) + head[len(head.rstrip(":")):] + sep + rest
    return re.sub(r"\b(\w+)=True\b",
                  lambda m: flags.get(m.group(1), m.group(0)), message)


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--gpu-budget -5GiB` as `--gpu-budget=-5GiB`: argparse takes a value that starts with
    '-' and is not a plain number for an option, and would say only "expected one argument";
    joined, the value reaches its check, which says what is wrong with it."""
    out, i = [], 0
    while i < len(argv):
        if (argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv)
                and re.match(r"-[0-9.]", argv[i + 1])):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(_join_negative_values(argv))
    warnings.showwarning = _show_warning
    try:
        args.func(args)
    except QliteError as e:
        print(f"qlite: error: {flag_message(str(e), parser)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
