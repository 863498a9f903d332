"""The decode step as one graph: torch.compile(fullgraph=True) traces it without a break (a
break, a host read or an op without a fake implementation fails the compile), and compiled
greedy decoding gives the eager tokens.

Most cases compile with backend="aot_eager" (dynamo and AOT tracing, ~5 s each on an idle
2-core CPU), which proves the graph is whole; one case goes through inductor, as
qlite.load(compile=True) does, to prove the generated code computes the same tokens."""
import warnings

import pytest
import torch
from conftest import save_tiny

import qlite
from qlite.errors import QliteError, QliteWarning
from qlite.quantize import quantize_checkpoint

GREEDY = dict(temperature=0, max_new_tokens=6, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A dense model, and an MoE model whose layer 1 is a dense MLP (QuantExperts and
    QuantLinear MLPs in one graph), each also as int8 and int4 (g32) checkpoints."""
    out = {}
    for name, kw in (("dense", {}), ("moe", dict(moe=True, mlp_only_layers=[1],
                                                  shared_expert_intermediate_size=64))):
        src = tmp_path_factory.mktemp(name)
        save_tiny(src, **kw)
        out[name, "16-bit"] = src
        for bits in (8, 4):
            out[name, f"int{bits}"] = quantize_checkpoint(
                src, tmp_path_factory.mktemp(f"{name}{bits}") / "q", bits,
                32 if bits == 4 else None, "rtn")
    return out


def _tokens(model, prompt="hello world"):
    gen = model.generate(prompt, **GREEDY)
    gen.text()
    return gen.stats.token_ids


@pytest.mark.parametrize("name, kind, dtype", [
    ("dense", "16-bit", "float32"), ("dense", "int4", "bfloat16"),
    ("moe", "16-bit", "bfloat16"), ("moe", "int8", "float32"), ("moe", "int4", "float32")])
def test_decode_step_compiles_whole_and_decodes_as_eager(dirs, name, kind, dtype):
    model = qlite.load(dirs[name, kind], dtype=dtype)
    want = _tokens(model)
    model.compile_decode(backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", QliteWarning)  # a fallback to eager fails the test
        got = _tokens(model)
    assert model._compiled_shapes  # the compiled step ran
    assert got == want and len(got) == GREEDY["max_new_tokens"]


def test_inductor_compiled_greedy_equals_eager(dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a cold compile cache
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # as a fresh process
    eager = qlite.load(dirs["moe", "int4"], dtype="float32")
    want = _tokens(eager)
    model = qlite.load(dirs["moe", "int4"], dtype="float32", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QliteWarning)
        assert _tokens(model) == want
    assert (tmp_path / "qlite" / "torch-compile").is_dir()  # torch's caches kept on disk


def test_a_failing_compile_warns_once_and_decodes_eager(dirs, monkeypatch):
    model = qlite.load(dirs["dense", "16-bit"], dtype="float32")
    want = _tokens(model)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this\nsecond line")
    model.compile_decode(backend="aot_eager")
    monkeypatch.setattr(model, "_compiled", broken)
    with pytest.warns(QliteWarning, match=r"^compile: the decode step runs eager "
                                          r"\(RuntimeError: no compiler for this\)$"):
        got = _tokens(model)
    assert got == want
    with warnings.catch_warnings():
        warnings.simplefilter("error", QliteWarning)  # once: later steps are plainly eager
        assert _tokens(model) == want


def test_compile_on_an_offloaded_model_warns_and_stays_eager(tmp_path):
    save_tiny(tmp_path, moe=True)
    with pytest.warns(QliteWarning, match="offloaded model .* stays eager"):
        model = qlite.load(tmp_path, dtype="float32", expert_slots=4, compile=True)
    assert _tokens(model) == _tokens(qlite.load(tmp_path, dtype="float32"))


def test_a_step_past_the_cache_is_an_error_and_a_longer_reply_resizes_it(dirs):
    model = qlite.load(dirs["dense", "16-bit"], dtype="float32")
    model.setup_cache(1, 8)
    with pytest.raises(QliteError, match="length 9 is outside the KV cache's 1..8 slots"):
        model.decode_step(torch.tensor([1]), torch.tensor([8]), length=9)
    model.compile_decode(backend="aot_eager")
    _tokens(model)  # sets up a cache that fits
    assert model.cache.max_len >= 6 + len(model.cache.held[0]) - 6
