"""Expert offloading: routed experts in host memory, a cache of them on the GPU, prefetching.

An MoE layer touches k of its E experts per token, so most expert bytes sit idle at any moment.
Each MoE layer keeps all its experts in one host buffer (pinned when CUDA is there), one row of
bytes per expert holding every tensor of that expert, so one copy moves an expert. A fixed
number of device slots per layer (`ExpertCache`) holds copies; an eviction policy picks what to
drop (LRFU by default, LRU as the baseline; bench/bench_offload.py compares them on traces).

Copies run on a dedicated CUDA stream; each slot has a `ready` event (compute waits on it only
when it needs that expert) and a `freed` event (a copy waits until compute is done reading the
slot it overwrites). On the CPU the same bookkeeping runs with synchronous copies, and the
"device" slots are a second CPU buffer: that is how CI proves the cache logic.

Prefetch (speculative gating, Eliseev & Mazur 2023): when layer L runs its experts, the next
MoE layer's router is applied to layer L's hidden state and the experts it picks start copying,
so they arrive while layer L and the next attention compute.

Exactness: `OffloadedExperts` runs the original experts' own forward on views of the slots,
in an order that sums each token's expert outputs as the resident module does, so the output is
bit-for-bit the resident model's (see OffloadedExperts for the two modes). Prefill needs many
experts per layer: each is copied once and runs all its tokens, and slots are reused as experts
finish (copies of the next ones overlap compute of the current one).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from qlite.errors import QliteError
from qlite.model import MoE
from qlite.plan import ALIGN, Plan
from qlite.quant.experts import QuantExperts


@dataclass
class Stats:
    hits: int = 0              # needed experts already in (or on their way to) a slot
    misses: int = 0            # experts copied on demand
    bytes_copied: int = 0      # host-to-device bytes, demand and prefetch
    prefetch_issued: int = 0   # experts copied on a guess
    prefetch_hits: int = 0     # ... that the layer then used
    stall_seconds: float = 0.0  # compute waiting for copies
    evictions: int = 0
    guessed: int = 0           # needed experts of layers that had a guess
    guessed_right: int = 0     # ... that the guess contained
    cpu_computed: int = 0      # missed experts run on the host copy instead of moved

    def as_dict(self) -> dict:
        d = asdict(self)
        need = self.hits + self.misses
        d["hit_rate"] = self.hits / need if need else 0.0
        d["prefetch_accuracy"] = self.guessed_right / self.guessed if self.guessed else 0.0
        return d


def format_stats(s: dict) -> str:
    """One line for `qlite generate --stats`."""
    return (f"experts: hit rate {100 * s['hit_rate']:.1f}% ({s['hits']} hits, {s['misses']} "
            f"misses), prefetch {s['prefetch_hits']}/{s['prefetch_issued']} used, guess "
            f"accuracy {100 * s['prefetch_accuracy']:.1f}%, copied "
            f"{s['bytes_copied'] / 2 ** 30:.2f} GiB, stalled {s['stall_seconds']:.3f} s")


# --- eviction policies: `victim` picks among experts that no running call needs -------------

class LRU:
    """Least recently used: the baseline."""

    def __init__(self):
        self.clock, self.last = 0, {}

    def step(self):  # one call of the layer
        pass

    def access(self, e):
        self.clock += 1
        self.last[e] = self.clock

    def insert(self, e, prefetched=False):
        self.access(e)

    def victim(self, candidates):
        return min(candidates, key=self.last.__getitem__)


class LRFU:
    """Least recently/frequently used (Lee et al. 2001): each expert scores
    sum over its past uses of 2^(-lam * age), age counted in calls of its layer. lam -> 0 is
    LFU, lam = 1 is close to LRU; in between it keeps the experts a layer keeps coming back to
    without holding on to yesterday's favourites. Scores outlive eviction (64 floats a layer),
    so an expert evicted once is not judged a stranger. A prefetched expert scores 0 until used:
    a wrong guess is the first to go."""

    def __init__(self, lam: float = 0.05):
        self.lam, self.now, self.clock = lam, 0, 0
        self.crf, self.at, self.last = {}, {}, {}

    def step(self):
        self.now += 1

    def score(self, e):
        return self.crf.get(e, 0.0) * 2.0 ** (-self.lam * (self.now - self.at.get(e, self.now)))

    def access(self, e):
        self.crf[e], self.at[e] = self.score(e) + 1.0, self.now
        self.clock += 1
        self.last[e] = self.clock

    def insert(self, e, prefetched=False):
        # Arriving is not a use: the use that follows a demand copy is counted by access().
        self.clock += 1
        self.last[e] = self.clock

    def victim(self, candidates):
        return min(candidates, key=lambda e: (self.score(e), self.last.get(e, 0)))


POLICIES = {"lru": LRU, "lrfu": LRFU}


def make_policy(name: str):
    if name not in POLICIES:
        raise QliteError(f"policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


# --- host store ------------------------------------------------------------------------------

def _row_views(buf: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Typed [rows, *shape] views of each tensor inside a [rows, row_bytes] uint8 buffer."""
    return {name: buf[:, off:off + n].view(dtype).view(buf.shape[0], *shape)
            for name, dtype, shape, off, n in layout}


class ExpertStore:
    """All routed experts of one MoE layer in host memory: row e of `buf` holds every tensor of
    expert e (dense weights or packed int4 with scales and zeros alike), each 64-byte aligned.
    Tensors of the experts module without a leading expert dimension are `shared`."""

    def __init__(self, experts: nn.Module, pin: bool):
        self.num_experts = num = experts.num_experts
        self.layout, self.shared, off = [], {}, 0
        state = experts.state_dict()
        for name, t in state.items():
            if t.dim() == 0 or t.shape[0] != num:
                self.shared[name] = t
                continue
            n = t[0].numel() * t.element_size()
            self.layout.append((name, t.dtype, tuple(t.shape[1:]), off, n))
            off += -(-n // ALIGN) * ALIGN
        self.row_bytes = off
        self.buf = torch.empty(num, off, dtype=torch.uint8, pin_memory=pin)
        views = self.views()
        for name, *_ in self.layout:
            views[name].copy_(state[name])

    def views(self):
        return _row_views(self.buf, self.layout)


def _module_view(template: nn.Module, tensors: dict[str, torch.Tensor], num_experts: int):
    """A shallow copy of `template` (same class, same forward) whose named tensors are replaced:
    the experts' own math then runs on slot memory. Submodules are copied the same way."""
    view = copy.copy(template)
    view._parameters, view._buffers = dict(template._parameters), dict(template._buffers)
    view._modules = {}
    for child_name, child in template._modules.items():
        prefix = child_name + "."
        sub = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        view._modules[child_name] = _module_view(child, sub, num_experts)
    for name, t in tensors.items():
        if "." in name:
            continue
        if name in view._parameters:
            view._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            view._buffers[name] = t
    if hasattr(view, "num_experts"):
        view.num_experts = num_experts
    return view


# --- device cache ----------------------------------------------------------------------------

class ExpertCache:
    """`slots` device copies of one layer's experts. A call of the layer goes
    begin(needed) -> acquire(e)/release(e) for each needed e in id order -> end().

    begin() counts hits and misses and starts copies for the misses into free slots, evicting
    only experts this call does not need. release(e) frees e's slot for the next pending copy,
    so a call needing more experts than there are slots still copies each once."""

    def __init__(self, store: ExpertStore, slots: int, device, policy, stats: Stats,
                 stream=None):
        self.store, self.slots, self.device = store, slots, torch.device(device)
        self.policy, self.stats, self.stream = policy, stats, stream
        self.buf = torch.empty(slots, store.row_bytes, dtype=torch.uint8, device=self.device)
        self.expert_in: list[int | None] = [None] * slots
        self.slot_of: dict[int, int] = {}
        self.ready = [None] * slots   # CUDA event: the copy into the slot is done
        self.freed = [None] * slots   # CUDA event: compute is done reading the slot
        self.busy: set[int] = set()   # needed by the running call (or a prefetch round)
        self.pending: list[int] = []  # misses of the running call still waiting for a slot
        self.prefetched: set[int] = set()
        self.guess: set[int] | None = None
        self.stalls = []              # CUDA (start, end) event pairs around waits

    def views(self):
        return _row_views(self.buf, self.store.layout)

    def resident(self) -> list[int]:
        return sorted(self.slot_of)

    # one call of the layer
    def begin(self, needed: list[int]):
        self.policy.step()
        if self.guess is not None:
            self.stats.guessed += len(needed)
            self.stats.guessed_right += len(self.guess.intersection(needed))
            self.guess = None
        self.busy = set(needed)
        for e in needed:
            if e in self.slot_of:
                self.stats.hits += 1
                if e in self.prefetched:
                    self.stats.prefetch_hits += 1
            else:
                self.pending.append(e)
        self.prefetched.difference_update(needed)
        self._fill()

    def acquire(self, e: int) -> int:
        """The slot holding e, once its copy is done (compute on the current stream waits)."""
        if e not in self.slot_of:
            # Every slot is held by an expert this call still needs (slots < needed): give up
            # the one needed last (Belady) and copy it again when its turn comes.
            s = self._free_slot()
            if s is None:
                later = max(x for x in self.busy if x in self.slot_of)
                s = self.slot_of[later]
                self._evict(s)
                self.pending.append(later)
            self.pending.remove(e)
            self._load(e, s)
        s = self.slot_of[e]
        self._wait(s)
        self.policy.access(e)
        return s

    def release(self, e: int):
        self.busy.discard(e)
        s = self.slot_of[e]
        if self.device.type == "cuda":
            self.freed[s] = torch.cuda.Event()
            self.freed[s].record()
        self._fill()

    def end(self):
        self.busy.clear()

    def prefetch(self, guess: list[int]):
        """Start copying a guessed set of experts for this layer's next call. Skipped when the
        guess does not fit: it would evict its own members."""
        self.guess = set(guess)
        if len(guess) > self.slots:
            return
        self.busy = set(guess)  # do not evict one guessed expert for another
        for e in guess:
            if e in self.slot_of:
                continue
            s = self._free_slot()
            if s is None:
                break
            self._load(e, s, prefetched=True)
        self.busy = set()

    # internals
    def _fill(self):
        while self.pending:
            s = self._free_slot()
            if s is None:
                return
            self._load(self.pending.pop(0), s)

    def _free_slot(self) -> int | None:
        for s, e in enumerate(self.expert_in):
            if e is None:
                return s
        candidates = [e for e in self.slot_of if e not in self.busy]
        if not candidates:
            return None
        s = self.slot_of[self.policy.victim(candidates)]
        self._evict(s)
        return s

    def _evict(self, s: int):
        e = self.expert_in[s]
        del self.slot_of[e]
        self.prefetched.discard(e)
        self.expert_in[s] = None
        self.stats.evictions += 1

    def _load(self, e: int, s: int, prefetched=False):
        src, dst = self.store.buf[e], self.buf[s]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                if self.freed[s] is not None:
                    self.stream.wait_event(self.freed[s])
                dst.copy_(src, non_blocking=True)
                self.ready[s] = torch.cuda.Event()
                self.ready[s].record(self.stream)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            if not prefetched:  # on the CPU a demand copy is time the layer waits
                self.stats.stall_seconds += time.perf_counter() - t0
        self.expert_in[s], self.slot_of[e] = e, s
        self.stats.bytes_copied += self.store.row_bytes
        if prefetched:
            self.prefetched.add(e)
            self.stats.prefetch_issued += 1
        else:
            self.stats.misses += 1
        self.policy.insert(e, prefetched)

    def _wait(self, s: int):
        ev = self.ready[s]
        if ev is None:
            return
        self.ready[s] = None
        if not ev.query():  # not arrived yet: time how long compute stands still for it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda.current_stream().wait_event(ev)
            end.record()
            self.stalls.append((start, end))
        else:
            torch.cuda.current_stream().wait_event(ev)


# --- the drop-in experts module --------------------------------------------------------------

class OffloadedExperts(nn.Module):
    """Routed experts of one MoE layer served from an ExpertCache; same forward as `Experts`.

    Per-expert mode (the default): each needed expert runs through a one-expert view of its slot
    (the original module's class and forward), in expert-id order, and its output is added the
    way the original adds it: dense `Experts` in x's dtype, QuantExperts' CPU path in float32
    with one rounding at the end. The result is bit-for-bit the resident model's.

    Grouped mode (QuantExperts on CUDA): its fused kernel computes every (token, expert) pair
    independently and sums each token's k pairs in k order, so expert ids can be replaced by
    slot ids and one launch on a view of the whole cache serves the layer. A call needing more
    experts than there are slots (a long prefill) falls back to per-expert mode."""

    def __init__(self, template: nn.Module, cache: ExpertCache, grouped: bool | None = None):
        super().__init__()
        self.num_experts = template.num_experts
        self.cache = cache
        quant = isinstance(template, QuantExperts)
        self.fp32_sum = quant
        self.grouped = quant and cache.device.type == "cuda" if grouped is None else grouped
        shared = {n: t.to(cache.device) for n, t in cache.store.shared.items()}
        # The experts' own module over the host store: the template when re-planning.
        self.host = _module_view(template, {**cache.store.shared, **cache.store.views()},
                                 self.num_experts)
        views = cache.views()
        # Built once: view s computes with whatever expert slot s holds at the time.
        self.slot_modules = [
            _module_view(template, {**shared, **{n: v[s:s + 1] for n, v in views.items()}}, 1)
            for s in range(cache.slots)]
        self.cache_module = _module_view(template, {**shared, **views}, cache.slots)
        self.next: tuple[nn.Module, MoE] | None = None  # (norm, moe) of the next MoE layer
        self.hidden = None  # this layer's pre-norm hidden state, set by a hook, for prefetch

    def forward(self, x, topk_ids, topk_weights):
        # The layer's one host read: its routing, with the next layer's guess in the same copy.
        guess = self._guess_next()
        flat = topk_ids.flatten()
        host = to_host(flat if guess is None else torch.cat([flat, guess.flatten()]))
        batches = _expert_batches(host[:flat.numel()], topk_ids.shape[1], self.num_experts,
                                  x.device)
        needed = [e for e, _, _ in batches]
        self.cache.begin(needed)
        if guess is not None:  # after this layer's own misses: the copy stream is in order
            self.next[1].experts.cache.prefetch(sorted(set(host[flat.numel():])))
        if self.grouped and len(needed) <= self.cache.slots:
            out = self._grouped(x, topk_ids, topk_weights, needed)
        else:
            out = self._per_expert(x, topk_weights, batches)
        self.cache.end()
        return out

    def _per_expert(self, x, topk_weights, batches):
        cache = self.cache
        xin = x.float() if self.fp32_sum else x
        out = torch.zeros_like(xin)
        weights = topk_weights.flatten()
        zeros = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        for e, tokens, pairs in batches:
            s = cache.acquire(e)
            y = self.slot_modules[s](xin[tokens], zeros[:len(pairs)], weights[pairs, None])
            cache.release(e)
            out.index_add_(0, tokens, y)
        return out.to(x.dtype)

    def _grouped(self, x, topk_ids, topk_weights, needed):
        cache = self.cache
        slot_of = torch.zeros(self.num_experts, dtype=topk_ids.dtype)
        for e in needed:
            slot_of[e] = cache.acquire(e)
        out = self.cache_module(x, slot_of.to(x.device)[topk_ids], topk_weights)
        for e in needed:
            cache.release(e)
        return out

    def _guess_next(self):
        """The next MoE layer's router applied to this layer's hidden state: its top-k ids
        (softmax keeps the top-k order), on the device; None without prefetch."""
        h, self.hidden = self.hidden, None
        if self.next is None or h is None:
            return None
        norm, moe = self.next
        return torch.topk(moe.gate(norm(h).reshape(-1, h.shape[-1])), moe.top_k, dim=-1).indices


def to_host(ids: torch.Tensor) -> list[int]:
    """Routing ids as a host list: from CUDA through a pinned buffer, after an event (the
    copy is the only wait). Every host read of routing in this file goes through here."""
    if ids.is_cuda:
        buf = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        buf.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        ids = buf
    return ids.tolist()


def _expert_batches(flat: list[int], k: int, num_experts: int, device) -> list:
    """[(expert, tokens, pairs)] for each expert that received tokens, in expert-id order,
    from the flattened routing on the host: `pairs` (device) index the flattened routing in
    stable order, `tokens` = pairs // k the rows of x. As qlite.model.expert_batches."""
    order = sorted(range(len(flat)), key=flat.__getitem__)  # stable
    pairs_all = torch.tensor(order, device=device)
    batches, begin = [], 0
    for e in range(num_experts):
        end = begin
        while end < len(order) and flat[order[end]] == e:
            end += 1
        if end > begin:
            pairs = pairs_all[begin:end]
            batches.append((e, pairs // k, pairs))
        begin = end
    return batches


class HostEmbedding(nn.Module):
    """An embedding table left in host memory: look rows up there, send only them over."""

    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.device = torch.device(device)

    def forward(self, ids):
        return nn.functional.embedding(ids.cpu(), self.weight).to(self.device)


class OffloadState:
    """A model's `offload`: the caches, one Stats, the copy stream, and the plan (generate
    reads plan.prefill_chunk: the workspace is sized for it)."""

    def __init__(self, caches, stats, stream, policy, prefetch, hooks, plan: Plan):
        self.caches, self.stats, self.stream = caches, stats, stream
        self.policy, self.prefetch, self.hooks = policy, prefetch, hooks
        self.plan = plan

    def stats_dict(self) -> dict:
        if self.stream is not None:
            torch.cuda.synchronize()
            for c in self.caches:
                self.stats.stall_seconds += sum(a.elapsed_time(b) for a, b in c.stalls) / 1e3
                c.stalls.clear()
        d = self.stats.as_dict()
        d["slots"] = self.caches[0].slots if self.caches else 0
        d["moe_layers"] = len(self.caches)
        d["policy"], d["prefetch"] = self.policy, self.prefetch
        return d

    def reset(self):
        self.stats_dict()  # drain pending stall events so they are not counted later
        for f in self.stats.__dataclass_fields__:
            setattr(self.stats, f, type(getattr(self.stats, f))())


def offload_experts(model: nn.Module, plan: Plan, prefetch: bool = True,
                    policy: str = "lrfu") -> OffloadState:
    """Replace each MoE layer's routed experts (loaded in host memory) by OffloadedExperts with
    `plan.slots` device slots; the model's offload_stats() / reset_offload_stats() then report.
    Called again on an offloaded model, it re-plans: the host store stays, the caches change."""
    old = model.offload
    if old is not None:
        for h in old.hooks:
            h.remove()
        model.offload = None
    device = torch.device(plan.device)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    stats = Stats()
    layers = [layer for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    caches, offloaded = [], []
    for layer in layers:
        experts = layer.mlp.experts
        if isinstance(experts, OffloadedExperts):
            store, experts = experts.cache.store, experts.host
        else:
            store = ExpertStore(experts, pin=cuda and torch.cuda.is_available())
        slots = plan.slots
        if plan.slots_from_budget:  # the planner estimated bytes; the store knows them
            room = plan.budget - plan.fixed_bytes
            slots = max(1, min(plan.num_experts, room // (plan.moe_layers * store.row_bytes)))
        cache = ExpertCache(store, min(slots, store.num_experts), device, make_policy(policy),
                            stats, stream)
        off = OffloadedExperts(experts, cache)
        layer.mlp.experts = off  # the old module and its stacked tensors go
        caches.append(cache)
        offloaded.append(off)
    hooks = []
    if prefetch:
        for layer, off, nxt in zip(layers, offloaded, layers[1:]):
            off.next = (nxt.post_attention_layernorm, nxt.mlp)
            hooks.append(layer.post_attention_layernorm.register_forward_hook(
                lambda mod, args, out, off=off: setattr(off, "hidden", args[0])))
    embed = model.model.embed_tokens
    if plan.embed_on_cpu and type(embed) is nn.Embedding and not model.config.tie_word_embeddings:
        model.model.embed_tokens = HostEmbedding(embed.weight.detach().cpu(), device)
    model.offload = OffloadState(caches, stats, stream, policy, prefetch, hooks, plan)
    return model.offload
