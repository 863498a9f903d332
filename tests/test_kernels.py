"""Every Triton kernel against its PyTorch reference.

On the CPU the kernels run under TRITON_INTERPRET=1. Triton decides interpreter or compiler
when a kernel is decorated, i.e. when qlite.kernels is first imported, and other test files may
import it first in this process; so the interpreter cases run once, all together, in a child
Python started with the variable set (this file run as a script), and each case is reported
here as its own test.

Inputs are fresh random each run (the seed is in every failure message); outputs are filled
with NaN before the call, so a tile left unwritten fails. Error = max|out - ref| / max|ref|,
ref in float32. Bounds: float32 1e-3; bfloat16 1.6e-2 and float16 2e-3, i.e. four units of
roundoff (u = 2^-8, 2^-11): the output is rounded to the activation dtype (up to u), and tl.dot
rounds the dequantized weight to it (about u more, relative to the output norm). Fused MoE
doubles the 16-bit bounds: two chained products with the intermediate stored in that dtype.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

TOL = {"float32": 1e-3, "bfloat16": 1.6e-2, "float16": 2e-3}
MOE_TOL = {"float32": 1e-3, "bfloat16": 3.2e-2, "float16": 4e-3}
# (bits, group_size, has_zeros); int8 is per channel and symmetric.
FORMATS = [(4, 32, True), (4, 64, True), (4, 128, True), (4, 128, False), (8, 0, False)]
K_FOR = {32: 224, 64: 192, 128: 384, 0: 333}  # multiples of the group, not of the block sizes
N = 77  # not a multiple of any BLOCK_N


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def _fmt(bits, g, z):
    return f"int{bits}" + (f"-g{g}-{'asym' if z else 'sym'}" if bits == 4 else "")


def _cases():
    """(kernel, fmt, M, dtype, forced config or None) for every interpreter case."""
    cases = []
    for f in FORMATS:
        for m in (1, 3, 5, 16):  # 1 and 3: CUDA-core kernel (BLOCK_M 1 and 4); 5, 16: tensor cores
            for dt in ("float32", "bfloat16", "float16"):
                cases.append(("qgemv", f, m, dt, None))
        # split-K, reduced in the kernel by the last program of each tile
        for m in (1, 3, 16):
            cases.append(("qgemv", f, m, "bfloat16", "split"))
        for m in (1, 3, 16, 64):
            for dt in ("float32", "bfloat16", "float16"):
                cases.append(("qgemm", f, m, dt, None))
        cases.append(("qgemm", f, 64, "float32", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)))
        for t in (1, 3, 16, 64):
            cases.append(("fused_moe", f, t, "float32", None))
        cases.append(("fused_moe", f, 16, "bfloat16", None))
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)
        cases.append(("fused_moe", f, 64, "float32", cfg))
    cases.append(("fused_moe", (4, 128, True), 3, "float16", None))
    return cases


def _case_id(c):
    kernel, f, m, dt, cfg = c
    tag = "" if cfg is None else "-splitk" if cfg == "split" else "-cfg" + "x".join(str(v) for v in cfg.values())
    return f"{kernel}-{_fmt(*f)}-M{m}-{dt}{tag}"


def _rand_weight(lead, n, k, bits, g, has_zeros, gen):
    """Random packed tensors of the documented shapes; codes cover the full range."""
    if bits == 8:
        qw = torch.randint(-127, 128, (*lead, n, k), dtype=torch.int8, generator=gen)
        s = (torch.rand(*lead, n, generator=gen) * 0.02 + 0.002).half()
        return qw, s, None
    qw = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, generator=gen)
    s = (torch.rand(*lead, k // g, n, generator=gen) * 0.1 + 0.01).half()
    z = (torch.rand(*lead, k // g, n, generator=gen) * 15).half() if has_zeros else None
    return qw, s, z


def _run_case(c, gen):
    from qlite.kernels import reference
    from qlite.kernels.fused_moe import fused_moe
    from qlite.kernels.gemm import qgemm
    from qlite.kernels.gemv import qgemv

    kernel, (bits, g, has_zeros), m, dt, cfg = c
    dtype = getattr(torch, dt)
    if kernel == "fused_moe":
        e, topk = 8, 3
        d, inter = (96, 64) if g in (0, 32) else (128, g)
        w13 = _rand_weight((e,), 2 * inter, d, bits, g, has_zeros, gen)
        w2 = _rand_weight((e,), d, inter, bits, g, has_zeros, gen)
        x = torch.randn(m, d, generator=gen).to(dtype)
        ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(m)])
        wts = torch.rand(m, topk, generator=gen).softmax(-1)
        out = torch.full((m, d), float("nan"), dtype=dtype)
        fused_moe(x, ids, wts, w13, w2, bits, g, out=out, config=cfg)
        ref = reference.fused_moe(x.float(), ids, wts, w13, w2, bits, g)
    else:
        k = 320 if kernel == "qgemv" and bits == 8 and m <= 4 else K_FOR[g]  # int8 on CUDA cores: K % 64 == 0
        w = _rand_weight((), N, k, bits, g, has_zeros, gen)
        x = torch.randn(m, k, generator=gen).to(dtype)
        out = torch.full((m, N), float("nan"), dtype=dtype)
        if cfg == "split":  # the launcher's first tile, K in 3 slices
            from qlite.kernels.gemv import configs
            cfg = dict(configs(m, N, k, bits, g or 128, 8)[0], SPLIT_K=3)
        (qgemv if kernel == "qgemv" else qgemm)(x, *w, bits, g, out=out, config=cfg)
        ref = reference.quant_matmul(x.float(), *w, bits, g)
    if torch.isnan(out).any():
        return float("inf")
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def _child(seed):
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for c in _cases():
        try:
            results[_case_id(c)] = _run_case(c, gen)
        except Exception as exc:  # reported by the case's own test
            results[_case_id(c)] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    seed = random.randrange(1 << 30)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)  # qlite, installed or not
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(seed)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return seed, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_kernel_matches_reference_under_interpreter(interpreted, case):
    seed, results = interpreted
    err = results[_case_id(case)]
    assert not isinstance(err, str), f"seed {seed}: {err}"
    tol = (MOE_TOL if case[0] == "fused_moe" else TOL)[case[3]]
    assert err <= tol, f"seed {seed}: relative error {err:.3g} > {tol}"


def test_moe_align_block_size_groups_slots_by_expert():
    from qlite.kernels.reference import moe_align_block_size

    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for t, k, e, bm in ((1, 8, 64, 16), (5, 2, 4, 4), (64, 3, 8, 16), (7, 1, 3, 1)):
        ids = torch.randint(0, e, (t, k), generator=gen)
        sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, bm, e)
        flat = ids.flatten()
        used = int(num_padded)
        assert used % bm == 0 and sorted_ids.numel() >= used and sorted_ids.numel() % bm == 0
        real = sorted_ids[:used][sorted_ids[:used] < t * k]
        assert sorted(real.tolist()) == list(range(t * k))  # every slot exactly once
        assert (sorted_ids[used:] == t * k).all()
        for b in range(used // bm):
            block = sorted_ids[b * bm:(b + 1) * bm]
            block = block[block < t * k]
            assert len(block) > 0 and (flat[block] == expert_ids[b]).all()
        assert (expert_ids[used // bm:] == -1).all()
        counts = torch.bincount(flat, minlength=e)
        assert used == int(((counts + bm - 1) // bm * bm).sum())


# ---- compiled for a real GPU, without one (bench/kernel_sass.py) -------------------------------

# Budgets of the main loop on sm_90, in thread-instructions per weight (bench/kernel_sass.py's
# docstring: an H200 issues ~3.5 per int4 weight at full bandwidth, ~7 per int8 weight), for the
# decode kernels. The int4 figures reached are 3.45 at M = 1 and 4.97 on tensor cores (M >= 3,
# bench/results/kernel_sass.md); the bounds leave a little room for ptxas scheduling
# differences. Prefill GEMM and batched fused MoE have no budget: they must read every weight
# through 16-byte loads too.
STATIC = [  # (case name prefix as kernel_sass.py names it, instructions-per-weight budget or None)
    ("qgemv-int4-g128-asym-bfloat16-M1-", 3.75),
    ("qgemv-int4-g128-sym-float16-M1-", 3.75),
    ("qgemv-int8-bfloat16-M1-", 6.5),
    ("moe-gateup-int4-g128-asym-bfloat16-decode", 3.75),
    ("qgemv-int4-g128-asym-bfloat16-M16-", 5.25),  # tensor cores, the 16-bit tile: 4.97
    ("qgemm-int4-g128-asym-bfloat16-64x128x64", None),
    ("moe-gateup-int4-g128-asym-bfloat16-16x", None),
    ("moe-down-int4-g128-asym-bfloat16-64x", None),
]


@pytest.fixture(scope="module")
def sass():
    """The STATIC cases compiled for sm_90 by triton's own compiler, here on the CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--sass"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip("this triton build cannot compile for CUDA here (no ptxas)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sass_child():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import kernel_sass

    chosen = []
    for prefix, _ in STATIC:  # the first case of each prefix: the launcher's first choice
        chosen.append(next(c for c in kernel_sass.cases(("bfloat16", "float16")) if c.name.startswith(prefix)))
    done = kernel_sass.run_all(chosen, [90], jobs=2)
    print(json.dumps({prefix: dict(name=c.name, **c.result) for (prefix, _), c in zip(STATIC, done)}))


@pytest.mark.parametrize("prefix,budget", STATIC, ids=[p for p, _ in STATIC])
def test_sm90_machine_code_has_no_spills_and_wide_weight_loads(sass, prefix, budget):
    """No register spills; every kernel reads every weight through 16-byte loads; the decode
    kernels spend at most `budget` instructions per weight in their main loop; the tensor-core
    kernels' main loops multiply with MMA, with 64-row tiles Hopper's HGMMA (wgmma)."""
    r = sass[prefix]
    assert "error" not in r, r
    assert r["stack"] == 0 and r["spill"] == 0, r
    assert r["w128"] >= 1.0, f"{r['name']}: weights not all in 16-byte loads: {r}"
    if budget is not None:
        assert r["ipw"] <= budget, f"{r['name']}: {r['ipw']} instructions per weight > {budget}"
    if budget is None or "-M16-" in prefix:  # prefill, batched MoE, decode from 3 rows: tensor cores
        assert r["mma"] > 0, f"{r['name']}: no MMA in the main loop: {r}"
    if prefix.startswith(("qgemm", "moe-down-int4-g128-asym-bfloat16-64x", "qgemv-int4-g128-asym-bfloat16-M16")):
        assert r["wgmma"], f"{r['name']}: no HGMMA (Hopper's wgmma, 64-row tiles) in the main loop: {r}"


# ---- tinygemm (torch's CUDA int4 matmul) as a second backend, chosen per shape -------------------

def test_tinygemm_repack_stands_for_the_same_weights_in_torchs_cpu_int4_op():
    """kernels/tinygemm.py's repack: the nibble-swapped codes read with the even k high (the
    convention of torch's CUDA packer) are qlite's codes, and its (scale, offset) pairs make
    torch's CPU int4 op (same pairs, same w = (q - 8) * scale + offset) compute qlite's matmul.
    Bounds: against the weights the pairs stand for, bfloat16 output rounding (2^-8 of the
    largest output, two units); against qlite's reference, also the pairs' own rounding to
    bfloat16 (TOL, four units)."""
    from qlite.kernels import reference, tinygemm

    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    n, k = 48, 256
    for g, has_zeros in ((32, True), (128, True), (128, False), (64, True)):
        qw, s, z = _rand_weight((), n, k, 4, g, has_zeros, gen)
        swapped = tinygemm.swap_nibbles(qw)
        codes = torch.stack((swapped >> 4, swapped & 15), dim=-1).flatten(-2)
        assert torch.equal(codes, reference.unpack_int4(qw))
        sz = tinygemm.scales_and_offsets(s, z)
        assert sz.shape == (k // g, n, 2) and sz.dtype == torch.bfloat16 and sz.is_contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz).float()
        scale, offset = (sz[..., i].float().T.repeat_interleave(g, dim=1) for i in (0, 1))
        stands_for = x.float() @ ((codes.float() - 8) * scale + offset).T
        assert (out - stands_for).abs().max() <= 2 ** -8 * stands_for.abs().max()
        ref = reference.quant_matmul(x.float(), qw, s, z, 4, g)
        assert (out - ref).abs().max() <= TOL["bfloat16"] * ref.abs().max()


@pytest.fixture
def backends(tmp_path, monkeypatch):
    """kernels/ops.py's backend choice with fakes: no GPU. The two backends record their calls;
    the timer runs what it is given once and reports the time set for that backend."""
    from torch.utils.weak import WeakIdKeyDictionary

    from qlite.kernels import autotune, ops

    monkeypatch.setenv("QLITE_CACHE", str(tmp_path))
    monkeypatch.delenv("QLITE_TUNE", raising=False)
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(autotune, "_machine", lambda device: "Test GPU | triton 0")
    monkeypatch.setattr(ops, "_backend", autotune.Plans("int4-backend"))
    monkeypatch.setattr(ops, "_packs", WeakIdKeyDictionary())
    calls, timed, ms = [], [], {"triton": 2.0, "tinygemm": 1.0}
    monkeypatch.setattr(ops.tinygemm, "pack", lambda qw, s, z: calls.append("pack") or ("packed", qw))
    monkeypatch.setattr(ops.tinygemm, "matmul", lambda x, pack, g: calls.append("tinygemm") or "tinygemm")

    def timer(fn):
        n = len(calls)
        fn()
        name = calls[n:][-1]
        timed.append(name)
        return ms[name]

    monkeypatch.setattr(autotune, "_time", timer)

    def launch(x, qw, s, z, bits, g):
        calls.append("triton")
        return "triton"

    def weight():
        return torch.zeros(64, 16, dtype=torch.uint8), torch.ones(1, 64), None

    return ops, launch, weight, calls, timed, ms, tmp_path


def _choose(ops, launch, w, m=1):
    key = (m, 64, 32, 32, True, torch.bfloat16, torch.device("cuda"))
    x = torch.zeros(m, 32)
    use = ops._backend.get(key) or ops.choose_backend(key, x, *w, 32, launch)
    return use, ops.backend_matmul(use, x, *w, 32, launch)


def test_backend_choice_without_tuning_or_record_is_qlite_and_times_nothing(backends):
    ops, launch, weight, calls, timed, ms, _ = backends
    w = weight()
    assert _choose(ops, launch, w) == ("triton", "triton")
    assert timed == [] and "pack" not in calls and w[0] not in ops._packs


def test_backend_choice_is_timed_once_recorded_and_repacks_only_when_chosen(backends, monkeypatch):
    import json

    from qlite.kernels import autotune
    ops, launch, weight, calls, timed, ms, cache = backends
    monkeypatch.setenv("QLITE_TUNE", "1")
    w = weight()
    assert _choose(ops, launch, w) == ("tinygemm", "tinygemm")  # 1.0 ms against 2.0
    assert sorted(timed) == ["tinygemm", "triton"] and calls.count("pack") == 1
    assert w[0] in ops._packs
    record = json.loads((cache / "kernel-plans.json").read_text())["Test GPU | triton 0"]
    assert [v for k, v in record.items() if k.startswith("int4-backend(1, 64, 32, 32, True")] == [1]
    timed.clear()
    assert _choose(ops, launch, w) == ("tinygemm", "tinygemm")  # looked up: no timing, no repack
    assert timed == [] and calls.count("pack") == 1
    # Where qlite's kernel is faster (16 rows here), tinygemm's copy made for the timing goes.
    ms["triton"] = 0.5
    w2 = weight()
    assert _choose(ops, launch, w2, m=16) == ("triton", "triton")
    assert sorted(timed) == ["tinygemm", "triton"] and w2[0] not in ops._packs
    # A later process without tuning follows the record, and repacks on first use.
    monkeypatch.delenv("QLITE_TUNE")
    monkeypatch.setattr(autotune, "_disk", None)
    monkeypatch.setattr(ops, "_backend", autotune.Plans("int4-backend"))
    timed.clear()
    w3 = weight()
    assert _choose(ops, launch, w3) == ("tinygemm", "tinygemm")
    assert _choose(ops, launch, w3, m=16) == ("triton", "triton")
    assert timed == [] and calls.count("pack") == 3 and w3[0] in ops._packs


# ---- the decode kernel's inline PTX, executed by a small emulator ---------------------------------
# The interpreter runs the kernels' float32 branch, not their PTX blocks; these run the PTX text
# itself, instruction by instruction, with PTX's semantics (16-bit results rounded to nearest
# even), so a wrong selector, mask or constant in kernels/gemv.py fails here without a GPU.

def _f16bits(v, half):
    dt = torch.float16 if half else torch.bfloat16
    return int(torch.tensor([v], dtype=torch.float64).to(torch.float32).to(dt).view(torch.int16)[0]) & 0xFFFF


def _f16val(b, half):
    return float(torch.tensor([b if b < 0x8000 else b - 0x10000], dtype=torch.int16).view(
        torch.float16 if half else torch.bfloat16)[0])


def _f32(b):
    return float(torch.tensor([b if b < 1 << 31 else b - (1 << 32)], dtype=torch.int32).view(torch.float32)[0])


def _run_ptx(text, args):
    """Execute one of gemv.py's asm blocks. args: {"$i": int} inputs; returns the registers."""
    import re
    regs = dict(args)

    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if re.match(r"^(0x[0-9A-Fa-f]+|\d+)$", tok) else regs[tok]

    for ins in text.split(";"):
        ins = ins.strip(" \n{}").strip()
        if not ins:
            continue
        op, _, rest = ins.partition(" ")
        if op.startswith(".reg"):
            continue
        m = re.match(r"\{(\S+), (\S+)\}, (\S+)", rest)
        if op in ("mov.b64", "mov.b32") and m:  # unpack a 64-bit (or 32-bit) register into halves
            v, bits = val(m[3]), 32 if op == "mov.b64" else 16
            regs[m[1]], regs[m[2]] = v & ((1 << bits) - 1), v >> bits
            continue
        ops = [o.strip() for o in rest.split(",")]
        d, a = ops[0], [val(o) for o in ops[1:]]
        if op == "mov.b32":
            r = a[0]
        elif op == "prmt.b32":
            pool = a[0] | (a[1] << 32)
            r = sum(((pool >> (8 * ((a[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            assert a[3] == 0xEA  # (a & b) | c
            r = (a[0] & a[1]) | a[2]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "shl.b32":
            r = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "add.f32":
            r = int(torch.tensor([_f32(a[0]) + _f32(a[1])], dtype=torch.float32).view(torch.int32)[0]) & 0xFFFFFFFF
        elif op == "cvt.f32.f16":
            r = int(torch.tensor([_f16val(a[0], True)], dtype=torch.float32).view(torch.int32)[0]) & 0xFFFFFFFF
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            half = op == "fma.rn.f16x2"
            r = 0
            for sh in (0, 16):
                x, y, z = (_f16val((v >> sh) & 0xFFFF, half) for v in a)
                r |= _f16bits(x * y + z, half) << sh  # exact in float64, then one rounding
        else:
            raise AssertionError(f"emulator: unknown instruction {op}")
        regs[d] = r
    return regs


@pytest.mark.parametrize("half", [False, True], ids=["bf16", "fp16"])
def test_decode_ptx_blocks_compute_the_documented_sums(half):
    from qlite.kernels import gemv

    pairs = str(getattr(gemv._PAIRS_F16 if half else gemv._PAIRS_BF16, "value", None) or
                (gemv._PAIRS_F16 if half else gemv._PAIRS_BF16))
    dot8 = str(getattr(gemv._DOT8_F16 if half else gemv._DOT8_BF16, "value", None) or
               (gemv._DOT8_F16 if half else gemv._DOT8_BF16))
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for _ in range(20):
        x = torch.randn(8, generator=gen).to(torch.float16 if half else torch.bfloat16)
        xb = [int(v) & 0xFFFF for v in x.view(torch.int16)]
        xa_word = xb[0] | xb[1] << 16 | xb[2] << 32 | xb[3] << 48  # x[8c..8c+3] as one int64
        xb_word = xb[4] | xb[5] << 16 | xb[6] << 32 | xb[7] << 48
        r = _run_ptx(pairs, {"$5": xa_word, "$6": xb_word})
        assert abs(_f32(r["$4"]) - x.double().sum().item()) <= 2e-2 * x.double().abs().sum().item()
        nib = torch.randint(0, 16, (8,), generator=gen)
        w = sum(int(n) << (4 * i) for i, n in enumerate(nib))  # nibble i is k = 8c + i (formats.py)
        out = _run_ptx(dot8, {"$1": w, "$2": r["$0"], "$3": r["$1"], "$4": r["$2"], "$5": r["$3"]})
        exact = ((nib.double() - 8) * x.double()).sum().item()
        bound = (2 ** -10 if half else 2 ** -7) * 4 * ((nib.double() - 8).abs() * x.double().abs()).sum().item()
        assert abs(_f32(out["$0"]) - exact) <= bound, (nib.tolist(), x.tolist(), _f32(out["$0"]), exact)


@pytest.mark.parametrize("half", [False, True], ids=["bf16", "fp16"])
def test_tensor_core_tile_ptx_gives_each_weight_in_k_order(half):
    """kernels/dequant.py's _TILE_ASM: one int4 word and its group's scale pair -> the word's 8
    weights (n - 8) * s, rounded once to the 16-bit type, two per register in k order."""
    from qlite.kernels import dequant

    text = str(getattr(dequant.TILE_F16 if half else dequant.TILE_BF16, "value", None) or
               (dequant.TILE_F16 if half else dequant.TILE_BF16))
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for _ in range(20):
        nib = torch.randint(0, 16, (8,), generator=gen)
        w = sum(int(n) << (4 * i) for i, n in enumerate(nib))  # nibble i is k = 8c + i (formats.py)
        scale = float((torch.rand(1, generator=gen) * 0.1 + 0.001).half())
        sb = _f16bits(scale, half)
        out = _run_ptx(text, {"$4": w, "$12": sb | sb << 16})
        got = [(out[f"${k // 2}"] >> (16 * (k % 2))) & 0xFFFF for k in range(8)]
        want = [_f16bits((int(n) - 8) * _f16val(sb, half), half) for n in nib]
        assert got == want, (nib.tolist(), scale)


# ---- CUDA: run when a GPU is lent --------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: _fmt(*f))
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
def test_cuda_matmul_kernels_match_reference(fmt, m, dt):
    from qlite.kernels import reference
    from qlite.kernels.gemm import qgemm
    from qlite.kernels.gemv import qgemv

    bits, g, has_zeros = fmt
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for n, k in ((N, K_FOR[g]), (1000, 1024 if bits == 4 else 1000)):
        w = [t.cuda() if t is not None else None for t in _rand_weight((), n, k, bits, g, has_zeros, gen)]
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dt)).cuda()
        ref = reference.quant_matmul(x.float(), *w, bits, g)
        kernels = (qgemv, qgemm) if m <= 16 else (qgemm,)
        for kern in kernels:
            out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
            kern(x, *w, bits, g, out=out)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err <= TOL[dt], f"{kern.__name__} n={n} k={k}: {err:.3g}"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: _fmt(*f))
@pytest.mark.parametrize("t", [1, 16, 200])
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_cuda_fused_moe_matches_reference(fmt, t, dt):
    from qlite.kernels import reference
    from qlite.kernels.fused_moe import fused_moe

    bits, g, has_zeros = fmt
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    e, topk, d, inter = 64, 8, 256, 128
    w13 = [x.cuda() if x is not None else None for x in _rand_weight((e,), 2 * inter, d, bits, g, has_zeros, gen)]
    w2 = [x.cuda() if x is not None else None for x in _rand_weight((e,), d, inter, bits, g, has_zeros, gen)]
    x = torch.randn(t, d, generator=gen).to(getattr(torch, dt)).cuda()
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(t)]).cuda()
    wts = torch.rand(t, topk, generator=gen).softmax(-1).cuda()
    out = torch.full((t, d), float("nan"), dtype=x.dtype, device="cuda")
    fused_moe(x, ids, wts, w13, w2, bits, g, out=out)
    ref = reference.fused_moe(x.float(), ids, wts, w13, w2, bits, g)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err <= MOE_TOL[dt], f"{err:.3g}"


if __name__ == "__main__":
    _sass_child() if sys.argv[1] == "--sass" else _child(int(sys.argv[1]))
