"""Prompt-lookup decoding (`generate(prompt_lookup_num_tokens=k)`) against transformers' assisted decoding with its
PromptLookupCandidateGenerator, token for token: greedy, sampled, with processors, EOS and length limits."""

import json

import pytest
import torch

import ttl_core
from generation_helpers import PAD, RecordingStreamer, cuda_models, saved_models
from ttl_core import prompt_lookup
from ttl_core.errors import GenerationError
from ttl_core.kv_cache import KVDecoder

COMMON = dict(eos_token_id=2, pad_token_id=PAD)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("lookup"))


@pytest.fixture
def drafted(monkeypatch) -> list[list[int]]:
    """The drafts each prompt-lookup step proposed, as they are recorded."""
    record = []
    original = prompt_lookup.draft

    def recorded(*args):
        record.append(original(*args))
        return record[-1]

    monkeypatch.setattr(prompt_lookup, "draft", recorded)
    return record


def repeating_prompt(seed: int, vocab: int = 131) -> torch.Tensor:
    """Six random tokens, again, then their first three: n-grams that recur, so steps have drafts."""
    base = torch.randint(4, vocab, (1, 6), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base, base[:, :3]], dim=1)


def theirs(hf, ids, **kwargs):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), **{**COMMON, **kwargs})


def accepted_and_rejected(drafts: list[list[int]], new_tokens: int) -> tuple[int, int]:
    """(drafted tokens kept, drafted tokens thrown away): each step adds one token of the model's own."""
    kept = new_tokens - len(drafts)
    return kept, sum(map(len, drafts)) - kept


@pytest.mark.parametrize("num_tokens, ngram", [(1, None), (3, None), (10, 1), (4, 3)])
def test_greedy_is_transformers_and_plain_greedy(models, drafted, num_tokens, ngram):
    hf, ours = models
    kept = thrown = 0
    for seed in (0, 2, 4):
        ids = repeating_prompt(seed)
        drafted.clear()
        got = ttl_core.generate(ours, ids, max_new_tokens=40, prompt_lookup_num_tokens=num_tokens,
                                max_matching_ngram_size=ngram, **COMMON)
        ref = theirs(hf, ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=num_tokens,
                     max_matching_ngram_size=ngram)
        assert torch.equal(got, ref)
        assert torch.equal(got, ttl_core.generate(ours, ids, max_new_tokens=40, **COMMON))
        assert max(map(len, drafted)) <= num_tokens
        kept, thrown = (a + b for a, b in zip((kept, thrown), accepted_and_rejected(drafted, got.shape[1] - 15)))
    assert kept > 0 and thrown > 0  # drafts were verified both ways


SETTINGS = [dict(), dict(temperature=0.7, top_k=20, top_p=0.9),
            dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=5, top_k=0),
            dict(top_k=30, min_p=0.05, typical_p=0.95, renormalize_logits=True)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_draws_transformers_tokens(models, drafted, settings):
    """seed=s samples what transformers samples after torch.manual_seed(s) (one draw over every verified position
    a step), and a call without seed moves torch's global RNG as transformers does."""
    hf, ours = models
    settings = {"top_k": 0, **settings}  # transformers' default top_k is 50, ttl's 0
    for seed in (0, 1, 2):
        ids = repeating_prompt(seed)
        torch.manual_seed(seed)
        ref = theirs(hf, ids, max_new_tokens=30, do_sample=True, prompt_lookup_num_tokens=4, **settings)
        after_theirs = torch.rand(3)
        got = ttl_core.generate(ours, ids, max_new_tokens=30, do_sample=True, seed=seed, prompt_lookup_num_tokens=4,
                                **COMMON, **settings)
        assert torch.equal(got, ref), seed
        torch.manual_seed(seed)
        unseeded = ttl_core.generate(ours, ids, max_new_tokens=30, do_sample=True, prompt_lookup_num_tokens=4,
                                     **COMMON, **settings)
        assert torch.equal(unseeded, ref) and torch.equal(torch.rand(3), after_theirs)
    assert any(drafted)  # no_repeat_ngram_size 3 forbids every draft longer than one token


RULES = [SETTINGS[2], dict(sequence_bias={(40,): -float("inf")}, suppress_tokens=[7], forced_eos_token_id=2,
                          exponential_decay_length_penalty=(3, 1.2)),
         dict(prefix_allowed_tokens_fn=lambda prompt, row: range(4, 90) if len(row) % 3 else range(40, 131))]


@pytest.mark.parametrize("settings", RULES)
def test_token_rules_apply_to_each_verified_position_greedy(models, settings):
    hf, ours = models
    for seed in (0, 4):
        ids = repeating_prompt(seed)
        ref = theirs(hf, ids, max_new_tokens=25, do_sample=False, prompt_lookup_num_tokens=5, **settings)
        got = ttl_core.generate(ours, ids, max_new_tokens=25, prompt_lookup_num_tokens=5, **COMMON, **settings)
        assert torch.equal(got, ref)


def test_drafts_stop_before_an_eos_id_and_generation_at_one(models, drafted):
    """transformers cuts a draft before its first EOS id (the model must choose it itself), and keeps no token
    after an accepted EOS."""
    hf, ours = models
    ids = repeating_prompt(0)
    free = ttl_core.generate(ours, ids, max_new_tokens=30, prompt_lookup_num_tokens=6, eos_token_id=[])
    in_drafts = {token for draft in drafted for token in draft}
    eos = ids[0, 4].item()
    assert eos in in_drafts
    drafted.clear()
    got = ttl_core.generate(ours, ids, max_new_tokens=30, prompt_lookup_num_tokens=6, eos_token_id=eos,
                            pad_token_id=PAD)
    assert not any(eos in draft for draft in drafted) and any(drafted)
    assert torch.equal(got, hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                                        prompt_lookup_num_tokens=6, eos_token_id=eos, pad_token_id=PAD))
    ended = free[0, 20].item()  # an id the model chooses itself: generation ends there
    got = ttl_core.generate(ours, ids, max_new_tokens=30, prompt_lookup_num_tokens=6, eos_token_id=ended,
                            pad_token_id=PAD)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, prompt_lookup_num_tokens=6,
                      eos_token_id=ended, pad_token_id=PAD)
    assert torch.equal(got, ref) and got.shape[1] < free.shape[1] and got[0, -1] == ended


def test_matches_that_share_a_forbidden_draft_run_the_processors_once(models, monkeypatch):
    """A long repetitive prompt has many earlier matches of its last n-gram, all continued by the token that
    no_repeat_ngram_size forbids: transformers runs its processors once a match (the cost grows with the row),
    ttl once for the lot, with the same outcome."""
    hf, ours = models
    ids = torch.arange(10, 15).repeat(40)[None]
    settings = dict(max_new_tokens=2, prompt_lookup_num_tokens=4, no_repeat_ngram_size=3)
    runs = []
    original = prompt_lookup.processed_scores

    def counted(*args):
        runs.append(args)
        return original(*args)

    monkeypatch.setattr(prompt_lookup, "processed_scores", counted)
    got = ttl_core.generate(ours, ids, **settings, **COMMON)
    assert torch.equal(got, theirs(hf, ids, do_sample=False, **settings))
    assert len(runs) == 3  # one check for all 78 matches, then one verified position a step (no draft fits in the 2nd)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
@pytest.mark.parametrize("do_sample", [False, True])
def test_max_new_tokens_cuts_a_draft_as_in_transformers(models, max_new_tokens, do_sample):
    """Drafts may run past the last new token (their positions are still drawn for when sampling, and checked
    against the processors, which may cut them there); the step keeps only what fits."""
    hf, ours = models
    ids = torch.cat([repeating_prompt(3)] * 2, dim=1)  # long drafts: the prompt repeats in full
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=0, prompt_lookup_num_tokens=10,
                    no_repeat_ngram_size=12, **(dict(top_p=0.9) if do_sample else {}))
    torch.manual_seed(7)
    ref = theirs(hf, ids, **settings)
    after_theirs = torch.rand(2)
    torch.manual_seed(7)
    got = ttl_core.generate(ours, ids, **settings, **COMMON)
    assert torch.equal(got, ref) and torch.equal(torch.rand(2), after_theirs)


def test_the_cache_after_rejected_drafts_gives_a_full_forward_logits(models):
    """verify writes every drafted token; accept keeps some; the slots of the rest are never seen again."""
    _, ours = models
    ids = repeating_prompt(5)
    gen = torch.Generator().manual_seed(1)
    decoder = KVDecoder(ours, torch.ones_like(ids), max_new_tokens=20, flash=False)
    decoder.prefill(ids)
    kept = []
    for fed_count, keep in ((5, 2), (4, 0), (6, 6), (3, 1)):
        fed = torch.randint(4, 131, (1, fed_count), generator=gen)
        logits = decoder.verify(fed)
        full = ours(torch.cat([ids, *kept, fed], dim=1)).logits[:, -fed_count:]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        decoder.accept(keep)
        kept.append(fed[:, :keep])
    row = torch.cat([ids, *kept], dim=1)
    token = torch.randint(4, 131, (1, 1), generator=gen)
    torch.testing.assert_close(decoder.step(token), ours(torch.cat([row, token], dim=1)).logits[:, -1],
                               atol=1e-5, rtol=1e-5)


def test_scores_logits_and_streamer_are_transformers(models):
    """One score and one logits tensor per new token, and the streamer gets each step's accepted tokens as one
    (1, n) tensor, as transformers hands them."""
    hf, ours = models

    ids = repeating_prompt(2)
    settings = dict(max_new_tokens=20, prompt_lookup_num_tokens=4, return_dict_in_generate=True, output_scores=True,
                    output_logits=True, repetition_penalty=1.2)
    theirs_stream, ours_stream = RecordingStreamer(), RecordingStreamer()
    ref = theirs(hf, ids, do_sample=False, streamer=theirs_stream, **settings)
    got = ttl_core.generate(ours, ids, streamer=ours_stream, **COMMON, **settings)
    streamed = ours_stream.as_lists()
    assert torch.equal(got.sequences, ref.sequences) and streamed == theirs_stream.as_lists()
    assert any(len(call[0]) > 1 for call in streamed[1:-1])  # a step streamed several tokens
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(ref, name)) == 20
        torch.testing.assert_close(torch.stack(getattr(got, name)), torch.stack(getattr(ref, name)), atol=1e-5,
                                   rtol=1e-5)


def test_a_generation_config_or_the_checkpoint_turns_it_on(models, drafted, tmp_path):
    hf, ours = models
    ids = repeating_prompt(2)
    ref = theirs(hf, ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3, max_matching_ngram_size=1)
    settings = {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 1}
    assert torch.equal(ttl_core.generate(ours, ids, max_new_tokens=12, generation_config=settings, **COMMON), ref)
    assert drafted and max(map(len, drafted)) == 3
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, **settings}))
    drafted.clear()
    assert torch.equal(ttl_core.generate(ttl_core.load_pretrained(tmp_path), ids, max_new_tokens=12, **COMMON), ref)
    assert drafted


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be a positive integer, got 0"),
    (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=1.5), "max_matching_ngram_size must be a positive"),
    (dict(max_matching_ngram_size=2), "max_matching_ngram_size takes effect only with prompt_lookup_num_tokens"),
    (dict(prompt_lookup_num_tokens=2, num_beams=2), r"does not run with beam search \(num_beams > 1\)"),
    (dict(prompt_lookup_num_tokens=2, do_sample=True, num_return_sequences=2), "num_return_sequences=2"),
    (dict(prompt_lookup_num_tokens=2, guidance_scale=1.5), "takes no classifier-free guidance"),
    (dict(prompt_lookup_num_tokens=2, watermarking_config={"bias": 2.0}), "or watermarking_config"),
])
def test_what_it_cannot_run_with_is_refused(models, kwargs, message):
    _, ours = models
    with pytest.raises(GenerationError, match=message) as info:
        ttl_core.generate(ours, repeating_prompt(0), max_new_tokens=4, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="decodes one sequence, got 2 prompt rows"):  # as transformers
        ttl_core.generate(ours, repeating_prompt(0).repeat(2, 1), max_new_tokens=4, prompt_lookup_num_tokens=2)


@pytest.mark.gpu
def test_on_cuda_greedy_and_sampled_tokens_are_transformers(tmp_path):
    """Eagerly on the GPU (fp32), where a plain call would run a CUDA graph and flash-attn's cache layout."""
    hf, ours = cuda_models(tmp_path)
    ids = repeating_prompt(2).cuda()
    for do_sample in (False, True):
        torch.manual_seed(3)
        ref = theirs(hf, ids, max_new_tokens=24, do_sample=do_sample, top_k=0, prompt_lookup_num_tokens=5)
        got = ttl_core.generate(ours, ids, max_new_tokens=24, do_sample=do_sample, seed=3, prompt_lookup_num_tokens=5,
                                **COMMON)
        assert torch.equal(got, ref)
