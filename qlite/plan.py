"""Placement planner: how many bytes each part of an MoE model needs on the GPU, and how many
routed experts per layer fit in a GPU budget beside them.

Everything except the routed experts must live on the GPU (attention, norms, routers, shared
experts, lm_head, the KV cache for the chosen context, activation workspace); the routed
experts, which are most of the bytes of an MoE model (49 of 57 B parameters in
Qwen2-57B-A14B), live in host memory with a cache of `slots` experts per MoE layer on the GPU.
The embedding is a table lookup of one row per token, so when it is not tied to lm_head the
planner leaves it in host memory and gives its bytes to expert slots.

The numbers are formulas over the config, computed before anything is allocated, so a budget
that cannot work fails at once with the minimum it would take.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlite.config import PREFILL_CHUNK, Config, load_config, resolve_dtype
from qlite.errors import QliteError
from qlite.quant.formats import BITS, packed_bytes
from qlite.quant.swap import QuantConfig

GiB = 2 ** 30
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10,
          "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
ALIGN = 64  # bytes: every per-expert tensor starts on a 64-byte boundary in a slot


def parse_bytes(value, option: str = "gpu_budget") -> int:
    """24GiB, 24GB, 1.5G (decimal unless 'iB'), or an int of bytes. A string needs its unit:
    a bare "24" is refused (bytes? GiB?) rather than guessed."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise QliteError(f"{option} {value!r}: write a size like 24GiB or 16GB")
        if not unit:
            raise QliteError(f"{option} {value!r}: give a unit, e.g. {m.group(1)}GiB "
                             f"(2^30 bytes) or {m.group(1)}GB (10^9 bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise QliteError(f"{option} {value!r}: must be positive")
    return n


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def matrix_bytes(n: int, k: int, bits: int, group_size: int, act_bytes: int,
                 symmetric: bool = False) -> int:
    """Bytes of one [n, k] weight: packed as quant/formats.py says for 4 and 8 bits; 16 bits is
    the activation dtype."""
    if bits in BITS:
        return packed_bytes(n, k, bits, group_size, symmetric)
    return n * k * act_bytes


@dataclass
class Plan:
    """Where an MoE model lives for one budget. Bytes are on the GPU unless named host."""
    device: torch.device
    budget: int | None
    context: int
    bits: int
    parts: dict[str, int]          # GPU bytes per non-expert part (incl. kv cache, workspace)
    expert_bytes: int              # one routed expert, all its tensors
    moe_layers: int
    num_experts: int
    slots: int                     # cached experts per MoE layer
    minimum: int                   # the smallest budget that runs (one slot per MoE layer)
    embed_on_cpu: bool = False
    embed_bytes: int = 0           # the embedding, when the plan may keep it in host memory
    slots_from_budget: bool = False  # not named by --expert-slots: re-derive from real bytes
    prefill_chunk: int = PREFILL_CHUNK
    notes: list[str] = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def expert_cache_bytes(self) -> int:
        return self.slots * self.moe_layers * self.expert_bytes

    @property
    def host_expert_bytes(self) -> int:
        return self.num_experts * self.moe_layers * self.expert_bytes

    @property
    def total(self) -> int:
        return self.fixed_bytes + self.expert_cache_bytes

    def place(self, key: str):
        """Device of one model tensor while loading: routed experts (and the embedding, when
        the plan says so) stay in host memory."""
        if ".experts." in key or (self.embed_on_cpu and key == "model.embed_tokens.weight"):
            return torch.device("cpu")
        return self.device


def estimate_parts(cfg: Config, bits: int, group_size: int, act_bytes: int, context: int,
                   keep_16bit=("embed",), symmetric: bool = False,
                   chunk: int = PREFILL_CHUNK) -> tuple[dict[str, int], int]:
    """(GPU bytes per non-expert part, bytes of one routed expert)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    h, kv, v = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size

    def w(n, k, b=bits):
        return matrix_bytes(n, k, b, group_size, act_bytes, symmetric)

    layers = range(cfg.num_hidden_layers)
    moe = [i for i in layers if cfg.is_moe_layer(i)]
    attn = (w(h * hd, d) + 2 * w(kv * hd, d) + w(d, h * hd)
            + (h + 2 * kv) * hd * act_bytes)  # q/k/v biases stay 16-bit
    dense_mlp = 3 * w(cfg.intermediate_size, d) if cfg.intermediate_size else 0
    shared = 0
    if cfg.shared_expert_intermediate_size:
        shared = 3 * w(cfg.shared_expert_intermediate_size, d) + d * act_bytes  # + its gate
    parts = {
        "attention": attn * cfg.num_hidden_layers,
        "norms": (2 * cfg.num_hidden_layers + 1) * d * act_bytes,
        "routers": len(moe) * cfg.num_experts * d * act_bytes,
        "shared experts": len(moe) * shared,
        "dense mlp": (cfg.num_hidden_layers - len(moe)) * dense_mlp,
        "lm_head": w(v, d, 16 if "lm_head" in keep_16bit else bits),
        "embedding": (0 if cfg.tie_word_embeddings
                      else w(v, d, 16 if "embed" in keep_16bit else bits)),
        "kv cache": 2 * cfg.num_hidden_layers * kv * hd * context * act_bytes,
    }
    # Activations of one forward of `t` tokens, the largest transient sizes at once: the
    # residual stream and fp32 norm temporaries, q/k/v, attention scores (the math path's
    # bound), the MLP or the shared expert plus routed-expert rows, and the logits.
    t = min(chunk, context)
    inter = max(cfg.intermediate_size if len(moe) < cfg.num_hidden_layers else 0,
                cfg.shared_expert_intermediate_size)
    work = (6 * t * d * 4 + t * (h + 2 * kv) * hd * act_bytes * 2 + h * t * context * 4
            + 3 * t * inter * act_bytes
            + t * max(cfg.num_experts_per_tok, 1) * (d + 3 * cfg.moe_intermediate_size) * act_bytes
            + t * v * act_bytes + v * 4)
    parts["workspace"] = int(work * 1.1) + 64 * 2 ** 20  # allocator rounding and kernel scratch
    parts = {k: int(b) for k, b in parts.items() if b}
    expert = sum(-(-b // ALIGN) * ALIGN for b in (w(2 * cfg.moe_intermediate_size, d),
                                                   w(d, cfg.moe_intermediate_size)))
    return parts, expert


def _quant_format(cfg: Config, bits: int | None, group_size: int | None):
    """(bits, group size, kept 16-bit parts, symmetric): the checkpoint's quantization, or what
    `qlite quantize` would write with `bits` (16: not quantized)."""
    if bits is None and cfg.quantization:
        q = QuantConfig.from_dict(cfg.quantization)
    elif bits == 16 or (bits is None and not cfg.quantization):
        return 16, None, (), False
    else:
        q = QuantConfig(bits, group_size) if bits in BITS else None
        if q is None:
            raise QliteError(f"bits {bits}: choose 4, 8 or 16")
    return q.bits, q.group_size, q.keep, q.symmetric


def make_plan(cfg: Config, gpu_budget=None, expert_slots: int | None = None, context: int | None = None,
              device="cuda", dtype: torch.dtype = torch.bfloat16, bits: int | None = None,
              group_size: int | None = None) -> Plan:
    """Plan an MoE model for a GPU budget (bytes or "24GiB") and/or a fixed number of expert
    slots per MoE layer. Raises QliteError naming the option when they cannot work."""
    if not cfg.is_moe or not cfg.num_experts:
        raise QliteError("gpu_budget/expert_slots: the model has no routed experts to offload")
    device = torch.device(device)
    context = context or cfg.max_position_embeddings
    act = torch.tensor([], dtype=dtype).element_size()
    bits, group, keep, sym = _quant_format(cfg, bits, group_size)
    parts, expert = estimate_parts(cfg, bits, group, act, context, keep, sym)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    budget = None if gpu_budget is None else parse_bytes(gpu_budget)
    # An untied embedding is a row lookup per token: off the GPU it frees its bytes for
    # experts. The smallest budget assumes it off; it stays on only when everything fits.
    embed = parts.pop("embedding", 0) if device.type == "cuda" else 0
    fixed = sum(parts.values())
    minimum = fixed + moe_layers * expert
    embed_on_cpu = embed > 0 and (budget is None
                                  or budget < fixed + embed + moe_layers * cfg.num_experts * expert)
    if embed and not embed_on_cpu:
        parts["embedding"] = embed
        fixed += embed
    if expert_slots is not None:
        if not 1 <= expert_slots <= cfg.num_experts:
            raise QliteError(f"expert_slots {expert_slots}: must be between 1 and the "
                             f"number of experts per layer, {cfg.num_experts}")
        slots = expert_slots
        need = fixed + moe_layers * slots * expert
        if budget is not None and need > budget:
            raise QliteError(f"gpu_budget {fmt_bytes(budget)} is too small for {slots} expert "
                             f"slots per layer: they need {fmt_bytes(need)}")
    elif budget is not None:
        if budget < minimum:
            raise QliteError(
                f"gpu_budget {fmt_bytes(budget)} is too small: the non-expert part and the "
                f"KV cache for {context} tokens ({fmt_bytes(fixed)}) plus one expert slot per MoE "
                f"layer need at least {fmt_bytes(minimum)} (a shorter context needs less)")
        slots = min(cfg.num_experts, (budget - fixed) // (moe_layers * expert))
    else:
        slots = cfg.num_experts
    return Plan(device=device, budget=budget, context=context, bits=bits, parts=parts,
                expert_bytes=expert, moe_layers=moe_layers, num_experts=cfg.num_experts,
                slots=int(slots), minimum=minimum, embed_on_cpu=embed_on_cpu, embed_bytes=embed,
                slots_from_budget=expert_slots is None and budget is not None)


def plan_table(plan: Plan, name: str = "model") -> str:
    """The `qlite plan` table."""
    rows = [(part, b) for part, b in plan.parts.items()]
    rows.append((f"routed experts: {plan.slots} of {plan.num_experts} per layer x "
                 f"{plan.moe_layers} layers", plan.expert_cache_bytes))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{name}: int{plan.bits} weights" if plan.bits < 16 else f"{name}: 16-bit weights",
             f"budget {fmt_bytes(plan.budget) if plan.budget else 'none'}, "
             f"context {plan.context} tokens, workspace sized for {plan.prefill_chunk}-token "
             f"prefill chunks", "",
             f"{'on the GPU':<{width}}{'bytes':>14}"]
    lines += [f"{part:<{width}}{fmt_bytes(b):>14}" for part, b in rows]
    lines.append(f"{'total':<{width}}{fmt_bytes(plan.total):>14}")
    resident = plan.slots * plan.moe_layers
    all_experts = plan.num_experts * plan.moe_layers
    lines += ["",
              f"experts resident: {resident} of {all_experts} "
              f"({100 * resident / all_experts:.0f}%), {fmt_bytes(plan.expert_bytes)} each",
              f"host memory (pinned): routed experts {fmt_bytes(plan.host_expert_bytes)}"
              + (f", embedding {fmt_bytes(plan.embed_bytes)}" if plan.embed_on_cpu else ""),
              f"smallest budget that runs (1 slot per layer): {fmt_bytes(plan.minimum)}",
              f"all experts resident from: "
              f"{fmt_bytes(plan.minimum + (all_experts - plan.moe_layers) * plan.expert_bytes)}"]
    return "\n".join(lines)


def plan_text(model: str, gpu_budget=None, bits: int | None = None, context: int | None = None,
              expert_slots: int | None = None, group_size: int | None = None,
              dtype: str = "bfloat16") -> str:
    """`qlite plan --model PATH|CONFIG --bits 4 --gpu-budget 24GiB [--context N]`: the table
    for a model directory or a config.json file, computed from the config alone."""
    act = resolve_dtype(dtype, torch.device("cuda"))
    if str(model).endswith(".gguf"):  # planned as `qlite quantize FILE.gguf` writes it
        from qlite.gguf import gguf_config
        cfg = gguf_config(model)
        bits = bits or 4
    else:
        cfg = load_config(model)
    if context is not None and not 0 < context <= cfg.max_position_embeddings:
        raise QliteError(f"context {context}: must be between 1 and "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    plan = make_plan(cfg, gpu_budget, expert_slots, context, "cuda", act, bits, group_size)
    return plan_table(plan, Path(model).name)
