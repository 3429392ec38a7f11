"""ttl_core.sampling's logits processors against transformers' LogitsProcessor classes on random logits."""

import pytest
import torch
import transformers.generation.logits_process as hf_lp

import ttl_core
from generation_helpers import PAD, cuda_batch, cuda_models, hf_generation_model, left_padded, saved_models
from ttl_core.errors import GenerationError
from ttl_core.kv_cache import KVDecoder
from ttl_core.sampling import (apply_epsilon_cutoff, apply_eta_cutoff, apply_min_p, apply_top_h, apply_top_k,
                               apply_top_p, apply_typical_p, process_logits, sample)
from ttl_core.token_rules import apply_repetition_penalty


def random_logits(seed: int = 0, batch: int = 6, vocab: int = 1000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])[:batch, None]
    return torch.randn(batch, vocab, generator=gen) * scale


def assert_same_scores(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_matches_transformers(k):
    scores = random_logits()
    scores[0, :10] = scores[0, 10]  # ties at the boundary
    assert_same_scores(apply_top_k(scores, k), hf_lp.TopKLogitsWarper(k)(None, scores.clone()))


@pytest.mark.parametrize("p", [1e-9, 0.01, 0.2, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    scores = random_logits(1)
    got = apply_top_p(scores, p)
    assert_same_scores(got, hf_lp.TopPLogitsWarper(p)(None, scores.clone()))
    assert torch.isfinite(got).any(dim=-1).all()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(p):
    scores = random_logits(2)
    assert_same_scores(apply_min_p(scores, p), hf_lp.MinPLogitsWarper(p)(None, scores.clone()))


@pytest.mark.parametrize("mass", [1e-9, 0.2, 0.5, 0.95, 0.999999])
def test_typical_p_matches_transformers(mass):
    scores = random_logits(8)
    scores[1, :20] = scores[1, 20]  # ties in the distance to the entropy
    assert_same_scores(apply_typical_p(scores, mass), hf_lp.TypicalLogitsWarper(mass)(None, scores.clone()))


@pytest.mark.parametrize("top_h", [1e-3, 0.2, 0.6, 1.0])
@pytest.mark.parametrize("vocab", [50, 1000])  # fewer and more tokens than the 100 it ranks
def test_top_h_matches_transformers(top_h, vocab):
    scores = random_logits(10, vocab=vocab)
    scores[3, :vocab // 2] = float("-inf")  # tokens an earlier processor filtered
    assert_same_scores(apply_top_h(scores, top_h), hf_lp.TopHLogitsWarper(top_h)(None, scores.clone()))


@pytest.mark.parametrize("cutoff", [1e-6, 3e-4, 0.02, 0.3, 0.999])
def test_epsilon_and_eta_cutoffs_match_transformers(cutoff):
    scores = random_logits(9)
    scores[2, 5] = float("-inf")  # a token an earlier processor filtered
    assert_same_scores(apply_epsilon_cutoff(scores, cutoff), hf_lp.EpsilonLogitsWarper(cutoff)(None, scores.clone()))
    assert_same_scores(apply_eta_cutoff(scores, cutoff), hf_lp.EtaLogitsWarper(cutoff)(None, scores.clone()))


@pytest.mark.parametrize("keep", [2, 4, 1000])
def test_warpers_keep_min_tokens_to_keep_as_in_transformers(keep):
    """Beam sampling's warpers keep at least `keep` tokens (one more than there are EOS ids), at thresholds that
    would keep fewer; the top-k, top-p and typical-p rows have ties at the boundary."""
    scores = random_logits(11)
    scores[0, :10] = scores[0, 10]
    cases = [(apply_top_k, hf_lp.TopKLogitsWarper, 1), (apply_top_p, hf_lp.TopPLogitsWarper, 0.01),
             (apply_min_p, hf_lp.MinPLogitsWarper, 0.9), (apply_typical_p, hf_lp.TypicalLogitsWarper, 0.01),
             (apply_epsilon_cutoff, hf_lp.EpsilonLogitsWarper, 0.3), (apply_eta_cutoff, hf_lp.EtaLogitsWarper, 0.3)]
    for ours, theirs, threshold in cases:
        got = ours(scores, threshold, keep)
        assert_same_scores(got, theirs(threshold, min_tokens_to_keep=keep)(None, scores.clone()))
        assert (torch.isfinite(got).sum(-1) >= keep).all()
        assert (torch.isfinite(ours(scores, threshold)).sum(-1) < keep).any()  # the threshold alone keeps fewer


def test_renormalize_logits_ends_the_chain_with_transformers_log_softmax():
    scores = random_logits(12)
    scores[1, :7] = float("-inf")
    ref = hf_lp.LogitNormalization()(None, hf_lp.TopKLogitsWarper(30)(None, scores.clone()))
    assert_same_scores(process_logits(scores, do_sample=True, top_k=30, renormalize_logits=True), ref)
    assert_same_scores(process_logits(scores, do_sample=False, top_k=30, renormalize_logits=True),
                       hf_lp.LogitNormalization()(None, scores.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.2, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    scores = random_logits(3, batch=3, vocab=50)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (3, 30), generator=gen)
    pads = torch.tensor([0, 4, 11])
    seen = torch.zeros(3, 51, dtype=torch.bool)
    seen.scatter_(1, ids.masked_fill(torch.arange(30) < pads[:, None], 50), True)
    # row by row: transformers 5.17 takes one prompt_ignore_length for the whole batch (5.25 also one a row)
    ref = torch.cat([hf_lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=int(pad))(
        ids[row:row + 1], scores[row:row + 1].clone()) for row, pad in enumerate(pads)])
    assert_same_scores(apply_repetition_penalty(scores, seen[:, :50], penalty), ref)


def test_processor_chain_matches_transformers_order():
    scores = random_logits(5, vocab=200)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 200, (6, 40), generator=gen)
    seen = torch.zeros(6, 200, dtype=torch.bool).scatter_(1, ids, True)
    chain = hf_lp.LogitsProcessorList([
        hf_lp.RepetitionPenaltyLogitsProcessor(1.2), hf_lp.TemperatureLogitsWarper(0.7), hf_lp.TopHLogitsWarper(0.9),
        hf_lp.TopKLogitsWarper(40), hf_lp.TopPLogitsWarper(0.8), hf_lp.MinPLogitsWarper(0.05),
        hf_lp.TypicalLogitsWarper(0.9), hf_lp.EpsilonLogitsWarper(0.01), hf_lp.EtaLogitsWarper(0.005),
    ])
    penalized = apply_repetition_penalty(scores, seen, 1.2)
    got = process_logits(penalized, do_sample=True, temperature=0.7, top_h=0.9, top_k=40, top_p=0.8, min_p=0.05,
                         typical_p=0.9, epsilon_cutoff=0.01, eta_cutoff=0.005)
    assert_same_scores(got, chain(ids, scores.clone()))
    greedy = process_logits(penalized, do_sample=False, temperature=0.7, top_k=40)
    assert_same_scores(greedy, chain[0](ids, scores.clone()))


def test_sample_follows_the_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]]).expand(200_000, 6)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(scores, gen), minlength=6).double() / scores.shape[0]
    probs = scores[0].softmax(-1).double()
    assert counts[4] == 0
    assert (counts - probs).abs().max() < 4e-3  # about 4 standard errors at 200k draws


def test_decoding_defaults_come_from_the_checkpoint_as_in_transformers(tmp_path):
    """Settings a call leaves out come from the checkpoint's generation_config.json (a published checkpoint's
    repetition penalty, length, sampling settings), as transformers' generate() takes them; an id of -1
    there (old conversions' "none") is no id; a padding id inside a prompt names the mask it was inferred to."""
    hf = hf_generation_model(seed=3)
    hf.generation_config.repetition_penalty, hf.generation_config.max_new_tokens = 3.0, 12
    hf.generation_config.pad_token_id = PAD
    hf.save_pretrained(tmp_path / "m")
    ours = ttl_core.load_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    expected = hf.generate(ids, do_sample=False, eos_token_id=[])
    assert expected.shape[1] == 5 + 12 and torch.equal(ttl_core.generate(ours, ids, eos_token_id=[]), expected)
    assert ttl_core.generate(ours, ids, eos_token_id=[], max_new_tokens=3).shape[1] == 8  # the call wins
    # sampling settings too: top_k 1 leaves one token to sample, the greedy one
    ours.generation_config = {**ours.generation_config, "do_sample": True, "top_k": 1}
    assert torch.equal(ttl_core.generate(ours, ids, eos_token_id=[], seed=0), expected)
    ours.generation_config = {"eos_token_id": -1, "pad_token_id": -1}
    assert ttl_core.generate(ours, ids, max_new_tokens=4).shape == (1, 9)
    with pytest.raises(GenerationError, match=r"the attention mask inferred from the padding id 7 in input_ids "
                                              r"\(pass one\) must be left-padded"):
        ttl_core.generate(ours, ids, pad_token_id=7, eos_token_id=2, max_new_tokens=4)


def test_a_zero_exponential_draw_never_picks_a_filtered_token(monkeypatch):
    """float32 Exp(1) draws can be exactly 0: a filtered token's probability 0 over it is NaN, which argmax picks,
    so `sample` clamps the draws above 0 (the kept tokens' odds do not change)."""
    scores = random_logits(7, batch=4, vocab=50)
    scores[:, 0] = float("-inf")  # a filtered token, whose draw comes out 0
    expected = sample(scores, torch.Generator().manual_seed(0))
    draw = torch.Tensor.exponential_
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda t, generator=None: draw(t, generator=generator)
                        .index_fill_(-1, torch.tensor([0]), 0.0))
    assert torch.equal(sample(scores, torch.Generator().manual_seed(0)), expected)


def test_a_bf16_model_samples_from_float32_scores_as_transformers_does(tmp_path):
    """generate() upcasts a bf16 model's logits to float32 before the processors and the sampler, as transformers'
    generate() does: in bf16 the scores round, and some of these 600 draws would pick other tokens."""
    hf_generation_model(seed=2).save_pretrained(tmp_path)
    model = ttl_core.load_pretrained(tmp_path, dtype=torch.bfloat16)
    prompts, prompt_mask = left_padded(model.config.vocab_size)
    draws = 200  # sequences a prompt, each one draw
    ids, mask = prompts.repeat_interleave(draws, 0), prompt_mask.repeat_interleave(draws, 0)
    with torch.no_grad():
        logits = KVDecoder(model, mask, max_new_tokens=1).prefill(ids)  # those generate() draws its token from
    assert logits.dtype == torch.bfloat16
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    seen[:, PAD] = False  # only the left padding holds it, which is no part of the prompt
    got = ttl_core.generate(model, prompts, prompt_mask, max_new_tokens=1, do_sample=True, seed=0, eos_token_id=[],
                            num_return_sequences=draws, temperature=0.7, top_p=0.9, repetition_penalty=1.3)
    expected = sample(process_logits(apply_repetition_penalty(logits.float(), seen, 1.3), True, temperature=0.7,
                                     top_p=0.9), torch.Generator().manual_seed(0))
    assert torch.equal(got[:, -1], expected), f"{int((got[:, -1] != expected).sum())} draws differ"


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("sampling"))


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
                                      dict(temperature=1.5, top_k=0),
                                      dict(top_k=0, typical_p=0.8, epsilon_cutoff=3e-3, eta_cutoff=1e-3),
                                      dict(top_k=0, top_h=0.5)])
def test_seed_s_samples_the_tokens_transformers_samples_after_manual_seed_s(hf_and_ours, settings):
    """torch.multinomial of one sample is itself an exponential race, over the same draws, so `seed=s` samples
    transformers' tokens after torch.manual_seed(s); rows that met EOS keep drawing, in both."""
    hf, ours = hf_and_ours
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=24, do_sample=True, eos_token_id=[5, 6, 7], pad_token_id=PAD, num_return_sequences=2,
                  **settings)
    finished_early = 0
    for seed in range(5):
        torch.manual_seed(seed)
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(ttl_core.generate(ours, ids, mask, seed=seed, **kwargs), expected), seed
        finished_early += int((expected[:, -1] == PAD).sum())
    assert finished_early > 0


def test_without_a_seed_sampling_draws_from_torchs_global_rng_as_transformers_does(hf_and_ours):
    """After torch.manual_seed(s), calls without `seed` sample transformers' tokens, and leave torch's global RNG
    where transformers leaves it, so a second call samples transformers' second answer; also right after a
    seeded call of the same shape (whose kept buffers draw from a generator of its own)."""
    hf, ours = hf_and_ours
    ids, mask = left_padded(ours.config.vocab_size)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=20, eos_token_id=[], pad_token_id=PAD)
    ttl_core.generate(ours, ids, mask, seed=5, **kwargs)
    torch.manual_seed(11)
    expected = [hf.generate(ids, attention_mask=mask, **kwargs) for _ in range(2)]
    rng_after = torch.get_rng_state()
    torch.manual_seed(11)
    got = [ttl_core.generate(ours, ids, mask, **kwargs) for _ in range(2)]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], got[1])
    assert torch.equal(torch.get_rng_state(), rng_after)


@pytest.mark.gpu
def test_cuda_graph_sampling_draws_transformers_tokens(tmp_path):
    """On CUDA too, where the decode step is a CUDA graph replaying the generator's draws: transformers' tokens
    after torch.manual_seed(s), with `seed=s` and without a seed."""
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=48, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1,
                  eos_token_id=[], pad_token_id=PAD)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(ttl_core.generate(ours, ids, mask, seed=seed, **kwargs), expected), seed
        torch.manual_seed(seed)
        assert torch.equal(ttl_core.generate(ours, ids, mask, **kwargs), expected), seed
