"""int4/int8 matmul on the CPU: a small C kernel (cpu_gemv.c, AVX2), made for decode's M = 1.

Decode on a CPU is nothing but GEMVs, and torch's packed ops leave bandwidth unused there:
`_weight_int4pack_mm_for_cpu` is compute-bound on AVX2 (about a third of the memory bandwidth
at M = 1) and `_weight_int8pack_mm` reaches about half of it in a whole model
(bench/results/cpu.md). The kernel is compiled with the system C compiler on first use into the
cache ($XDG_CACHE_HOME/qlite/kernels, keyed by a hash of the source and flags) and called
through ctypes. Where it cannot be had (no compiler, no AVX2, QLITE_CPU_KERNEL=0), `available()`
is False and callers keep torch's ops; `why_unavailable()` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lib = None
_why = None  # the reason it is unavailable, once known


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str | None:
    _load()
    return _why


def supports(bits: int, in_features: int) -> bool:
    """Whether the kernel takes this layer: int4 always, int8 when K is a multiple of 32."""
    return bits == 4 or in_features % 32 == 0


def quant_matmul(x: torch.Tensor, qweight, scales, zeros, bits: int, group_size: int, bias=None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (float32/bfloat16/float16, contiguous) @ dequantized W.T (+ bias) -> [M, N] in
    x's dtype, the arguments as reference.quant_matmul's. Activations are taken per group as
    int16 times a float scale (finer than bfloat16): error about 5e-5 of the float32 result."""
    lib = _lib or _load()
    if lib is None:
        raise RuntimeError(f"the C CPU kernel is unavailable: {_why}")
    m, k = x.shape
    n = qweight.shape[0]
    if not supports(bits, k):
        raise ValueError(f"cpu_gemv: int{bits} with K={k} (int8 needs K % 32 == 0)")
    y = torch.empty(m, n, dtype=x.dtype) if out is None else out
    # The C code reads raw memory: anything but contiguous CPU tensors would be read wrong.
    if not (x.is_contiguous() and y.is_contiguous() and y.shape == (m, n) and y.dtype == x.dtype
            and not x.is_cuda and qweight.is_contiguous() and scales.is_contiguous()
            and scales.dtype == torch.float16 and (zeros is None or zeros.is_contiguous())):
        raise ValueError(f"cpu_gemv: x {tuple(x.shape)}, out {tuple(y.shape)} {y.dtype} and the "
                         f"weights must be contiguous CPU tensors, out [M, N] in x's dtype, "
                         f"scales float16")
    rc = lib.quant_matmul(x.data_ptr(), _DTYPES[x.dtype], bits, qweight.data_ptr(),
                          scales.data_ptr(), None if zeros is None else zeros.data_ptr(),
                          None if bias is None else bias.data_ptr(),
                          0 if bias is None else _DTYPES[bias.dtype],
                          y.data_ptr(), _DTYPES[x.dtype], m, n, k, group_size or 0)
    if rc:
        raise MemoryError(f"cpu_gemv: no memory for a [{m}, {k}] activation copy")
    return y


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    try:
        _lib = _build()
        f = _lib.quant_matmul
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64]
        f.restype = ctypes.c_int
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _lib, _why = None, str(e)
    return _lib


def _build() -> ctypes.CDLL:
    if os.environ.get("QLITE_CPU_KERNEL", "1") == "0":
        raise RuntimeError("QLITE_CPU_KERNEL=0")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise RuntimeError(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, needs AVX2")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc] + FLAGS).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    lib = Path(base) / "qlite" / "kernels" / f"cpu_gemv-{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # built aside, renamed whole
            out = Path(tmp) / lib.name
            r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True,
                               text=True, timeout=120)
            if r.returncode:
                raise RuntimeError(f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[-300:]}")
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
