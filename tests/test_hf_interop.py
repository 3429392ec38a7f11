"""Hugging Face checkpoint interop: bit-exact round trips, sharding and the ttl-native layout (refused checkpoints:
test_hf_bad_checkpoints.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_script
from hf_reference import edit_config, hf_causal_lm, hf_classifier, read_all, saved_hf
from safetensors import safe_open
from transformers.utils.hub import convert_file_size_to_int

import ttl_core
from ttl_core.errors import CheckpointError, ConfigError
from ttl_core.hf import DTYPES
from ttl_core.shards import parse_shard_size
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer


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

    auto = (transformers.AutoModelForSequenceClassification if kind == "classifier"
            else transformers.AutoModelForCausalLM)
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
    exported, expected = model.config.to_hf_dict(), {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert config.rope_parameters == expected == exported["rope_parameters"]  # v5's key; v4 reads rope_scaling
    assert {**exported["rope_scaling"], "rope_theta": 500000.0} == expected
    assert ttl_core.LlamaConfig.from_hf_dict(exported) == model.config
    default = ttl_core.LlamaConfig.from_preset("tiny", rope_scaling={"type": "default"})  # the same as none
    assert default == ttl_core.LlamaConfig.from_preset("tiny")
    assert ttl_core.LlamaConfig.from_hf_dict(default.to_hf_dict()) == default
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 3


def test_resharding_replaces_stale_shards(tmp_path):
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"))
    ttl_core.save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    ttl_core.save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_save_killed_while_removing_stale_shards_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Saving one file over a sharded checkpoint, killed after any number of the old files are removed: the
    directory loads (an index left naming removed shards would make it load nothing)."""
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"))
    ttl_core.save_pretrained(model, tmp_path / "sharded", max_shard_size="40KB")
    n_old = len(list((tmp_path / "sharded").glob("model*.safetensors*")))
    real = Path.unlink
    for survive in range(n_old):
        out = tmp_path / f"out{survive}"
        shutil.copytree(tmp_path / "sharded", out)
        removed = []

        def unlink_then_die(path, *args, **kwargs):
            if path.name.startswith("model"):  # the old weight files, counted (the configs go first)
                if len(removed) == survive:
                    raise KeyboardInterrupt("simulated kill")
                removed.append(path.name)
            real(path, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", unlink_then_die)
        with pytest.raises(KeyboardInterrupt):
            ttl_core.save_pretrained(model, out)
        monkeypatch.setattr(Path, "unlink", real)
        loaded = ttl_core.load_pretrained(out).state_dict()
        assert all(torch.equal(loaded[name], weight) for name, weight in model.state_dict().items())


def test_a_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    """The embedding (33.5 KB) exceeds 20 KB: it takes a shard alone, and no shard file is left empty."""
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"))
    ttl_core.save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values()))
    assert_bit_identical(read_all(tmp_path / "src"), read_all(tmp_path / "out"))


def test_shard_sizes_read_as_transformers_reads_them():
    for size in ("40KB", "500MB", "2GB", "64KiB", "3MiB", "1GiB", "5Gb", "500mb", "40Kb", "3mib", 12345):
        assert parse_shard_size(size) == convert_file_size_to_int(size), size


def test_native_layout_round_trip_and_convert_script(tmp_path):
    hf = hf_causal_lm()
    saved_hf(hf, tmp_path / "hf")
    texts = [f"o menino {i} foi para a escola com seu cachorro número {i * 7}." for i in range(60)]
    tokenizer = train_tokenizer(texts, None, vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "hf")
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
    # the tokenizer travels with the weights, both ways, so each output is a whole checkpoint
    for out in ("native", "back"):
        assert Tokenizer.from_pretrained(tmp_path / out).encode(texts[3]) == tokenizer.encode(texts[3])


def test_config_presets_and_validation():
    with pytest.raises(ConfigError, match="unknown preset"):
        ttl_core.LlamaConfig.from_preset("ttl-7b")
    with pytest.raises(ConfigError, match="unknown LlamaConfig field"):
        ttl_core.LlamaConfig.from_preset("tiny", hiden_size=3)
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        ttl_core.LlamaConfig(num_attention_heads=12, num_key_value_heads=5)
    with pytest.raises(ConfigError, match="head_dim must be even for rotary embeddings, got 63"):
        ttl_core.LlamaConfig.from_preset("tiny", head_dim=63)
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
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:  # written so, not cast on loading
            assert {f.get_tensor(key).dtype for key in f.keys()} == {dtype}, name
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)  # dtype "auto": the config's
        assert torch.equal(loaded.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(dtype))


@pytest.mark.parametrize("overrides", [
    dict(mlp_bias=True, attention_bias=True),
    dict(head_dim=32),  # not hidden_size / heads
    dict(num_key_value_heads=1),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_less_common_shapes_round_trip_bit_identically(tmp_path, overrides):
    hf = hf_causal_lm(**overrides)
    hf.save_pretrained(tmp_path / "src")
    model = ttl_core.load_pretrained(tmp_path / "src")
    ttl_core.save_pretrained(model, tmp_path / "out")
    assert_bit_identical(read_all(tmp_path / "src"), read_all(tmp_path / "out"))
    ids = torch.randint(4, 131, (2, 200), generator=torch.Generator().manual_seed(5))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = hf(ids).logits
        assert (model(ids).logits - expected).abs().max() <= 1e-5
        assert torch.equal(reloaded(ids).logits, expected)


def test_label_overrides_rebuild_the_head_names(tmp_path):
    """Asking for another number of labels resizes the head even when config.json names two labels."""
    hf_causal_lm().save_pretrained(tmp_path / "src")
    edit_config(tmp_path / "src", id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "src", num_labels=5)
    ours = ttl_core.load_pretrained(tmp_path / "src", architecture="LlamaForSequenceClassification", num_labels=5)
    assert ours.score.weight.shape == theirs.score.weight.shape == (5, 64)
    assert ours.config.id2label == theirs.config.id2label
    assert ours.config.to_hf_dict("LlamaForSequenceClassification")["id2label"] == {
        str(k): v for k, v in theirs.config.id2label.items()}
    named = ours.config.replace(id2label={0: "neg", 1: "neu", 2: "pos"})
    assert named.num_labels == 3 and named.label2id == {"neg": 0, "neu": 1, "pos": 2}
    with pytest.raises(ConfigError, match="num_labels 4 does not match the 3 names"):
        ours.config.replace(num_labels=4, id2label={0: "a", 1: "b", 2: "c"})


def test_a_config_json_whose_num_labels_disagrees_with_id2label_reads_as_in_transformers(tmp_path):
    """transformers lets num_labels win and names the labels anew (ttl took the head size from id2label)."""
    hf_causal_lm().save_pretrained(tmp_path)
    edit_config(tmp_path, num_labels=3, id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1})
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path, architecture="LlamaForSequenceClassification")
    assert ours.score.weight.shape == theirs.score.weight.shape == (3, 64)
    exported = ours.config.to_hf_dict("LlamaForSequenceClassification")
    assert exported["id2label"] == {str(k): v for k, v in theirs.config.id2label.items()}
    assert exported["label2id"] == theirs.config.label2id


@pytest.mark.parametrize("declared, dtype", [("bfloat16", None), ("float32", None), ("bfloat16", "auto")])
def test_a_checkpoint_of_mixed_dtypes_loads_in_its_declared_dtype(tmp_path, declared, dtype):
    """fp32 norms beside bf16 matrices: the model takes the dtype config.json declares, as transformers' default
    dtype="auto" does (before, every tensor took the embedding's dtype, rounding fp32 ones to bf16)."""
    hf = hf_causal_lm().to(torch.bfloat16)
    for name, module in hf.named_modules():
        if name.endswith("norm"):
            module.float()
    hf.save_pretrained(tmp_path / "src")
    edit_config(tmp_path / "src", dtype=declared)
    stored = read_all(tmp_path / "src")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16, torch.float32}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    ours = ttl_core.load_pretrained(tmp_path / "src", dtype=dtype)  # "auto": transformers' name for the default
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()} == {DTYPES[declared]}
    if declared == "float32":  # nothing rounded: the stored tensors come back exactly, the logits as transformers'
        ttl_core.save_pretrained(ours, tmp_path / "out")
        back = read_all(tmp_path / "out")
        assert all(torch.equal(back[key], tensor.float()) for key, tensor in stored.items())
        ids = torch.randint(4, 131, (2, 11), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-5


def test_an_older_config_declaring_torch_dtype_loads_in_that_dtype(tmp_path):
    """transformers v4 wrote the weight dtype as `torch_dtype`; transformers still reads it, and so does ttl."""
    hf_causal_lm().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.pop("dtype", None)
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    ours = ttl_core.load_pretrained(tmp_path / "src")
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()} == {torch.float32}


def test_each_layout_removes_the_others_config_and_native_keeps_no_runtime_settings(tmp_path):
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"), kernels="torch", attention="eager")
    ttl_core.save_pretrained(model, tmp_path / "out")
    ttl_core.save_native(model, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()  # transformers would read the fused tensors under it
    meta = json.loads((tmp_path / "out" / "ttl_config.json").read_text())
    assert "kernels" not in meta["config"] and "attention" not in meta["config"]
    edited = {**meta, "config": {**meta["config"], "kernels": "torch"}}  # nor does a file holding them choose them
    (tmp_path / "out" / "ttl_config.json").write_text(json.dumps(edited))
    reloaded = ttl_core.load_pretrained(tmp_path / "out")
    assert (reloaded.config.kernels, reloaded.config.attention) == ("auto", "auto")
    (tmp_path / "out" / "ttl_config.json").write_text(json.dumps({**meta, "architecture": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        ttl_core.load_pretrained(tmp_path / "out")
    # a layout written by a later ttl (or another tool's file of that name) is refused, not misread
    for changed in ({"version": meta["version"] + 1}, {"format": "other"}):
        (tmp_path / "out" / "ttl_config.json").write_text(json.dumps({**meta, **changed}))
        with pytest.raises(CheckpointError, match="this ttl reads format 'ttl' version 1"):
            ttl_core.load_pretrained(tmp_path / "out")
    ttl_core.save_pretrained(model, tmp_path / "out")  # back to transformers' layout: the native config would win
    assert not (tmp_path / "out" / "ttl_config.json").exists() and ttl_core.load_pretrained(tmp_path / "out")


def test_a_given_state_dict_is_checked_against_the_model(tmp_path):
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"))
    full = {name: p.detach() for name, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"state_dict lacks backbone\.embed\.weight.*without DDP"):
        ttl_core.save_pretrained(model, tmp_path / "a", state_dict={f"module.{k}": v for k, v in full.items()})
    half = {**full, "backbone.layers.0.attn.qkv.weight": full["backbone.layers.0.attn.qkv.weight"][:64]}
    with pytest.raises(CheckpointError,
                       match=r"backbone\.layers\.0\.attn\.qkv\.weight \(64, 64\) \(model: \(128, 64\)\)"):
        ttl_core.save_pretrained(model, tmp_path / "b", state_dict=half)
    assert not list((tmp_path / "b").glob("*.safetensors"))


def test_float64_weights_are_labelled_float64(tmp_path):
    model = ttl_core.load_pretrained(saved_hf(hf_causal_lm(), tmp_path / "src"), dtype=torch.float64)
    ttl_core.save_pretrained(model, tmp_path / "out")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.float64


@pytest.mark.parametrize("pad, row", [(-1, 130), (130, 130), (-131, 0)])
def test_the_padding_row_is_the_one_transformers_picks(tmp_path, pad, row):
    hf = hf_causal_lm(pad_token_id=pad)
    # the padding row is config.json's; transformers 5.17 refuses to save a generation config with a negative pad
    hf.generation_config.pad_token_id = None
    ours = ttl_core.load_pretrained(saved_hf(hf, tmp_path / "src"))
    assert json.loads((tmp_path / "src" / "config.json").read_text())["pad_token_id"] == pad
    assert ours.backbone.embed.padding_idx == hf.model.embed_tokens.padding_idx == row


def test_a_padding_id_outside_the_vocabulary_is_refused(tmp_path):
    d = saved_hf(hf_causal_lm(), tmp_path)
    edit_config(d, pad_token_id=131)
    with pytest.raises(ConfigError, match="pad_token_id 131 is outside the vocabulary of 131 tokens"):
        ttl_core.load_pretrained(d)


@pytest.mark.parametrize("block, top", [({}, None), ({}, 32), ({"original_max_position_embeddings": 64}, 32),
                                        ({"original_max_position_embeddings": 64}, None)])
def test_llama3_rope_takes_the_original_context_as_transformers_models_do(tmp_path, block, top):
    """The pretraining context llama3 rope scales from: the block's, else max_position_embeddings; a top-level
    original_max_position_embeddings wins over both when transformers builds the model (its config object
    still shows the other value, so logits are what this compares)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, **block}
    saved_hf(hf_causal_lm(rope_parameters=dict(rope)), tmp_path / "m")  # a copy: transformers fills in the defaults
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {**rope, "rope_theta": config.get("rope_theta", 10000.0)}
    if top is not None:
        config["original_max_position_embeddings"] = top
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = ttl_core.load_pretrained(tmp_path / "m", kernels="torch")
    ids = torch.randint(4, 131, (2, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4


def test_bidirectional_and_partial_rotary_configs_are_refused(tmp_path):
    """What ttl cannot compute as transformers does is refused, not run causally or with the whole head."""
    with pytest.raises(ConfigError, match="is_causal false"):
        ttl_core.LlamaConfig.from_hf_dict({"is_causal": False})
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 is not supported"):
        ttl_core.LlamaConfig.from_hf_dict({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                               "partial_rotary_factor": 0.5}})
    with pytest.raises(ConfigError, match="hidden_size 10 is not divisible by num_attention_heads 4"):
        ttl_core.LlamaConfig(vocab_size=31, hidden_size=10, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=4)


@pytest.mark.parametrize("size", [50, 100])  # 100: the pad id itself is the first row dropped
def test_shrinking_the_vocabulary_below_the_padding_id_drops_the_padding_row(tmp_path, size):
    """As transformers' resize_token_embeddings does; loading such a config is refused, naming the checkpoint."""
    theirs = hf_causal_lm(pad_token_id=100)
    ours = ttl_core.load_pretrained(saved_hf(theirs, tmp_path / "src"))
    theirs.resize_token_embeddings(size)
    ours.resize_token_embeddings(size)
    assert ours.backbone.embed.padding_idx is theirs.model.embed_tokens.padding_idx is None
    ttl_core.save_pretrained(ours, tmp_path / "out")
    with pytest.raises(ConfigError, match=rf"out: pad_token_id 100 is outside the vocabulary of {size} tokens"):
        ttl_core.load_pretrained(tmp_path / "out")
