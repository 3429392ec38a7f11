"""Hugging Face checkpoints that ttl refuses, each in one line naming what is wrong: missing or unexpected
tensors, truncated files and shards, pickles, unsupported configs."""

from pathlib import Path

import pytest
import torch
from helpers import run_script
from hf_reference import edit_config, hf_causal_lm, read_all, saved_hf
from safetensors import safe_open
from safetensors.torch import save_file

import ttl_core
from ttl_core.errors import CheckpointError, ConfigError


def rewrite_tensors(directory: Path, edit) -> None:
    tensors = read_all(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
     r"unexpected tensors: model\.layers\.0\.extra\.weight"),
])
def test_missing_and_unexpected_tensors_are_named(tmp_path, edit, message):
    d = saved_hf(hf_causal_lm(), tmp_path)
    rewrite_tensors(d, edit)
    with pytest.raises(CheckpointError, match=message):
        ttl_core.load_pretrained(d)


def test_rotary_buffers_saved_by_older_transformers_are_ignored(tmp_path):
    """Older transformers versions saved each layer's rotary inv_freq, state dicts gathered with the buffers hold the
    model's: no weights, so the checkpoint loads, as in transformers, and the frequencies stay ttl's own."""
    hf = hf_causal_lm()
    d = saved_hf(hf, tmp_path)
    gen = torch.Generator().manual_seed(7)
    rewrite_tensors(d, lambda t: t.update({f"model.{where}rotary_emb.inv_freq": torch.rand(8, generator=gen)
                                    for where in ("", "layers.0.self_attn.", "layers.1.self_attn.")}))
    ours = ttl_core.load_pretrained(d)
    ids = torch.randint(4, 131, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_wrong_vocab_size_is_a_shape_mismatch_naming_the_tensor(tmp_path):
    d = saved_hf(hf_causal_lm(), tmp_path)
    edit_config(d, vocab_size=200)
    with pytest.raises(CheckpointError, match=r"shape mismatch: model\.embed_tokens\.weight \[131, 64\].*\[200, 64\]"):
        ttl_core.load_pretrained(d)


def test_truncated_file_is_reported(tmp_path):
    d = saved_hf(hf_causal_lm(), tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        ttl_core.load_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ttl_core.load_pretrained(d)


def test_missing_shard_and_corrupt_config(tmp_path):
    d = saved_hf(hf_causal_lm(), tmp_path / "a")
    ttl_core.save_pretrained(ttl_core.load_pretrained(d), tmp_path / "sharded", max_shard_size="40KB")
    next((tmp_path / "sharded").glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="missing: .*model-00002"):
        ttl_core.load_pretrained(tmp_path / "sharded")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        ttl_core.load_pretrained(d)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    """Which copy a loader takes would be arbitrary (ttl took the last shard it scanned, transformers another):
    the checkpoint is malformed, and the error names the tensor and both files."""
    d = saved_hf(hf_causal_lm(), tmp_path / "a")
    ttl_core.save_pretrained(ttl_core.load_pretrained(d), tmp_path / "sharded", max_shard_size="40KB")
    first, second = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[:2]
    with safe_open(first, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with safe_open(second, framework="pt") as handle:
        key = next(iter(handle.keys()))
        tensors[key] = handle.get_tensor(key) + 1
    save_file(tensors, first, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {key} is stored in both {first.name} and {second.name}"):
        ttl_core.load_pretrained(tmp_path / "sharded")


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    d = saved_hf(hf_causal_lm(), tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a pickle that would create a file if it were ever loaded
    (d / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint.*never unpickles.*save_pretrained\(OUT\), which"):
        ttl_core.load_pretrained(d)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture 'MistralForCausalLM'"),
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "unsupported activation hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}},
     "unsupported rope type 'longrope'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None},
     r"unsupported rope type 'dynamic'; .* follow the longest sequence seen"),
])
def test_unsupported_configs_are_named(tmp_path, edit, message):
    d = saved_hf(hf_causal_lm(), tmp_path)
    edit_config(d, **edit)
    with pytest.raises(ConfigError, match=message):
        ttl_core.load_pretrained(d)


def test_not_a_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ttl_core.load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json$"):
        ttl_core.load_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")  # an adapter where a model was expected is named as such
    with pytest.raises(CheckpointError, match=r"no config.json \(it holds a PEFT adapter"):
        ttl_core.load_pretrained(tmp_path)


def test_convert_script_reports_errors_in_one_line(tmp_path):
    run = run_script("convert", "--to-hf", tmp_path / "missing", tmp_path / "out")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")
    assert "Traceback" not in run.stderr
