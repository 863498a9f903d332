"""`qlite quantize --method gptq` (qlite/calibrate.py) on tiny random dense and MoE models."""
import importlib.util
import inspect
import json
import json.decoder
import json.encoder
import sysconfig
from pathlib import Path

import pytest
import torch

import qlite
from qlite import calibrate
from qlite.cli import main
from qlite.errors import QliteError
from qlite.kernels.reference import unpack_int4
from qlite.quant.formats import quantize
from qlite.quant.gptq import gptq_quantize
from qlite.quantize import quantize_checkpoint

from conftest import save_tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Calibration text: ~3000 tokens of the tiny tokenizer (trained on json.decoder)."""
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    return f


@pytest.fixture(scope="module")
def moe32(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe32")
    return path, save_tiny(path, moe=True, shared_expert_intermediate_size=64)


def _logit_error(out, ref, ids):
    with torch.no_grad():
        a, b = qlite.load(out, dtype="float32")(ids), ref(ids)
    return ((a - b).norm() / b.norm()).item()


def _ids(src, text, n=1024):
    return torch.tensor(qlite.load(src).tokenizer.encode(text.read_text())[:n]).view(-1, 512)


def test_dense_gptq_beats_rtn_and_layer_zero_is_gptq_of_its_inputs(tiny_dense, text, tmp_path):
    src, _ = tiny_dense
    out = tmp_path / "gptq"
    main(["quantize", str(src), str(out), "--method", "gptq", "--group-size", "32",
          "--symmetric", "--calibration", str(text), "--calibration-tokens", "1024"])
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"] == {
        "text": str(text), "tokens": 1024, "sequence_length": 512}
    rtn = quantize_checkpoint(src, tmp_path / "rtn", 4, 32, "rtn", symmetric=True)
    ref = qlite.load(src, dtype="float32")
    ids = _ids(src, text)
    # On the calibration text: measured 0.057 (GPTQ) vs 0.129 (RTN) at 2048 tokens.
    gptq_err, rtn_err = _logit_error(out, ref, ids), _logit_error(rtn, ref, ids)
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)

    # Layer 0's q/k/v: GPTQ (computed here, in one piece) of the source weights with the
    # Hessian of input_layernorm(embedding) over the same calibration ids.
    model = qlite.load(out, dtype="float32")
    attn = ref.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    expect = unpack_int4(gptq_quantize(w, h, 32, True).qweight)
    got = unpack_int4(torch.cat([model.model.layers[0].self_attn.q_proj.qweight,
                                 model.model.layers[0].self_attn.k_proj.qweight,
                                 model.model.layers[0].self_attn.v_proj.qweight]))
    # float32 sums in another order may flip a code sitting on a rounding boundary; wrong
    # inputs (e.g. without the norm) agree on ~70%
    assert (expect == got).float().mean() > 0.98

    # Layer 0's o_proj (true sequential): GPTQ of its inputs as the *quantized* q/k/v make them.
    def o_proj_codes(source):
        xs = []
        hook = source.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: xs.append(args[0].reshape(-1, 64)))
        with torch.no_grad():
            source(ids)
        hook.remove()
        x = torch.cat(xs)
        w = attn.o_proj.weight.detach()
        return unpack_int4(gptq_quantize(w, 2 * x.T @ x / x.shape[0], 32, True).qweight)
    got = unpack_int4(model.model.layers[0].self_attn.o_proj.qweight)
    same, from_float = [(o_proj_codes(m) == got).float().mean().item() for m in (model, ref)]
    assert same > 0.98 and from_float < same - 0.02, (same, from_float)


def test_moe_experts_calibrated_from_their_tokens_or_counted_as_fallback(moe32, text, tmp_path,
                                                                        monkeypatch):
    src = moe32[0]
    ref = qlite.load(src, dtype="float32")
    out = quantize_checkpoint(src, tmp_path / "q", 4, 32, "gptq", calibration=text,
                              calibration_tokens=1024)
    q = json.loads((out / "config.json").read_text())["quantization"]["calibration"]
    assert q["experts_gptq"] + q["experts_fallback"] == 2 * 8  # layers x experts
    assert q["experts_gptq"] > 0 and q["fallback_method"] == "hqq"
    ids = _ids(src, text)
    hqq = quantize_checkpoint(src, tmp_path / "hqq", 4, 32, "hqq")
    err, hqq_err = _logit_error(out, ref, ids), _logit_error(hqq, ref, ids)
    assert err < 0.8 * hqq_err

    # No expert with enough tokens: every expert is HQQ's, exactly.
    monkeypatch.setattr(calibrate, "MIN_EXPERT_TOKENS", 10 ** 9)
    out2 = quantize_checkpoint(src, tmp_path / "q2", 4, 32, "gptq", calibration=text,
                               calibration_tokens=1024)
    q2 = json.loads((out2 / "config.json").read_text())["quantization"]["calibration"]
    assert (q2["experts_gptq"], q2["experts_fallback"]) == (0, 16)
    experts = qlite.load(out2, dtype="float32").model.layers[1].mlp.experts
    w = ref.model.layers[1].mlp.experts.gate_up_proj[5].detach()
    assert torch.equal(experts.gate_up_proj.qweight[5], quantize(w, 4, 32, False, "hqq").qweight)


def test_interrupted_gptq_leaves_nothing(tiny_dense, text, tmp_path):
    def interrupt(stage, done, total, tensors=None):
        if stage.startswith("GPTQ") and done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_dense[0], tmp_path / "q", 4, 32, "gptq", calibration=text,
                            calibration_tokens=512, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=8, method="gptq"), "method gptq: int4 only"),
    (dict(bits=4, group_size=32, method="hqq", calibration_tokens=512), "only with method gptq"),
    (dict(bits=4, group_size=32, method="gptq", calibration_tokens=100), "at least 512"),
    (dict(bits=4, group_size=32, method="gptq", calibration="/nonexistent.txt"),
     "nonexistent.txt: unreadable"),
])
def test_bad_calibration_options_write_nothing(tiny_dense, tmp_path, kwargs, match):
    with pytest.raises(QliteError, match=match):
        quantize_checkpoint(tiny_dense[0], tmp_path / "q", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_short_calibration_text_is_refused(tiny_dense, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("def f(): pass\n")
    with pytest.raises(QliteError, match="fewer than one sequence"):
        quantize_checkpoint(tiny_dense[0], tmp_path / "q", 4, 32, "gptq", calibration=f)


def test_default_calibration_text_is_disjoint_from_the_quality_bench():
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_quality", root / "bench" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert not set(bench.STDLIB_FILES) & set(calibrate.STDLIB_FILES)

    class Chars:  # a tokenizer of one id per character: the count is the text's length
        def encode(self, text):
            return [ord(c) % 100 for c in text]

    ids, what = calibrate.calibration_ids(Chars(), None, 4096)
    assert what == "python-stdlib" and ids.shape == (8, 512)
    # one sequence from each of the first 8 files, not 8 from the first one
    root = Path(sysconfig.get_paths()["stdlib"])
    for row, name in zip(ids, calibrate.STDLIB_FILES):
        assert row.tolist() == Chars().encode((root / name).read_text()[:512]), name
