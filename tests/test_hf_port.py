"""Idioms of whole transformers programs (a training loop moving its batch to `model.device`, LoRA-style training
with frozen weights, transition scores, generation settings written on `model.generation_config`, resizing to a
padded vocabulary, `AutoModel`-style embeddings, label names, a padding token set or added on the tokenizer), run on
ttl's models and tokenizer against transformers itself."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from generation_helpers import PAD, left_padded, saved_models
from hf_reference import hf_causal_lm, hf_config

import ttl_core
from ttl_core.errors import CheckpointError, ConfigError, GenerationError, TokenizerError
from ttl_core.model_io import classification_loss, next_token_targets


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def both_models(tmp_path, **overrides):
    """(transformers model, ttl model loaded from its saved checkpoint), in training mode as a program starts."""
    hf = hf_causal_lm(**overrides)
    hf.save_pretrained(tmp_path)
    return hf.train(), ttl_core.LlamaForCausalLM.from_pretrained(tmp_path).train()


def test_device_and_dtype_are_the_parameters_as_in_transformers(tmp_path):
    """`inputs.to(model.device)` and `model.dtype`, read after `.to(bfloat16)` and `.half()` as programs read them;
    the dtype is the first floating-point parameter's, so a float64 norm does not change it."""
    hf, ours = both_models(tmp_path)
    assert (ours.device, ours.dtype) == (hf.device, hf.dtype) == (torch.device("cpu"), torch.float32)
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        assert convert(ours).dtype == convert(hf).dtype
    ours.backbone.norm.double()
    assert ours.dtype == torch.float16
    base = ttl_core.LlamaModel.from_pretrained(tmp_path, dtype=torch.bfloat16)  # AutoModel-style embedding code too
    assert (base.device, base.dtype) == (torch.device("cpu"), torch.bfloat16)


def test_a_training_loop_moving_its_batch_to_model_device_trains_as_transformers(tmp_path):
    """The plain PyTorch loop of transformers' course: the batch moved to `model.device`, `model(**batch).loss`, AdamW
    and gradient clipping, three steps; the losses stay transformers'."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 131, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for model in both_models(tmp_path):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
        run = []
        for _ in range(3):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(torch.tensor(run))
    assert losses[0][0] > 1 and max_diff(*losses) <= 1e-5


def test_input_require_grads_lets_a_frozen_model_backpropagate_as_in_transformers(tmp_path):
    """PEFT-style training freezes the weights and calls `enable_input_require_grads()` so that the embeddings' output
    requires grad and reentrant checkpointing passes gradients on; `disable_input_require_grads()` undoes it."""
    hf, ours = both_models(tmp_path)
    ids = torch.randint(4, 131, (2, 7), generator=torch.Generator().manual_seed(2))
    for model in (hf, ours):
        model.requires_grad_(False)
        assert not model(ids, labels=ids).loss.requires_grad
        model.enable_input_require_grads()
    hidden = [model(ids, output_hidden_states=True).hidden_states[0] for model in (hf, ours)]
    assert all(h.requires_grad for h in hidden) and max_diff(*hidden) == 0
    losses = [model(ids, labels=ids).loss for model in (hf, ours)]
    assert all(loss.requires_grad for loss in losses) and max_diff(*losses) <= 1e-5
    for model in (hf, ours):  # a new table: the hook follows it (transformers keeps its embedding module)
        model.resize_token_embeddings(140)
    assert all(model(ids, output_hidden_states=True).hidden_states[0].requires_grad for model in (hf, ours))
    for model in (hf, ours):
        model.disable_input_require_grads()
    assert not any(model(ids, labels=ids).loss.requires_grad for model in (hf, ours))


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "beams"])
def test_compute_transition_scores_is_transformers_own(settings, tmp_path):
    """`model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=True)` on a
    ttl output gives what transformers' method gives for it, bit for bit."""
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(hf.config.vocab_size)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, return_dict_in_generate=True,
                        output_scores=True, **settings)
    for normalize in (False, True):
        expected = hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize)
        got = ours.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=normalize)
        assert torch.equal(got, expected)


def test_num_parameters_counts_only_trainable_ones_when_asked_as_transformers(tmp_path):
    hf, ours = both_models(tmp_path)
    for model in (hf, ours):
        model.get_input_embeddings().weight.requires_grad_(False)
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True) < hf.num_parameters()


@pytest.mark.parametrize("tied", [False, True])
def test_resize_pads_to_a_multiple_and_returns_the_embedding_as_transformers(tied, tmp_path):
    """`model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)` rounds the size up, draws the new rows
    as transformers does after the same seed and returns the new input embedding; without a size it pads the
    current one, and without either it returns the embedding untouched."""
    hf, ours = both_models(tmp_path, tie_word_embeddings=tied)
    resized = []
    for model in (hf, ours):
        torch.manual_seed(3)
        resized.append(model.resize_token_embeddings(133, pad_to_multiple_of=64))
        assert resized[-1] is model.get_input_embeddings() and model.config.vocab_size == 192
    assert max_diff(resized[0].weight, resized[1].weight) == 0
    assert max_diff(hf.get_output_embeddings().weight, ours.get_output_embeddings().weight) == 0
    assert ours.resize_token_embeddings(pad_to_multiple_of=100).num_embeddings == 200
    assert ours.resize_token_embeddings() is ours.get_input_embeddings() and ours.config.vocab_size == 200
    for size, multiple, message in ((140, 8.0, "pad_to_multiple_of must be a positive integer, got 8.0"),
                                    ("x", 8, "new_vocab_size must be a positive integer, got 'x'"),
                                    (-5, 8, "new_vocab_size must be a positive integer, got -5"),
                                    (10.5, 8, "new_vocab_size must be a positive integer, got 10.5")):
        with pytest.raises(ConfigError, match=message):  # named as given, not after rounding
            ours.resize_token_embeddings(size, pad_to_multiple_of=multiple)


def test_settings_written_on_generation_config_are_those_generate_uses(tmp_path):
    """`model.generation_config.max_new_tokens = 4` and `.pad_token_id = ...`, as programs set them, are read by
    `generate()` as transformers' are; a setting never set is an AttributeError naming it (transformers would give
    its default), and `model.generation_config` stays a dict for ttl's code."""
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(hf.config.vocab_size)
    for model in (hf, ours):
        model.generation_config.max_new_tokens = 4
        model.generation_config.pad_token_id = PAD
        model.generation_config.do_sample = False
    expected = hf.generate(ids, attention_mask=mask)
    assert expected.shape[1] == ids.shape[1] + 4 and torch.equal(ours.generate(ids, attention_mask=mask), expected)
    assert ours.generation_config["max_new_tokens"] == 4 and ours.generation_config.eos_token_id == 2
    with pytest.raises(AttributeError, match="no generation setting 'top_k'"):
        ours.generation_config.top_k


def test_llama_model_from_pretrained_gives_transformers_base_model_outputs(tmp_path):
    """`LlamaModel.from_pretrained(dir)` (transformers' `AutoModel`) for embeddings: the last hidden state of a
    causal LM's checkpoint, pooled at the last real token as embedding code pools it."""
    hf_causal_lm().save_pretrained(tmp_path)
    ids = torch.randint(4, 131, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    theirs = transformers.LlamaModel.from_pretrained(tmp_path)(ids, attention_mask=mask).last_hidden_state
    ours = ttl_core.LlamaModel.from_pretrained(tmp_path)(ids, attention_mask=mask).last_hidden_state
    last = mask.sum(1) - 1
    assert max_diff(theirs[[0, 1], last], ours[[0, 1], last]) <= 1e-5


def test_config_reads_as_transformers_config(tmp_path):
    """`model.config.model_type` and `model.config.to_dict()`, which programs branch on and log."""
    hf, ours = both_models(tmp_path)
    assert ours.config.model_type == hf.config.model_type == "llama"
    theirs, mine = hf.config.to_dict(), ours.config.to_dict()
    shared = ["vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "pad_token_id",
              "tie_word_embeddings", "model_type"]
    assert {key: mine[key] for key in shared} == {key: theirs[key] for key in shared}


@pytest.mark.parametrize("labels", [{}, {"num_labels": 3}, {"label2id": {"a": 0, "b": 1}}],
                         ids=["default", "three", "label2id_alone"])
def test_a_classifier_started_without_label_names_names_them_as_transformers(labels, tmp_path):
    """Inference code reads `model.config.id2label[logits.argmax().item()]`: without names given, a classifier's are
    transformers' LABEL_0, LABEL_1, ..., and label2id the other way (a label2id given alone too, as there), also
    after a change of `num_labels`."""
    hf_causal_lm().save_pretrained(tmp_path)
    theirs = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path, **labels).config
    ours = ttl_core.LlamaForSequenceClassification.from_pretrained(tmp_path, **labels).config
    assert (ours.id2label, ours.label2id) == (theirs.id2label, theirs.label2id)
    assert ours.replace(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    built = [config.label2id for config in (transformers.LlamaConfig(**labels),
                                            ttl_core.LlamaConfig.from_preset("tiny", **labels))]
    assert built[0] == built[1]


def test_a_config_read_from_a_checkpoint_and_changed_builds_transformers_model(tmp_path):
    """`LlamaConfig.from_pretrained(dir, num_hidden_layers=1)` (transformers' `AutoConfig`), then a model built from
    it after a seed, to train from scratch at a checkpoint's shape: transformers' weights."""
    hf_causal_lm(tie_word_embeddings=True).save_pretrained(tmp_path)
    theirs = transformers.LlamaConfig.from_pretrained(tmp_path, num_hidden_layers=1)
    ours = ttl_core.LlamaConfig.from_pretrained(tmp_path, num_hidden_layers=1)
    assert ours.to_hf_dict() == ttl_core.LlamaConfig.from_hf_dict(theirs.to_dict()).to_hf_dict()
    models = []
    for build, config in ((transformers.LlamaForCausalLM, theirs), (ttl_core.LlamaForCausalLM, ours)):
        torch.manual_seed(6)
        models.append(build(config))
    ids = torch.randint(4, 131, (2, 8), generator=torch.Generator().manual_seed(1))
    assert max_diff(models[0](ids).logits, models[1](ids).logits) <= 1e-5
    with pytest.raises(ConfigError, match="unknown LlamaConfig field"):
        ttl_core.LlamaConfig.from_pretrained(tmp_path, hidden_activation="gelu")


def test_save_pretrained_takes_safe_serialization_true_only(tmp_path):
    """Older transformers code passes `safe_serialization=True`; ttl writes safetensors only and says so for False."""
    _, ours = both_models(tmp_path / "source")
    ours.save_pretrained(tmp_path / "out", safe_serialization=True)
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="safe_serialization=False: ttl writes safetensors only") as e:
        ours.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert "\n" not in str(e.value)


def tokenizers(tmp_path):
    """(transformers' AutoTokenizer, ttl's Tokenizer) of one TeenyTinyLlama-style directory."""
    from tokenizer_helpers import corpus, make_ttl_style_dir
    make_ttl_style_dir(tmp_path / "tokenizer", corpus(200, seed=1), vocab_size=300)
    return (transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
            ttl_core.Tokenizer.from_pretrained(tmp_path / "tokenizer"))


def test_tokenizer_answers_to_transformers_names(tmp_path):
    """`len(tokenizer)` (added tokens included), the special tokens and their ids, `tokenize`,
    `convert_ids_to_tokens`, `convert_tokens_to_ids` (the unknown token's id for a token not in the vocabulary) and
    `encode(text, add_special_tokens=False)`, as transformers' tokenizer answers them."""
    theirs, ours = tokenizers(tmp_path)
    text = "a casa de o menino foi para escola com seu cachorro"
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name)
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_id")
    ids = theirs(text)["input_ids"] + [theirs.eos_token_id, theirs.pad_token_id]
    for calls in (lambda t: len(t), lambda t: t.tokenize(text), lambda t: t.tokenize(text, add_special_tokens=True),
                  lambda t: t.convert_ids_to_tokens(ids), lambda t: t.convert_ids_to_tokens(ids[3]),
                  lambda t: t.convert_ids_to_tokens(ids, skip_special_tokens=True),
                  lambda t: t.convert_tokens_to_ids(t.tokenize(text) + ["not-a-token"]),
                  lambda t: t.convert_tokens_to_ids("</s>"), lambda t: t.encode(text, add_special_tokens=False)):
        assert calls(ours) == calls(theirs)
    assert len(theirs.tokenize(text)) > 3
    theirs.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    ours.add_special_tokens(["<|user|>"])
    assert len(ours) == len(theirs) == 301 and ours.get_vocab() == theirs.get_vocab()


def test_pad_token_set_to_eos_pads_as_transformers(tmp_path):
    """`tokenizer.pad_token = tokenizer.eos_token` (or `pad_token_id = eos_token_id`), then padding, as programs
    without a padding token do; a token outside the vocabulary is refused (transformers pads with `<unk>`'s id)."""
    theirs, ours = tokenizers(tmp_path)
    texts = ["a casa de o menino", "o cachorro"]
    for set_pad in (lambda t: setattr(t, "pad_token", t.eos_token), lambda t: setattr(t, "pad_token_id", 2)):
        for tokenizer in (theirs, ours):
            tokenizer.pad_token_id = 3
            set_pad(tokenizer)
        assert (ours.pad_token, ours.pad_token_id) == (theirs.pad_token, theirs.pad_token_id) == ("</s>", 2)
        padded = [t(texts, padding=True, return_tensors="pt") for t in (theirs, ours)]
        assert torch.equal(padded[0]["input_ids"], padded[1]["input_ids"]) and (padded[1]["input_ids"] == 2).any()
    ours.pad_token = None
    assert (ours.pad_token, ours.pad_token_id, ours.pad_id) == (None, None, -1)
    with pytest.raises(TokenizerError, match="pad_token '<zzz>' is not in the vocabulary"):
        ours.pad_token = "<zzz>"


def test_add_special_tokens_takes_transformers_dict(tmp_path):
    """`tokenizer.add_special_tokens({"pad_token": "[PAD]"})` (GPT-2-era code adding a padding token) and
    `{"additional_special_tokens": [...]}` add, pad and count as transformers' (before, the dict's keys were added as
    tokens); `add_tokens("one")` adds one token; keys ttl does not take are refused by name."""
    theirs, ours = tokenizers(tmp_path)
    for tokens in ({"pad_token": "[PAD]"}, {"pad_token": "</s>"}, {"additional_special_tokens": ["<|u|>", "<|b|>"]}):
        assert ours.add_special_tokens(tokens) == theirs.add_special_tokens(tokens)
        assert (len(ours), ours.pad_token, ours.pad_token_id) == (len(theirs), theirs.pad_token, theirs.pad_token_id)
    ours.add_tokens("novo")
    theirs.add_tokens("novo")
    texts = ["<|u|> a casa novo<|b|>", "o"]
    padded = [t(texts, padding=True, return_tensors="pt")["input_ids"] for t in (theirs, ours)]
    assert torch.equal(*padded) and (padded[1] == 2).any() and len(ours) == 304
    with pytest.raises(TokenizerError, match="add_special_tokens: sep_token not taken by ttl"):
        ours.add_special_tokens({"sep_token": "[SEP]"})


def test_pad_token_set_to_an_ordinary_piece_leaves_it_ordinary_as_in_transformers(tmp_path):
    """`pad_token_id` set to a piece of the text: encoding and decoding are unchanged (ttl made it special, so decode
    dropped it from the text), and padding uses it."""
    theirs, ours = tokenizers(tmp_path)
    text = "a casa de o menino foi para escola"
    piece = theirs.convert_tokens_to_ids("s")
    for tokenizer in (theirs, ours):
        tokenizer.pad_token_id = piece
    ids = theirs(text)["input_ids"]
    assert ours(text)["input_ids"] == ids and piece in ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    padded = [t([text, "o"], padding=True, return_tensors="pt")["input_ids"] for t in (theirs, ours)]
    assert torch.equal(*padded) and int((padded[1][1] == piece).sum()) >= len(ids) - 3


def test_add_special_tokens_takes_transformers_5_names_and_the_roles_own_tokens(tmp_path):
    """`{"extra_special_tokens": [...]}` (transformers 5's name) adds as `additional_special_tokens` does, and naming
    the token a role already has (`{"eos_token": "</s>"}`, common in Llama scripts) adds nothing, as there."""
    theirs, ours = tokenizers(tmp_path)
    cases = ({"extra_special_tokens": ["<|x|>"]}, {"eos_token": "</s>"}, {"bos_token": "<s>", "pad_token": "</s>"})
    for tokens in cases:
        assert ours.add_special_tokens(tokens) == theirs.add_special_tokens(tokens)
        assert (len(ours), ours.pad_token_id) == (len(theirs), theirs.pad_token_id)
    with pytest.raises(TokenizerError, match="add_special_tokens: eos_token not taken by ttl"):
        ours.add_special_tokens({"eos_token": "<|x|>"})


@pytest.mark.parametrize("option", [{"device_map": "auto"}, {"load_in_8bit": True}, {"low_cpu_mem_usage": True}])
def test_transformers_loader_options_are_refused_by_name(option, tmp_path):
    """Options of transformers' loader that ttl does not take are named as such in one line, not as config fields."""
    hf_causal_lm().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"load_pretrained takes no {next(iter(option))}: neither a LlamaConfig") as e:
        ttl_core.LlamaForCausalLM.from_pretrained(tmp_path, **option)
    assert "\n" not in str(e.value)


def test_a_model_built_from_a_config_has_transformers_generation_config(tmp_path):
    """A model built from a config, not loaded, has as in transformers a generation_config of its config's ids: the
    common `model.generation_config.pad_token_id = tokenizer.eos_token_id` sets what generate() pads with, a later
    change to `model.config` is not read, save_pretrained writes transformers' file, and a bad id names its origin."""
    hf = hf_causal_lm(pad_token_id=None)
    hf.save_pretrained(tmp_path / "weights")
    ours = ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(ttl_core.load_pretrained(tmp_path / "weights").state_dict())
    ids, mask = left_padded(131)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[],
                       pad_token_id=5)
    for model in (hf, ours):
        model.generation_config.pad_token_id = 5
        model.generation_config.eos_token_id = int(free[0, 9 + 2])  # row 0 stops early: padded with 5
        model.config.eos_token_id = int(free[1, 9 + 1])  # read by neither
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, expected) and (got[0, 9 + 3:] == 5).all()
    for pad in (None, 3):
        config = hf_config(pad_token_id=pad)
        models = {"hf": transformers.LlamaForCausalLM(config),
                  "ttl": ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_hf_dict(config.to_dict()))}
        for name, model in models.items():
            model.save_pretrained(tmp_path / name)
        files = {name: json.loads((tmp_path / name / "generation_config.json").read_text()) for name in models}
        files["hf"].pop("transformers_version")
        assert files["ttl"] == files["hf"]
    bad_eos = ttl_core.LlamaForCausalLM(ttl_core.LlamaConfig.from_hf_dict(hf_config(eos_token_id=131).to_dict()))
    with pytest.raises(GenerationError, match="^config.json: eos_token_id 131 is not a token id"):
        bad_eos.generate(ids)
    ours.generation_config.pad_token_id = 999
    with pytest.raises(GenerationError, match="^model.generation_config: pad_token_id 999 is not a token id"):
        ours.generate(ids)


def test_transformers_generation_config_assigned_to_a_model_is_what_generate_uses(tmp_path):
    """`model.generation_config = GenerationConfig(...)`, as transformers programs set decoding defaults; anything
    else that is neither a dict nor has `to_dict()` is refused by name."""
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(131)
    settings = transformers.GenerationConfig(max_new_tokens=6, do_sample=True, top_k=5, eos_token_id=[], pad_token_id=2)
    for model in (hf, ours):
        model.generation_config = settings
    torch.manual_seed(3)
    expected = hf.generate(ids, attention_mask=mask)
    torch.manual_seed(3)
    got = ours.generate(ids, attention_mask=mask)
    assert got.shape == (3, 9 + 6) and torch.equal(got, expected)
    assert ours.generation_config.top_k == 5 and ours.generation_config.to_dict()["max_new_tokens"] == 6
    files = {}  # saved as transformers saves them: without the config's EOS id, which generate() then does not read
    for name, model in (("hf", hf), ("ttl", ours)):
        model.save_pretrained(tmp_path / name)
        files[name] = json.loads((tmp_path / name / "generation_config.json").read_text())
        files[name].pop("transformers_version")  # the GenerationConfig's own, in ttl's file too
    assert files["ttl"] == files["hf"]
    with pytest.raises(GenerationError, match="^generation_config must be a dict or a transformers GenerationConfig"):
        ours.generation_config = [("top_k", 3)]


def test_labels_kept_on_the_cpu_are_moved_to_the_logits_device_as_in_transformers():
    """HF code often leaves `labels` on the CPU with the model on CUDA; transformers moves them to the logits'
    device. Checked on the loss helpers with the logits on the meta device (this machine may have no GPU)."""
    labels = torch.randint(0, 131, (2, 7))
    targets = next_token_targets(labels, None, (2, 7), torch.device("meta"))
    assert targets.device.type == "meta" and targets.dtype == torch.long
    config = ttl_core.LlamaConfig(num_labels=3)
    logits = torch.randn(2, 3, device="meta")
    loss, _ = classification_loss(config, logits, torch.tensor([0, 2]))
    assert loss.device.type == "meta" and config.problem_type == "single_label_classification"


def test_config_to_dict_holds_transformers_keys_and_values():
    """Programs log `model.config.to_dict()` and read `return_dict`, `output_hidden_states`, `is_encoder_decoder`,
    `use_cache` ... from it: every key transformers' dict of the same config has, at its value, but the two that name
    the checkpoint's path and transformers' version; ttl keeps the v4 rope keys beside `rope_parameters`."""
    theirs = hf_config(num_labels=3, tie_word_embeddings=True).to_dict()
    mine = ttl_core.LlamaConfig.from_hf_dict(theirs).to_dict()
    assert set(theirs) - set(mine) == {"_name_or_path", "transformers_version"}
    assert set(mine) - set(theirs) == {"rope_theta", "rope_scaling"}
    assert {key: mine[key] for key in theirs if key in mine} == {key: theirs[key] for key in theirs if key in mine}
