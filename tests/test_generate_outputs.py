"""generate(return_dict_in_generate=True): the scores, logits, beam scores and beam indices of transformers'
GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput, against transformers' generate() on random models.

ttl's and transformers' fp32 logits differ by float rounding (a few 1e-6 here), so the scores are compared within
1e-5 with the same filtered (-inf) tokens; that they are exactly the processed logits is checked against
transformers' processors applied to ttl's own logits."""

import pytest
import torch
import transformers.generation.logits_process as hf_lp
from generation_helpers import PAD, cuda_batch, cuda_models, left_padded, saved_models

import ttl_core
from ttl_core.errors import GenerationError

OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("outputs"))


def assert_same_steps(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)) and not ours.isnan().any()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def generate_both(models, seed: int = 0, **kwargs):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    torch.manual_seed(seed)
    expected = hf.generate(ids, attention_mask=mask, **OUTPUTS, **kwargs)
    torch.manual_seed(seed)
    return ttl_core.generate(ours, ids, mask, **OUTPUTS, **kwargs), expected


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.7, num_return_sequences=2),
    dict(do_sample=True, top_k=0, min_p=0.1, no_repeat_ngram_size=2, renormalize_logits=True),
])
def test_scores_and_logits_of_each_step_match_transformers(models, kwargs):
    """One (rows, vocab) tensor a step, as many as new columns, rows that finished early included (EOS 5 and 6
    end some rows before others here)."""
    got, expected = generate_both(models, max_new_tokens=14, eos_token_id=[5, 6], pad_token_id=PAD, **kwargs)
    assert isinstance(got, ttl_core.GenerateOutput) and torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == got.sequences.shape[1] - 9
    assert_same_steps(got.scores, expected.scores)
    assert_same_steps(got.logits, expected.logits)
    assert got.sequences_scores is None and got.beam_indices is None


def test_scores_are_the_processed_logits_exactly(models):
    """Each step's scores are transformers' repetition penalty and temperature... applied to ttl's own logits of
    that step, bit for bit: what was argmaxed is what is returned."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[], repetition_penalty=1.4, **OUTPUTS)
    for step, (scores, logits) in enumerate(zip(got.scores, got.logits)):
        rows = got.sequences[:, :9 + step]
        penalized = torch.cat([hf_lp.RepetitionPenaltyLogitsProcessor(1.4, prompt_ignore_length=pad)(
            rows[row:row + 1], logits[row:row + 1].clone()) for row, pad in enumerate((0, 3, 5))])
        assert torch.equal(scores, penalized)
        assert torch.equal(scores.argmax(-1), got.sequences[:, 9 + step])


@pytest.mark.parametrize("do_sample", [False, True])
def test_beam_outputs_match_transformers(models, do_sample):
    """Beam search's per-step log-probabilities of every beam, logits, the returned beams' scores (length-penalized)
    and the beam row each of their tokens came from (int32, -1 past a beam's end)."""
    # the warpers, and the rules that renormalize_logits renormalizes after, change what each step's scores hold
    sampling = dict(do_sample=True, top_k=5, temperature=0.7) if do_sample else dict(
        repetition_penalty=1.3, renormalize_logits=True)
    got, expected = generate_both(models, seed=3, max_new_tokens=10, num_beams=3, num_return_sequences=2,
                                  eos_token_id=list(range(4, 24)), pad_token_id=PAD, length_penalty=0.5, **sampling)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.beam_indices.dtype == torch.int32 and torch.equal(got.beam_indices, expected.beam_indices)
    assert (got.beam_indices == -1).any()  # a beam that ended before the longest one
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-5)
    assert_same_steps(got.scores, expected.scores)
    assert_same_steps(got.logits, expected.logits)


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False, repetition_penalty=1.3, eos_token_id=[5, 6]),
    dict(do_sample=True, top_k=20, num_return_sequences=2, seed=1, eos_token_id=[5, 6]),
    dict(num_beams=3, num_return_sequences=2, eos_token_id=list(range(4, 24)), length_penalty=0.5),
    dict(num_beams=3, do_sample=True, top_k=0, seed=2, eos_token_id=list(range(4, 24))),
])
def test_transition_scores_are_transformers_compute_transition_scores(models, kwargs):
    """Bit for bit what transformers' `compute_transition_scores` makes of the same output, normalized or not."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=10, pad_token_id=PAD, return_dict_in_generate=True,
                            output_scores=True, **kwargs)
    for normalize in (False, True):
        expected = hf.compute_transition_scores(got.sequences, got.scores, got.beam_indices, normalize)
        assert torch.equal(got.transition_scores(normalize), expected)


def test_normalized_transition_scores_are_the_log_probabilities_of_the_new_tokens(models):
    """Greedy, without processors: each new token's log-probability under a full forward pass of the sequence."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=1, pads=(0,))
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True,
                            output_scores=True)
    with torch.no_grad():
        log_probs = ours(got.sequences).logits[0, 8:-1].float().log_softmax(-1)
    expected = log_probs.gather(1, got.sequences[0, 9:, None])[:, 0]
    torch.testing.assert_close(got.transition_scores(normalize_logits=True)[0], expected, rtol=0, atol=1e-5)
    with pytest.raises(GenerationError, match="^transition scores need each step's scores: generate with "
                                              "output_scores=True$"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=2, return_dict_in_generate=True).transition_scores()


def test_outputs_read_like_transformers_outputs(models):
    """By field name or by position among the fields that are set, as code written for transformers reads them."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    got, expected = ttl_core.generate(ours, ids, mask, **kwargs), hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got["sequences"], expected["sequences"]) and torch.equal(got[0], expected[0])
    assert len(got[1]) == len(expected[1]) == 3 and got[1] is got.logits  # no scores: the logits come second
    for output in (got, expected):  # a field not set is no key
        with pytest.raises(KeyError):
            output["scores"]


def test_only_what_is_asked_for_is_kept(models):
    """Without output_scores or output_logits the output holds the sequences (and, with beams, the beam indices, as
    transformers'); output flags without return_dict_in_generate change nothing."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    plain = ttl_core.generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[])
    bare = ttl_core.generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[], return_dict_in_generate=True)
    assert torch.equal(bare.sequences, plain) and bare.scores is None and bare.logits is None
    logits_only = ttl_core.generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[], return_dict_in_generate=True,
                                    output_logits=True)
    assert logits_only.scores is None and len(logits_only.logits) == 5
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[], output_scores=True),
                       plain)
    beams = ttl_core.generate(ours, ids, mask, max_new_tokens=5, eos_token_id=[], num_beams=2,
                              return_dict_in_generate=True)
    assert beams.scores is None and beams.sequences_scores is None and beams.beam_indices.shape == (3, 5)


def test_a_second_call_leaves_the_first_calls_scores_alone(models):
    """The decoding buffers are reused by the next call of the same shape: the returned steps are copies."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    first = ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[], **OUTPUTS)
    kept = [step.clone() for step in first.scores]
    ttl_core.generate(ours, ids.flip(0), mask.flip(0), max_new_tokens=4, eos_token_id=[], **OUTPUTS)
    assert all(torch.equal(a, b) for a, b in zip(first.scores, kept))


def test_output_flags_come_from_the_checkpoint_as_in_transformers(models, monkeypatch):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    monkeypatch.setattr(ours, "generation_config", {"return_dict_in_generate": True, "output_scores": True})
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[])
    assert len(got.scores) == 4 and got.logits is None
    assert isinstance(ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[],
                                        return_dict_in_generate=False), torch.Tensor)  # the call wins


@pytest.mark.parametrize("name", ["return_dict_in_generate", "output_scores", "output_logits"])
def test_output_flags_must_be_booleans(models, name):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    with pytest.raises(GenerationError, match=f"^{name} must be True or False, got 'yes'$"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=2, **{name: "yes"})


@pytest.mark.gpu
def test_cuda_graph_keeps_the_scores_eager_decoding_keeps(tmp_path):
    """The graphed step copies each step's scores and logits into its buffers as the eager step does."""
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=40, do_sample=True, top_k=30, seed=1, eos_token_id=[5, 6], **OUTPUTS)
    graphed = ttl_core.generate(ours, ids, mask, **kwargs)
    eager = ttl_core.generate(ours, ids, mask, cuda_graph=False, **kwargs)
    assert torch.equal(graphed.sequences, eager.sequences) and len(graphed.scores) == len(eager.scores)
    assert all(torch.equal(a, b) for a, b in zip(graphed.scores + graphed.logits, eager.scores + eager.logits))
    torch.manual_seed(1)
    expected = hf.generate(ids, attention_mask=mask, **{k: v for k, v in kwargs.items() if k != "seed"})
    assert torch.equal(graphed.sequences, expected.sequences)
    assert_same_steps(tuple(s.cpu() for s in graphed.scores), tuple(s.cpu() for s in expected.scores))
