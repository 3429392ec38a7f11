"""generate()'s arguments: one-line errors for bad settings and inputs, the accepted edges of each range, the
defaults and special token ids a checkpoint supplies, and token ids in any integer type."""

import copy
import re
import warnings

import pytest
import torch
from generation_helpers import PAD, CharTokenizer, assert_refused, left_padded, saved_models

import ttl_core
from ttl_core import decode_session
from ttl_core.errors import GenerationError
from ttl_core.generate_output import GenerationSettings
from ttl_core.streamer import TextStreamer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("gen"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=250), "exceeds the model's context of 256"),
    (dict(use_cache="no"), "use_cache must be True, False or None, got 'no'"),
    (dict(do_sample=True, top_p=0.0), "top_p must be in"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in"),
    (dict(temperature=-0.1), "temperature must be"),
    (dict(do_sample=True, temperature=0.0), "temperature must be"),
    (dict(top_k=-1), "top_k must be"),
    (dict(min_p=1.5), "min_p must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
    (dict(num_return_sequences=2), "needs do_sample"),
    (dict(eos_token_id=[2, 999]), "eos_token_id 999"),
    (dict(eos_token_id=131), "eos_token_id 131 is not a token id in \\[0, 131\\)"),  # the vocabulary's end
    (dict(stop_strings=["x"]), "need a tokenizer"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(do_sample=True, temperature="0.5"), "temperature must be a number, got '0.5'"),
    (dict(do_sample=True, temperature=1e-39), "temperature 1e-39 is too small to sample with"),
    (dict(do_sample=True, top_p="0.9"), "top_p must be a number, got '0.9'"),
    (dict(do_sample=True, temperature=10**400), "temperature must be a number, got 1000"),  # float() overflows
    (dict(repetition_penalty=-10**400), "repetition_penalty must be a number, got -1000"),
    (dict(do_sample=True, top_k=True), "top_k must be an integer"),
    (dict(pad_token_id=[3, 4]), "pad_token_id must be one token id"),
    (dict(eos_token_id=torch.tensor([2.0])), "eos_token_id 2.0 is not a token id"),
    (dict(stop_strings=[""], tokenizer=CharTokenizer()), "stop_strings must be a non-empty string"),
    (dict(stop_strings="x", tokenizer=object()), "stop_strings need a tokenizer with id_to_token"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),  # not 1 new token
    (dict(do_sample=True, num_return_sequences=True), "num_return_sequences must be a positive integer, got True"),
    (dict(do_sample="False"), "do_sample must be True or False, got 'False'"),  # a non-empty string is truthy
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0, got -1"),
    (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be an integer >= 0, got 1.5"),
    (dict(max_time=-1.0), "max_time must be a number of seconds >= 0, got -1.0"),
    (dict(max_time="5"), "max_time must be a number of seconds >= 0, got '5'"),
    (dict(do_sample=True, top_h=0.0), r"top_h must be in \(0, 1\], got 0.0"),
    (dict(do_sample=True, top_h="1"), "top_h must be a number, got '1'"),
    (dict(do_sample=True, typical_p=0.0), r"typical_p must be in \(0, 1\], got 0.0"),
    (dict(do_sample=True, epsilon_cutoff=1.0), r"epsilon_cutoff must be in \[0, 1\), got 1.0"),
    (dict(do_sample=True, eta_cutoff=-0.1), r"eta_cutoff must be in \[0, 1\), got -0.1"),
    (dict(do_sample=True, eta_cutoff="0.1"), "eta_cutoff must be a number, got '0.1'"),
    (dict(min_length=2.5), "min_length must be an integer >= 0, got 2.5"),
    (dict(max_new_tokens=None, max_length="20"), "max_length must be an integer >= 0, got '20'"),
    (dict(max_new_tokens=None, max_length=10**9), "^max_length of 1000000000 exceeds the model's context of 256 "),
    (dict(max_new_tokens=3, max_length=-1), "max_length must be an integer >= 0, got -1"),  # unused, still wrong
    (dict(min_new_tokens=2, min_length="4"), "min_length must be an integer >= 0, got '4'"),
])
def test_bad_arguments_raise_one_line_errors(models, kwargs, message):
    assert_refused(models[1], message, **kwargs)


def test_bad_inputs_raise_one_line_errors(models):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    with pytest.raises(GenerationError, match="empty prompt"):
        ttl_core.generate(ours, ids[:, :0])
    no_token = mask.clone()
    no_token[2] = 0
    with pytest.raises(GenerationError, match="row 2 of attention_mask attends to no token"):
        ttl_core.generate(ours, ids, no_token)
    for scale in (0.5, 1.5):  # float values that an integer conversion would turn into 0 or 1
        with pytest.raises(GenerationError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(token\)"):
            ttl_core.generate(ours, ids, mask * scale)
    right = mask.flip(1)
    with pytest.raises(GenerationError, match="left-padded"):
        ttl_core.generate(ours, ids, right)
    with pytest.raises(GenerationError, match="attention_mask must be a tensor shaped like input_ids, got a list"):
        ttl_core.generate(ours, ids, mask.tolist())
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        ttl_core.generate(ours, ids + 1000)
    with pytest.raises(GenerationError, match="outside the vocabulary"):  # one id past the last
        ttl_core.generate(ours, ids.masked_fill(mask == 0, ours.config.vocab_size), mask)
    with pytest.raises(GenerationError, match="a streamer follows one sequence"):
        ttl_core.generate(ours, ids, mask, streamer=TextStreamer(CharTokenizer()))
    classifier = ttl_core.LlamaForSequenceClassification(ttl_core.LlamaConfig.from_preset("tiny"))
    with pytest.raises(GenerationError, match="needs a causal LM"):
        ttl_core.generate(classifier, ids)


def test_token_ids_as_tensors_and_numpy_integers(models):
    """As transformers takes them: 0-d and 1-d tensors and NumPy integers are ids like Python ints."""
    import numpy as np

    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[])[:, 9:]
    eos = [int(free[0, 2]), int(free[1, 4])]
    expected = ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    for eos_ids, pad in ((torch.tensor(eos), torch.tensor(PAD)), (np.array(eos), np.int64(PAD)),
                         ([np.int64(eos[0]), torch.tensor(eos[1])], torch.tensor([PAD]))):
        got = ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=pad)
        assert torch.equal(got, expected)
    one = ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos[0], pad_token_id=PAD)
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=torch.tensor(eos[0]),
                                         pad_token_id=PAD), one)


def test_range_edges_are_accepted(models):
    """Each setting's range includes its edges: temperature 0 when greedy (unused, as in transformers), the
    smallest normal float32 temperature when sampling, min_p 1 and a top_p near 0 (only the most likely token
    is left, so sampling is greedy; this also shows each reaches the decode loop) and a prompt plus
    max_new_tokens that fill the context exactly."""
    from ttl_core.sampling import MIN_TEMPERATURE, check_sampling_arguments

    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    greedy = ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[], temperature=0.0), greedy)
    for edge in (dict(min_p=1.0), dict(top_p=1e-9)):
        sampled = ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[], do_sample=True, seed=1, **edge)
        assert torch.equal(sampled, greedy), edge
    check_sampling_arguments(True, MIN_TEMPERATURE, top_h=1.0, top_k=0, top_p=1.0, min_p=1.0, typical_p=1.0,
                             epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, num_return_sequences=1)
    every_id = list(range(ours.config.vocab_size))  # each row ends at its first token: a quick call
    full = ttl_core.generate(ours, ids, mask, max_new_tokens=ours.config.max_position_embeddings - 9,
                             eos_token_id=every_id, pad_token_id=PAD)
    assert full.shape == (3, 10)


def test_settings_left_out_sample_20_tokens_without_top_k(models, monkeypatch):
    """DECODING_DEFAULTS where neither the call nor the checkpoint sets a value: 20 new tokens, and sampling
    keeps every token (no top_k, where transformers' default would keep 50 of this vocabulary's 131)."""
    _, ours = models
    assert "max_new_tokens" not in ours.generation_config and "top_k" not in ours.generation_config
    ids, mask = left_padded(ours.config.vocab_size)
    assert ttl_core.generate(ours, ids, mask, eos_token_id=[]).shape == (3, 9 + 20)
    recorded = []
    real = decode_session.process_logits

    def recording(*args, **kwargs):
        recorded.append(real(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(decode_session, "process_logits", recording)
    for top_k in (None, 50):
        recorded.clear()
        ttl_core.generate(ours, ids, mask, max_new_tokens=3, do_sample=True, top_k=top_k, eos_token_id=[], seed=0)
        filtered = torch.isinf(torch.stack(recorded)).sum(-1)
        assert len(recorded) == 3 and (filtered == (0 if top_k is None else ours.config.vocab_size - 50)).all()


def test_special_token_ids_from_the_checkpoint(models, monkeypatch):
    """The checkpoint's generation_config.json gives the EOS ids and the padding id (id 0 included, -1 meaning
    none); without a padding id, padding is the first EOS id."""
    from ttl_core.sampling import special_token_ids

    _, ours = models
    monkeypatch.setattr(ours, "generation_config", {"eos_token_id": [0, -1, 7], "pad_token_id": 5})
    assert special_token_ids(ours, None, None) == ([0, 7], 5)
    monkeypatch.setattr(ours, "generation_config", {"eos_token_id": [9, 7], "pad_token_id": -1})
    assert special_token_ids(ours, None, None) == ([9, 7], 9)
    assert special_token_ids(ours, 4, None) == ([4], 4) and special_token_ids(ours, 4, 0) == ([4], 0)
    monkeypatch.setattr(ours, "generation_config", {})
    ids, mask = left_padded(ours.config.vocab_size)
    with pytest.raises(GenerationError, match="stop_strings need a pad_token_id"):
        ttl_core.generate(ours, ids, mask, eos_token_id=[], stop_strings="ab", tokenizer=CharTokenizer())


def test_a_padding_id_that_is_an_eos_id_is_not_taken_for_padding(models):
    """As in transformers: without attention_mask, prompt tokens equal to the padding id count as padding
    only when that id is no EOS id (Llama pads with its EOS id, and an EOS inside a prompt is a real token)."""
    hf, ours = models
    ids = left_padded(hf.config.vocab_size, batch=1)[0]
    ids[0, 4] = 2
    ref = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[2], pad_token_id=2)
    assert torch.equal(ttl_core.generate(ours, ids, max_new_tokens=6, eos_token_id=[2], pad_token_id=2), ref)


@pytest.mark.parametrize("lengths", [dict(min_new_tokens=6), dict(min_length=9 + 5),
                                     dict(min_new_tokens=6, min_length=30), dict(min_length=4)])
@pytest.mark.parametrize("do_sample", [False, True])
def test_min_lengths_keep_eos_away_as_in_transformers(models, lengths, do_sample):
    """min_new_tokens, or min_length (prompt columns included, left padding too), keep the EOS ids from being
    chosen until a row is that long, greedy or sampling; min_new_tokens wins over min_length, as in transformers.
    The EOS ids are tokens the rows pick at once without them."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    seed = 0 if do_sample else None
    first = ttl_core.generate(ours, ids, mask, max_new_tokens=2, do_sample=do_sample, seed=seed, eos_token_id=[])
    kwargs = dict(max_new_tokens=12, do_sample=do_sample, top_k=20, eos_token_id=first[:, 9:].flatten().tolist(),
                  pad_token_id=PAD)
    torch.manual_seed(0)
    expected = hf.generate(ids, attention_mask=mask, **kwargs, **lengths)
    got = ttl_core.generate(ours, ids, mask, seed=seed, **kwargs, **lengths)
    assert torch.equal(got, expected)
    without = ttl_core.generate(ours, ids, mask, seed=seed, **kwargs)
    assert got.shape[1] == without.shape[1] if lengths == dict(min_length=4) else got.shape[1] > without.shape[1]


@pytest.mark.parametrize("size", [1, 2, 3, 12, 40])
@pytest.mark.parametrize("do_sample", [False, True])
def test_no_repeat_ngram_size_blocks_as_in_transformers(models, size, do_sample):
    """A token that would repeat an n-gram of the row (left padding and prompt included, as transformers reads
    the row) is never chosen; greedy, or sampling at a low temperature, the rows would repeat themselves."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=24, do_sample=do_sample, temperature=0.1, top_k=0, eos_token_id=[5, 6],
                  pad_token_id=PAD, num_return_sequences=2 if do_sample else 1)
    torch.manual_seed(3)
    expected = hf.generate(ids, attention_mask=mask, no_repeat_ngram_size=size, **kwargs)
    got = ttl_core.generate(ours, ids, mask, seed=3 if do_sample else None, no_repeat_ngram_size=size, **kwargs)
    assert torch.equal(got, expected)
    unblocked = ttl_core.generate(ours, ids, mask, seed=3 if do_sample else None, **kwargs)
    assert not torch.equal(got, unblocked) or size >= 12  # 40: longer than the rows


def test_a_checkpoint_min_length_applies_without_a_warning(models, monkeypatch):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    eos = ttl_core.generate(ours, ids, mask, max_new_tokens=1, eos_token_id=[])[:, -1].tolist()
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    monkeypatch.setattr(hf.generation_config, "min_length", 9 + 5)
    monkeypatch.setattr(ours, "generation_config", {"min_length": 9 + 5})
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ttl_core.generate(ours, ids, mask, **kwargs)
    assert expected.shape[1] >= 9 + 5 and torch.equal(got, expected)


def test_max_time_stops_as_in_transformers(models):
    """max_time is checked after each new token, as transformers' MaxTimeCriteria is: 0 s leaves one token, a day
    all of them."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=[], pad_token_id=PAD)
    for max_time, new_tokens in ((0.0, 1), (86400.0, 10)):
        expected = hf.generate(ids, attention_mask=mask, max_time=max_time, **kwargs)
        got = ttl_core.generate(ours, ids, mask, max_time=max_time, **kwargs)
        assert expected.shape[1] == 9 + new_tokens and torch.equal(got, expected)


def test_max_length_counts_the_prompt_as_in_transformers(models, monkeypatch):
    """max_length counts the prompt's columns; max_new_tokens, the call's or the checkpoint's, wins over it; a
    prompt that fills it leaves no room."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(do_sample=False, eos_token_id=[], pad_token_id=PAD)
    with pytest.raises(GenerationError, match="the prompt's 9 tokens already fill max_length of 9: no room for new"):
        ttl_core.generate(ours, ids, mask, max_length=9, **kwargs)
    for lengths, saved, columns in ((dict(max_length=13), None, 13), (dict(max_length=13, max_new_tokens=7), None, 16),
                                    (dict(max_length=20), 5, 14)):
        monkeypatch.setattr(hf.generation_config, "max_new_tokens", saved)
        monkeypatch.setattr(ours, "generation_config", {"max_new_tokens": saved})
        expected = hf.generate(ids, attention_mask=mask, **kwargs, **lengths)
        got = ttl_core.generate(ours, ids, mask, **kwargs, **lengths)
        assert expected.shape[1] == columns and torch.equal(got, expected), lengths


def test_the_default_length_stops_at_the_context_like_transformers(models):
    """With no length from the call or the checkpoint, transformers generates 20 new tokens or up to the
    model's context, whichever comes first; a prompt that fills the context leaves nothing to generate."""
    hf, ours = models
    context = ours.config.max_position_embeddings
    assert "max_length" not in ours.generation_config and "max_new_tokens" not in ours.generation_config
    ids = torch.randint(4, ours.config.vocab_size, (1, context - 6), generator=torch.Generator().manual_seed(5))
    ref = hf.generate(ids, do_sample=False, eos_token_id=[], pad_token_id=PAD)
    got = ttl_core.generate(ours, ids, eos_token_id=[])
    assert ref.shape == (1, context) and torch.equal(got, ref)
    full = torch.cat([ids, ids[:, :6]], dim=1)
    with pytest.raises(GenerationError, match=f"the prompt's {context} tokens fill the model's context of {context} "
                                              "positions: no room for new tokens"):
        ttl_core.generate(ours, full, eos_token_id=[])


@pytest.mark.parametrize("saved, message", [
    ({"eos_token_id": [2, None]}, "generation_config.json: eos_token_id None is not a token id"),
    ({"eos_token_id": 2, "pad_token_id": "3"}, "generation_config.json: pad_token_id '3' is not a token id"),
])
def test_bad_token_ids_in_the_checkpoint_are_named(models, monkeypatch, saved, message):
    """A malformed id in generation_config.json (a null in an EOS list) raised a TypeError from deep inside."""
    _, ours = models
    monkeypatch.setattr(ours, "generation_config", GenerationSettings(saved))  # as the loader keeps the file's
    with pytest.raises(GenerationError, match=message):
        ttl_core.generate(ours, torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_blocking_every_token_picks_transformers_greedy_token_and_names_the_cause_when_sampling(models):
    """no_repeat_ngram_size=1 over a row that holds every id, or min_new_tokens with every id an EOS id, leaves no
    token: transformers' greedy argmax then picks id 0 and its sampling fails. ttl raised in both, blaming the
    model's logits."""
    hf, ours = models
    vocab = ours.config.vocab_size
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(4))[None, :vocab - 5]
    mask = torch.ones_like(ids)
    every_id = list(range(vocab))
    for blocking in (dict(no_repeat_ngram_size=1, eos_token_id=[]), dict(min_new_tokens=3, eos_token_id=every_id)):
        kwargs = dict(max_new_tokens=8, pad_token_id=PAD, **blocking)
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        assert expected[0, -1] == 0  # every id blocked (then, in the second, id 0 is an EOS id and ends the row)
        assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected)
        with pytest.raises(GenerationError, match=r"or the token rules \(min_new_tokens, no_repeat_ngram_size, "
                                                  r"bad_words_ids, ...\) left no token"):
            ttl_core.generate(ours, ids, mask, do_sample=True, seed=0, **kwargs)


def test_a_generation_config_passed_wins_over_the_checkpoints_as_in_transformers(models, monkeypatch):
    """`generation_config=` (transformers' GenerationConfig or a dict): its settings win over the checkpoint's
    generation_config.json where it sets them (ids included), the call's own arguments over both."""
    from transformers import GenerationConfig

    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    saved = {"max_new_tokens": 4, "repetition_penalty": 3.0, "eos_token_id": [9], "top_k": 1}
    monkeypatch.setattr(ours, "generation_config", saved)
    for name, value in saved.items():
        monkeypatch.setattr(hf.generation_config, name, value)
    passed = GenerationConfig(max_new_tokens=9, do_sample=True, top_k=0, temperature=0.7, eos_token_id=[5, 6],
                              pad_token_id=PAD, num_return_sequences=2)
    for config in (passed, passed.to_dict()):
        for call in ({}, dict(top_k=3, max_new_tokens=6)):
            torch.manual_seed(1)
            expected = hf.generate(ids, attention_mask=mask, generation_config=passed, **call)
            got = ttl_core.generate(ours, ids, mask, generation_config=config, seed=1, **call)
            assert torch.equal(got, expected)
    assert got.shape == (6, 9 + 6)
    with pytest.raises(GenerationError, match="^generation_config must be a dict or a transformers GenerationConfig, "
                                              "got a list$"):
        ttl_core.generate(ours, ids, mask, generation_config=[("top_k", 3)])
    with pytest.raises(GenerationError, match="^generation_config: eos_token_id 131 is not a token id"):
        ttl_core.generate(ours, ids, mask, generation_config={"eos_token_id": 131})


@pytest.mark.parametrize("name, value, call, message", [
    ("max_length", 5, {}, "the prompt's 9 tokens already fill max_length of 5: no room for new tokens$"),
    ("max_length", 999, {}, "max_length of 999 exceeds the model's context of 256 positions$"),
    ("min_length", -2, {}, "min_length must be an integer >= 0, got -2$"),
    ("stop_strings", [5], dict(tokenizer=CharTokenizer()), "stop_strings must be a non-empty string"),
    ("watermarking_config", {"bias": float("nan")}, {}, "watermarking_config bias must be a number other than NaN"),
])
def test_a_bad_setting_is_blamed_on_where_it_was_set(models, monkeypatch, name, value, call, message):
    """On the generation_config passed, on model.generation_config once a program set it there (by attribute, by
    item, by update, or a dict assigned), on the checkpoint's generation_config.json only where it came from that file
    (which may not exist or not set it at all; a copy, as the EMA's of a model, still did)."""
    _, ours = models
    by_attribute, by_item, by_update = (GenerationSettings(ours.generation_config) for _ in range(3))
    setattr(by_attribute, name, value)
    by_item[name] = value
    by_update.update({name: value})
    from_file = GenerationSettings({**ours.generation_config, name: value})
    for model_settings, passed, source in ((None, {name: value}, "generation_config"),
                                           (by_attribute, None, "model.generation_config"),
                                           (by_item, None, "model.generation_config"),
                                           (by_update, None, "model.generation_config"),
                                           ({**ours.generation_config, name: value}, None, "model.generation_config"),
                                           (from_file, None, "generation_config.json"),
                                           (copy.deepcopy(from_file), None, "generation_config.json")):
        monkeypatch.setattr(ours, "generation_config", model_settings)
        assert_refused(ours, f"^{re.escape(source)}: {message}", generation_config=passed, **call)


def test_settings_ttl_does_not_implement_are_warned_of_by_where_they_were_set(models, monkeypatch):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    set_in_code = GenerationSettings(ours.generation_config)
    set_in_code.penalty_alpha = 0.6
    monkeypatch.setattr(ours, "generation_config", set_in_code)
    with pytest.warns(UserWarning, match=r"^model\.generation_config sets penalty_alpha=0\.6 and generation_config "
                                         r"sets token_healing=True, which ttl's generate\(\) does not implement"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=1, generation_config={"token_healing": True})
    from_file = GenerationSettings({**ours.generation_config, "token_healing": True})
    monkeypatch.setattr(ours, "generation_config", from_file)
    with pytest.warns(UserWarning, match=r"^generation_config\.json sets penalty_alpha=0\.6, token_healing=True, "
                                         "which"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_use_cache_is_taken_as_transformers_callers_pass_it_and_changes_nothing(models, use_cache):
    """Code written for transformers passes use_cache (False decodes without a cache there): the tokens are
    transformers' either way, sampled from the same seed."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=[], pad_token_id=PAD, use_cache=use_cache)
    torch.manual_seed(5)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ttl_core.generate(ours, ids, mask, seed=5, **kwargs), expected)
    assert torch.equal(ours.generate(ids, mask, seed=5, **kwargs), expected)
