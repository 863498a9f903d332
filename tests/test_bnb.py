"""`--backend bnb`: bitsandbytes NF4 / int8 layers in place of the model's linears and experts.

bitsandbytes >= 0.45 runs both matmuls on the CPU; where it cannot be imported or its CPU
backend fails, every test here skips with the reason.
"""
import pytest
import torch
import torch.nn as nn

import qlite
from qlite.errors import QliteError


def _bnb_works():
    try:
        import bitsandbytes as bnb
        lin = bnb.nn.Linear4bit(64, 8, bias=False, compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4")
        lin = lin.to("cpu")
        lin(torch.randn(2, 64))
        return None
    except Exception as e:  # pragma: no cover - depends on the install
        return f"bitsandbytes cannot run NF4 on the CPU here: {e}"


_WHY = _bnb_works()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _dequantized_reference(model_dir, bnb_model):
    """A plain qlite model whose weights are the bitsandbytes layers' dequantized weights: the
    bnb model must compute the same function up to float rounding."""
    import bitsandbytes.functional as BF
    from qlite.bnb import BnbExperts

    def weight_of(layer):
        w = layer.weight
        if hasattr(w, "quant_state") and w.quant_state is not None:  # NF4
            return BF.dequantize_4bit(w.data, w.quant_state).float()
        scb = w.SCB if w.SCB is not None else layer.state.SCB  # moved there by a forward
        return w.data.float() * scb.float()[:, None] / 127  # LLM.int8: row-wise absmax

    ref = qlite.load(model_dir, dtype="float32")
    bnb_modules = dict(bnb_model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            new = bnb_modules[name]
            if isinstance(module, nn.Linear) and not isinstance(new, nn.Linear) or \
                    type(new).__module__.startswith("bitsandbytes"):
                module.weight.copy_(weight_of(new))
            elif isinstance(new, BnbExperts):
                for e in range(new.num_experts):
                    module.gate_up_proj[e] = weight_of(new.gate_up[e])
                    module.down_proj[e] = weight_of(new.down[e])
    return ref


@pytest.mark.parametrize("bits, bound", [(8, 0.03), (4, 0.25)])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bnb_backend_matches_its_own_dequantized_weights(tiny_dense, tiny_moe, moe, bits, bound):
    from qlite.bnb import to_bitsandbytes
    path, hf = tiny_moe if moe else tiny_dense
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    model = to_bitsandbytes(qlite.load(path, dtype="float32"), bits=bits)
    with torch.no_grad():
        out = model(ids)
        exact = hf(ids).logits
        ref = _dequantized_reference(path, model)(ids)
    # The function computed is the one of the dequantized weights (int8 re-quantizes the
    # activations per row, hence the looser bound there) ...
    assert _rel(out, ref) < (2e-2 if bits == 8 else 1e-4)
    # ... and it is close to the unquantized model: int8 ~0.5%, NF4 ~10% on random weights.
    assert _rel(out, exact) < bound


def test_bnb_backend_replaces_linears_and_experts_but_not_router_or_lm_head(tiny_moe):
    import bitsandbytes as bnb
    from qlite.bnb import BnbExperts, to_bitsandbytes
    path, _ = tiny_moe
    model = to_bitsandbytes(qlite.load(path, dtype="float32"), bits=4)
    mlp = model.model.layers[0].mlp
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(mlp.shared_expert.down_proj, bnb.nn.Linear4bit)
    assert isinstance(mlp.experts, BnbExperts)
    from qlite.model import Linear  # the model's own 16-bit linear (bnb's are nn.Linear too)
    assert type(mlp.gate) is Linear and type(mlp.shared_expert_gate) is Linear
    assert type(model.lm_head) is Linear
    assert model.backend == "bnb-nf4"


def test_bnb_backend_runs_in_bfloat16(tiny_dense):
    from qlite.bnb import to_bitsandbytes
    path, hf = tiny_dense
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))
    for bits in (4, 8):
        model = to_bitsandbytes(qlite.load(path, dtype="bfloat16"), bits=bits)
        with torch.no_grad():
            out = model(ids)
            exact = hf(ids).logits
        assert out.dtype == torch.bfloat16
        assert _rel(out.float(), exact) < 0.3


def test_bnb_backend_rejects_other_bit_widths(tiny_dense):
    from qlite.bnb import to_bitsandbytes
    with pytest.raises(QliteError, match="bits=3"):
        to_bitsandbytes(qlite.load(tiny_dense[0], dtype="float32"), bits=3)


def test_load_with_bnb_backend(tiny_dense):
    import bitsandbytes as bnb
    model = qlite.load(tiny_dense[0], dtype="float32", backend="bnb")
    assert isinstance(model.model.layers[1].mlp.down_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
