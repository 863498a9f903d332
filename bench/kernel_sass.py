"""What the GPU will run, read without a GPU: each Triton kernel compiled for sm_90 (and sm_89,
sm_80) on this CPU by triton's own compiler, disassembled with the nvdisasm/cuobjdump that ship
in the triton wheel, and summed up per kernel x config x format:

    regs     registers per thread            stack  stack frame bytes (> 0: local memory)
    spill    STL/LDL instructions             smem   shared memory bytes (triton's allocation)
    loop     instructions in the main loop    ldg    global loads in the main loop, by width
    w128     bytes the main loop reads through 16-byte weight loads, per weight byte: 1.0 = every
             weight arrives 16 bytes at a time (weight loads are told apart by compiling again
             with the weight pointer not known to be aligned: the 128-bit loads that vanish)
    i/w      instructions per weight: loop instructions x threads / weights per iteration

i/w is the number that decides a decode kernel: an H200 issues ~30 T thread-instructions/s
(132 SMs x 128 lanes x ~1.8 GHz) against ~8.6 T int4 weights/s at 4.3 TB/s, so above ~3.5 a
kernel is bound by instructions, not by memory. w128 >= 1 means every weight byte can arrive
through a 16-byte load (the loads are counted per thread, weights per program).

    python bench/kernel_sass.py                  # the table, sm_90, every case
    python bench/kernel_sass.py --arch 80 89 90  # several targets
    python bench/kernel_sass.py --json --only qgemv-int4  # machine-readable (tests use this)
    python bench/kernel_sass.py --md bench/results/kernel_sass.md

The cases are the launchers' own configs (kernels.gemv.CONFIGS etc.), with the specialisation
a real launch gets: pointers and 4096-like sizes divisible by 16. Must not run under
TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


@dataclass
class Case:
    name: str          # kernel-format-dtype-shape, the table's first column
    kernel: str        # attribute path of the @triton.jit function, e.g. "gemv.qgemv_kernel"
    signature: dict    # argument -> triton type ("*bf16", "i32", ...); constexprs filled in
    constexprs: dict
    num_warps: int
    num_stages: int
    weights: int       # weights one program consumes per main-loop iteration
    weight_bytes: int  # their packed bytes
    divisible: tuple = ()  # integer arguments a real launch specialises as divisible by 16
    note: str = ""
    result: dict = field(default_factory=dict)


def _fmt_name(bits, group, zeros):
    return "int8" if bits == 8 else f"int4-g{group}-{'asym' if zeros else 'sym'}"


FORMATS = [(4, 128, True), (4, 128, False), (4, 32, True), (8, 0, False)]


def cases(dtypes=("bfloat16",)):
    """Every kernel x config x format the launchers can pick, for the given activation dtypes."""
    from qlite.kernels import fused_moe, gemm, gemv

    out = []
    for dt in dtypes:
        a = _PTR[dt]
        for bits, group, zeros in FORMATS:
            fmt = _fmt_name(bits, group, zeros)
            w = "*u8" if bits == 4 else "*i8"
            fmt_c = dict(BITS=bits, GROUP=group, HAS_ZEROS=zeros)
            for c in gemv.sass_cases(bits, group):
                c = dict(c)
                kernel = c.pop("kernel")
                c.update({k: v for k, v in dict(F16=dt == "float16", DOT_F32=dt == "float32",
                                                PAIRS=dt != "float32").items() if k in c})
                if "TILE16" in c:
                    c["TILE16"] = c["TILE16"] and dt != "float32"
                sig = dict(gemv.SIGNATURE, x_ptr=a, qw_ptr=w, out_ptr=a)
                out.append(_case("qgemv", "gemv." + kernel, fmt, dt, sig, {**fmt_c, **c}, bits))
            for c in gemm.sass_cases():
                sig = dict(gemm.SIGNATURE, x_ptr=a, qw_ptr=w, out_ptr=a)
                out.append(_case("qgemm", "gemm.qgemm_kernel", fmt, dt, sig, {**fmt_c, **c}, bits))
            for c in fused_moe.sass_cases(bits, group):
                c = dict(c)
                kernel = c.pop("kernel")
                c.update({k: v for k, v in dict(F16=dt == "float16", DOT_F32=dt == "float32",
                                                PAIRS=dt != "float32").items() if k in c})
                if "TILE16" in c:
                    c["TILE16"] = c["TILE16"] and dt != "float32"
                base = fused_moe.DECODE_SIGNATURE if kernel == "moe_gemv_kernel" else fused_moe.SIGNATURE
                sig = dict(base, a_ptr=a, qw_ptr=w, out_ptr=a if c["GATE_UP"] else "*fp32")
                out.append(_case("moe-" + ("gateup" if c["GATE_UP"] else "down"), "fused_moe." + kernel,
                                 fmt, dt, sig, {**fmt_c, **c}, bits))
    return out


def _case(kind, kernel, fmt, dt, sig, consts, bits):
    consts = dict(consts)
    warps, stages = consts.pop("num_warps"), consts.pop("num_stages", 1)
    per_iter = consts.pop("weights_per_iter", None) or consts["BLOCK_N"] * consts["BLOCK_K"]
    divisible = tuple(consts.pop("divisible", ()))
    shape = consts.pop("label")
    sig = dict(sig)
    for k in consts:
        sig[k] = "constexpr"
    return Case(f"{kind}-{fmt}-{dt}-{shape}", kernel, sig, consts, warps, stages, per_iter,
                per_iter * bits // 8, divisible)


def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(case: Case, arch: int, weight_aligned: bool = True):
    """(kernel, cuobjdump resource usage, SASS text) of case for sm_<arch>."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, fn = case.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module("qlite.kernels." + mod), fn)
    names = list(case.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if (case.signature[n].startswith("*") and (weight_aligned or n != "qw_ptr")) or n in case.divisible}
    src = ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return k, usage, sass


def compile_case(case: Case, arch: int = 90) -> Case:
    """Compile for sm_<arch>, disassemble, fill case.result. The weights' loads are told apart
    by a second compile in which the weight pointer is not known to be 16-byte aligned: the
    128-bit loads that disappear from the main loop are the weights' (w128)."""
    try:
        k, usage, sass = _compile(case, arch)
        _, _, sass_unaligned = _compile(case, arch, weight_aligned=False)
    except Exception as exc:  # reported in the table, asserted on by tests
        case.result = dict(arch=arch, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return case
    r = analyse(sass)
    r["arch"] = arch
    r["regs"] = int(re.search(r"REG:(\d+)", usage)[1])
    r["stack"] = int(re.search(r"STACK:(\d+)", usage)[1])
    r["smem"] = k.metadata.shared
    threads = 32 * case.num_warps
    r["ipw"] = round(r["loop"] * threads / case.weights, 2) if r["loop"] else None
    weight128 = r["ldg"].get(128, 0) - analyse(sass_unaligned)["ldg"].get(128, 0)
    r["w128"] = round(16 * max(weight128, 0) * threads / case.weight_bytes, 2)
    case.result = r
    return case


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LOAD = re.compile(r"\b(LDG|LDGSTS)(\.[A-Z0-9_.]+)?\s")


def _width(op: str) -> int:
    """Bits of a global load from its opcode (LDG.E.128, LDG.E.U8, LDGSTS.E.BYPASS.128, ...)."""
    for bits in (128, 64):
        if f".{bits}" in op:
            return bits
    return 16 if ".U16" in op or ".S16" in op else 8 if ".U8" in op or ".S8" in op else 32


def analyse(sass: str) -> dict:
    """The main loop of a disassembly: the loop (a backward branch's range) holding the most
    global loads, innermost on a tie; its instruction count and load widths; spills anywhere."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m[1]] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            instrs.append(m[2])
    loops = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", ins)
        if m and m[1] in labels and labels[m[1]] <= i:
            loops.append((labels[m[1]], i))
    spill = sum(1 for ins in instrs if re.search(r"\b(STL|LDL)\b", ins))

    def loads(lo, hi):
        return [m[1] + (m[2] or "") for ins in instrs[lo:hi + 1] for m in [_LOAD.search(ins)] if m]

    best = max(loops, key=lambda lh: (len(loads(*lh)), -(lh[1] - lh[0])), default=None)
    if best is None or not loads(*best):
        return dict(loop=0, ldg={}, spill=spill, total=len(instrs))
    lo, hi = best
    body = [ins for ins in instrs[lo:hi + 1] if not ins.startswith("NOP")]
    widths = {}
    for op in loads(lo, hi):
        w = _width(op)
        widths[w] = widths.get(w, 0) + 1
    return dict(loop=len(body), ldg=widths, spill=spill, total=len(instrs),
                bar=sum("BAR" in i for i in body), shfl=sum("SHFL" in i for i in body),
                mma=sum(bool(re.match(r"(HGMMA|HMMA)", i)) for i in body),
                wgmma=any(i.startswith("HGMMA") for i in body))


def _run(args):
    case, arch = args
    return compile_case(case, arch)


def run_all(selected, archs, jobs=None):
    work = [(c, a) for a in archs for c in selected]
    with ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
        return list(pool.map(_run, work))


def table(done) -> str:
    rows = ["| kernel | sm | warps/stages | regs | stack | spill | smem | loop | ldg (bits:n) | w128 | mma | i/w |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in done:
        r = c.result
        if "error" in r:
            rows.append(f"| {c.name} | {r['arch']} | | error: {r['error'][:80]} | | | | | | | | |")
            continue
        ldg = " ".join(f"{w}:{n}" for w, n in sorted(r["ldg"].items(), reverse=True))
        rows.append(f"| {c.name} | {r['arch']} | {c.num_warps}/{c.num_stages} | {r['regs']} | {r['stack']} | "
                    f"{r['spill']} | {r['smem']} | {r['loop']} | {ldg} | {r['w128']} | {r.get('mma', 0)} | "
                    f"{r['ipw']} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90])
    p.add_argument("--dtype", nargs="+", default=["bfloat16"])
    p.add_argument("--only", nargs="*", default=[], help="keep cases whose name contains any of these")
    p.add_argument("--json", action="store_true")
    p.add_argument("--md", help="also write the table to this markdown file")
    p.add_argument("--jobs", type=int)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_sass.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    selected = [c for c in cases(tuple(args.dtype)) if not args.only or any(s in c.name for s in args.only)]
    done = run_all(selected, args.arch, args.jobs)
    if args.json:
        print(json.dumps([dict(name=c.name, warps=c.num_warps, stages=c.num_stages, **c.result) for c in done]))
        return
    text = table(done)
    print(text)
    if args.md:
        import triton
        with open(args.md + ".tmp", "w") as f:
            f.write(f"# SASS of qlite's kernels (triton {triton.__version__}, compiled on a CPU)\n\n"
                    f"`python bench/kernel_sass.py {' '.join(argv or sys.argv[1:])}`\n\n"
                    "Columns: bench/kernel_sass.py's docstring.\n\n" + text + "\n")
        os.replace(args.md + ".tmp", args.md)


if __name__ == "__main__":
    main()
