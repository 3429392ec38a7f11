"""Assisted decoding (`generate(assistant_model=draft)`) against transformers' assisted generate with the same draft
model, token for token: greedy (also plain greedy's tokens), speculative sampling from the same RNG state, the
drafting settings, the draft cache's rollback, and what it refuses."""

import copy

import pytest
import torch

import ttl_core
from generation_helpers import (PAD, RecordingStreamer, chat_checkpoint, cuda_models, hf_generation_model,
                                tiny_model)
from helpers import load_script
from ttl_core import assisted
from ttl_core.errors import GenerationError
from ttl_core.kv_cache import KVDecoder
from ttl_core.prompt_lookup import speculative_sampling

COMMON = dict(eos_token_id=2, pad_token_id=PAD)


def perturbed(hf, scale: float = 0.02, seed: int = 5):
    """A copy of `hf` with every weight nudged: it agrees with `hf` on most tokens, not all."""
    draft = copy.deepcopy(hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers target, transformers draft, ttl target, ttl draft), the ttl ones loaded from the saved ones."""
    path = tmp_path_factory.mktemp("assisted")
    hf = hf_generation_model()
    draft = perturbed(hf)
    hf.save_pretrained(path / "target")
    draft.save_pretrained(path / "draft")
    return hf, draft, ttl_core.load_pretrained(path / "target"), ttl_core.load_pretrained(path / "draft")


@pytest.fixture
def steps(monkeypatch) -> list[tuple[int, int]]:
    """(drafted, kept) of each step, as the draft model's side hears of them."""
    record = []
    original = assisted.AssistantDrafts.kept

    def recorded(self, count):
        record.append((self.drafted, count))
        return original(self, count)

    monkeypatch.setattr(assisted.AssistantDrafts, "kept", recorded)
    return record


def theirs(hf, draft, ids, tokens=5, schedule="constant", threshold=0.4, **kwargs):
    """transformers' assisted generate; it reads the drafting settings from the draft model's generation config."""
    draft.generation_config.num_assistant_tokens = tokens
    draft.generation_config.num_assistant_tokens_schedule = schedule
    draft.generation_config.assistant_confidence_threshold = threshold
    return hf.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, **{**COMMON, **kwargs})


def prompt(seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(4, 131, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens, schedule, threshold", [(5, "constant", 0.0), (3, "heuristic", 0.4),
                                                         (20, "constant", 0.4), (2, "heuristic_transient", 0.2)])
def test_greedy_is_transformers_and_plain_greedy(models, steps, tokens, schedule, threshold):
    hf, draft, ours, small = models
    for seed in range(3):
        ids = prompt(seed)
        got = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=30, num_assistant_tokens=tokens,
                                num_assistant_tokens_schedule=schedule, assistant_confidence_threshold=threshold,
                                **COMMON)
        assert torch.equal(got, theirs(hf, draft, ids, tokens, schedule, threshold, max_new_tokens=30,
                                       do_sample=False))
        assert torch.equal(got, ttl_core.generate(ours, ids, max_new_tokens=30, **COMMON))
    assert max(drafted for drafted, _ in steps) <= tokens + (2 * len(steps) if schedule != "constant" else 0)
    assert any(kept > 0 for _, kept in steps) and any(kept < drafted for drafted, kept in steps)


def test_the_schedule_adapts_the_number_of_drafts(models, steps):
    """"heuristic": 2 more after a step that kept every draft, else 1 fewer, never under 1."""
    _, _, ours, small = models
    ttl_core.generate(ours, prompt(1), assistant_model=small, max_new_tokens=40, num_assistant_tokens=3,
                      num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0, **COMMON)
    allowed = 3
    for drafted, kept in steps[:-1]:
        assert drafted == allowed
        allowed = allowed + 2 if kept == drafted else max(1, allowed - 1)
    assert {kept == drafted for drafted, kept in steps[:-1]} == {True, False}


@pytest.mark.parametrize("schedule, threshold", [("heuristic", 0.08), ("constant", 0.15)])
def test_each_step_drafts_as_many_tokens_as_transformers(models, steps, monkeypatch, schedule, threshold):
    """The confidence threshold and the schedule give transformers' number of drafts, step by step."""
    from transformers.generation.candidate_generator import AssistedCandidateGenerator
    hf, draft, ours, small = models
    lengths = []
    original = AssistedCandidateGenerator.get_candidates

    def counted(self, input_ids, **kwargs):
        candidates = original(self, input_ids, **kwargs)
        lengths.append(candidates[0].shape[1] - input_ids.shape[1])
        return candidates

    monkeypatch.setattr(AssistedCandidateGenerator, "get_candidates", counted)
    ids = prompt(1)
    theirs(hf, draft, ids, 4, schedule, threshold, max_new_tokens=40, do_sample=False)
    ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=40, num_assistant_tokens=4,
                      num_assistant_tokens_schedule=schedule, assistant_confidence_threshold=threshold, **COMMON)
    assert [drafted for drafted, _ in steps] == lengths and len(set(lengths)) > 2


SETTINGS = [dict(), dict(temperature=0.7, top_k=20, top_p=0.9), dict(repetition_penalty=1.3, min_new_tokens=5)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_draws_transformers_tokens(models, steps, settings):
    """seed=s samples what transformers' speculative sampling samples after torch.manual_seed(s) (the draft model's
    draws, one uniform draw a draft, one draw after them), and a call without seed moves torch's global RNG as
    transformers does."""
    hf, draft, ours, small = models
    settings = {"top_k": 0, **settings}
    for seed in range(3):
        ids = prompt(seed)
        torch.manual_seed(seed)
        ref = theirs(hf, draft, ids, threshold=0.2, max_new_tokens=25, do_sample=True, **settings)
        after_theirs = torch.rand(3)
        got = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=25, do_sample=True, seed=seed,
                                num_assistant_tokens=5, assistant_confidence_threshold=0.2, **COMMON, **settings)
        assert torch.equal(got, ref), seed
        torch.manual_seed(seed)
        unseeded = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=25, do_sample=True,
                                     num_assistant_tokens=5, assistant_confidence_threshold=0.2, **COMMON, **settings)
        assert torch.equal(unseeded, ref) and torch.equal(torch.rand(3), after_theirs)
    assert any(kept > 0 for _, kept in steps) and any(kept < drafted for drafted, kept in steps)


# transformers' assistant masks a new token equal to pad_token_id out of its attention (see docs/generation.md)
RULES = [dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=5, suppress_tokens=[PAD]),
         dict(sequence_bias={(40,): -float("inf")}, suppress_tokens=[7], forced_eos_token_id=2,
              exponential_decay_length_penalty=(3, 1.2), renormalize_logits=True),
         dict(prefix_allowed_tokens_fn=lambda prompt, row: range(4, 90) if len(row) % 3 else range(40, 131))]


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("settings", RULES)
def test_token_rules_apply_to_drafts_and_verified_positions(models, settings, do_sample):
    """The draft model's scores get the call's processors at each draft's position, as transformers passes them
    to its assistant, and so do the model's at each verified position."""
    hf, draft, ours, small = models
    ids = prompt(1)
    torch.manual_seed(4)
    ref = theirs(hf, draft, ids, tokens=4, threshold=0.1, max_new_tokens=25, do_sample=do_sample, top_k=0, **settings)
    got = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=25, do_sample=do_sample, seed=4,
                            num_assistant_tokens=4, assistant_confidence_threshold=0.1, **COMMON, **settings)
    assert torch.equal(got, ref)


def saved(hf, path):
    hf.save_pretrained(path)
    return ttl_core.load_pretrained(path)


def test_speculative_sampling_keeps_the_model_distribution():
    """Over many draws, with drafts drawn from q, the first token speculative sampling returns is distributed as
    the model's p at that position, and the second (where the first draft was kept) as p at the next one
    (chi-square on six tokens); a token p rules out (-inf) is never kept, though q often drafts it."""
    gen = torch.Generator().manual_seed(0)
    scores, draft_scores = torch.randn(3, 6, generator=gen) * 1.5, torch.randn(2, 6, generator=gen) * 1.5
    scores[0, 1] = scores[1, 4] = float("-inf")
    draft_scores[0, 1] = 2.0  # the draft model likes what the model forbids
    q = draft_scores.softmax(-1)
    runs = 6000
    drafts = torch.stack([torch.multinomial(q[i], runs, replacement=True, generator=gen) for i in range(2)], 1)
    outputs = [speculative_sampling(scores, draft_scores, pair.tolist(), gen)[1] for pair in drafts]
    for position in (0, 1):
        tokens = torch.tensor([out[position] for out in outputs if len(out) > position])
        counts = torch.bincount(tokens, minlength=6).float()
        expected = scores[position].softmax(-1) * len(tokens)
        assert counts[expected == 0].sum() == 0 and len(tokens) > 1000
        live = expected > 0
        assert float(((counts - expected) ** 2 / expected)[live].sum()) < 18.5  # 4 degrees of freedom: p = 0.001
    first = torch.bincount(torch.tensor([out[0] for out in outputs]), minlength=6).float()
    assert float(((first - q[0] * runs) ** 2 / (q[0] * runs)).sum()) > 100  # the drafts' own law is told apart


def test_the_draft_cache_rewinds_to_a_full_forward(models):
    """After rejected drafts are rewound, the draft cache's next logits are a full forward's over the kept row."""
    _, _, _, small = models
    ids = prompt(4)
    decoder = KVDecoder(small, torch.ones_like(ids), max_new_tokens=20, flash=False)
    decoder.prefill(ids)
    row = ids
    gen = torch.Generator().manual_seed(2)
    for fed, forgotten in ((4, 2), (3, 3), (5, 0)):
        tokens = torch.randint(4, 131, (1, fed), generator=gen)
        for i in range(fed):
            decoder.step(tokens[:, i:i + 1])
        decoder.rewind(forgotten)
        row = torch.cat([row, tokens[:, :fed - forgotten]], dim=1)
    token = torch.randint(4, 131, (1, 1), generator=gen)
    torch.testing.assert_close(decoder.step(token), small(torch.cat([row, token], dim=1)).logits[:, -1],
                               atol=1e-5, rtol=1e-5)


def test_eos_in_the_drafts_and_the_length_limit(models):
    """A draft EOS the model keeps ends the row there; drafts never run past max_new_tokens."""
    hf, draft, ours, small = models
    ids = prompt(0)
    free = ttl_core.generate(ours, ids, max_new_tokens=20, eos_token_id=[])
    for eos in (free[0, 14].item(), free[0, 20].item()):
        for max_new_tokens in (1, 2, 13):
            got = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=max_new_tokens,
                                    num_assistant_tokens=4, assistant_confidence_threshold=0, eos_token_id=eos,
                                    pad_token_id=PAD)
            ref = theirs(hf, draft, ids, tokens=4, threshold=0.0, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos)
            assert torch.equal(got, ref)


def test_scores_streamer_and_the_checkpoint_settings(models, steps):
    """One score a new token, and each step's kept tokens streamed as one tensor, as transformers hands them; the
    drafting settings come from the draft model's generation_config.json where the call leaves them out, as
    transformers reads them."""
    hf, draft, ours, small = models
    ids = prompt(2)
    settings = dict(max_new_tokens=15, return_dict_in_generate=True, output_scores=True, output_logits=True)
    theirs_stream, ours_stream = RecordingStreamer(), RecordingStreamer()
    ref = theirs(hf, draft, ids, tokens=3, threshold=0.0, do_sample=False, streamer=theirs_stream, **settings)
    saved_config = small.generation_config
    small.generation_config = {**(saved_config or {}), "num_assistant_tokens": 3, "assistant_confidence_threshold": 0}
    try:
        got = ttl_core.generate(ours, ids, assistant_model=small, streamer=ours_stream, **settings, **COMMON)
    finally:
        small.generation_config = saved_config
    assert torch.equal(got.sequences, ref.sequences) and max(drafted for drafted, _ in steps) == 3
    streamed = ours_stream.as_lists()
    assert streamed == theirs_stream.as_lists() and any(len(call[0]) > 1 for call in streamed[1:-1])
    for name in ("scores", "logits"):
        torch.testing.assert_close(torch.stack(getattr(got, name)), torch.stack(getattr(ref, name)), atol=1e-5,
                                   rtol=1e-5)


def test_a_kept_draft_eos_ends_the_row_where_plain_greedy_ends_it(models):
    """The model as its own draft model keeps every draft: a draft EOS, always a step's last, is kept and the
    token the model adds after it is not."""
    _, _, ours, _ = models
    ids = prompt(1)
    free = ttl_core.generate(ours, ids, max_new_tokens=10, eos_token_id=[])[0, 8:].tolist()
    for eos in free[2:7]:
        kwargs = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
        got = ttl_core.generate(ours, ids, assistant_model=ours, num_assistant_tokens=3,
                                assistant_confidence_threshold=0, **kwargs)
        assert torch.equal(got, ttl_core.generate(ours, ids, **kwargs)), eos


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_assistant_tokens=0), "num_assistant_tokens must be a positive integer, got 0"),
    (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule must be one of constant, heuristic"),
    (dict(assistant_confidence_threshold=1.5), r"assistant_confidence_threshold must be a probability in \[0, 1\]"),
    (dict(num_beams=2), r"assisted decoding \(assistant_model\) does not run with beam search"),
    (dict(do_sample=True, num_return_sequences=2), "num_return_sequences=2"),
    (dict(guidance_scale=1.5), "takes no classifier-free guidance"),
    (dict(watermarking_config={"bias": 2.0}), "or watermarking_config"),
    (dict(prompt_lookup_num_tokens=3), "assistant_model and prompt_lookup_num_tokens are two sources of drafts"),
])
def test_what_it_cannot_run_with_is_refused(models, kwargs, message):
    _, _, ours, small = models
    with pytest.raises(GenerationError, match=message) as info:
        ttl_core.generate(ours, prompt(0), max_new_tokens=4, assistant_model=small, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="decodes one sequence, got 2 prompt rows"):  # as transformers
        ttl_core.generate(ours, prompt(0).repeat(2, 1), max_new_tokens=4, assistant_model=small)


def test_a_draft_model_it_cannot_use_is_refused(models, tmp_path):
    hf, _, ours, _ = models
    other = saved(hf_generation_model(vocab_size=140), tmp_path)
    for model, message in ((other, "assistant_model's vocabulary of 140 tokens is not the model's 131"),
                           (hf, "assistant_model must be a ttl LlamaForCausalLM, got LlamaForCausalLM"),
                           (None, "num_assistant_tokens takes effect only with assistant_model")):
        with pytest.raises(GenerationError, match=message):
            ttl_core.generate(ours, prompt(0), max_new_tokens=4, assistant_model=model, num_assistant_tokens=2)


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_draft_model_with_nan_logits_is_named(models, do_sample):
    _, _, ours, small = models
    broken = copy.deepcopy(small)
    with torch.no_grad():
        broken.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(GenerationError, match="assistant_model's logits hold NaN or inf"):
        ttl_core.generate(ours, prompt(0), max_new_tokens=6, assistant_model=broken, do_sample=do_sample, seed=1,
                          top_k=0, **COMMON)


def test_the_cli_s_assistant_drafts_and_the_greedy_answer_stays_the_model_s(tmp_path, capsys, monkeypatch):
    """--assistant: a draft model (here the model with nudged weights) changes how the answer is found, not what
    it is."""
    path, tok, model = chat_checkpoint(tmp_path / "model")
    kept = []
    original = assisted.AssistantDrafts.kept
    monkeypatch.setattr(assisted.AssistantDrafts, "kept",
                        lambda self, count: kept.append(count) or original(self, count))
    draft = tiny_model(tok.vocab_size)
    with torch.no_grad():
        for (name, p), q in zip(draft.named_parameters(), model.parameters()):
            p.copy_(q + 0.02 * torch.randn_like(q))
    ttl_core.save_pretrained(draft, tmp_path / "draft", tokenizer=tok)
    arguments = ["--model", str(path), "--prompt", "o menino foi", "--greedy", "--max-new-tokens", "16"]
    answers = []
    for extra in ([], ["--assistant", str(tmp_path / "draft")]):
        assert load_script("generate").main(arguments + extra) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers[1] == answers[0] and sum(kept) > 0  # drafts were made and kept


@pytest.mark.gpu
def test_on_cuda_greedy_tokens_are_transformers(tmp_path):
    """Eagerly on the GPU (fp32), where a plain call would run a CUDA graph and flash-attn's cache layout."""
    hf, ours = cuda_models(tmp_path / "target")
    draft = perturbed(hf.cpu()).cuda()
    hf.cuda()
    draft.save_pretrained(tmp_path / "draft")
    small = ttl_core.load_pretrained(tmp_path / "draft", device="cuda")
    for seed in range(3):
        ids = prompt(seed, 24).cuda()
        ref = theirs(hf, draft, ids, tokens=5, threshold=0.2, max_new_tokens=40, do_sample=False)
        got = ttl_core.generate(ours, ids, assistant_model=small, max_new_tokens=40, num_assistant_tokens=5,
                                assistant_confidence_threshold=0.2, **COMMON)
        assert torch.equal(got, ref) and torch.equal(got, ttl_core.generate(ours, ids, max_new_tokens=40, **COMMON))
