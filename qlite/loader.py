"""`qlite.load`: a model directory -> a ready Qwen2 on the chosen device and dtype.

The model is built on the `meta` device (no memory), the checkpoint's headers are checked
against it, then each tensor is read with plain file reads and moved to its device and dtype;
a tensor that changes dtype is converted a block of rows at a time. Peak memory is therefore
the loaded model plus one block (bfloat16 from a float32 checkpoint: about half the file).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from qlite.checkpoint import (TensorReader, check_run, check_tensors, read_checkpoint, set_tensor,
                              tensor_sources)
from qlite.config import load_config, resolve_dtype
from qlite.errors import QliteError, QliteWarning
from qlite.model import Qwen2
from qlite.offload import offload_experts
from qlite.plan import make_plan
from qlite.kernels import cpu_gemv
from qlite.quant.linear import QuantLinear
from qlite.quant.swap import QuantConfig, swap_to_quantized
from qlite.tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_QUANT_PARAMS = (".scales", ".zeros")
CONVERT_ELEMENTS = 1 << 22  # a tensor changing dtype or device is moved 4M elements at a time


def resolve_device(device) -> torch.device:
    """The device to run on: "cpu", "cuda" or "cuda:N"; None is cuda when there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise QliteError(f"device {str(device)!r}: choose cpu or cuda (cuda:N for one GPU of "
                         "several)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QliteError(f"device {str(device)!r}: CUDA is not available on this machine")
    return dev


def resolve_model_dir(path, progress: Progress | None = None) -> Path:
    if str(path) == "demo":
        from qlite.pull import pull_demo
        return pull_demo(progress=progress)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise QliteError(f"{path}: no such model directory")
    return path


def load_weights(model: nn.Module, model_dir: Path, place: Callable[[str], object],
                 dtype: torch.dtype, progress: Progress | None = None):
    """Fill a meta-device model from the checkpoint in model_dir, tensor by tensor.
    `place(name)` gives each model tensor's device. Floating-point tensors take `dtype`;
    integer (packed) tensors and quantization scales and zeros keep theirs."""
    tensors = read_checkpoint(model_dir)
    sources = tensor_sources(model, tensors)
    check_tensors(model, sources, tensors, model_dir)
    params = model.state_dict(keep_vars=True)
    total = sum(tensors[n].nbytes for parts in sources.values() for n, _ in parts if n in tensors)
    done = 0
    reader = TensorReader(tensors)

    def read(name, device):
        info = tensors[name]
        # Quantization scales and zeros keep their float16: bfloat16 would round them.
        cast = info.torch_dtype.is_floating_point and not name.endswith(_QUANT_PARAMS)
        target = dtype if cast else info.torch_dtype
        if device.type == "cpu" and target == info.torch_dtype:
            return reader.rows(name)  # read straight into the tensor the model keeps
        out = torch.empty(info.shape, dtype=target, device=device)
        if not info.shape:
            return out.copy_(reader.rows(name))
        step = max(1, CONVERT_ELEMENTS * info.shape[0] // max(out.numel(), 1))
        for r0 in range(0, info.shape[0], step):
            r1 = min(info.shape[0], r0 + step)
            out[r0:r1].copy_(reader.rows(name, r0, r1))
        return out

    try:
        for key, parts in sources.items():
            if model.config.tie_word_embeddings and key == "lm_head.weight":
                continue
            device = place(key)
            if parts[0][1] is None:
                value = read(parts[0][0], device)
            else:
                like = params[key]
                value = torch.empty(like.shape, device=device,
                                    dtype=dtype if like.is_floating_point() else like.dtype)
                for name, index in parts:
                    value[index] = read(name, device)
            set_tensor(model, key, value)
            done += sum(tensors[n].nbytes for n, _ in parts)
            if progress:
                progress("loading weights", done, total)
    finally:
        reader.close()


def load(path="demo", device=None, dtype=None, context: int | None = None,
         progress: Progress | None = None, gpu_budget=None, expert_slots: int | None = None,
         prefetch: bool = True, backend: str = "qlite", bnb_bits: int = 4,
         compile: bool = False) -> Qwen2:
    """Load a Qwen2 / Qwen2-MoE model directory (or "demo") ready for inference.

    `model(input_ids)` gives logits; `model.generate(messages)` streams a chat reply.
    `device` defaults to cuda when there is one. `context` caps the context window
    (default: the config's max_position_embeddings).
    `gpu_budget` (bytes or "24GiB") or `expert_slots` keep the routed experts of an MoE model
    in CPU memory with a device cache of experts (see qlite/offload.py).
    `backend="bnb"` swaps in bitsandbytes NF4 (`bnb_bits=4`) or int8 linears: the baseline.
    `compile=True` runs the decode step under torch.compile (see Qwen2.compile_decode)."""
    device = resolve_device(device)
    if backend not in ("qlite", "bnb"):
        raise QliteError(f"backend {backend!r}: choose qlite or bnb")
    model_dir = resolve_model_dir(path, progress)
    config = load_config(model_dir)
    if backend == "bnb" and config.quantization:
        raise QliteError(f"{model_dir}: already quantized (int{config.quantization.get('bits')} "
                         "by qlite quantize); the bnb backend quantizes a 16-bit checkpoint")
    dtype = resolve_dtype(dtype, device, quantized=bool(config.quantization))
    offload = (gpu_budget is not None or expert_slots is not None)
    if offload:
        if not config.is_moe:
            raise QliteError(f"gpu_budget/expert_slots: {model_dir} is not an MoE model")
        plan = make_plan(config, gpu_budget, expert_slots,
                         context or config.max_position_embeddings, device, dtype)
    with torch.device("meta"):
        model = Qwen2(config)
    if config.quantization:
        swap_to_quantized(model, QuantConfig.from_dict(config.quantization,
                                                       str(model_dir / "config.json")), dtype)
        if device.type == "cpu":  # build the CPU kernel now rather than at the first token
            if not cpu_gemv.available():
                warnings.warn(f"{model_dir}: the CPU int4/int8 kernel is unavailable "
                              f"({cpu_gemv.why_unavailable()}); torch's slower ops are used",
                              QliteWarning, stacklevel=2)
    if config.quantization and config.quantization.get("run_id"):
        check_run(model_dir, config.quantization["run_id"])
    # With offloading the plan keeps routed experts (maybe the embedding) in host memory.
    place = plan.place if offload else (lambda key: device)
    if config.quantization and "source" in config.quantization:  # GPTQ / AWQ, repacked here
        from qlite.gptq_awq import load_weights as load_imported
        load_imported(model, model_dir, place, dtype, progress)
    else:
        load_weights(model, model_dir, place, dtype, progress)
    if config.quantization and device.type == "cpu":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.prepare_cpu(dtype)  # torch's ops' layout, where the C kernel cannot serve
    if backend == "bnb":
        from qlite.bnb import to_bitsandbytes
        to_bitsandbytes(model, bits=bnb_bits)
    if offload:
        offload_experts(model, plan, prefetch=prefetch)
    model.tie_weights()
    model.eval()
    model.tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() \
        else None
    model.model_dir = model_dir
    if context is not None:
        if not 0 < context <= config.max_position_embeddings:
            raise QliteError(f"context {context}: must be between 1 and "
                             f"max_position_embeddings={config.max_position_embeddings}")
        model.max_context = context
    if compile:
        model.compile_decode()
    return model
