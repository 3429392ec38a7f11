"""The transformers model API a researcher reaches for, on ttl's models, against transformers itself:
`output_hidden_states`, `inputs_embeds`, the embedding accessors and activation checkpointing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from hf_reference import hf_causal_lm, hf_classifier

import ttl_core
from ttl_core.errors import CheckpointError, ConfigError

PAD = 3


def to_ttl(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return ttl_core.load_pretrained(tmp_path)


def padded_batch(seed: int = 1, batch: int = 3, seq: int = 9, vocab: int = 131):
    """Random ids with row 0 left-padded, row 1 right-padded and row 2 unpadded, and their mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, seq - 2:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def random_embeds(seed: int, batch: int = 3, seq: int = 9, hidden: int = 64) -> torch.Tensor:
    return torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.mark.parametrize("build", [hf_causal_lm, hf_classifier])
def test_hidden_states_match_transformers(build, tmp_path):
    """The embeddings, each layer's output (the residual stream, whose add ttl fuses into the next norm) and, last,
    the final norm's output, as transformers 5 returns them; padded positions aside, which no one reads."""
    hf = build(num_hidden_layers=3)
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(ref.hidden_states) == 4
    real = mask.bool()
    for want, have in zip(ref.hidden_states, got.hidden_states):
        assert want.abs().max() > 0.5 and max_diff(want[real], have[real]) <= 1e-5
    assert max_diff(ref.logits, got.logits) <= 1e-5
    with torch.no_grad():
        assert ours(ids, attention_mask=mask).hidden_states is None  # nothing kept unless asked


def test_llama_model_returns_the_last_hidden_state_and_hidden_states_as_transformers(tmp_path):
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        ref = hf.model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        got = ours.backbone(ids, attention_mask=mask, output_hidden_states=True)
    assert list(got.keys()) == list(ref.keys()) == ["last_hidden_state", "hidden_states"]
    real = mask.bool()
    assert max_diff(ref.last_hidden_state[real], got[0][real]) <= 1e-5
    assert got.hidden_states[-1] is got.last_hidden_state
    assert max_diff(ref.hidden_states[1][real], got[1][1][real]) <= 1e-5


def test_outputs_index_and_iterate_like_transformers(tmp_path):
    """(loss, logits, hidden_states) in transformers' order, None fields skipped (transformers without a cache)."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path)
    ids, _ = padded_batch(seed=3)
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_hidden_states=True, use_cache=False)
        got = ours(ids, labels=ids, output_hidden_states=True, return_logits=True)
    assert list(got) == list(got.keys()) == list(ref.keys()) == ["loss", "logits", "hidden_states"]
    assert "hidden_states" in got and "last_hidden_state" not in got
    assert len(got.to_tuple()) == len(ref.to_tuple()) == 3
    assert abs(got[0].item() - ref[0].item()) <= 1e-5
    assert max_diff(got[1], ref[1]) <= 1e-5 and len(got[2]) == len(ref[2]) == 3
    assert max_diff(got["hidden_states"][1], ref["hidden_states"][1]) <= 1e-5


def test_output_hidden_states_takes_a_bool_only(tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    with pytest.raises(ConfigError, match="output_hidden_states must be True or False, got 0"):
        ours(padded_batch()[0], output_hidden_states=0)


def test_inputs_embeds_logits_loss_and_gradient_match_transformers(tmp_path):
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path)
    _, mask = padded_batch(seed=4)
    labels = padded_batch(seed=5)[0].masked_fill(mask == 0, -100)
    embeds = random_embeds(6).requires_grad_()
    ref = hf(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    ref_grad, = torch.autograd.grad(ref.loss, embeds)
    got = ours(inputs_embeds=embeds, attention_mask=mask, labels=labels, return_logits=True)
    grad, = torch.autograd.grad(got.loss, embeds)
    real = mask.bool()
    assert abs(ref.loss.item() - got.loss.item()) <= 1e-5
    assert max_diff(ref.logits[real], got.logits[real]) <= 1e-5
    assert ref_grad.abs().max() > 1e-3 and max_diff(ref_grad, grad) <= 1e-5


def test_inputs_embeds_of_the_ids_give_the_ids_logits_bit_for_bit(tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    ids, mask = padded_batch(seed=7)
    with torch.no_grad():
        from_ids = ours(ids, attention_mask=mask, output_hidden_states=True)
        from_embeds = ours(inputs_embeds=ours.get_input_embeddings()(ids), attention_mask=mask,
                           output_hidden_states=True)
    assert torch.equal(from_ids.logits, from_embeds.logits)
    assert all(map(torch.equal, from_ids.hidden_states, from_embeds.hidden_states))


@pytest.mark.parametrize("given, message", [
    (dict(), "exactly one of input_ids and inputs_embeds"),
    (dict(input_ids=torch.ones(2, 5, dtype=torch.long), inputs_embeds=torch.ones(2, 5, 64)), "exactly one of"),
    (dict(inputs_embeds=torch.ones(2, 5, 63)), r"inputs_embeds must be \(batch, seq, hidden_size\), got shape"),
    (dict(inputs_embeds=torch.ones(2, 5, 64), attention_mask=torch.ones(2, 4)),
     r"attention_mask shape \(2, 4\) does not fit inputs_embeds shape \(2, 5, 64\)"),
])
def test_input_ids_or_inputs_embeds_misused_is_named(given, message, tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        ours(**given)


def test_classifier_pools_inputs_embeds_at_the_last_position_as_transformers_does(tmp_path):
    """transformers cannot see padding in embeddings: it pools every row at its last position, with a warning."""
    hf = hf_classifier()
    ours = to_ttl(hf, tmp_path)
    _, mask = padded_batch(seed=8)
    embeds = random_embeds(9).requires_grad_()
    labels = torch.tensor([0, 1, 1])
    ref = hf(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    ref_grad, = torch.autograd.grad(ref.loss, embeds)
    with pytest.warns(UserWarning, match="inputs_embeds show no pad token"):
        got = ours(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    grad, = torch.autograd.grad(got.loss, embeds)
    assert max_diff(ref.logits, got.logits) <= 1e-5 and abs(ref.loss.item() - got.loss.item()) <= 1e-5
    assert max_diff(ref_grad, grad) <= 1e-5


def test_embedding_accessors_follow_transformers(tmp_path):
    """Setting the input embedding of a tied model leaves the LM head on the old table until `tie_weights()`."""
    hf = hf_causal_lm(tie_word_embeddings=True)
    ours = to_ttl(hf, tmp_path / "lm")
    assert ours.get_input_embeddings() is ours.backbone.embed and ours.get_output_embeddings() is ours.lm_head
    new_hf, new_ours = torch.nn.Embedding(131, 64), torch.nn.Embedding(131, 64)
    hf.set_input_embeddings(new_hf)
    ours.set_input_embeddings(new_ours)
    assert ours.get_input_embeddings() is new_ours
    assert hf.lm_head.weight is not new_hf.weight and ours.lm_head.weight is not new_ours.weight
    hf.tie_weights()
    ours.tie_weights()
    assert hf.lm_head.weight is new_hf.weight and ours.lm_head.weight is new_ours.weight
    classifier = hf_classifier()
    assert classifier.get_output_embeddings() is None
    assert to_ttl(classifier, tmp_path / "cls").get_output_embeddings() is None


def test_untying_gives_the_head_its_own_copy_frozen_as_the_embedding_was(tmp_path):
    ours = to_ttl(hf_causal_lm(tie_word_embeddings=True), tmp_path)
    ours.backbone.embed.weight.requires_grad_(False)
    ours.untie_embeddings()
    head, embed = ours.lm_head.weight, ours.backbone.embed.weight
    assert head.data_ptr() != embed.data_ptr() and torch.equal(head, embed) and not head.requires_grad
    assert not ours.config.tie_word_embeddings and ours.backbone.config is ours.config


def loss_and_grads(model, ids, mask):
    model.zero_grad()
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_recomputes_the_blocks_and_keeps_the_gradients_bit_for_bit(tmp_path):
    ours = to_ttl(hf_causal_lm(num_hidden_layers=3), tmp_path).train()
    ids, mask = padded_batch(seed=10)
    loss, grads = loss_and_grads(ours, ids, mask)
    calls = []
    for block in ours.backbone.layers:
        block.attn_norm.register_forward_hook(lambda *_: calls.append(1))
    assert not ours.is_gradient_checkpointing
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing and ours.is_activation_checkpointing
    recomputed_loss, recomputed = loss_and_grads(ours, ids, mask)
    assert len(calls) == 6  # each block's forward, then again in the backward
    assert torch.equal(loss, recomputed_loss)
    assert all(torch.equal(grads[name], grad) for name, grad in recomputed.items())
    ours.gradient_checkpointing_disable()
    calls.clear()
    loss_and_grads(ours, ids, mask)
    assert not ours.is_gradient_checkpointing and len(calls) == 3


def test_activation_checkpointing_every_n_layers_and_only_in_training(tmp_path):
    ours = to_ttl(hf_causal_lm(num_hidden_layers=3), tmp_path)
    ours.activation_checkpointing_enable(every_n_layers=2)
    assert [block.gradient_checkpointing for block in ours.backbone.layers] == [True, False, True]
    calls = []
    ours.backbone.layers[0].attn_norm.register_forward_hook(lambda *_: calls.append(1))
    ids, mask = padded_batch(seed=11)
    ours.eval()
    loss_and_grads(ours, ids, mask)
    assert len(calls) == 1  # eval mode runs the block once, as transformers checks `self.training`


@pytest.mark.parametrize("kwargs, message", [
    (dict(gradient_checkpointing_kwargs={"use_reentrant": True}), "takes only {'use_reentrant': False}"),
    (dict(every_n_layers=0), "every_n_layers must be a positive integer, got 0"),
    # not a dict: dict() of it raised ValueError / TypeError from inside the check
    (dict(gradient_checkpointing_kwargs=["use_reentrant"]), r"takes only .*got \['use_reentrant'\]"),
    (dict(gradient_checkpointing_kwargs=True), "takes only .*got True"),
])
def test_unsupported_checkpointing_settings_are_refused(kwargs, message, tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        ours.gradient_checkpointing_enable(**kwargs)


def test_a_classifier_given_ids_pools_without_a_warning(tmp_path):
    """The pooling warning is for embeddings only: a classifier given ids pools at the last non-pad token quietly."""
    ours = to_ttl(hf_classifier(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(padded_batch()[0])


def test_classifier_places_its_tokens_at_the_position_ids_given_as_transformers_does(tmp_path):
    """Positions spread apart (not a shift, to which rotary attention is blind) change a classifier's logits as
    they change transformers'; the defaults 0..seq-1 give other logits. Positions (1, seq) or (seq,) broadcast."""
    hf = hf_classifier(num_labels=3)
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch(seed=14)
    position_ids = (torch.arange(ids.shape[1]) * 5)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        assert max_diff(got, expected) <= 1e-5 and max_diff(ours(ids, attention_mask=mask).logits, expected) > 1e-2
        for broadcast in (position_ids[:1], position_ids[0]):
            assert torch.equal(ours(ids, attention_mask=mask, position_ids=broadcast).logits, got)


@pytest.mark.parametrize("build", [hf_causal_lm, hf_classifier])
def test_return_dict_false_gives_transformers_tuple(build, tmp_path):
    hf = build()
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch(seed=12)
    labels = torch.tensor([0, 1, 1]) if build is hf_classifier else ids
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False,
                 return_dict=False)
        got = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=False,
                   return_dict=False, **({} if build is hf_classifier else dict(return_logits=True)))
        base_ref = hf.model(ids, attention_mask=mask, use_cache=False, return_dict=False)
        base_got = ours.backbone(ids, attention_mask=mask, return_dict=False)
    assert type(got) is type(ref) is tuple and len(got) == len(ref) == 3
    assert abs(got[0].item() - ref[0].item()) <= 1e-5 and max_diff(got[1], ref[1]) <= 1e-5
    assert len(got[2]) == len(ref[2])
    assert type(base_got) is type(base_ref) is tuple and len(base_got) == len(base_ref) == 1
    real = mask.bool()
    assert max_diff(base_got[0][real], base_ref[0][real]) <= 1e-5


@pytest.mark.parametrize("build", [hf_causal_lm, hf_classifier])
def test_return_dict_none_gives_the_output_object_as_in_transformers(build, tmp_path):
    """None, which wrapping code passes on for "the config's default", gives the output, not a tuple (it gave one)."""
    hf = build()
    ours = to_ttl(hf, tmp_path)
    ids, mask = padded_batch(seed=14)
    with torch.no_grad():
        assert hf(ids, attention_mask=mask, return_dict=None).logits is not None
        got = ours(ids, attention_mask=mask, return_dict=None)
        assert torch.equal(got.logits, ours(ids, attention_mask=mask).logits)
        base = ours.backbone(ids, attention_mask=mask, return_dict=None)
        assert torch.equal(base.last_hidden_state, ours.backbone(ids, attention_mask=mask).last_hidden_state)


@pytest.mark.parametrize("keep", [3, torch.tensor([0, 4, 8]), torch.tensor([5])], ids=["last_3", "indices", "index"])
def test_logits_to_keep_takes_a_count_or_positions_as_in_transformers(keep, tmp_path):
    """An int keeps the last n positions; a 1-d tensor keeps the positions it indexes (packed rows: each document's
    last token), as transformers reads `logits_to_keep`."""
    hf = hf_causal_lm()
    ours = to_ttl(hf, tmp_path)
    ids, _ = padded_batch(seed=13)
    with torch.no_grad():
        expected = hf(ids, logits_to_keep=keep).logits
        got = ours(ids, logits_to_keep=keep).logits
    assert got.shape == expected.shape and max_diff(got, expected) <= 1e-5


def test_use_cache_true_is_refused_with_where_the_cache_lives(tmp_path):
    ours = to_ttl(hf_causal_lm(), tmp_path)
    with pytest.raises(ConfigError, match="use_cache=True: .* ttl_core.generate"):
        ours(padded_batch()[0], use_cache=True)


def test_resizing_a_tied_model_grows_its_head_with_the_embedding(tmp_path):
    """As transformers' resize_token_embeddings does, a tied LM head stays the input embedding: the logits gain the
    new tokens' columns and keep the old ones."""
    ours = to_ttl(hf_causal_lm(tie_word_embeddings=True), tmp_path)
    ids, _ = padded_batch()
    with torch.no_grad():
        before = ours(ids).logits
        ours.resize_token_embeddings(140)
        after = ours(ids).logits
    assert ours.lm_head.weight is ours.backbone.embed.weight
    assert after.shape[-1] == 140 and torch.equal(after[..., :131], before)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resizing_after_a_seed_draws_transformers_new_rows(tied, dtype, tmp_path):
    """Grown by 9 tokens after the same seed, the embedding (and an untied LM head) get transformers' new rows to
    the bit: drawn around the old rows' mean with 1e-9 times their covariance (131 rows of 64 dims: positive
    definite), with the same draws, so the RNG is left where transformers leaves it (for LoRA's adapters next)."""
    theirs = hf_causal_lm(tie_word_embeddings=tied).to(dtype)
    ours = to_ttl(theirs, tmp_path).to(dtype)
    torch.manual_seed(9)
    theirs.resize_token_embeddings(140)
    their_next_draw = torch.rand(4)
    torch.manual_seed(9)
    ours.resize_token_embeddings(140)
    assert torch.equal(torch.rand(4), their_next_draw)
    assert torch.equal(ours.backbone.embed.weight, theirs.model.embed_tokens.weight)
    assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight) and not torch.equal(ours.lm_head.weight[-1],
                                                                                     ours.lm_head.weight[-2])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resizing_to_the_current_size_keeps_the_tables_and_draws_nothing(tied, tmp_path):
    """transformers keeps the tables of a resize to the vocabulary's own size and draws nothing; new modules would
    have drawn their initial weights from the global RNG, moving what is drawn next (LoRA's adapters) off
    transformers' draws, and would have left an optimizer holding the old tables."""
    theirs = hf_causal_lm(tie_word_embeddings=tied)
    ours = to_ttl(theirs, tmp_path)
    embed, head = ours.backbone.embed, ours.lm_head
    torch.manual_seed(9)
    theirs.resize_token_embeddings(theirs.config.vocab_size)
    their_next_draw = torch.rand(4)
    torch.manual_seed(9)
    ours.resize_token_embeddings(ours.config.vocab_size)
    assert torch.equal(torch.rand(4), their_next_draw)
    assert ours.backbone.embed is embed and ours.lm_head is head


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_resize_to_the_embeddings_size_still_resizes_the_head_and_the_config(tied, tmp_path):
    """Each table is compared with the new size on its own, as transformers compares them: after
    `set_input_embeddings` of a larger table, resizing to its size keeps it and still resizes the LM head (by the same
    draws as transformers'), the config's vocab_size and the tie."""
    theirs = hf_causal_lm(tie_word_embeddings=tied)
    ours = to_ttl(theirs, tmp_path)
    size = theirs.config.vocab_size + 10
    table = torch.nn.Embedding(size, theirs.config.hidden_size)
    for model in (theirs, ours):
        model.set_input_embeddings(copy.deepcopy(table))
        torch.manual_seed(3)
        model.resize_token_embeddings(size)
    assert ours.config.vocab_size == theirs.config.vocab_size == size
    assert torch.equal(ours.backbone.embed.weight, table.weight)
    assert torch.equal(ours.lm_head.weight, theirs.lm_head.weight) and ours.lm_head.out_features == size
    assert (ours.lm_head.weight is ours.backbone.embed.weight) == tied


@pytest.mark.parametrize("size", [120, 140])
def test_a_negative_pad_id_keeps_its_padding_row_on_the_last_row_through_a_resize(size, tmp_path):
    """Old Llama configs' pad_token_id -1 names the last row: after a resize ttl's padding row is the new table's
    last, the row transformers picks when it loads its resized checkpoint; its model in memory keeps the old row
    (after growing, a real token's, which then learns nothing) or none after shrinking (docs/models.md)."""
    theirs = hf_causal_lm(pad_token_id=-1)
    theirs.generation_config.pad_token_id = None  # transformers refuses to save a negative one there
    ours = to_ttl(theirs, tmp_path / "src")
    theirs.resize_token_embeddings(size)
    ours.resize_token_embeddings(size)
    theirs.save_pretrained(tmp_path / "resized")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resized")
    assert ours.backbone.embed.padding_idx == reloaded.model.embed_tokens.padding_idx == size - 1
    assert theirs.model.embed_tokens.padding_idx == (130 if size > 131 else None)


def test_model_generate_is_ttl_generate_called_as_transformers_code_calls_it(tmp_path):
    """`model.generate(**batch, ...)` (the tokenizer's dict unpacked) gives transformers' tokens, and ttl's own
    options (here the seed) reach `ttl_core.generate`."""
    from generation_helpers import left_padded, saved_models
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(hf.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": mask}
    expected = hf.generate(**batch, max_new_tokens=7, do_sample=False, pad_token_id=PAD)
    assert torch.equal(ours.generate(**batch, max_new_tokens=7, do_sample=False, pad_token_id=PAD), expected)
    sampled = dict(max_new_tokens=5, do_sample=True, top_k=0, seed=4, pad_token_id=PAD)
    assert torch.equal(ours.generate(ids, mask, **sampled), ttl_core.generate(ours, ids, mask, **sampled))


def test_model_generate_takes_the_prompt_as_inputs_as_transformers_does(tmp_path):
    """transformers' `generate(inputs=ids)` names the prompt `inputs`; both `inputs` and `input_ids` is refused."""
    from generation_helpers import left_padded, saved_models
    hf, ours = saved_models(tmp_path)
    ids, mask = left_padded(hf.config.vocab_size)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(ours.generate(inputs=ids, **settings), hf.generate(inputs=ids, **settings))
    with pytest.raises(ValueError, match="were passed alongside input_ids"):
        hf.generate(inputs=ids, input_ids=ids, **settings)
    with pytest.raises(ValueError, match="both `inputs` and `input_ids`"):
        ours.generate(inputs=ids, input_ids=ids, **settings)


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, "float16", "auto"], ids=["bf16", "fp16_name", "auto"])
def test_torch_dtype_is_dtypes_older_name_as_in_transformers(torch_dtype, tmp_path):
    """transformers 4.x code passes `load_pretrained(dir, torch_dtype=...)`; transformers 5 still takes it silently
    as `dtype` (and takes `dtype` where both come, which ttl refuses instead)."""
    import transformers
    hf_causal_lm().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = ttl_core.load_pretrained(tmp_path, torch_dtype=torch_dtype)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch_dtype)
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()}
    assert {p.dtype for p in ttl_core.load_pretrained(tmp_path, dtype=torch_dtype).parameters()} == \
        {p.dtype for p in ours.parameters()}
    with pytest.raises(CheckpointError, match="got both dtype=torch.float32 and torch_dtype=.* pass dtype alone") as e:
        ttl_core.load_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch_dtype)
    assert "\n" not in str(e.value)


def test_from_pretrained_and_save_pretrained_are_called_on_the_classes_as_in_transformers(tmp_path):
    """`LlamaForSequenceClassification.from_pretrained(causal_lm_dir, num_labels=3)` after a seed starts the
    classifier transformers starts (its new head drawn alike), `LlamaForCausalLM.from_pretrained(dir, dtype=...)`
    loads what `load_pretrained` loads, and `model.save_pretrained(dir)` writes a directory transformers reads."""
    hf_causal_lm().save_pretrained(tmp_path / "lm")
    ids, mask = padded_batch()
    torch.manual_seed(11)
    theirs = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3,
                                                                         pad_token_id=PAD)
    torch.manual_seed(11)
    ours = ttl_core.LlamaForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3, pad_token_id=PAD)
    assert torch.equal(ours.score.weight, theirs.score.weight)
    assert max_diff(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits) <= 1e-5
    ours.save_pretrained(tmp_path / "classifier")
    reread = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert max_diff(reread(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits) <= 1e-5

    lm = ttl_core.LlamaForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16)
    assert lm.architecture == "LlamaForCausalLM" and {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    reference = ttl_core.load_pretrained(tmp_path / "lm", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(CheckpointError, match="cannot be loaded as LlamaForCausalLM") as e:
        ttl_core.LlamaForCausalLM.from_pretrained(tmp_path / "classifier")
    assert "\n" not in str(e.value)
