"""The model matches transformers on tiny random checkpoints, with and without the KV cache.

Tolerance: max |logit difference| <= 1e-4 in float32. Both sides run the same math in the same
order up to the summation order inside matmuls and expert accumulation (~1e-7 here)."""
import pytest
import torch
from conftest import save_tiny

import qlite

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
}
MOE_VARIANTS = {
    "moe": dict(),
    "moe_norm_topk": dict(norm_topk_prob=True),
    "moe_sparse_step_2": dict(decoder_sparse_step=2, num_hidden_layers=3),
    "moe_mlp_only_layers": dict(mlp_only_layers=[1], num_hidden_layers=3),
}


def _pair(tmp_path, moe, overrides):
    ref = save_tiny(tmp_path, moe=moe, **overrides)
    return qlite.load(tmp_path, dtype="float32"), ref


@pytest.mark.parametrize("name", list(VARIANTS) + list(MOE_VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    moe = name in MOE_VARIANTS
    model, ref = _pair(tmp_path, moe, {**VARIANTS, **MOE_VARIANTS}[name])
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_tied_checkpoint_has_no_lm_head_and_shares_the_embedding(tmp_path):
    model, _ = _pair(tmp_path, False, dict(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("moe", [False, True])
def test_cached_decode_equals_uncached_forward_at_every_step(tiny_dense, tiny_moe, moe):
    path, _ = tiny_moe if moe else tiny_dense
    model = qlite.load(path)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(2))
    model.setup_cache(1, 32)
    with torch.no_grad():
        full = model(ids)
        logits = [model(ids[:, :8], start=0)]
        for t in range(8, 20):
            logits.append(model(ids[:, t:t + 1], start=t))
    assert (torch.cat(logits, dim=1) - full).abs().max().item() <= 1e-4


def test_chunked_prefill_into_the_cache_equals_one_prefill(tiny_dense):
    model = qlite.load(tiny_dense[0])
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    model.setup_cache(1, 16)
    with torch.no_grad():
        full = model(ids)
        parts = torch.cat([model(ids[:, :10], start=0), model(ids[:, 10:], start=10)], dim=1)
    assert (parts - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("moe", [False, True])
def test_left_padded_batch_equals_each_sequence_alone(tiny_dense, tiny_moe, moe):
    path, _ = tiny_moe if moe else tiny_dense
    model = qlite.load(path)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 320, (1, 12), generator=g), torch.randint(0, 320, (1, 7), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        alone_a, alone_b = model(a), model(b)
    assert (out[0] - alone_a[0]).abs().max().item() <= 1e-4
    assert (out[1, 5:] - alone_b[0]).abs().max().item() <= 1e-4
    assert torch.isfinite(out).all()  # padding rows attend to themselves, never NaN


def test_left_padded_batch_decodes_through_the_cache(tiny_dense):
    model = qlite.load(tiny_dense[0])
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 320, (1, 9), generator=g), torch.randint(0, 320, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    nxt = torch.tensor([[7], [11]])
    model.setup_cache(2, 16)
    with torch.no_grad():
        model(batch, attention_mask=mask[:, :9], start=0)
        pos = (mask.cumsum(-1) - 1)[:, 9:]
        step = model(nxt, attention_mask=mask, positions=pos, start=9)
        want_a = model(torch.cat([a, nxt[:1]], dim=1))[0, -1]
        want_b = model(torch.cat([b, nxt[1:]], dim=1))[0, -1]
    assert (step[0, 0] - want_a).abs().max().item() <= 1e-4
    assert (step[1, 0] - want_b).abs().max().item() <= 1e-4


def _alone(model, prompt, steps):
    """Logits of prompt's prefill and of each decode step feeding `steps`, on a 1-row cache."""
    model.setup_cache(1, 32)
    out = [model.prefill_row(0, prompt)]
    for i, tok in enumerate(steps):
        out.append(model.decode_step(tok.view(1), torch.tensor([len(prompt) + i]))[0])
    return out


@pytest.mark.parametrize("moe", [False, True])
def test_rows_at_their_own_positions_equal_each_prompt_alone(tiny_dense, tiny_moe, moe):
    # Row 0 runs throughout, row 1 retires after 4 steps and takes a new prompt 2 steps
    # later, row 2 joins at step 3. Tolerance 1e-5 in float32: the same math per row, only
    # the matmuls' row count differs (summation order, ~1e-7 here).
    model = qlite.load((tiny_moe if moe else tiny_dense)[0], dtype="float32")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (9, 5, 3, 6)]
    steps = [torch.randint(0, 320, (n,), generator=g) for n in (10, 4, 7, 4)]
    plan = {0: (0, 0, 10), 1: (1, 0, 4), 2: (2, 3, 10), 3: (1, 6, 10)}  # row, first, last step
    with torch.no_grad():
        want = {p: _alone(model, prompts[p], steps[p]) for p in plan}
        model.setup_cache(3, 32)
        got = {p: [] for p in plan}
        live = {}  # row -> (prompt, steps done)
        for t in range(10):
            for p, (row, first, _) in plan.items():
                if t == first:
                    got[p].append(model.prefill_row(row, prompts[p]))
                    live[row] = (p, 0)
            for p, (row, _, last) in plan.items():
                if t == last and live.get(row, (None,))[0] == p:
                    del live[row]  # retired: its row is fed junk until reused
            tokens, positions = torch.zeros(3, dtype=torch.long), torch.full((3,), 31)
            for row, (p, i) in live.items():
                tokens[row], positions[row] = steps[p][i], len(prompts[p]) + i
            logits = model.decode_step(tokens, positions)
            for row, (p, i) in list(live.items()):
                got[p].append(logits[row])
                live[row] = (p, i + 1)
    for p in plan:
        assert len(got[p]) == len(want[p]) == plan[p][2] - plan[p][1] + 1
        for a, b in zip(got[p], want[p]):
            assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tiny_moe, dtype):
    # bf16 keeps 8 mantissa bits: logits of this 2-layer model stay within a few 1e-2.
    path, _ = tiny_moe
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = qlite.load(path)(ids)
        half = qlite.load(path, dtype=dtype)(ids)
    assert half.dtype == getattr(torch, dtype)
    assert (half.float() - ref).abs().max().item() <= 0.1


def test_moe_routes_by_grouping_tokens_per_expert():
    from qlite.model import group_by_expert
    ids = torch.tensor([[3, 1], [1, 0], [3, 2]])
    order, counts = group_by_expert(ids, 5)
    assert counts.tolist() == [1, 2, 1, 2, 0]
    assert ids.flatten()[order].tolist() == [0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_row_half_products_on_a_slow_cpu_run_in_float32_by_chunks(dtype, monkeypatch):
    """On a CPU without bf16 units, 16 rows or more go through float32 (the weight converted a
    few rows at a time); fewer rows stay a 16-bit product. Chunks may sum in another order than
    one product: within one unit of the output's last place."""
    import qlite.model as M
    monkeypatch.setattr(M, "CPU_HALF_IS_SLOW", True)
    monkeypatch.setattr(M, "UPCAST_WEIGHTS", 8 * 24)  # 8 weight rows of 24 at a time: 5 chunks
    torch.manual_seed(0)
    lin = M.Linear(24, 37).to(dtype).requires_grad_(False)
    for rows in (16, 40):
        x = torch.randn(2, rows // 2 if rows == 16 else rows, 24).to(dtype)
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        torch.testing.assert_close(lin(x).float(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)
    x = torch.randn(1, 3, 24).to(dtype)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_decode_step_of_the_first_rows_equals_the_full_step(tiny_dense):
    # A server steps only rows 0..k-1 when the rest are idle. Tolerance as above (float32,
    # only the matmuls' row count differs); the idle rows' cache is left as it was.
    model = qlite.load(tiny_dense[0], dtype="float32")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (7, 4, 5, 6)]
    tokens = torch.randint(0, 320, (4,), generator=g)
    positions = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        model.setup_cache(4, 32)
        for row, p in enumerate(prompts):
            model.prefill_row(row, p)
        idle = model.model.layers[0].self_attn.cache.k[2:].clone()
        first = model.decode_step(tokens[:2], positions[:2])
        assert torch.equal(model.model.layers[0].self_attn.cache.k[2:], idle)
        full = model.decode_step(tokens, positions)
    assert first.shape == (2, 320)
    assert (first - full[:2]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("slow_half", [True, False])
def test_bfloat16_decodes_on_either_kind_of_cpu(tiny_dense, slow_half, monkeypatch):
    """Without bf16 units the cache of a bfloat16 model is float32 (setup_cache): a decode
    step's indexed write converts the new keys (it does not as a sliced write does). Whichever
    CPU runs the suite, both paths run; bfloat16 keys widen exactly, so the written slot equals
    the step's keys in either cache."""
    import qlite.model as M
    monkeypatch.setattr(M, "CPU_HALF_IS_SLOW", slow_half)
    model = qlite.load(tiny_dense[0], dtype="bfloat16")
    gen = model.generate("hello world", temperature=0, max_new_tokens=4, repetition_penalty=1.0)
    gen.text()
    assert len(gen.stats.token_ids) == 4
    cache = model.model.layers[0].self_attn.cache
    assert cache.k.dtype == (torch.float32 if slow_half else torch.bfloat16)
    with torch.no_grad():
        pos = torch.tensor([9])
        model.decode_step(torch.tensor([5]), pos)
        k = cache.k[0, :, 9].clone()
        model.decode_step(torch.tensor([5]), pos)  # the same token again: the same keys
    assert torch.equal(cache.k[0, :, 9], k) and k.abs().sum() > 0
