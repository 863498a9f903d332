"""Expert offloading: the offloaded model computes exactly what the resident one does, the cache
keeps to its slots and follows its policy, and the statistics count what happened.

The "GPU" side is a second CPU buffer here; the cuda-marked tests repeat the equality on a GPU.
"""
import pytest
import torch
from conftest import save_tiny

import qlite
from qlite.errors import QliteError
from qlite.model import Experts
from qlite.offload import (LRFU, LRU, ExpertCache, ExpertStore, OffloadedExperts, Stats,
                           format_stats)
from qlite.plan import make_plan

# 16 experts, top-4 (so accumulation order matters: with top-2 any order is exact), 3 MoE
# layers (two prefetch hand-overs); 4 slots per layer hold a quarter of the experts.
MOE16 = dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
SLOTS = 4


@pytest.fixture(scope="module")
def moe16(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe16")
    save_tiny(path, moe=True, **MOE16)
    return path, qlite.load(path, dtype="float32")


def _ids(b, t, seed=1):
    return torch.randint(0, 317, (b, t), generator=torch.Generator().manual_seed(seed))


def _quarter_budget(path):
    cfg = qlite.loader.load_config(path)
    plan = make_plan(cfg, None, SLOTS, 256, "cpu", torch.float32)
    return plan.fixed_bytes + plan.moe_layers * SLOTS * plan.expert_bytes


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("how", ["slots", "budget"])
def test_prefill_and_decode_logits_equal_the_resident_model(moe16, prefetch, how):
    path, ref = moe16
    kw = dict(expert_slots=SLOTS) if how == "slots" else dict(gpu_budget=_quarter_budget(path))
    model = qlite.load(path, dtype="float32", prefetch=prefetch, **kw)
    assert all(c.slots == SLOTS for c in model.offload.caches)
    ids = _ids(2, 23)
    with torch.inference_mode():
        assert torch.equal(model(ids), ref(ids))  # batched prefill, all 16 experts needed
        for m in (model, ref):
            m.setup_cache(1, 64)
        prompt = ids[:1, :9]
        assert torch.equal(model(prompt, start=0), ref(prompt, start=0))
        for pos in range(9, 23):  # one-token decode steps
            step = ids[:1, pos:pos + 1]
            assert torch.equal(model(step, start=pos), ref(step, start=pos))
    s = model.offload_stats()
    assert s["misses"] > 0 and s["hits"] > 0
    assert (s["prefetch_issued"] > 0) == prefetch
    for c in model.offload.caches:
        assert c.buf.shape[0] == SLOTS and len(c.slot_of) <= SLOTS


@pytest.mark.parametrize("prefetch", [False, True])
def test_each_moe_layer_reads_its_routing_to_the_host_once(moe16, prefetch, monkeypatch):
    # With prefetch the next layer's guess travels in the same copy. Counted by wrapping the
    # one function that reads routing (to_host); tokens of a step: prefill 9, then 1.
    import qlite.offload
    path, _ = moe16
    model = qlite.load(path, dtype="float32", expert_slots=SLOTS, prefetch=prefetch)
    reads = []
    real = qlite.offload.to_host
    monkeypatch.setattr(qlite.offload, "to_host", lambda t: reads.append(t.numel()) or real(t))
    ids = _ids(1, 12)[0]
    layers = len(model.offload.caches)
    with torch.inference_mode():
        model.setup_cache(1, 16)
        model.prefill_row(0, ids[:9])
        assert len(reads) == layers
        for pos in range(9, 12):
            model.decode_step(ids[pos:pos + 1], torch.tensor([pos]))
    assert len(reads) == 4 * layers
    top_k = MOE16["num_experts_per_tok"]
    # the last layer has no next one to guess for
    assert reads[-layers:] == [top_k * (2 if prefetch else 1)] * (layers - 1) + [top_k]


@pytest.mark.parametrize("prefetch", [False, True])
def test_greedy_output_equals_the_resident_model(moe16, prefetch):
    path, ref = moe16
    model = qlite.load(path, dtype="float32", expert_slots=SLOTS, prefetch=prefetch)
    args = dict(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    want = ref.generate("hello world", **args)
    got = model.generate("hello world", **args)
    assert got.text() == want.text()
    assert got.stats.token_ids == want.stats.token_ids


@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_experts_equal_experts_with_fewer_slots_than_needed(slots, dtype):
    torch.manual_seed(0)
    experts = Experts(16, 24, 20)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    experts = experts.to(dtype)
    x = torch.randn(40, 24, dtype=dtype)
    ids = torch.stack([torch.randperm(16)[:6] for _ in range(40)])
    w = torch.rand(40, 6, dtype=dtype)
    want = experts(x, ids, w)
    stats = Stats()
    cache = ExpertCache(ExpertStore(experts, pin=False), slots, "cpu", LRFU(), stats)
    off = OffloadedExperts(experts, cache)
    assert torch.equal(off(x, ids, w), want)
    needed = ids.unique().numel()
    # Each needed expert copied exactly once even though only `slots` fit at a time.
    assert stats.misses == needed and stats.hits == 0
    assert stats.bytes_copied == needed * cache.store.row_bytes
    assert len(cache.slot_of) <= slots
    assert torch.equal(off(x, ids, w), want)  # and again with a warm cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_quant_experts_equal_quant_experts(dtype):
    from qlite.quant.experts import QuantExperts
    torch.manual_seed(0)
    dense = Experts(16, 64, 32)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()
    experts = QuantExperts.from_experts(dense, bits=4, group_size=32, method="rtn")
    x = torch.randn(30, 64, dtype=dtype)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(30)])
    w = torch.rand(30, 4, dtype=dtype)
    want = experts(x, ids, w)
    stats = Stats()
    store = ExpertStore(experts, pin=False)
    # qweight, scales, zeros of both weights in one row
    assert len(store.layout) == 6
    cache = ExpertCache(store, 3, "cpu", LRFU(), stats)
    assert torch.equal(OffloadedExperts(experts, cache)(x, ids, w), want)
    assert stats.misses == ids.unique().numel()


def test_grouped_mode_remaps_expert_ids_to_slots():
    # The CUDA path of QuantExperts; forced here on dense experts with top-2 routing, where
    # the order of each token's two additions cannot change the sum.
    torch.manual_seed(0)
    experts = Experts(16, 24, 20)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    stats = Stats()
    cache = ExpertCache(ExpertStore(experts, pin=False), 6, "cpu", LRU(), stats)
    off = OffloadedExperts(experts, cache, grouped=True)
    for t in (1, 2, 1, 9):  # decode-like calls fit in 6 slots; 9 tokens may not (per-expert)
        x = torch.randn(t, 24)
        ids = torch.stack([torch.randperm(16)[:2] for _ in range(t)])
        w = torch.rand(t, 2)
        assert torch.equal(off(x, ids, w), experts(x, ids, w))
        assert len(cache.slot_of) <= 6


def _trace_cache(policy, slots=3, num=6):
    torch.manual_seed(0)
    experts = Experts(num, 8, 4)  # 384 bytes per expert in float32
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    stats = Stats()
    return ExpertCache(ExpertStore(experts, pin=False), slots, "cpu", policy, stats), stats


def _call(cache, needed):
    cache.begin(needed)
    for e in needed:
        cache.acquire(e)
        cache.release(e)
    cache.end()
    assert len(cache.slot_of) <= cache.slots
    return cache.resident()


# Expert 0 is used on three calls in a row, then 1, 2, 3, 4 once each, three slots.
TRACE = [[0], [0], [0], [1], [2], [3], [4], [0]]


def test_lru_evicts_the_least_recently_used_even_if_frequent():
    cache, stats = _trace_cache(LRU())
    got = [_call(cache, n) for n in TRACE]
    assert got == [[0], [0], [0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 3, 4]]
    assert (stats.hits, stats.misses, stats.evictions) == (2, 6, 3)
    assert stats.bytes_copied == 6 * 384


def test_lrfu_keeps_the_frequently_used_expert():
    cache, stats = _trace_cache(LRFU(lam=0.05))
    got = [_call(cache, n) for n in TRACE]
    assert got == [[0], [0], [0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 3, 4]]
    assert (stats.hits, stats.misses, stats.evictions) == (3, 5, 2)
    assert stats.bytes_copied == 5 * 384


def test_lrfu_forgets_old_favourites_with_a_short_half_life():
    # lam = 1 halves a score every call: recency wins, as in LRU.
    cache, _ = _trace_cache(LRFU(lam=1.0))
    got = [_call(cache, n) for n in TRACE]
    assert got[5] == [1, 2, 3]


def test_stats_are_exact_on_a_scripted_trace_with_prefetch():
    cache, stats = _trace_cache(LRU(), slots=3)
    _call(cache, [0, 1])                    # 2 misses
    cache.prefetch([1, 2, 3])               # 1 resident; 2 and 3 copied, 0 evicted
    assert cache.resident() == [1, 2, 3]
    _call(cache, [2, 4])                    # 2 hit (a prefetch hit), 4 miss evicts 1 (LRU)
    assert cache.resident() == [2, 3, 4]
    cache.prefetch(list(range(6)))          # does not fit in 3 slots: nothing copied
    _call(cache, [3, 5])                    # 3 hit, a prefetch that was used late
    s = stats.as_dict()
    assert (s["hits"], s["misses"], s["prefetch_issued"], s["prefetch_hits"]) == (2, 4, 2, 2)
    assert s["bytes_copied"] == 6 * 384 and s["evictions"] == 3
    # guesses: {1,2,3} for [2,4] -> 1 of 2 right; {0..5} for [3,5] -> 2 of 2
    assert (s["guessed"], s["guessed_right"]) == (4, 3) and s["prefetch_accuracy"] == 0.75
    assert s["hit_rate"] == 2 / 6
    assert "hit rate 33.3%" in format_stats(s)


def test_a_call_needing_more_than_all_slots_recopies_only_what_it_must():
    cache, stats = _trace_cache(LRU(), slots=1)
    _call(cache, [5])
    # 5 is resident but needed after 1: the single slot goes to 1 first, 5 comes back after.
    assert _call(cache, [1, 5]) == [5]
    assert (stats.hits, stats.misses) == (1, 3)


def test_stats_reset_and_load_errors(moe16):
    path, _ = moe16
    model = qlite.load(path, dtype="float32", expert_slots=SLOTS)
    with torch.inference_mode():
        model(_ids(1, 5))
    assert model.offload_stats()["misses"] > 0
    model.reset_offload_stats()
    s = model.offload_stats()
    assert s["misses"] == s["hits"] == s["bytes_copied"] == 0 and s["stall_seconds"] == 0.0
    with pytest.raises(QliteError, match="expert_slots 17"):
        qlite.load(path, dtype="float32", expert_slots=17)
    with pytest.raises(QliteError, match="gpu_budget .* too small.* at least"):
        qlite.load(path, dtype="float32", gpu_budget="100KiB")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_offloaded_equals_resident_and_stays_in_budget(moe16, prefetch):
    path, _ = moe16
    ref = qlite.load(path, device="cuda", dtype="float32")
    ids = _ids(2, 23).cuda()
    with torch.inference_mode():
        want = ref(ids)
        ref.setup_cache(1, 64)
        want_steps = [ref(ids[:1, :9], start=0)] + [ref(ids[:1, p:p + 1], start=p)
                                                    for p in range(9, 23)]
    del ref
    torch.cuda.empty_cache()
    budget = _quarter_budget(path)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = qlite.load(path, device="cuda", dtype="float32", gpu_budget=budget,
                       prefetch=prefetch, context=64)
    with torch.inference_mode():
        assert torch.equal(model(ids), want)
        model.setup_cache(1, 64)
        got = [model(ids[:1, :9], start=0)] + [model(ids[:1, p:p + 1], start=p)
                                               for p in range(9, 23)]
    assert all(torch.equal(a, b) for a, b in zip(got, want_steps))
    assert torch.cuda.max_memory_allocated() - base <= budget
    assert model.offload_stats()["bytes_copied"] > 0


def test_lrfu_beats_lru_on_a_zipf_trace_and_the_bench_simulator_runs():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_offload", Path(__file__).parent.parent / "bench" / "bench_offload.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = bench.trace(64, 8, 800, 1.0, 0, seed=1)  # Qwen2-57B's shape, 16 GiB's 28 slots
    lru, lrfu = (bench.simulate(p, calls, 64, 28) for p in (LRU(), LRFU()))
    assert lrfu > lru + 0.03
    assert bench.belady(calls, 28) >= lrfu
