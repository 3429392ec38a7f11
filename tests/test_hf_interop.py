"""Hugging Face checkpoint interop: bit-exact round trips, sharding, ttl-native layout and bad input."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_script
from hf_reference import hf_causal_lm, hf_classifier
from safetensors import safe_open
from safetensors.torch import save_file

import ttl_core
from ttl_core.errors import CheckpointError, ConfigError

def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [None, "40KB"])
@pytest.mark.parametrize("kind", ["causal", "causal_tied", "classifier"])
def test_hf_to_ttl_to_hf_is_bit_identical(tmp_path, dtype, shard, kind):
    if kind == "classifier":
        hf = hf_classifier(num_labels=3)
    else:
        hf = hf_causal_lm(tie_word_embeddings=kind == "causal_tied", attention_bias=True)
    hf = hf.to(dtype)
    src, out = tmp_path / "src", tmp_path / "out"
    hf.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    model = ttl_core.load_pretrained(src)
    assert model.backbone.embed.weight.dtype == dtype
    ttl_core.save_pretrained(model, out, max_shard_size=shard or "2GB")
    assert_bit_identical(read_all(src), read_all(out))
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (out / "model.safetensors").exists()

    auto = transformers.AutoModelForSequenceClassification if kind == "classifier" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(out, dtype=dtype).eval()
    original = auto.from_pretrained(src, dtype=dtype).eval()  # not `hf`: its .to(bf16) also rounded inv_freq
    assert type(reloaded) is type(hf)
    ids = torch.randint(4, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)
    if kind == "classifier":
        assert reloaded.config.num_labels == 3


def test_exported_config_round_trips_and_transformers_reads_it(tmp_path):
    hf = hf_causal_lm(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf.save_pretrained(tmp_path / "src")
    model = ttl_core.load_pretrained(tmp_path / "src")
    assert model.config.rope_theta == 500000.0 and model.config.rope_type == "linear"
    ttl_core.save_pretrained(model, tmp_path / "out")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert ttl_core.LlamaConfig.from_hf_dict(model.config.to_hf_dict()) == model.config
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 3


def test_resharding_replaces_stale_shards(tmp_path):
    model = ttl_core.load_pretrained(_saved(hf_causal_lm(), tmp_path / "src"))
    ttl_core.save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    ttl_core.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_native_layout_round_trip_and_convert_script(tmp_path):
    hf = hf_causal_lm()
    _saved(hf, tmp_path / "hf")
    run = run_script("convert", "--from-hf", tmp_path / "hf", tmp_path / "native", "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "native" / "ttl_config.json").exists()
    assert "backbone.layers.0.attn.qkv.weight" in read_all(tmp_path / "native")
    native = ttl_core.load_pretrained(tmp_path / "native")
    assert native.backbone.embed.weight.dtype == torch.bfloat16
    run = run_script("convert", "--to-hf", tmp_path / "native", tmp_path / "back", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    back = read_all(tmp_path / "back")
    for key, tensor in read_all(tmp_path / "hf").items():
        assert torch.equal(back[key], tensor.to(torch.bfloat16).float()), key



def _saved(hf_model, directory: Path) -> Path:
    hf_model.save_pretrained(directory)
    return directory


def _rewrite(directory: Path, edit) -> None:
    tensors = read_all(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        ttl_core.load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        ttl_core.load_pretrained(d)


def test_wrong_vocab_size_is_a_shape_mismatch_naming_the_tensor(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.embed_tokens\.weight \[131, 64\].*\[200, 64\]"):
        ttl_core.load_pretrained(d)


def test_truncated_file_is_reported(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        ttl_core.load_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ttl_core.load_pretrained(d)


def test_missing_shard_and_corrupt_config(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path / "a")
    ttl_core.save_pretrained(ttl_core.load_pretrained(d), tmp_path / "sharded", max_shard_size="40KB")
    next((tmp_path / "sharded").glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="missing: .*model-00002"):
        ttl_core.load_pretrained(tmp_path / "sharded")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        ttl_core.load_pretrained(d)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    d = _saved(hf_causal_lm(), tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a pickle that would create a file if it were ever loaded
    (d / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*never unpickles.*safe_serialization"):
        ttl_core.load_pretrained(d)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture 'MistralForCausalLM'"),
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "unsupported activation hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "unsupported rope type 'dynamic'"),
])
def test_unsupported_configs_are_named(tmp_path, edit, message):
    d = _saved(hf_causal_lm(), tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.update(edit)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        ttl_core.load_pretrained(d)


def test_not_a_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ttl_core.load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        ttl_core.load_pretrained(tmp_path)


def test_convert_script_reports_errors_in_one_line(tmp_path):
    run = run_script("convert", "--to-hf", tmp_path / "missing", tmp_path / "out")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")
    assert "Traceback" not in run.stderr


def test_config_presets_and_validation():
    with pytest.raises(ConfigError, match="unknown preset"):
        ttl_core.LlamaConfig.from_preset("ttl-7b")
    with pytest.raises(ConfigError, match="unknown LlamaConfig field"):
        ttl_core.LlamaConfig.from_preset("tiny", hiden_size=3)
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        ttl_core.LlamaConfig(num_attention_heads=12, num_key_value_heads=5)
    assert ttl_core.LlamaConfig.from_preset("tiny", vocab_size=500).vocab_size == 500


def test_saved_config_records_the_weight_dtype(tmp_path):
    """config.json names the dtype the weights were written in, so transformers loads them without a cast."""
    hf = hf_causal_lm().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    model = ttl_core.load_pretrained(tmp_path / "src")
    ttl_core.save_pretrained(model, tmp_path / "same")
    ttl_core.save_pretrained(model, tmp_path / "half", dtype="float16")
    for name, dtype in (("same", torch.bfloat16), ("half", torch.float16)):
        assert transformers.AutoConfig.from_pretrained(tmp_path / name).dtype == dtype
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)  # dtype "auto": the config's
        assert loaded.model.embed_tokens.weight.dtype == dtype, name
        assert torch.equal(loaded.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(dtype))
