"""Watermarking (`generate(watermarking_config=...)`) token for token against transformers' generate(), and what it
is for: transformers' WatermarkDetector finds the watermark in ttl's text and not in unmarked text."""

import pytest
import torch
from generation_helpers import PAD, assert_refused, cuda_batch, cuda_models, left_padded, saved_models
from transformers import WatermarkDetector, WatermarkingConfig

import ttl_core
from ttl_core.errors import GenerationError
from ttl_core.generate_output import GenerationSettings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("watermark"))


@pytest.mark.parametrize("scheme, width", [("lefthash", 1), ("lefthash", 3), ("selfhash", 1), ("selfhash", 3)])
@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=10, temperature=0.7, num_return_sequences=2, renormalize_logits=True),
    dict(num_beams=2, do_sample=True, top_k=0),
])
def test_watermarked_tokens_match_transformers(models, scheme, width, kwargs):
    """Greedy, sampled (after the warpers, before the log-softmax of renormalize_logits, as there) and beam
    sampled; selfhash with a context of 3 tokens reaches into the left padding, as transformers' rows do."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    config = WatermarkingConfig(seeding_scheme=scheme, context_width=width, bias=4.0)
    common = dict(max_new_tokens=10, eos_token_id=[5, 6], pad_token_id=PAD, **kwargs)
    torch.manual_seed(3)
    expected = hf.generate(ids, attention_mask=mask, watermarking_config=config, **common)
    seed = 3 if kwargs["do_sample"] else None
    got = ttl_core.generate(ours, ids, mask, watermarking_config=config.to_dict(), seed=seed, **common)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ttl_core.generate(ours, ids, mask, seed=seed, **common))  # the watermark had an effect


def test_transformers_detector_finds_the_watermark_in_ttl_text(models):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, pads=(0, 0, 0))
    config = WatermarkingConfig(bias=4.0)
    kwargs = dict(max_new_tokens=60, do_sample=True, top_k=0, eos_token_id=[], seed=1)
    detector = WatermarkDetector(hf.config, "cpu", config)
    marked = detector(ttl_core.generate(ours, ids, mask, watermarking_config=config, **kwargs)[:, 9:],
                      return_dict=True)
    plain = detector(ttl_core.generate(ours, ids, mask, **kwargs)[:, 9:], return_dict=True)
    assert marked.prediction.all() and (marked.z_score > 8).all()
    assert not plain.prediction.any()


def test_a_checkpoint_watermarking_config_applies(models, monkeypatch):
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    monkeypatch.setattr(ours, "generation_config", {"watermarking_config": {"bias": 3.0, "seeding_scheme": "selfhash"}})
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], do_sample=False,
                           watermarking_config=WatermarkingConfig(bias=3.0, seeding_scheme="selfhash"))
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[]), expected)


@pytest.mark.parametrize("config, message", [
    ({"seeding_scheme": "hash"}, "seeding_scheme must be 'lefthash' or 'selfhash', got 'hash'"),
    ({"greenlist_ratio": 1.0}, r"greenlist_ratio must be in \(0, 1\), got 1.0"),
    ({"context_width": 0}, "context_width must be an integer >= 1, got 0"),
    ({"hashing_key": 1.5}, r"hashing_key must be an integer in \[-2\*\*63, 2\*\*64\), got 1.5"),
    ({"hashing_key": 2**64}, r"hashing_key must be an integer in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"),
    ({"hashing_key": -2**63 - 1, "seeding_scheme": "selfhash"}, "hashing_key must be an integer in"),
    ({"bias": "2"}, "bias must be a number other than NaN, got '2'"),
    ({"bias": float("nan")}, "bias must be a number other than NaN, got nan"),
    ({"gamma": 0.5}, r"watermarking_config has unknown settings \['gamma'\]"),
    ({"ngram_len": 5, "keys": [1, 2]}, r"SynthID text watermarking \(a watermarking_config with ngram_len\) is not "
                                       "implemented"),
    ("lefthash", "watermarking_config must be a dict or a transformers WatermarkingConfig, got a str"),
])
def test_bad_watermarking_configs_are_one_line_errors(models, config, message):
    assert_refused(models[1], message, max_new_tokens=2, watermarking_config=config)


def test_a_bad_watermarking_config_names_where_it_came_from(models, monkeypatch):
    """SynthID (not implemented) in a checkpoint's generation_config.json, or in a generation_config passed."""
    _, ours = models
    synthid = {"ngram_len": 5, "keys": [1, 2]}
    assert_refused(ours, "^generation_config: SynthID", max_new_tokens=2,
                   generation_config={"watermarking_config": synthid})
    monkeypatch.setattr(ours, "generation_config", GenerationSettings({"watermarking_config": synthid}))
    assert_refused(ours, "^generation_config.json: SynthID", max_new_tokens=2)
    monkeypatch.setattr(ours, "generation_config", {"watermarking_config": synthid})  # a program's
    assert_refused(ours, "^model.generation_config: SynthID", max_new_tokens=2)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True, top_k=0), dict(suppress_tokens=list(range(4, 60)))])
def test_an_infinite_bias_is_named_where_it_leaves_no_distribution(models, kwargs):
    """+inf on green tokens leaves sampling no distribution, and on a green token scored -inf (suppressed) is NaN,
    which greedy decoding cannot pick from either: the error names the bias, not the model's logits."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    with pytest.raises(GenerationError, match="or watermarking_config's bias inf took them to inf or NaN"):
        ttl_core.generate(ours, ids, mask, max_new_tokens=3, seed=0, watermarking_config={"bias": float("inf")},
                          **kwargs)


@pytest.mark.gpu
def test_cuda_watermark_matches_transformers(tmp_path):
    """On CUDA the green lists come from CUDA generators, as transformers draws them; the steps run eagerly."""
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=24, eos_token_id=[5, 6], pad_token_id=PAD, do_sample=True, top_k=0,
                  watermarking_config=WatermarkingConfig(seeding_scheme="selfhash", bias=3.0))
    torch.manual_seed(0)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ttl_core.generate(ours, ids, mask, seed=0, **kwargs), expected)


@pytest.mark.parametrize("scheme, width", [("lefthash", 1), ("selfhash", 3)])
def test_a_prompt_just_as_long_as_the_context_is_marked_from_its_first_new_token(models, scheme, width):
    """transformers seeds from the row once it holds `context_width` tokens: a prompt of just that many is marked
    from the first new token on."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, seed=7, batch=4, seq=width, pads=(0, 0, 0, 0))
    config = WatermarkingConfig(seeding_scheme=scheme, context_width=width, bias=4.0)
    common = dict(max_new_tokens=2, eos_token_id=[], pad_token_id=PAD, do_sample=False)
    expected = hf.generate(ids, attention_mask=mask, watermarking_config=config, **common)
    assert torch.equal(ttl_core.generate(ours, ids, mask, watermarking_config=config.to_dict(), **common), expected)


def test_a_hashing_key_whose_seeds_pass_two_to_the_63_marks_as_in_transformers(models):
    """Seeds reduced modulo 2**64 - 1 as transformers reduces them, which only a key this large tells apart."""
    hf, ours = models
    ids, mask = left_padded(ours.config.vocab_size, seed=11, batch=3, seq=5, pads=(0, 1, 2))
    config = WatermarkingConfig(hashing_key=2**62 + 977, bias=4.0)
    common = dict(max_new_tokens=4, eos_token_id=[], pad_token_id=PAD, do_sample=False)
    expected = hf.generate(ids, attention_mask=mask, watermarking_config=config, **common)
    assert torch.equal(ttl_core.generate(ours, ids, mask, watermarking_config=config.to_dict(), **common), expected)
