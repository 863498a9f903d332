"""Configuration and checkpoint loading: both config key styles, sharded checkpoints, and a
clear one-line error naming the file, field or tensor for every kind of bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qlite
from qlite.config import config_from_dict, load_config
from qlite.errors import QliteError

BASE = dict(architectures=["Qwen2ForCausalLM"], vocab_size=10, hidden_size=8,
            intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


def test_reads_both_rope_key_styles():
    old = config_from_dict(dict(BASE, rope_theta=1e6))
    new = config_from_dict(dict(BASE, rope_parameters={"rope_type": "default",
                                                       "rope_theta": 1e6}))
    assert old.rope_theta == new.rope_theta == 1e6


def test_num_key_value_heads_defaults_to_mha():
    assert config_from_dict(BASE).num_key_value_heads == 2


def test_moe_layer_rule_follows_sparse_step_and_mlp_only_layers():
    cfg = config_from_dict(dict(BASE, architectures=["Qwen2MoeForCausalLM"], num_hidden_layers=6,
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
                                decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize("raw, message", [
    (dict(BASE, architectures=["LlamaForCausalLM"]), "unsupported architecture 'LlamaForCausalLM'"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "missing field 'hidden_size'"),
    (dict(BASE, use_sliding_window=True, sliding_window=4096), "use_sliding_window"),
    (dict(BASE, rope_scaling={"type": "yarn", "factor": 4}), "rope scaling 'yarn'"),
    (dict(BASE, architectures=["Qwen2MoeForCausalLM"]), "missing field 'num_experts'"),
])
def test_bad_config_names_the_file_and_field(tmp_path, raw, message):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(QliteError, match=message) as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_missing_model_directory(tmp_path):
    with pytest.raises(QliteError, match="no such model directory"):
        qlite.load(tmp_path / "nope")


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_moe):
    src, ref = tiny_moe
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(qlite.load(tmp_path)(ids), qlite.load(src)(ids))


def _copy_with(tmp_path, src, edit):
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    return tmp_path


def test_missing_tensor_is_named(tmp_path, tiny_dense):
    path = _copy_with(tmp_path, tiny_dense[0],
                      lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(QliteError, match="'model.layers.1.self_attn.k_proj.bias' is missing"):
        qlite.load(path)


def test_missing_expert_tensor_is_named(tmp_path, tiny_moe):
    path = _copy_with(tmp_path, tiny_moe[0],
                      lambda t: t.pop("model.layers.0.mlp.experts.5.up_proj.weight"))
    with pytest.raises(QliteError, match=r"experts\.5\.up_proj\.weight' is missing"):
        qlite.load(path)


def test_unexpected_tensor_is_named(tmp_path, tiny_dense):
    path = _copy_with(tmp_path, tiny_dense[0],
                      lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(QliteError, match="unexpected tensor 'model.layers.9.extra.weight'"):
        qlite.load(path)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path, tiny_dense):
    path = _copy_with(tmp_path, tiny_dense[0],
                      lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(QliteError, match=r"'model.norm.weight' has shape \[63\], the config "
                                         r"says \[64\]") as e:
        qlite.load(path)
    assert "model.safetensors" in str(e.value)


def test_truncated_shard_is_reported_before_loading(tmp_path, tiny_dense):
    path = _copy_with(tmp_path, tiny_dense[0], lambda t: None)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(QliteError, match="truncated") as e:
        qlite.load(path)
    assert str(file) in str(e.value)


def test_corrupt_header_is_reported(tmp_path, tiny_dense):
    path = _copy_with(tmp_path, tiny_dense[0], lambda t: None)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(QliteError, match="model.safetensors"):
        qlite.load(path)


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from qlite.cli import main
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err


def test_inspect_reports_architecture_and_bytes(tiny_moe, capsys):
    from qlite.cli import main
    main(["inspect", str(tiny_moe[0])])
    out = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM" in out and "8 routed (top 2)" in out and "MB on disk" in out


def test_progress_line_shows_tensors_bytes_and_the_end(capsys):
    from qlite.cli import progress_printer
    show = progress_printer()
    show("quantizing", 0, 8 << 20, tensors=(0, 4))
    show("quantizing", 8 << 20, 8 << 20, tensors=(4, 4))
    err = capsys.readouterr().err
    assert "4/4 tensors" in err and "8/8 MiB" in err and "100.0%" in err
    assert err.endswith("\n")
