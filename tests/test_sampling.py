"""Device sampling (qlite.sampling) against the host sampler it replaced.

`host_probs` / `host_greedy` below are qlite's previous sampler, kept here as the oracle:
penalty, temperature, top-k by threshold, top-p over the sorted distribution (it then drew
with torch.multinomial on the host). Greedy and the penalty must agree exactly; draws are
compared with the old sampler's distribution."""
import pytest
import torch

from qlite.sampling import History, device_generator, sample


def host_probs(logits, temperature, top_k, top_p, penalty, seen):
    """The old sampler's distribution (temperature > 0); it drew with torch.multinomial."""
    logits = logits.clone()
    if penalty != 1.0 and seen is not None and seen.numel():
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / penalty, prev * penalty)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        probs = probs.scatter(0, idx[drop], 0.0)
        probs = probs / probs.sum()
    return probs


def host_greedy(logits, penalty, seen):
    logits = logits.clone()
    if penalty != 1.0 and seen.numel():
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / penalty, prev * penalty)
    return int(logits.argmax())


def test_greedy_and_the_penalty_equal_the_host_sampler():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    seen = torch.rand(64, 50, generator=g) < 0.2
    for penalty in (1.0, 1.3, 0.7):
        got = sample(logits, 0.0, 20, 0.8, penalty, seen)
        want = [host_greedy(row, penalty, seen[i].nonzero()[:, 0])
                for i, row in enumerate(logits)]
        assert got.tolist() == want


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 4, 1.0, 1.0), (1.3, 0, 0.8, 1.0), (0.8, 5, 0.9, 1.5)])
def test_draws_follow_the_host_samplers_distribution(temperature, top_k, top_p, penalty):
    # 8 tokens, 20,000 draws in one batched call. Each frequency's standard deviation is at
    # most 0.0035 (sqrt(.25 / 20000)); the bound, 0.015, is over 4 of them. Tokens the old
    # sampler gives probability 0 (cut by top-k/top-p) must never be drawn.
    logits = torch.tensor([2.0, 1.5, 1.2, 0.3, -0.5, 0.9, -2.0, 1.0])
    seen = torch.tensor([0, 5])
    mask = torch.zeros(8, dtype=torch.bool)
    mask[seen] = True
    want = host_probs(logits, temperature, top_k, top_p, penalty, seen)
    n = 20000
    got = sample(logits.expand(n, 8), temperature, top_k, top_p, penalty, mask.expand(n, 8),
                 device_generator(2, "cpu"))
    got = torch.bincount(got, minlength=8) / n
    assert ((got > 0) == (want > 0)).all()
    assert (got - want).abs().max().item() <= 0.015


def test_a_seed_repeats_its_draws_and_rows_draw_independently():
    logits = torch.zeros(4, 1000)
    a = sample(logits, 1.0, 0, 1.0, 1.0, None, device_generator(5, "cpu"))
    b = sample(logits, 1.0, 0, 1.0, 1.0, None, device_generator(5, "cpu"))
    assert a.tolist() == b.tolist()
    assert len(set(a.tolist())) > 1  # uniform over 1000: four equal draws would be a bug


def test_history_marks_the_prompt_and_each_step():
    h = History(2, 10, "cpu")
    h.reset(1, torch.tensor([3, 3, 7]))
    h.add(torch.tensor([1, 2]))
    assert h.seen[0].nonzero()[:, 0].tolist() == [1]
    assert h.seen[1].nonzero()[:, 0].tolist() == [2, 3, 7]
    h.reset(1, torch.tensor([0]))
    assert h.seen[1].nonzero()[:, 0].tolist() == [0]
