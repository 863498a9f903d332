"""A small autotuner: time each candidate config once per problem key and keep the fastest.

The launchers tune themselves through this rather than with @triton.autotune because a
split-K launch is a kernel plus a reduction, and the pair is what must be timed. Under
TRITON_INTERPRET=1 timings mean nothing and cost minutes, so the first config is taken.
"""
import os

import torch
import triton

_best: dict = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether kernels upcast tl.dot operands to float32 (and multiply them as 3xTF32, a
    float32-accurate product on tensor cores): for float32 activations, so results match the
    float32 reference, and for bfloat16 under the interpreter, whose bfloat16 tl.dot multiplies
    the raw bits (triton 3.9). The operands are rounded to the activation dtype first, so the
    numbers are those of a bfloat16 dot with float32 accumulation."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def pick(key: tuple, configs: list, run) -> dict:
    """The fastest of configs (dicts) for key; run(config) launches once with that config."""
    if interpreting() or len(configs) == 1:
        return configs[0]
    best = _best.get(key)
    if best is None:
        times = []
        for c in configs:
            try:
                times.append(triton.testing.do_bench(lambda: run(c), warmup=5, rep=25))
            except Exception:  # a config the device cannot compile (e.g. out of shared memory)
                times.append(float("inf"))
        best = _best[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return best
