"""Classifier-free guidance (`generate(guidance_scale=..., negative_prompt_ids=...)`) token for token against
transformers' generate(): greedy, sampled, beam search and beam sampling, with the default unconditional context
(each prompt's last token) and with left-padded negative prompts."""

import pytest
import torch
from generation_helpers import PAD, assert_refused, cuda_batch, cuda_models, left_padded, saved_models

import ttl_core


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("guidance"))


def negative_prompts(vocab: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(vocab, seed=9, batch=batch, seq=6, pads=(0, 3, 5))


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=True, top_k=0, temperature=0.7, eos_token_id=[5, 6, 7]),
    dict(num_beams=3, num_return_sequences=2, eos_token_id=[5, 6]),
    dict(num_beams=2, do_sample=True, top_k=0),
])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_guidance_matches_transformers(models, kwargs, scale):
    """Guided by each prompt's last token alone (transformers' default), with every kind of decoding; with beams,
    the unconditional rows go on with the tokens of the beams that replace them, as in transformers."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=10, pad_token_id=PAD, **{"eos_token_id": [], **kwargs})
    torch.manual_seed(1)
    expected = hf.generate(ids, attention_mask=mask, guidance_scale=scale, **kwargs)
    seed = 1 if kwargs.get("do_sample") else None
    got = ttl_core.generate(ours, ids, mask, guidance_scale=scale, seed=seed, **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ttl_core.generate(ours, ids, mask, seed=seed, **kwargs))  # guidance had an effect


@pytest.mark.parametrize("do_sample", [False, True])
def test_negative_prompts_match_transformers(models, do_sample):
    """Left-padded negative prompts, one a prompt row, their positions counted from their first token; the
    session's unconditional cache starts over for the next call's negative prompts."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    negative, negative_mask = negative_prompts(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=10, pad_token_id=PAD, eos_token_id=[5], guidance_scale=2.0, do_sample=do_sample,
                  top_k=0)
    for rows in (negative, negative.flip(0)):
        torch.manual_seed(2)
        expected = hf.generate(ids, attention_mask=mask, negative_prompt_ids=rows,
                               negative_prompt_attention_mask=negative_mask, **kwargs)
        got = ttl_core.generate(ours, ids, mask, negative_prompt_ids=rows, negative_prompt_attention_mask=negative_mask,
                                seed=2, **kwargs)
        assert torch.equal(got, expected)


def test_one_negative_prompt_guides_every_returned_sequence(models):
    """A prompt's negative prompt guides each of its num_return_sequences rows, as the same negative prompt repeated
    for each returned row guides them in transformers (which fails when given one a prompt)."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, seed=4, pads=(0, 2, 4))
    negative, negative_mask = negative_prompts(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=0, num_return_sequences=2,
                  guidance_scale=1.5)
    torch.manual_seed(3)
    expected = hf.generate(ids, attention_mask=mask, negative_prompt_ids=negative.repeat_interleave(2, 0),
                           negative_prompt_attention_mask=negative_mask.repeat_interleave(2, 0), **kwargs)
    got = ttl_core.generate(ours, ids, mask, seed=3, negative_prompt_ids=negative,
                            negative_prompt_attention_mask=negative_mask, **kwargs)
    assert torch.equal(got, expected)


def test_guidance_scale_comes_from_the_checkpoint(models, monkeypatch):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    monkeypatch.setattr(ours, "generation_config", {"guidance_scale": 2.5})
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], guidance_scale=2.5)
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[]), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_scale="2"), "guidance_scale must be a finite number, got '2'"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=float("-inf")), "guidance_scale must be a finite number, got -inf"),
    (dict(guidance_scale=1e300, do_sample=True, top_k=0), r"sampling met scores .*, or guidance_scale 1e\+300 did"),
    (dict(negative_prompt_ids=torch.ones(3, 2, dtype=torch.long)),
     r"a negative prompt takes effect only with classifier-free guidance: pass guidance_scale != 1"),
    (dict(guidance_scale=2.0, negative_prompt_attention_mask=torch.ones(3, 2, dtype=torch.long)),
     "negative_prompt_attention_mask needs negative_prompt_ids"),
    (dict(guidance_scale=2.0, negative_prompt_ids=torch.ones(2, 2, dtype=torch.long)),
     "negative_prompt_ids has 2 rows for 3 prompt rows"),
    (dict(guidance_scale=2.0, negative_prompt_ids=torch.full((3, 2), 131)),
     r"negative prompt: input_ids hold ids outside the vocabulary \[0, 131\)"),
    (dict(guidance_scale=2.0, negative_prompt_ids=torch.ones(3, 2, dtype=torch.long),
          negative_prompt_attention_mask=torch.tensor([[1, 0]] * 3)),
     "negative prompt: attention_mask must be left-padded"),
])
def test_bad_guidance_arguments_are_one_line_errors(models, kwargs, message):
    assert_refused(models[1], message, max_new_tokens=2, **kwargs)


@pytest.mark.gpu
def test_cuda_graph_steps_both_caches_as_eager_decoding_does(tmp_path):
    """The graphed step runs the unconditional pass too; tokens equal eager decoding's and transformers'."""
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    negative, negative_mask = (t.cuda() for t in negative_prompts(hf.config.vocab_size))
    kwargs = dict(max_new_tokens=40, eos_token_id=[5, 6], pad_token_id=PAD, guidance_scale=1.8,
                  negative_prompt_ids=negative, negative_prompt_attention_mask=negative_mask)
    graphed = ttl_core.generate(ours, ids, mask, **kwargs)
    assert torch.equal(graphed, ttl_core.generate(ours, ids, mask, cuda_graph=False, **kwargs))
    assert torch.equal(graphed, hf.generate(ids, attention_mask=mask, **kwargs))
