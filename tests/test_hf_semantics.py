"""What transformers and peft do with the less common parts of a checkpoint, and ttl doing the same: config
keys left out or null, a v4 rope_scaling beside v5 rope_parameters, a tied config with its own stored head,
generation_config.json, a prompt padded without a mask, problem_type, attention dropout, LoRA's
modules_to_save on tied embeddings, a single weight file beside a sharded index and a shard filled exactly to
max_shard_size. Every case compares against the reference library itself."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers
from generation_helpers import CharTokenizer
from hf_reference import hf_causal_lm, hf_classifier
from safetensors.torch import load_file, save_file, save_model

import ttl_core
from ttl_core.config import padding_index
from ttl_core.errors import ConfigError
from ttl_core.lora import apply_lora
from ttl_core.lora_files import load_adapter, save_adapter
from ttl_core.sampling import unimplemented_settings

PAD = 3


def edited_checkpoint(hf_model, path, **edits):
    """Save `hf_model`, then change config.json: a key set to `...` is removed, any other value replaces it."""
    hf_model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    for key, value in edits.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def ids(batch=2, seq=11, vocab=131, seed=3):
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("edits, auto", [
    # transformers v4 left pad_token_id out when it was None: the classifier then pools the last token
    ({"pad_token_id": ...}, transformers.AutoModelForSequenceClassification),
    ({"rms_norm_eps": ...}, transformers.AutoModelForCausalLM),  # transformers' default 1e-6, not ttl's 1e-5
    # a v4 rope_scaling block wins over v5 rope_parameters in transformers
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, transformers.AutoModelForCausalLM),
    ({"rope_parameters": ..., "rope_theta": 5e5}, transformers.AutoModelForCausalLM),
    ({"hidden_act": "swish", "pretraining_tp": 2}, transformers.AutoModelForCausalLM),  # the same math
    ({"head_dim": None, "attention_dropout": None}, transformers.AutoModelForCausalLM),  # null: the default
])
def test_config_json_reads_as_transformers_reads_it(tmp_path, edits, auto):
    hf = hf_classifier(pad_token_id=None) if auto is transformers.AutoModelForSequenceClassification else hf_causal_lm()
    path = edited_checkpoint(hf, tmp_path / "ckpt", **edits)
    theirs = auto.from_pretrained(path).eval()
    ours = ttl_core.load_pretrained(path)
    tokens = ids(batch=1)
    tokens[0, -1] = PAD  # an ordinary token unless the config names a padding id
    with torch.no_grad():
        assert max_diff(ours(tokens).logits, theirs(tokens).logits) < 1e-5


def test_null_special_tokens_stay_null(tmp_path):
    path = edited_checkpoint(hf_causal_lm(), tmp_path / "ckpt", bos_token_id=None, eos_token_id=None)
    config = ttl_core.load_pretrained(path).config
    assert config.bos_token_id is None and config.eos_token_id is None
    assert config.to_hf_dict()["eos_token_id"] is None


@pytest.mark.parametrize("field", ["rms_norm_eps", "hidden_size", "tie_word_embeddings"])
def test_a_null_that_transformers_refuses_is_refused_by_name(tmp_path, field):
    """Not read as some default: a null rms_norm_eps would otherwise take ttl's own 1e-5."""
    path = edited_checkpoint(hf_causal_lm(), tmp_path / "ckpt", **{field: None})
    with pytest.raises(Exception, match=f"field '{field}'"):  # transformers' validation error names it
        transformers.AutoConfig.from_pretrained(path)
    with pytest.raises(ConfigError, match=f"config.json sets {field} to null"):
        ttl_core.load_pretrained(path)


def test_a_tied_config_with_a_different_stored_head_keeps_the_head(tmp_path):
    path = edited_checkpoint(hf_causal_lm(), tmp_path / "ckpt", tie_word_embeddings=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with pytest.warns(UserWarning, match="kept untied"):
        ours = ttl_core.load_pretrained(path)
    assert not ours.config.tie_word_embeddings and ours.lm_head.weight is not ours.backbone.embed.weight
    with torch.no_grad():
        assert max_diff(ours(ids()).logits, theirs(ids()).logits) < 1e-5


def test_a_tied_checkpoint_that_also_stores_the_same_head_stays_tied(tmp_path):
    """Older transformers versions saved lm_head.weight beside a tied embedding: equal to it, it is no
    reason to untie (nor an unexpected tensor), as transformers keeps such a model tied too."""
    path = edited_checkpoint(hf_causal_lm(tie_word_embeddings=True), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = ttl_core.load_pretrained(path)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.backbone.embed.weight
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    with torch.no_grad():
        assert max_diff(ours(ids()).logits, theirs(ids()).logits) < 1e-5


def test_a_tied_checkpoint_that_stores_the_shared_weight_as_the_head_loads_as_in_transformers(tmp_path):
    """safetensors' save_model keeps one name per shared tensor, the first in sorted order: a tied Llama's
    weight lands under lm_head.weight alone. transformers fills the embedding from it; so must ttl."""
    hf = hf_causal_lm(tie_word_embeddings=True)
    path = edited_checkpoint(hf, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    save_model(hf, str(path / "model.safetensors"))
    assert "model.embed_tokens.weight" not in load_file(path / "model.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ours = ttl_core.load_pretrained(path)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.backbone.embed.weight
    with torch.no_grad():
        assert max_diff(ours(ids()).logits, theirs(ids()).logits) < 1e-5
        assert max_diff(ours(ids()).logits, hf(ids()).logits) < 1e-5


def test_generation_config_sets_eos_and_travels(tmp_path):
    hf = hf_causal_lm()
    with torch.no_grad():
        hf.lm_head.weight[PAD] = 0.0
    tokens = ids(batch=3, seq=9)
    free = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=12, do_sample=False,
                       eos_token_id=[])
    extra = int(free[0, 9 + 3])  # a token row 0 produces: an EOS id there makes it stop early
    hf.generation_config.eos_token_id = [2, extra]
    hf.generation_config.max_length = 77
    hf.save_pretrained(tmp_path / "ckpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ours = ttl_core.load_pretrained(tmp_path / "ckpt")
    expected = theirs.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=12, do_sample=False)
    got = ttl_core.generate(ours, tokens, max_new_tokens=12)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert (got[0, 9 + 4:] == PAD).all()  # row 0 stopped at the extra EOS id
    ttl_core.save_pretrained(ours, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [2, extra] and saved["max_length"] == 77
    # through ttl's native layout too (scripts/convert.py --from-hf, then --to-hf): the settings stay
    ttl_core.save_native(ours, tmp_path / "native")
    native = ttl_core.load_pretrained(tmp_path / "native")
    assert torch.equal(ttl_core.generate(native, tokens, max_new_tokens=12), expected)
    ttl_core.save_pretrained(native, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text()) == saved


def test_checkpoint_settings_ttl_does_not_implement_are_named_in_a_warning(tmp_path):
    """A generation_config.json with settings that make transformers' generate() pick other tokens (contrastive
    search, token healing) is decoded without them, and a warning names them; a plain transformers checkpoint and
    settings at their no-op values give none."""
    hf = hf_causal_lm()
    hf.save_pretrained(tmp_path / "plain")
    hf.generation_config.penalty_alpha = 0.6
    hf.generation_config.token_healing = True
    hf.generation_config.typical_p = 1.0
    hf.generation_config.stop_strings = "</s>"
    hf.save_pretrained(tmp_path / "blocking")
    tokens = ids(batch=1, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttl_core.generate(ttl_core.load_pretrained(tmp_path / "plain"), tokens, max_new_tokens=3)
    blocking = ttl_core.load_pretrained(tmp_path / "blocking")
    every = (r"^generation_config.json sets penalty_alpha=0.6, stop_strings='</s>' \(pass tokenizer= to apply them\), "
             r"token_healing=True, which")
    with pytest.warns(UserWarning, match=every):
        ttl_core.generate(blocking, tokens, max_new_tokens=3)
    with pytest.warns(UserWarning, match=r"sets penalty_alpha=0.6, token_healing=True, which") as seen:
        ttl_core.generate(blocking, tokens, max_new_tokens=3, stop_strings="x", tokenizer=CharTokenizer())
    assert seen[0].filename == __file__  # points at the call, not into ttl

    def from_file(name: str) -> str:
        return "generation_config.json"

    assert unimplemented_settings({"token_healing": True, "top_k": 4}, from_file) == [
        "generation_config.json sets token_healing=True"]
    # prompt lookup is implemented (ttl_core.prompt_lookup): a checkpoint that sets it decodes as transformers does
    assert unimplemented_settings({"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 1}, from_file) == []


def test_a_checkpoint_num_return_sequences_applies_as_in_transformers(tmp_path):
    """A sampling generation_config.json with num_return_sequences 2 gives two rows a prompt, interleaved, as in
    transformers' generate() (top_k 1: both draw the greedy tokens); ttl warned it did not implement the
    setting and returned one. The call's own value wins."""
    hf = hf_causal_lm()
    hf.generation_config.update(do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=PAD)
    hf.save_pretrained(tmp_path / "m")
    ours = ttl_core.load_pretrained(tmp_path / "m")
    tokens = ids(batch=2, seq=5)
    expected = hf.generate(tokens, max_new_tokens=4, eos_token_id=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ttl_core.generate(ours, tokens, max_new_tokens=4, eos_token_id=[])
    assert expected.shape == (4, 9) and torch.equal(got, expected)
    assert torch.equal(ttl_core.generate(ours, tokens, max_new_tokens=4, eos_token_id=[], num_return_sequences=1),
                       expected[::2])


def test_a_checkpoint_max_length_counts_the_prompt_as_in_transformers(tmp_path):
    """A generation_config.json `max_length` (prompt included) sets how many tokens a call without
    max_new_tokens adds, as transformers reads it; the checkpoint's or the call's max_new_tokens wins over it,
    and a prompt that already fills it is an error in both."""
    from ttl_core.errors import GenerationError

    hf = hf_causal_lm()
    tokens = ids(batch=2, seq=9)
    for saved, call, expected_len in ((dict(max_length=15), {}, 15), (dict(max_length=15, max_new_tokens=3), {}, 12),
                                      (dict(max_length=15), dict(max_new_tokens=2), 11)):
        hf.generation_config.max_new_tokens = None
        for key, value in saved.items():
            setattr(hf.generation_config, key, value)
        hf.save_pretrained(tmp_path / "ckpt")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
        ours = ttl_core.load_pretrained(tmp_path / "ckpt")
        expected = theirs.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, eos_token_id=[],
                                   **call)
        got = ttl_core.generate(ours, tokens, eos_token_id=[], **call)
        assert expected.shape[1] == expected_len and torch.equal(got, expected), (saved, call)
    with pytest.raises(ValueError, match="max_length"):
        theirs.generate(ids(batch=2, seq=15), do_sample=False)
    with pytest.raises(GenerationError,
                       match=r"^generation_config.json: the prompt's 15 tokens already fill max_length of 15: "):
        ttl_core.generate(ours, ids(batch=2, seq=15))
    saved = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({**saved, "max_length": "15"}))
    with pytest.raises(GenerationError, match=r"generation_config.json: max_length must be an integer >= 0, got '15'"):
        ttl_core.generate(ttl_core.load_pretrained(tmp_path / "ckpt"), tokens)
    ours.generation_config["max_length"] = "15"
    with pytest.raises(GenerationError, match=r"model.generation_config: max_length must be an integer >= 0, got"):
        ttl_core.generate(ours, tokens)


def test_the_padding_row_is_the_one_torch_reads_from_pad_token_id():
    """transformers passes pad_token_id to nn.Embedding as padding_idx, which counts a negative one from the end
    (old Llama configs say -1) down to -vocab_size, row 0; past either end is an error."""
    for pad in (-8, -1, 0, 7):
        assert padding_index(pad, 8) == torch.nn.Embedding(8, 2, padding_idx=pad).padding_idx
    for pad in (-9, 8):
        with pytest.raises(ConfigError, match=f"^pad_token_id {pad} is outside the vocabulary of 8 tokens$"):
            padding_index(pad, 8)


def test_prompts_padded_without_a_mask_are_masked_by_the_padding_id(tmp_path):
    hf = hf_causal_lm()
    with torch.no_grad():
        hf.lm_head.weight[PAD] = 0.0
    hf.save_pretrained(tmp_path / "ckpt")
    ours = ttl_core.load_pretrained(tmp_path / "ckpt")
    tokens = ids(batch=3, seq=9)
    mask = torch.ones_like(tokens)
    mask[1, :3] = mask[2, :5] = 0
    tokens = tokens.masked_fill(mask == 0, PAD)
    expected = hf.generate(tokens, max_new_tokens=12, do_sample=False, eos_token_id=[])
    assert torch.equal(expected, hf.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                             eos_token_id=[]))
    assert torch.equal(ttl_core.generate(ours, tokens, max_new_tokens=12, eos_token_id=[]), expected)


def test_the_inferred_problem_type_is_recorded_and_saved(tmp_path):
    hf_classifier(num_labels=3).save_pretrained(tmp_path / "ckpt")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    ours = ttl_core.load_pretrained(tmp_path / "ckpt")
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        expected = theirs(ids(), labels=labels).loss
        assert abs(float(ours(ids(), labels=labels).loss) - float(expected)) < 1e-5
    assert ours.config.problem_type == theirs.config.problem_type == "multi_label_classification"
    ttl_core.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["problem_type"] == "multi_label_classification"


def test_int32_class_ids_make_a_single_label_classifier_as_in_transformers(tmp_path):
    """transformers infers single-label classification from int64 or int32 labels (its cross-entropy then refuses
    int32, which ttl widens): the first loss of a fresh classifier given int32 ids is the int64 ids' loss."""
    hf_classifier(num_labels=3).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        expected = theirs(ids(), labels=labels).loss
        assert abs(float(ours(ids(), labels=labels.int()).loss) - float(expected)) < 1e-5
    assert ours.config.problem_type == theirs.config.problem_type == "single_label_classification"


def test_label_names_that_are_not_each_others_inverse_are_kept_as_in_transformers():
    """Hub configs may pair id2label with a label2id of other names; transformers keeps both as given."""
    hf = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "negative", "1": "positive"},
          "label2id": {"LABEL_0": 0, "LABEL_1": 1}}
    theirs = transformers.LlamaConfig(**hf)
    exported = ttl_core.LlamaConfig.from_hf_dict(hf).to_hf_dict("LlamaForSequenceClassification")
    assert (exported["id2label"], exported["label2id"]) == ({"0": "negative", "1": "positive"}, theirs.label2id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_classifier_head_is_the_one_transformers_draws_from_the_same_seed(tmp_path, dtype):
    """A causal LM loaded as a classifier gets the score head transformers gives it after the same
    torch.manual_seed (its only draw from the RNG), so fine-tunes in the two libraries start alike; its std is the
    checkpoint's initializer_range (here not the default 0.02)."""
    hf_causal_lm(initializer_range=0.05).save_pretrained(tmp_path / "lm")
    torch.manual_seed(7)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3, dtype=dtype)
    torch.manual_seed(7)
    ours = ttl_core.load_pretrained(tmp_path / "lm", architecture="LlamaForSequenceClassification", num_labels=3,
                                    dtype=dtype)
    assert ours.score.weight.dtype == dtype
    assert torch.equal(ours.score.weight, theirs.score.weight)
    with torch.no_grad():
        expected = theirs(ids()).logits
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2 * float(expected.abs().max())
        assert max_diff(ours(ids()).logits, expected) <= tolerance


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_dropout_applies_in_training_only(tmp_path, attention):
    path = edited_checkpoint(hf_causal_lm(), tmp_path / "ckpt", attention_dropout=0.5)
    ours = ttl_core.load_pretrained(path, attention=attention)
    assert ours.config.attention_dropout == 0.5
    with torch.no_grad():
        evaluated = ours(ids()).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        assert max_diff(evaluated, theirs(ids()).logits) < 1e-5
        ours.train()
        torch.manual_seed(0)
        first = ours(ids()).logits
        torch.manual_seed(1)
        assert max_diff(first, ours(ids()).logits) > 1e-2  # different dropout masks
        torch.manual_seed(0)
        assert torch.equal(first, ours(ids()).logits)
    ttl_core.save_pretrained(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_dropout"] == 0.5


def test_attention_dropout_is_refused_where_the_backend_has_none(tmp_path):
    path = edited_checkpoint(hf_causal_lm(), tmp_path / "ckpt", attention_dropout=0.1)
    ours = ttl_core.load_pretrained(path, attention="triton").train()
    with pytest.raises(ConfigError, match="no attention dropout"):
        ours(ids())


def randomize_adapter_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
@pytest.mark.parametrize("ensure_tying", [False, True])
def test_modules_to_save_on_tied_embeddings_follow_peft_both_ways(tmp_path, saved, ensure_tying):
    hf_causal_lm(tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    ours = apply_lora(ttl_core.load_pretrained(tmp_path / "base"), r=4, dropout=0.0, modules_to_save=saved,
                      ensure_weight_tying=ensure_tying)
    randomize_adapter_(ours, seed=5)
    assert (ours.lm_head.weight is ours.backbone.embed.weight) == ensure_tying
    save_adapter(ours, tmp_path / "ours")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(ours.eval()(ids()).logits, theirs(input_ids=ids()).logits) < 1e-4

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=saved,
                             task_type="CAUSAL_LM", **({"ensure_weight_tying": True} if ensure_tying else {}))
    trained = peft.get_peft_model(base, config)
    randomize_adapter_(trained, seed=6)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(ttl_core.load_pretrained(tmp_path / "base"), tmp_path / "theirs")
    with torch.no_grad():
        assert max_diff(loaded(ids()).logits, trained.eval()(input_ids=ids()).logits) < 1e-4


def test_a_single_weight_file_beside_a_sharded_index_is_the_one_loaded_as_in_transformers(tmp_path):
    """transformers reads model.safetensors before model.safetensors.index.json, so a directory holding both (a
    single-file model copied over a sharded one) loads the single file; ttl loads the same weights."""
    hf_causal_lm(seed=0).save_pretrained(tmp_path / "both", max_shard_size="40KB")
    hf_causal_lm(seed=1).save_pretrained(tmp_path / "single")
    (tmp_path / "both" / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "both").eval()
    with torch.no_grad():
        assert max_diff(ttl_core.load_pretrained(tmp_path / "both")(ids()).logits, theirs(ids()).logits) < 1e-4


@pytest.mark.parametrize("with_labels", [False, True])
def test_outputs_index_like_transformers_outputs(tmp_path, with_labels):
    """Code written for transformers reads outputs by position (`model(x, labels=y)[0]` is the loss) or by
    name; ttl's outputs answer both the same way, for the causal LM and the classifier."""
    hf_causal_lm().save_pretrained(tmp_path / "lm")
    hf_classifier(num_labels=3).save_pretrained(tmp_path / "cls")
    x = ids()
    cases = [(transformers.AutoModelForCausalLM, "lm", x, {"use_cache": False}, {"return_logits": True}),
             (transformers.AutoModelForSequenceClassification, "cls", torch.tensor([0, 2]), {"use_cache": False}, {})]
    for auto, name, labels, their_kwargs, our_kwargs in cases:
        theirs = auto.from_pretrained(tmp_path / name).eval()
        ours = ttl_core.load_pretrained(tmp_path / name).eval()
        label_kwargs = {"labels": labels} if with_labels else {}
        with torch.no_grad():
            expected = theirs(x, **label_kwargs, **their_kwargs)
            got = ours(x, **label_kwargs, **our_kwargs)
        assert len(got.to_tuple()) == len(expected.to_tuple()) == 1 + with_labels
        for position in range(1 + with_labels):
            assert max_diff(got[position], expected[position]) < 1e-4
        assert max_diff(got["logits"], expected["logits"]) < 1e-4
        assert max_diff(got[-1], expected[-1]) < 1e-4  # the logits, last either way
        with pytest.raises(KeyError):
            got["hidden_states"]
        # membership, keys and dict() as on transformers' outputs (which are ordered dicts of the fields set)
        assert list(got.keys()) == [k for k in expected.keys() if k in ("loss", "logits")]
        assert "logits" in got and ("loss" in got) == with_labels and "hidden_states" not in got
        assert list(got) == list(dict(got)) == list(got.keys())


def test_saved_files_are_those_transformers_saves_for_each_head(tmp_path):
    """transformers writes generation_config.json for models that generate only; ttl wrote one for a
    classifier too, where it is noise a pipeline never reads."""
    for name, hf in (("causal", hf_causal_lm()), ("classifier", hf_classifier())):
        hf.save_pretrained(tmp_path / name / "hf")
        ours = ttl_core.load_pretrained(tmp_path / name / "hf")
        ttl_core.save_pretrained(ours, tmp_path / name / "ttl")
        files = {d: sorted(p.name for p in (tmp_path / name / d).iterdir()) for d in ("hf", "ttl")}
        assert files["ttl"] == files["hf"], name
        assert ("generation_config.json" in files["ttl"]) == (name == "causal")


def test_a_shard_filled_exactly_to_max_shard_size_is_not_split_as_in_transformers(tmp_path):
    """A shard may hold max_shard_size bytes; one byte less splits it. Here the whole checkpoint's tensors fill
    the one file exactly."""
    hf = hf_causal_lm()
    hf.save_pretrained(tmp_path / "src")
    ours = ttl_core.load_pretrained(tmp_path / "src")
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    for limit in (total, total - 1):
        hf.save_pretrained(tmp_path / f"hf-{limit}", max_shard_size=limit)
        ttl_core.save_pretrained(ours, tmp_path / f"ttl-{limit}", max_shard_size=limit)
        files = {d: len(list((tmp_path / f"{d}-{limit}").glob("model*.safetensors"))) for d in ("hf", "ttl")}
        assert (files["ttl"] == 1) == (files["hf"] == 1) == (limit == total), files
