"""Beam search (`generate(num_beams=k)`) token for token against transformers' generate(), over random settings:
batches with different left padding, EOS lists, length penalties, the three early-stopping rules,
num_return_sequences, and the processors beam search applies to log-probabilities."""

import random

import pytest
import torch
from generation_helpers import (PAD, CharTokenizer, assert_refused, cuda_batch, cuda_models, left_padded,
                                saved_models)

import ttl_core


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("beams"))


def random_case(rng: random.Random, case: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    batch, seq = rng.randint(1, 3), rng.randint(2, 9)
    ids, mask = left_padded(131, seed=case, batch=batch, seq=seq, pads=[rng.randint(0, seq - 1) for _ in range(batch)])
    beams = rng.randint(2, 4)
    kwargs = dict(max_new_tokens=rng.randint(1, 12), num_beams=beams, num_return_sequences=rng.randint(1, beams),
                  eos_token_id=rng.choice([[], [5], [5, 6, 7], list(range(4, 40))]), pad_token_id=PAD,
                  length_penalty=rng.choice([1.0, 0.0, -1.0, 2.0]), early_stopping=rng.choice([False, True, "never"]))
    extras = [dict(repetition_penalty=rng.choice([1.3, 0.8])), dict(no_repeat_ngram_size=rng.choice([1, 2, 3])),
              dict(min_new_tokens=rng.randint(1, 5)), dict(bad_words_ids=[[rng.randint(4, 130)], [9, 10]]),
              dict(renormalize_logits=True), dict(exponential_decay_length_penalty=(rng.randint(-2, 4), 1.5))]
    for extra in extras:
        if rng.random() < 0.3:
            kwargs.update(extra)
    return ids, mask, kwargs


@pytest.mark.parametrize("chunk", range(4))
def test_beam_search_matches_transformers(models, chunk):
    """24 random cases (200 more were compared by hand the day beam search came, all equal)."""
    hf, ours = models
    rng = random.Random(chunk)
    for case in range(6):
        ids, mask, kwargs = random_case(rng, 6 * chunk + case)
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected), kwargs


@pytest.mark.parametrize("chunk", range(2))
def test_beam_sampling_matches_transformers(models, chunk):
    """Beams with do_sample draw their candidates as transformers' torch.multinomial does (the best of p / Exp(1),
    over the same draws), with its warpers keeping a token more than there are EOS ids: 12 random cases, seeded
    (`seed=s` as `torch.manual_seed(s)`) or from torch's global RNG, which ends where transformers leaves it."""
    hf, ours = models
    rng = random.Random(100 + chunk)
    for case in range(6):
        ids, mask, kwargs = random_case(rng, 100 + 6 * chunk + case)
        kwargs.update(do_sample=True, top_k=0)
        warpers = [dict(temperature=0.6), dict(top_k=rng.choice([1, 3])), dict(top_p=rng.choice([0.1, 0.6])),
                   dict(min_p=0.3), dict(typical_p=0.5), dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.02)]
        for warper in rng.sample(warpers, 2):
            kwargs.update(warper)
        seeded = case % 2 == 0
        torch.manual_seed(case)
        expected, after_transformers = hf.generate(ids, attention_mask=mask, **kwargs), torch.rand(1)
        torch.manual_seed(99 if seeded else case)
        got = ttl_core.generate(ours, ids, mask, seed=case if seeded else None, **kwargs)
        assert torch.equal(got, expected), kwargs
        assert seeded or torch.equal(torch.rand(1), after_transformers)


def test_forced_eos_without_eos_ids_pads_placeholder_beams_with_the_padding_id(models):
    """With one token left (forced EOS) the k beams tie with the empty finished slots transformers starts with; those
    are filled with the padding id there whenever it is set, also given an empty list of EOS ids (given none at all,
    transformers fills them with -1, no token id, where ttl keeps the padding id: docs/generation.md)."""
    hf, ours = models
    ids, mask = left_padded(131, batch=2, seq=5, pads=(0, 2))
    kwargs = dict(max_new_tokens=1, num_beams=3, num_return_sequences=3, eos_token_id=[], pad_token_id=5,
                  forced_eos_token_id=5)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected)


def test_a_padding_id_of_0_without_eos_ids_pads_placeholder_beams_with_0(models):
    """transformers' beam search takes a padding id of 0 for none and then fails on the missing EOS id; ttl pads as
    transformers pads with any other padding id (never with -1, no token id)."""
    hf, ours = models
    ids, mask = left_padded(131, batch=2, seq=5, pads=(0, 2))
    kwargs = dict(max_new_tokens=1, num_beams=3, num_return_sequences=3, eos_token_id=[], forced_eos_token_id=7)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=9, **kwargs)
    assert (expected[:, 5:] == 9).any()  # placeholder beams, padded
    expected[:, 5:] = expected[:, 5:].masked_fill(expected[:, 5:] == 9, 0)
    assert torch.equal(ttl_core.generate(ours, ids, mask, pad_token_id=0, **kwargs), expected)


def test_beams_find_a_likelier_sequence_than_greedy(models):
    """What beam search is for: with 4 beams the returned continuation is at least as likely as greedy's, and here
    strictly likelier (the sums of log-probabilities below are computed from full forward passes)."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=1, pads=(0,))

    def log_prob(sequence: torch.Tensor) -> float:
        log_probs = ours(sequence[None]).logits[0, :-1].float().log_softmax(-1)
        return float(log_probs[torch.arange(8, sequence.shape[0] - 1), sequence[9:]].sum())

    kwargs = dict(max_new_tokens=8, eos_token_id=[], length_penalty=0.0)
    greedy = ttl_core.generate(ours, ids, mask, **kwargs)[0]
    beam = ttl_core.generate(ours, ids, mask, num_beams=4, **kwargs)[0]
    with torch.no_grad():
        assert log_prob(beam) > log_prob(greedy) + 1e-3


@pytest.mark.parametrize("early_stopping, length_penalty", [("never", 2.0), (False, 2.0)])
def test_when_the_search_gives_up_on_a_prompt_as_transformers_does(models, early_stopping, length_penalty):
    """Many EOS ids fill the finished slots early, where the stopping rule decides the result: "never" with a
    positive length_penalty measures a running beam at the longest length it could reach, and a prompt given up on
    files no more finished beams while the others of its batch run on."""
    hf, ours = models
    for case in range(2):
        ids, mask = left_padded(131, seed=300 + case, batch=3, seq=4, pads=[0, 2, 1])
        kwargs = dict(max_new_tokens=16, num_beams=3, eos_token_id=list(range(4, 70)), pad_token_id=PAD,
                      length_penalty=length_penalty, early_stopping=early_stopping)
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected), case


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), r"num_beams must be an integer in \[1, 2\*\*31\), got 0"),
    (dict(num_beams=2, seed=-1), r"seed must be an integer in \[0, 2\*\*63\), got -1"),
    (dict(num_beams=2, length_penalty="1"), "length_penalty must be a number, got '1'"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never', got 'sometimes'"),
    # 1 == True, but transformers' beam search (and ttl's) tests `is True`: 1 would silently stop as False does
    (dict(num_beams=2, early_stopping=1), "early_stopping must be True, False or 'never', got 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be at most num_beams \(2\)"),
    (dict(num_beams=2, stop_strings="ab", tokenizer=CharTokenizer()),
     r"beam search \(num_beams > 1\) takes no streamer, stop strings or stopping_criteria"),
    (dict(num_beams=2, length_penalty=2000.0),
     r"length_penalty 2000.0 is too large: \(new tokens\) \*\* length_penalty overflows a float at 2 new tokens"),
    (dict(num_beams=2, length_penalty=1100), r"length_penalty 1100 is too large"),
    (dict(num_beams=2, eos_token_id=list(range(131))),
     r"beam search keeps \(1 \+ 131 EOS ids\) \* 2 beams = 264 candidates, more than the 262 there are"),
    (dict(num_beams=2, stop_strings=[]), None),  # no stop strings: accepted
])
def test_beam_settings_are_checked(models, kwargs, message):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    if message is None:
        assert ttl_core.generate(ours, ids, mask, max_new_tokens=2, **kwargs).shape[0] == 3
        return
    assert_refused(ours, message, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("rules", [
    dict(suppress_tokens=list(range(131))),  # no token left: log-softmax of all -inf
    # remove_invalid_values makes the blocked EOS score float32's lowest, which the decay takes to +inf
    dict(min_new_tokens=3, remove_invalid_values=True, exponential_decay_length_penalty=(0, 1e10)),
])
def test_beams_from_nan_scores_are_refused_as_greedy_decoding_refuses_them(models, rules):
    """renormalize_logits log-softmaxes a row with no token or a +inf score to NaN; transformers' beam search ranks
    its NaN candidates first, as its greedy argmax picks one, where ttl refuses both."""
    _, ours = models
    kwargs = dict(max_new_tokens=3, eos_token_id=[5], pad_token_id=PAD, renormalize_logits=True, **rules)
    assert_refused(ours, "greedy decoding met scores with no distribution", **kwargs)
    assert_refused(ours, r"beam search met NaN scores at new token \d: renormalize_logits", num_beams=2, **kwargs)


@pytest.mark.gpu
def test_cuda_beam_search_matches_transformers_fp32(tmp_path):
    """On CUDA the cache rows follow their beams through index_select copies (flash-attn's layout too, in bf16)."""
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=24, num_beams=4, num_return_sequences=2, eos_token_id=[5, 6, 7], pad_token_id=PAD,
                  repetition_penalty=1.2)
    assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), hf.generate(ids, attention_mask=mask, **kwargs))
    kwargs.update(do_sample=True, top_k=0, top_p=0.9)  # beam sampling draws from the CUDA generator as transformers
    torch.manual_seed(0)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ttl_core.generate(ours, ids, mask, seed=0, **kwargs), expected)
    bf16 = ttl_core.load_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert ttl_core.generate(bf16, ids, mask, **kwargs).shape[0] == 6
