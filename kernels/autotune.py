"""Launch plans: which config a launcher uses for a shape, chosen once and then looked up.

A launcher builds, per shape, a short whitelist of configs (best guess first) and turns each into
a plan (kernel, grid, constexprs). `Plans.put` picks one:
  - the choice recorded on disk for this GPU, triton version and shape, if any;
  - else, with QLITE_TUNE=1 (bench/gpu.sh sets it), the fastest plan, timed once and recorded;
  - else the first (no timing: tests and first runs never tune).
After that a call costs a dictionary lookup and the launch. The disk cache is
$QLITE_CACHE (default ~/.cache/qlite)/kernel-plans.json: {"<gpu> | triton <v>": {shape: index}}.
Under TRITON_INTERPRET=1 the first plan is always taken.
"""
import hashlib
import json
import os

import torch

_disk: dict | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether kernels upcast tl.dot operands to float32 (and multiply them as 3xTF32, a
    float32-accurate product on tensor cores): for float32 activations, so results match the
    float32 reference, and for bfloat16 under the interpreter, whose bfloat16 tl.dot multiplies
    the raw bits (triton 3.9). The operands are rounded to the activation dtype first, so the
    numbers are those of a bfloat16 dot with float32 accumulation."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _path():
    return os.path.join(os.environ.get("QLITE_CACHE", os.path.expanduser("~/.cache/qlite")), "kernel-plans.json")


def _machine(device) -> str:
    import triton
    return f"{torch.cuda.get_device_name(device)} | triton {triton.__version__}"


def _load():
    global _disk
    if _disk is None:
        try:
            with open(_path()) as f:
                _disk = json.load(f)
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _save():
    path = _path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_disk, f, indent=0, sort_keys=True)
    os.replace(tmp, path)


class Plans:
    """One launcher's chosen plans, by shape key (a tuple whose last item is the device)."""

    def __init__(self, name: str):
        self.name = name
        self._mem: dict = {}

    def get(self, key):
        return self._mem.get(key)

    def put(self, key, plans: list, run):
        """Choose among plans (run(plan) launches one) and remember the choice for key."""
        choice = 0
        device = key[-1]
        if len(plans) > 1 and device.type == "cuda" and not interpreting():
            names = repr([p if isinstance(p, dict) else [getattr(v, "__name__", v) for v in p]
                          for p in plans])  # the whitelist: a change of it invalidates the record
            shape = f"{self.name}{key[:-1]}#{hashlib.sha1(names.encode()).hexdigest()[:8]}"
            machine = _load().setdefault(_machine(device), {})
            if shape in machine and machine[shape] < len(plans):
                choice = machine[shape]
            elif os.environ.get("QLITE_TUNE") == "1":
                choice = _fastest(plans, run)
                machine[shape] = choice
                _save()
        self._mem[key] = plans[choice]
        return plans[choice]


def _time(fn) -> float:
    """Milliseconds a call of fn takes on the GPU (median; tests replace this)."""
    import triton
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _fastest(plans, run):
    times = []
    for p in plans:
        try:
            times.append(_time(lambda: run(p)))
        except Exception:  # a config the device cannot run (e.g. out of shared memory)
            times.append(float("inf"))
    return min(range(len(plans)), key=times.__getitem__)
