"""The placement planner on the published configs of Qwen2-57B-A14B and Qwen1.5-MoE-A2.7B."""
from pathlib import Path

import pytest
import torch

from qlite.config import load_config
from qlite.errors import QliteError
from qlite.plan import GiB, make_plan, parse_bytes, plan_text

FIXTURES = Path(__file__).parent / "fixtures"
Q57 = FIXTURES / "qwen2-57b-a14b.json"
Q15 = FIXTURES / "qwen1.5-moe-a2.7b.json"


def _plan(path, budget=None, bits=4, context=8192, **kw):
    return make_plan(load_config(path), budget, kw.pop("slots", None), context, "cuda",
                     torch.bfloat16, bits, **kw)


def test_16bit_bytes_add_up_to_the_published_parameter_counts():
    for path, params in ((Q57, 57.41e9), (Q15, 14.32e9)):
        p = _plan(path, bits=16)
        weights = sum(b for k, b in p.parts.items() if k not in ("kv cache", "workspace"))
        embedding = 151936 * load_config(path).hidden_size * 2  # in host memory (untied)
        assert "embedding" not in p.parts
        assert abs((weights + embedding + p.host_expert_bytes) / 2 - params) / params < 0.002


def test_int4_expert_of_qwen2_57b_is_packed_nibbles_plus_group_scales_and_zeros():
    # lm_head int4, embedding 16-bit: the defaults of `qlite quantize`
    p = _plan(Q57)
    gate_up = 5120 * 3584 // 2 + 5120 * (3584 // 128) * 4   # [2I, D]: nibbles + fp16 scale, zero
    down = 3584 * 2560 // 2 + 3584 * (2560 // 128) * 4       # [D, I]
    assert p.expert_bytes == gate_up + down == 14_622_720
    assert p.moe_layers == 28 and p.num_experts == 64
    # KV cache: 2 (k, v) x 28 layers x 4 kv heads x 128 x 8192 tokens x 2 bytes
    assert p.parts["kv cache"] == 2 * 28 * 4 * 128 * 8192 * 2


@pytest.mark.parametrize("budget,slots", [("24GiB", 49), ("16GiB", 28), ("12GiB", 18)])
def test_qwen2_57b_int4_slots_per_budget(budget, slots):
    p = _plan(Q57, budget)
    assert p.slots == slots
    assert p.total <= parse_bytes(budget) < p.total + p.moe_layers * p.expert_bytes
    assert p.embed_on_cpu and "embedding" not in p.parts  # untied: its GiB go to experts


def test_qwen15_moe_int4_at_4gib_and_the_context_it_costs():
    assert _plan(Q15, "4GiB").slots == 11
    # 16 kv heads: the KV cache for 8192 tokens is 1.5 GiB; a shorter context buys slots.
    assert _plan(Q15, "4GiB").parts["kv cache"] == int(1.5 * GiB)
    assert _plan(Q15, "4GiB", context=2048).slots > 11


def test_too_small_budget_states_the_minimum():
    p = _plan(Q57, "24GiB")
    assert p.minimum == p.fixed_bytes + 28 * p.expert_bytes
    with pytest.raises(QliteError, match=r"gpu_budget 5\.00 GiB is too small.*at least 5\.48 GiB"):
        _plan(Q57, "5GiB")
    assert _plan(Q57, p.minimum).slots == 1


def test_expert_slots_option():
    assert _plan(Q57, slots=8).slots == 8
    with pytest.raises(QliteError, match="expert_slots 65"):
        _plan(Q57, slots=65)
    with pytest.raises(QliteError, match="gpu_budget .* too small for 64 expert slots"):
        _plan(Q57, "24GiB", slots=64)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30
    assert parse_bytes("16 GB") == 16 * 10 ** 9
    assert parse_bytes("1.5g") == 1_500_000_000
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "24XB", "-1GiB", 0):
        with pytest.raises(QliteError, match="gpu_budget"):
            parse_bytes(bad)


def test_plan_table_text():
    text = plan_text(str(Q57), "24GiB", bits=4, context=8192)
    for want in ("int4 weights", "shared experts", "kv cache", "workspace",
                 "routed experts: 49 of 64 per layer x 28 layers",
                 "experts resident: 1372 of 1792 (77%)", "smallest budget that runs",
                 "5.48 GiB"):
        assert want in text, want
    with pytest.raises(QliteError, match="context 99999"):
        plan_text(str(Q57), "24GiB", bits=4, context=99999)
    with pytest.raises(QliteError, match="bits 3"):
        plan_text(str(Q57), "24GiB", bits=3)
