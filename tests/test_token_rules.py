"""ttl_core.token_rules' processors (sequence_bias, bad_words_ids, suppress_tokens, begin_suppress_tokens,
forced_bos_token_id, forced_eos_token_id, remove_invalid_values, exponential_decay_length_penalty) through
generate(), token for token against transformers' generate(), greedy and sampled."""

import pytest
import torch
from generation_helpers import PAD, assert_refused, left_padded, saved_models

import ttl_core
from ttl_core.errors import GenerationError

NEW = 12  # new tokens a call


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("rules"))


@pytest.fixture(scope="module")
def greedy_tokens(models):
    """Each row's greedy new tokens without any rule: the rules below name them, so that each has an effect."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    return ttl_core.generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=[])[:, 9:].tolist()


def rule_cases(g: list[list[int]]) -> dict[str, dict]:
    return {
        "sequence_bias": dict(sequence_bias={(g[0][0],): -4.0, (g[1][1], g[1][2]): -30.0, (g[2][3],): 2.5,
                                             (g[2][0], g[2][1], g[2][2]): -1e9, (g[1][0], g[1][1]): 0.75}),
        # a bad word that is one EOS id (5) bans nothing, as in transformers
        "bad_words_ids": dict(bad_words_ids=[[g[0][0]], [g[1][1], g[1][2]], [g[2][0], g[2][1], g[2][2]], [5]]),
        "suppress_tokens": dict(suppress_tokens=[g[0][0], g[1][0], g[2][4]]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[g[0][0], g[1][0], g[2][0]]),
        "forced_eos_token_id": dict(forced_eos_token_id=[7, 8]),
    }


@pytest.mark.parametrize("rule", ["sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                                  "forced_eos_token_id"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_token_rules_match_transformers(models, greedy_tokens, rule, do_sample):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    settings = rule_cases(greedy_tokens)[rule]
    kwargs = dict(max_new_tokens=NEW, do_sample=do_sample, top_k=0, temperature=0.5, repetition_penalty=1.3,
                  eos_token_id=[5], pad_token_id=PAD, num_return_sequences=2 if do_sample else 1)
    seed = 1 if do_sample else None
    torch.manual_seed(1)
    expected = hf.generate(ids, attention_mask=mask, **kwargs, **settings)
    got = ttl_core.generate(ours, ids, mask, seed=seed, **kwargs, **settings)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ttl_core.generate(ours, ids, mask, seed=seed, **kwargs))  # the rule had an effect


def test_rules_from_the_checkpoint_together_as_in_transformers(models, greedy_tokens, monkeypatch):
    """All at once, read from generation_config.json (where transformers writes a sequence_bias as a list of
    [ids, bias] pairs), with the repetition penalty, n-gram blocking and min_new_tokens: each in transformers'
    order."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    saved = {name: value for case in rule_cases(greedy_tokens).values() for name, value in case.items()}
    saved.update(no_repeat_ngram_size=2, min_new_tokens=4, exponential_decay_length_penalty=(5, 1.4),
                 remove_invalid_values=True, repetition_penalty=1.2)
    for name, value in saved.items():
        monkeypatch.setattr(hf.generation_config, name, value)
    saved["sequence_bias"] = [[list(sequence), bias] for sequence, bias in saved["sequence_bias"].items()]
    saved["exponential_decay_length_penalty"] = [5, 1.4]  # as JSON holds it
    monkeypatch.setattr(ours, "generation_config", saved)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=[5, 7], pad_token_id=PAD)
    assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), hf.generate(ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("do_sample", [False, True])
def test_forced_bos_after_a_one_token_prompt_as_in_transformers(models, do_sample):
    """transformers forces forced_bos_token_id where the row is one token long: the first new token after a
    one-column prompt (never after a longer one); begin_suppress_tokens then apply to the token after it."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=3, seq=1, pads=(0, 0, 0))
    forced = int(ttl_core.generate(ours, ids, mask, max_new_tokens=2, eos_token_id=[])[1, 2])
    # the greedy tokens after the forced one, so that suppressing them has an effect
    after_forced = ttl_core.generate(ours, ids, mask, max_new_tokens=2, eos_token_id=[], forced_bos_token_id=forced)
    settings = dict(forced_bos_token_id=forced, begin_suppress_tokens=after_forced[:, 2].tolist())
    kwargs = dict(max_new_tokens=NEW, do_sample=do_sample, top_k=0, eos_token_id=[5], pad_token_id=PAD)
    torch.manual_seed(2)
    expected = hf.generate(ids, attention_mask=mask, **kwargs, **settings)
    got = ttl_core.generate(ours, ids, mask, seed=2 if do_sample else None, **kwargs, **settings)
    assert torch.equal(got, expected) and (got[:, 1] == forced).all()
    assert not torch.isin(got[:, 2], after_forced[:, 2]).any()
    longer, longer_mask = left_padded(ours.config.vocab_size)
    assert torch.equal(ttl_core.generate(ours, longer, longer_mask, **kwargs, forced_bos_token_id=7, seed=2),
                       ttl_core.generate(ours, longer, longer_mask, **kwargs, seed=2))


@pytest.mark.parametrize("do_sample", [False, True])
def test_exponential_decay_length_penalty_matches_transformers(models, do_sample):
    """From the `start`-th new token on, the EOS ids' scores grow by |score| * (factor ** steps - 1): rows end
    earlier than without it (and a negative start counts from before the first new token)."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW, do_sample=do_sample, top_k=0, repetition_penalty=1.2, eos_token_id=[5, 9],
                  pad_token_id=PAD)
    for decay in ((3, 1.8), (-2, 1.3)):
        torch.manual_seed(3)
        expected = hf.generate(ids, attention_mask=mask, exponential_decay_length_penalty=decay, **kwargs)
        got = ttl_core.generate(ours, ids, mask, exponential_decay_length_penalty=decay, seed=3, **kwargs)
        assert torch.equal(got, expected)
        assert got.shape[1] < ttl_core.generate(ours, ids, mask, seed=3, **kwargs).shape[1]


@pytest.mark.parametrize("do_sample", [False, True])
def test_remove_invalid_values_makes_inf_the_largest_float_as_in_transformers(models, greedy_tokens, do_sample):
    """remove_invalid_values turns +inf scores (here from sequence_bias) into float32's largest value and -inf into
    its lowest, after the repetition penalty: two tokens biased by +inf then share all the probability (without it,
    sampling has no distribution and ttl raises)."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    favored = (greedy_tokens[0][2], greedy_tokens[1][3])
    kwargs = dict(max_new_tokens=NEW, do_sample=do_sample, top_k=0, repetition_penalty=1.3, eos_token_id=[],
                  pad_token_id=PAD, num_return_sequences=2 if do_sample else 1, min_new_tokens=2,
                  sequence_bias={(favored[0],): float("inf"), (favored[1],): float("inf")})
    torch.manual_seed(4)
    expected = hf.generate(ids, attention_mask=mask, remove_invalid_values=True, **kwargs)
    got = ttl_core.generate(ours, ids, mask, remove_invalid_values=True, seed=4, **kwargs)
    assert torch.equal(got, expected) and torch.isin(got[:, 9:], torch.tensor(favored)).all()
    if do_sample:
        assert set(got[:, 9:].flatten().tolist()) == set(favored)
        with pytest.raises(GenerationError, match="sampling met scores with no distribution"):
            ttl_core.generate(ours, ids, mask, seed=4, **kwargs)


def allowed_after(prompt: int, row: torch.Tensor) -> list[int]:
    """A constraint that depends on the prompt and on the row's last token, as a grammar's would."""
    return [(int(row[-1]) * 7 + k + prompt) % 131 for k in range(5)]


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=True, top_k=0, num_return_sequences=2),
    dict(num_beams=3, num_return_sequences=2),
    dict(num_beams=2, do_sample=True, top_k=0),
])
def test_prefix_allowed_tokens_fn_matches_transformers(models, kwargs):
    """Called with the prompt's index (shared by its returned sequences and beams) and the row so far, prompt and
    left padding included; every new token is one it allowed."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=PAD, prefix_allowed_tokens_fn=allowed_after,
                  **kwargs)
    torch.manual_seed(5)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    got = ttl_core.generate(ours, ids, mask, seed=5 if kwargs.get("do_sample") else None, **kwargs)
    assert torch.equal(got, expected)
    rows_per_prompt = got.shape[0] // 3
    for row, tokens in enumerate(got):
        for end in range(9, tokens.shape[0]):
            assert int(tokens[end]) in allowed_after(row // rows_per_prompt, tokens[:end])


def test_an_unmeetable_prefix_constraint_keeps_its_tokens_as_in_transformers(models):
    """Where every allowed token is already blocked (here by bad_words_ids), transformers keeps the allowed tokens
    at 0 rather than leaving no token; ttl does the same."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=4, eos_token_id=[], pad_token_id=PAD, bad_words_ids=[[20], [21]],
                  prefix_allowed_tokens_fn=lambda prompt, row: [20 + prompt % 2])
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected)
    assert torch.equal(expected[:, 9:], torch.tensor([[20], [21], [20]]).expand(3, 4))


def test_an_infinite_sequence_bias_forces_its_token_in_greedy_decoding_as_in_transformers(models, greedy_tokens):
    """+inf is argmax's answer, as in transformers (sampling from it fails in both): no NaN-or-inf error."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    forced = greedy_tokens[1][4]
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=[5], pad_token_id=PAD, repetition_penalty=1.3,
                  sequence_bias={(forced,): float("inf"), (greedy_tokens[0][0], greedy_tokens[0][1]): -2.0})
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert (expected[:, 9:] == forced).all()
    assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected)


@pytest.mark.parametrize("do_sample", [False, True])
def test_infinite_biases_that_make_nan_or_inf_scores_are_named(models, greedy_tokens, do_sample):
    """inf and -inf on one token is NaN, which transformers' argmax picks as if it were text, and sampling takes
    no inf: ttl raises, naming sequence_bias rather than the model's weights."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    token = greedy_tokens[0][0]
    with pytest.raises(GenerationError, match="or sequence_bias put inf") as info:
        ttl_core.generate(ours, ids, mask, max_new_tokens=3, do_sample=do_sample, seed=0,
                          sequence_bias={(token,): float("inf")}, bad_words_ids=[[token]])
    assert "\n" not in str(info.value)


def test_an_exponential_decay_past_the_float_range_keeps_the_sign_of_its_power(models):
    """A negative factor's power alternates in sign: past a double's range (where transformers' Python power
    overflows) an odd power of it is -inf, which bans the EOS ids, and an even one +inf, which forces them."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    # EOS is banned by min_new_tokens at new token 0; tokens 1, 2 and 3 are 401st, 402nd and 403rd powers of -10
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[5], pad_token_id=PAD, min_new_tokens=1,
                            exponential_decay_length_penalty=(-400, -10.0))
    assert (got[:, 10] != 5).all() and (got[:, 11] == 5).all()


@pytest.mark.parametrize("do_sample", [False, True])
def test_an_exponential_decay_past_float32_is_named(models, do_sample):
    """factor ** steps past float32's range makes the EOS scores inf (past a double's, transformers' power overflows),
    which renormalize_logits turns into NaN and which sampling cannot draw from: the error names the decay, not the
    model's weights."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    with pytest.raises(GenerationError, match="or exponential_decay_length_penalty grew the EOS scores past float32"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=4, do_sample=do_sample, seed=0, eos_token_id=[5, 9],
                          exponential_decay_length_penalty=(-3, 1e30), renormalize_logits=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bad_words_ids=[[]]), r"bad_words_ids must hold non-empty lists of token ids, got \[\]"),
    (dict(bad_words_ids=[4, 5]), "bad_words_ids must hold non-empty lists of token ids, got 4"),
    (dict(bad_words_ids=[[4, 131]]), r"bad_words_ids 131 is not a token id in \[0, 131\)"),
    (dict(bad_words_ids=7), "bad_words_ids must be a list of lists of token ids, got 7"),
    (dict(sequence_bias={(3,): "x"}), "sequence_bias must map token id sequences to numbers"),
    (dict(sequence_bias=[[[3, 4]]]), "sequence_bias must map token id sequences to numbers"),
    (dict(sequence_bias={(3,): 10**400}), "sequence_bias must map token id sequences to numbers"),  # no float
    (dict(sequence_bias={(): 1.0}), r"sequence_bias must hold non-empty lists of token ids, got \(\)"),
    (dict(suppress_tokens=[-1]), r"suppress_tokens -1 is not a token id in \[0, 131\)"),
    (dict(begin_suppress_tokens=["a"]), "begin_suppress_tokens 'a' is not a token id"),
    (dict(forced_eos_token_id=131), r"forced_eos_token_id 131 is not a token id in \[0, 131\)"),
    (dict(forced_bos_token_id=131), r"forced_bos_token_id 131 is not a token id in \[0, 131\)"),
    (dict(forced_bos_token_id=[1, 2]), r"forced_bos_token_id must be one token id, got \[1, 2\]"),
    (dict(remove_invalid_values="yes"), "remove_invalid_values must be True or False, got 'yes'"),
    (dict(exponential_decay_length_penalty=(1.5, 2.0)), r"exponential_decay_length_penalty must be \(start, factor\)"),
    (dict(exponential_decay_length_penalty=3), r"must be \(start, factor\): new tokens before the penalty starts"),
    (dict(exponential_decay_length_penalty=(1, "x")), r"got \(1, 'x'\)"),
    (dict(prefix_allowed_tokens_fn=lambda prompt, row: [] if prompt == 1 else [4]),
     "prefix_allowed_tokens_fn allowed no token for prompt 1: its constraint cannot be met"),
    (dict(prefix_allowed_tokens_fn=lambda prompt, row: [4, 131]),
     r"prefix_allowed_tokens_fn allowed ids outside the vocabulary \[0, 131\) for prompt 0"),
    (dict(prefix_allowed_tokens_fn=[4, 5]),
     r"prefix_allowed_tokens_fn must be a function \(prompt index, row so far\)"),
    # transformers refuses this too: the last step would have no token left (greedy would silently pick id 0)
    (dict(forced_eos_token_id=[7, 9], suppress_tokens=[9, 4, 7]),
     r"every forced_eos_token_id \(\[7, 9\]\) is also in suppress_tokens"),
    # and this (whatever the prompt's length): after a one-column prompt, greedy would silently pick id 0
    (dict(forced_bos_token_id=7, suppress_tokens=[9, 7]),
     r"every forced_bos_token_id \(\[7\]\) is also in suppress_tokens"),
    # transformers' greedy decoding picks the NaN it puts on the EOS scores as if it were a token
    (dict(exponential_decay_length_penalty=(1, float("nan"))), "exponential_decay_length_penalty's factor is NaN"),
])
def test_bad_rules_are_one_line_errors(models, kwargs, message):
    assert_refused(models[1], message, max_new_tokens=3, **kwargs)


def test_rules_that_leave_no_token_are_named_when_renormalize_logits_makes_that_nan(models):
    """Greedy decoding picks id 0 where the rules leave no token, but renormalize_logits' log-softmax makes that
    row NaN, which ttl refuses (transformers' argmax picks id 0 again): the error names the rules, not the model."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    banned = list(range(ours.config.vocab_size))
    kwargs = dict(max_new_tokens=3, eos_token_id=[], pad_token_id=PAD, suppress_tokens=banned)
    assert (ttl_core.generate(ours, ids, mask, **kwargs)[:, 9:] == 0).all()  # as the docs say
    assert (hf.generate(ids, attention_mask=mask, renormalize_logits=True, **kwargs)[:, 9:] == 0).all()
    with pytest.raises(GenerationError, match="renormalize_logits") as info:
        ttl_core.generate(ours, ids, mask, renormalize_logits=True, **kwargs)
    assert "token rules" in str(info.value) and "\n" not in str(info.value)


def test_rules_at_the_edges_of_a_row_as_in_transformers(models):
    """A sequence bias longer than the row so far matches nothing (not the row's first token read again), and the
    n-gram that ends at the row's last token counts for no_repeat_ngram_size."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, seed=21, batch=3, seq=1, pads=(0, 0, 0))
    greedy = ttl_core.generate(ours, ids, mask, max_new_tokens=1, eos_token_id=[])[:, 1].tolist()
    prompt = ids[:, 0].tolist()
    kwargs = dict(max_new_tokens=3, eos_token_id=[], pad_token_id=PAD)
    cases = [(ids, mask, dict(sequence_bias={(p, p, g): -1e9 for p, g in zip(prompt, greedy)}))]
    repeated, repeated_mask = left_padded(ours.config.vocab_size, seed=22, batch=3, seq=5, pads=(0, 0, 0))
    repeated[:, -2:] = greedy[0]  # rows ending in "a a": with n = 2, "a" may not follow, however likely
    cases.append((repeated, repeated_mask, dict(no_repeat_ngram_size=2, sequence_bias={(greedy[0],): 20.0})))
    for rows, rows_mask, settings in cases:
        expected = hf.generate(rows, attention_mask=rows_mask, **kwargs, **settings)
        assert torch.equal(ttl_core.generate(ours, rows, rows_mask, **kwargs, **settings), expected), settings
