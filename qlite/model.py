"""Qwen2 and Qwen2-MoE in one file.

Pre-norm decoder: x += attn(rmsnorm(x)); x += mlp(rmsnorm(x)). Attention has q/k/v bias, rotary
positions and grouped KV heads (MHA, GQA and MQA are the same code). The MLP is SwiGLU, or in
sparse layers the MoE block: a softmax router picks top-k routed experts, and a shared expert is
added behind a sigmoid gate.

The KV cache is preallocated (static) and positions are explicit, so a left-padded batch and a
one-token decode step go through the same code as a prefill.

Rows (the API a server batches on): `setup_cache(batch=R, max_len=L)` gives R cache rows;
`prefill_row(row, ids, start)` fills one row's slots start.. (in chunks) and returns the last
token's logits; `decode_step(tokens, positions)` advances every row by one token, row r at its
own device-side position positions[r], attending to its own slots <= positions[r]. A decode
step has the same shapes and the same Python path at every position: one graph for
torch.compile. Rows start, step and retire independently; slots past a row's position are
masked, so whatever a retired row left there is never read.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlite.config import PREFILL_CHUNK, Config
from qlite.errors import QliteError, QliteWarning


# A CPU without bf16 matrix units (AVX2, AVX-512 without BF16) multiplies bf16/fp16 several
# times slower than float32 (BENCHMARKS.md): many-row products and attention go through
# float32 there. One-row products (decode) stay in 16-bit, where reading half the bytes wins.
CPU_HALF_IS_SLOW = not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
UPCAST_WEIGHTS = 1 << 24  # weights converted to float32 at a time (64 MB)


def half_on_slow_cpu(x: torch.Tensor) -> bool:
    """Whether x is 16-bit on such a CPU, where its big products are better done in float32."""
    return CPU_HALF_IS_SLOW and x.dtype != torch.float32 and x.device.type == "cpu"


class Linear(nn.Linear):
    """nn.Linear, except for 16-bit products of many rows on such a CPU: done in float32, with
    the weight converted for the call (5x faster at 256 rows of the demo's MLP), at most 64 MB
    of it at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (half_on_slow_cpu(x) and x.numel() >= 16 * self.in_features):
            return F.linear(x, self.weight, self.bias)
        x32 = x.float()
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype)
        rows = max(1, UPCAST_WEIGHTS // self.in_features)
        for i in range(0, self.out_features, rows):
            bias = None if self.bias is None else self.bias[i:i + rows].float()
            out[..., i:i + rows] = F.linear(x32, self.weight[i:i + rows].float(), bias)
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for integer positions [B, T], computed in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; the two halves of the head dimension rotate as (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class KVCache(nn.Module):
    """One layer's keys and values, [batch, kv_heads, max_len, head_dim] each (zeros at first,
    so a masked slot never holds a NaN that a zero attention weight would spread)."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, row: int | None = None):
        """Write k/v [B, Hkv, T, D] at slots start..start+T of every row (or of row `row`,
        B = 1); return the filled slots of those rows."""
        end = start + k.shape[2]
        rows = slice(None) if row is None else slice(row, row + 1)
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def write_at(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write row r's k/v [R, Hkv, 1, D] at slot positions[r] for the first R rows (an
        indexed copy: no host read of the positions); return those rows' whole cache."""
        r = k.shape[0]
        # An indexed copy does not convert as a sliced one does, and the cache may be float32
        # under a 16-bit model (setup_cache).
        self.k[self.rows[:r], :, positions] = k[:, :, 0].to(self.k.dtype)
        self.v[self.rows[:r], :, positions] = v[:, :, 0].to(self.v.dtype)
        return self.k[:r], self.v[:r]


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads,
                                                  cfg.num_key_value_heads, cfg.head_dim)
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, start=None, row=None, positions=None):
        """start: the tokens fill cache slots start.. (of row `row` only, if given);
        positions [R]: one token per row, written at its row's position (decode)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if positions is not None:  # decode: the mask's width is the number of slots attended
            k, v = self.cache.write_at(positions, k, v)
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        elif start is not None:
            k, v = self.cache.update(start, k, v, row)
        dtype = q.dtype
        if half_on_slow_cpu(q):
            # 0.28 vs 0.04 ms a decode step at 300 keys on the demo's shapes (AVX2)
            q, k, v = q.float(), k.float(), v.float()
        if t == 1 and self.n_kv != self.n_heads:
            # Decode: the query heads that share a KV head become rows of one query, so each
            # head's keys are read once, by a product of several rows (13x faster than
            # enable_gqa on the demo's shapes on a CPU in bfloat16, 2.5x in float32).
            q = q.view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(y.to(dtype).reshape(b, 1, -1))
        # mask None means plain causal attention with as many keys as queries (or one query).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and t > 1,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def group_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Sort the (token, slot) pairs of a routing decision by expert.

    Returns `order` (indices into the flattened [N*k] routing, grouped by expert) and
    `counts` [num_experts] (how many pairs each expert received); token index = order // k.
    """
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def expert_batches(topk_ids: torch.Tensor, num_experts: int) -> list:
    """[(expert, tokens, pairs)] for each expert that received tokens, in expert-id order:
    `pairs` index the flattened routing (for its weights), `tokens` the rows of x."""
    order, counts = group_by_expert(topk_ids, num_experts)
    k, begin, batches = topk_ids.shape[1], 0, []
    for e, n in enumerate(counts.tolist()):
        if n:
            pairs = order[begin:begin + n]
            batches.append((e, pairs // k, pairs))
            begin += n
    return batches


class Experts(nn.Module):
    """The routed experts of one MoE layer, stacked: the narrow interface that quantized and
    offloaded experts implement too. forward(x [N, D], topk_ids [N, k], topk_weights [N, k])
    returns sum_j topk_weights[n, j] * expert_{topk_ids[n, j]}(x[n])."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x, topk_ids, topk_weights):
        if torch.compiler.is_compiling() or (
                x.is_cuda and x.shape[0] * topk_ids.shape[1] <= self.num_experts):
            return self._gathered(x, topk_ids, topk_weights)
        out = torch.zeros_like(x)
        for e, tokens, pairs in expert_batches(topk_ids, self.num_experts):
            gate, up = F.linear(x[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, tokens, y * topk_weights.flatten()[pairs, None])
        return out

    def _gathered(self, x, topk_ids, topk_weights):
        """Decode's path, with no host read of the routing (so it compiles into one graph and
        a GPU never waits): each token's k experts' weights are gathered and multiplied in a
        batch. A token's k outputs are summed in expert-id order, as the grouped path does."""
        ids, order = topk_ids.sort(dim=-1)
        weights = topk_weights.gather(-1, order)
        h = torch.matmul(self.gate_up_proj[ids], x[:, None, :, None])[..., 0]  # [N, k, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch.matmul(self.down_proj[ids], (F.silu(gate) * up)[..., None])[..., 0]
        out = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            out = out + y[:, j] * weights[:, j, None]
        return out


class MoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        d = cfg.hidden_size
        self.gate = Linear(d, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, d, cfg.moe_intermediate_size)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(d, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(d, 1, bias=False)

    def route(self, x: torch.Tensor):
        """Top-k experts per token from an fp32 softmax over the router logits."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size,
                                                                cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, start=None, row=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start, row, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Cache:
    """The host's record of the KV cache: its shape, and per row the token ids whose keys and
    values fill that row's first slots (a chat's next turn reuses that prefix). Writes keep it
    honest: a prefill from slot `start` keeps only the first `start` ids, a decode step (whose
    positions the host does not read) forgets every row; whoever fed tokens records them."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.held: list[list[int]] = [[] for _ in range(batch)]

    def forget(self, row: int | None = None, start: int = 0):
        for r in range(self.batch) if row is None else (row,):
            del self.held[r][start:]


class Qwen2(nn.Module):
    """The causal LM. State-dict names follow the HF checkpoints (`model.layers.0...`,
    `lm_head.weight`), except that routed experts are stacked (see `Experts`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cache = Cache(0, 0)  # setup_cache allocates
        self.max_context = cfg.max_position_embeddings  # load(context=...) may lower it
        self.tokenizer = None  # set by qlite.load when the model directory has one
        self.model_dir = None  # the directory qlite.load read
        self.backend = "qlite"  # or "bnb-nf4" / "bnb-int8" (qlite/bnb.py)
        self.offload = None  # qlite.offload.OffloadState when routed experts are offloaded
        self._decode = self._decode_step  # compile_decode replaces it by a compiled one

    def offload_stats(self) -> dict | None:
        """Expert-offloading statistics (qlite/offload.py); None when nothing is offloaded."""
        return None if self.offload is None else self.offload.stats_dict()

    def reset_offload_stats(self):
        if self.offload is not None:
            self.offload.reset()

    @property
    def cache_len(self) -> int:
        return self.cache.max_len

    def generate(self, prompt, **kwargs):
        """Stream a chat reply: see qlite.generate.generate."""
        from qlite.generate import generate
        return generate(self, prompt, **kwargs)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, batch: int, max_len: int):
        """Preallocate the KV cache of every layer for `batch` rows of `max_len` slots.
        It is float32 where attention runs in float32 (a 16-bit model on a CPU without bf16
        units): widening a key is exact, so this only saves converting the cache every step."""
        p = self.model.norm.weight
        cfg = self.config
        dtype = self.model.embed_tokens.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
                (CPU_HALF_IS_SLOW and p.device.type == "cpu"):
            dtype = torch.float32
        for layer in self.model.layers:
            layer.self_attn.cache = None  # free the old one first
            layer.self_attn.cache = KVCache(batch, max_len, cfg.num_key_value_heads,
                                            cfg.head_dim, p.device, dtype)
        slots = torch.arange(max_len, device=p.device)
        self._rope = rope_cos_sin(slots, cfg.head_dim, cfg.rope_theta, torch.float32)
        self._slots = slots
        self.cache = Cache(batch, max_len)

    @property
    def prefill_chunk(self) -> int:
        """Tokens per forward in prefill_row (an offloaded model's workspace is sized for its
        plan's chunk)."""
        plan = getattr(self.offload, "plan", None)
        return plan.prefill_chunk if plan else PREFILL_CHUNK

    def prefill_row(self, row: int, ids: torch.Tensor, start: int = 0, progress=None) -> torch.Tensor:
        """Fill slots start..start+T of cache row `row` with ids [T] (chunk by chunk, so
        activation memory stays bounded); return the last token's logits, float32 [vocab].
        progress(done, total) is called after each chunk."""
        n = ids.shape[0]
        if not 0 <= row < self.cache.batch:
            raise QliteError(f"prefill_row: row {row} is not one of the cache's "
                             f"{self.cache.batch} rows (setup_cache first)")
        if n == 0:
            raise QliteError("prefill_row: ids is empty")
        chunk = self.prefill_chunk
        for pos in range(start, start + n, chunk):
            part = ids[pos - start:pos - start + chunk][None]
            logits = self(part, start=pos, row=row, last_only=True)
            if progress is not None:
                progress(min(pos + chunk, start + n) - start, n)
        return logits[0, -1].float()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    length: int | None = None) -> torch.Tensor:
        """One token for each of the first R cache rows: tokens, positions [R] (device tensors,
        R at most the cache's batch: a server steps only the rows up to its last busy one).
        Row r writes its keys/values at slot positions[r] and attends to its slots
        <= positions[r]. Returns float32 logits [R, vocab].

        Positions must lie below cache_len (not checked here: that would read them back to
        the host). `length`, when the caller knows one above every position, bounds the slots
        read: it is rounded up to a power of two (>= 256), so a compiled step sees few shapes
        and attention reads the live part of the cache, not all of it."""
        self.cache.forget()
        return self._decode(tokens, positions, self._slots_read(length))

    def _slots_read(self, length: int | None) -> int:
        n = self.cache.max_len
        if length is not None:
            if not 0 < length <= n:
                raise QliteError(f"decode_step: length {length} is outside the KV cache's "
                                 f"1..{n} slots")
            n = min(n, max(256, 1 << (length - 1).bit_length()))
        return n

    def will_compile(self, length: int | None = None) -> bool:
        """Whether the next decode_step (with this `length`) compiles a new graph first."""
        return self._decode == self._decode_compiled and (
            self.cache.batch, self._slots_read(length), self.cache.max_len) not in self._compiled_shapes

    def compile_decode(self, backend: str = "inductor"):
        """Run decode_step under torch.compile(fullgraph=True): one graph per cache shape
        (batch, slots attended), compiled at its first step; on CUDA with CUDA graphs
        (mode="reduce-overhead"). torch's compile caches live in ~/.cache/qlite/torch-compile
        (TORCHINDUCTOR_CACHE_DIR), so a second run compiles faster. If compiling fails, the
        step stays eager and a QliteWarning names the cause (will_compile tells a caller that
        wants to show progress whether the next step compiles)."""
        if self.offload is not None:
            warnings.warn("compile: an offloaded model decides on the host which experts to "
                          "fetch each layer; its decode step stays eager", QliteWarning,
                          stacklevel=2)
            return
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                             os.path.join(os.path.expanduser("~"), ".cache"),
                             "qlite", "torch-compile")
        try:  # torch sets the variable itself once it has used its default (under /tmp)
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
            torch_default = default_cache_dir()
        except ImportError:
            torch_default = None
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, torch_default):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        cuda = self.model.norm.weight.is_cuda
        self._compiled = torch.compile(self._decode_step, fullgraph=True, dynamic=False,
                                       backend=backend,
                                       mode="reduce-overhead" if cuda and backend == "inductor"
                                       else None)
        self._compiled_shapes: set = set()
        self._decode = self._decode_compiled

    def _decode_compiled(self, tokens, positions, slots: int):
        shape = (tokens.shape[0], slots, self.cache.max_len)
        if shape in self._compiled_shapes:
            return self._compiled(tokens, positions, slots)
        try:
            out = self._compiled(tokens, positions, slots)
        except Exception as e:  # noqa: BLE001 - any failure of torch.compile: run eager
            cause = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"compile: the decode step runs eager ({type(e).__name__}: {cause})",
                          QliteWarning, stacklevel=3)
            self._decode = self._decode_step
            return self._decode_step(tokens, positions, slots)
        self._compiled_shapes.add(shape)
        return out

    def _decode_step(self, tokens, positions, slots: int):
        x = self.model.embed_tokens(tokens[:, None])
        cos, sin = (t[positions][:, None].to(x.dtype) for t in self._rope)
        mask = (self._slots[:slots] <= positions[:, None])[:, None, None]  # [R, 1, 1, slots]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, positions=positions)
        return self.lm_head(self.model.norm(x))[:, 0].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, start: int | None = None,
                last_only: bool = False, row: int | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] ([B, 1, vocab] with last_only, which is
        all a prefill needs: the vocabulary projection is the largest matmul).

        Without `start`: a plain causal forward, no cache involved. `attention_mask` [B, T]
        (1 = token, 0 = left padding) masks padding; positions then count real tokens only.
        With `start` (after setup_cache): the tokens fill cache slots start..start+T (of every
        row, or of row `row` only, B = 1) and attend to every filled slot; `attention_mask`
        then covers all start+T slots.
        """
        b, t = input_ids.shape
        end = t if start is None else start + t
        if start is not None:
            if end > self.cache.max_len:
                raise QliteError(f"the KV cache holds {self.cache.max_len} tokens, asked for {end}")
            self.cache.forget(row, start)
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(end - t, end, device=input_ids.device).expand(b, t)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, end - t:]
        mask = None
        if attention_mask is not None or (start not in (None, 0) and t > 1):
            mask = self._mask(attention_mask, b, t, end, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start, row)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    @staticmethod
    def _mask(attention_mask, b, t, end, device):
        """Boolean [B, 1, T, end]: causal over slots, padding slots hidden. A query that is
        itself padding still sees its own slot, so no row is empty (an empty row is NaN)."""
        q_slot = torch.arange(end - t, end, device=device)[:, None]
        k_slot = torch.arange(end, device=device)[None, :]
        mask = (k_slot <= q_slot)[None]
        if attention_mask is not None:
            mask = (mask & attention_mask.bool()[:, None, :end]) | (k_slot == q_slot)[None]
        return mask.expand(b, t, end)[:, None]
