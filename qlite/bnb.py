"""`--backend bnb`: the same model with bitsandbytes layers in place of qlite's quantized ones.

It is the baseline users would otherwise pick, so it sits beside qlite in the quality and speed
tables. `to_bitsandbytes(model, bits)` takes a model already loaded in 16/32-bit and replaces

- every `nn.Linear` of attention, dense MLP and shared expert by `bnb.nn.Linear4bit` (NF4, blocks
  of 64, no double quantization: bnb's most accurate 4-bit setting) or `bnb.nn.Linear8bitLt`
  (LLM.int8(), threshold 0: plain row-wise int8, no fp16 outlier columns);
- the routed experts of each MoE layer by `BnbExperts`: one bitsandbytes linear per expert and
  projection, with the forward of `qlite.model.Experts`.

The router (`mlp.gate`), the shared-expert gate (one output row), norms and embedding stay as they
are; `lm_head` stays unless `skip` says otherwise (bitsandbytes' own default in transformers).

bitsandbytes >= 0.45 runs NF4 and int8 matmuls on the CPU as well as on CUDA (measured here with
0.50.2 and torch 2.13 CPU), so this path works on either device. It is imported lazily: nothing
else in qlite imports bitsandbytes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlite.errors import QliteError
from qlite.quant.swap import ROUTER_NAMES  # kept as they are, as qlite's quantization keeps them


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or its native library failed to load
        raise QliteError(f"backend bnb: bitsandbytes is not usable here ({e})") from None
    return bnb


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
               compute_dtype: torch.dtype, device) -> nn.Module:
    """A bitsandbytes linear holding `weight` [N, K] (and `bias`), quantized on `device`."""
    bnb = _bnb()
    n, k = weight.shape
    w = weight.detach().to("cpu", torch.float32 if weight.dtype == torch.float32 else torch.float16)
    if bits == 4:
        m = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=False, quant_type="nf4", device="meta")
        m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                     compress_statistics=False, blocksize=64)
    elif bits == 8:
        m = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise QliteError(f"backend bnb: bits={bits}: choose 4 (NF4) or 8 (LLM.int8)")
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    return m.to(device)  # moving the parameter is what quantizes it


class BnbExperts(nn.Module):
    """Routed experts on bitsandbytes linears, one per expert and projection; same forward as
    qlite.model.Experts: (x [N, D], topk_ids [N, k], topk_weights [N, k]) -> [N, D]."""

    def __init__(self, experts: nn.Module, bits: int):
        super().__init__()
        self.num_experts, self.hidden = experts.num_experts, experts.hidden
        dtype, device = experts.gate_up_proj.dtype, experts.gate_up_proj.device
        self.gate_up = nn.ModuleList(bnb_linear(experts.gate_up_proj[e], None, bits, dtype, device)
                                     for e in range(self.num_experts))
        self.down = nn.ModuleList(bnb_linear(experts.down_proj[e], None, bits, dtype, device)
                                  for e in range(self.num_experts))

    def forward(self, x, topk_ids, topk_weights):
        from qlite.model import expert_batches
        out = torch.zeros_like(x)
        for e, tokens, pairs in expert_batches(topk_ids, self.num_experts):
            gate, up = self.gate_up[e](x[tokens]).chunk(2, dim=-1)
            y = self.down[e](F.silu(gate) * up)
            out.index_add_(0, tokens, (y * topk_weights.flatten()[pairs, None]).to(out.dtype))
        return out


def to_bitsandbytes(model: nn.Module, bits: int = 4, skip=("lm_head",)) -> nn.Module:
    """Replace, in place, the linears and routed experts of a loaded qlite model by
    bitsandbytes ones (NF4 for bits=4, int8 for bits=8); return the model.

    `skip`: module names (or name suffixes) to leave as they are, besides the router and the
    shared-expert gate. The model must hold real (not meta) 16/32-bit weights."""
    from qlite.model import Experts
    if bits not in (4, 8):
        raise QliteError(f"backend bnb: bits={bits}: choose 4 (NF4) or 8 (LLM.int8)")
    _bnb()
    skip = tuple(skip) + ROUTER_NAMES
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        skip += ("lm_head",)  # it shares the embedding's tensor, which stays 16-bit
    targets = []
    for name, module in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(module, (nn.Linear, Experts)):
            if any(p.is_meta for p in module.parameters()):
                raise QliteError(f"backend bnb: {name} has no weights loaded yet")
            targets.append((name, module))
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Experts):
            new = BnbExperts(module, bits)
        else:
            w = module.weight
            new = bnb_linear(w, module.bias, bits, w.dtype, w.device)
        setattr(parent, attr, new)
        del module
    model.backend = f"bnb-{'nf4' if bits == 4 else 'int8'}"
    return model
