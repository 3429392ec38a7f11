"""ttl_core.generate against transformers' generate() and logits processors on random tiny models (fp32 CPU)."""

import copy
import gc
import importlib
import inspect
import sys
import types
import weakref

import pytest
import torch
from generation_helpers import PAD, cuda_batch, cuda_models, hf_generation_model, hf_greedy, left_padded, saved_models
from hf_reference import hf_causal_lm

import ttl_core
from ttl_core.errors import GenerationError
from ttl_core import decode_session, kv_cache
from ttl_core.kv_cache import KVDecoder
from ttl_core.lora import apply_lora, lora_layers, merge_lora

generate_module = importlib.import_module("ttl_core.generate")  # the package's `generate` is the function


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("gen"))


def tmp_path_hf(tmp_path, name: str, seed: int = 0):
    hf_generation_model(seed=seed).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matches_transformers(models, penalty, batch):
    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size, batch=batch)
    ref = hf_greedy(hf, ids, mask, max_new_tokens=24, repetition_penalty=penalty, eos_token_id=[])
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=24, repetition_penalty=penalty, eos_token_id=[])
    assert got.shape == ref.shape == (batch, 9 + 24)
    assert torch.equal(got, ref)


def test_shortest_prompt_and_generation_match_transformers(models):
    hf, ours = models
    ids = torch.tensor([[17], [42]])
    for new in (1, 2):
        ref = hf_greedy(hf, ids, torch.ones_like(ids), max_new_tokens=new, eos_token_id=[])
        assert torch.equal(ttl_core.generate(ours, ids, max_new_tokens=new, eos_token_id=[]), ref)


def test_greedy_eos_stopping_matches_transformers(models):
    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=[])[:, 9:]
    # EOS ids that end rows at different steps: one id, then a list
    for eos in (int(free[0, 4]), [int(free[0, 4]), int(free[1, 7])]):
        ref = hf_greedy(hf, ids, mask, max_new_tokens=24, eos_token_id=eos)
        got = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(got, ref)
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else eos)
        assert torch.isin(got[:, 9:], eos_ids).any(dim=1).any()  # EOS did stop a row
    # every row stops: the output is cut at the step where the last row finished
    eos = sorted({int(free[r, 2]) for r in range(3)})
    ref = hf_greedy(hf, ids, mask, max_new_tokens=24, eos_token_id=eos)
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, ref) and got.shape[1] <= 9 + 3


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, causal):
    """flash-attn's documented semantics on the CPU: append k, v at each row's `cache_seqlens`, then attend
    (causal, bottom-right aligned) over that row's keys from `cache_leftpad` on."""
    from ttl_core.attention import sdpa_attention

    out = []
    for row in range(q.shape[0]):
        start, end = int(cache_seqlens[row]), int(cache_seqlens[row]) + k.shape[1]
        k_cache[row, start:end], v_cache[row, start:end] = k[row], v[row]
        keys = slice(int(cache_leftpad[row]), end)
        out.append(sdpa_attention(q[row:row + 1], k_cache[row:row + 1, keys], v_cache[row:row + 1, keys],
                                  causal=causal))
    return torch.cat(out)


def test_flash_decoding_bookkeeping_with_a_reference_kernel(models, monkeypatch):
    """The flash-attn decode path (cache layout, seqlens, left padding) with a CPU stand-in for the kernel."""
    _, ours = models
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape[1])
        return flash_attn_with_kvcache_reference(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "_flash_attn_with_kvcache", lambda: kernel)
    ids, mask = left_padded(ours.config.vocab_size)
    cont = torch.randint(0, ours.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        runs = []
        for flash in (False, True):
            decoder = KVDecoder(ours, mask, max_new_tokens=6, flash=flash)
            runs.append(torch.stack([decoder.prefill(ids)] + [decoder.step(cont[:, t:t + 1]) for t in range(6)], 1))
    assert decoder.cache.keys[0].shape[1] == decoder.cache.max_len  # flash-attn's (batch, seq, heads, dim)
    assert calls == [1] * 6 * ours.config.num_hidden_layers  # every decode step of every layer, no prefill
    assert (runs[0] - runs[1]).abs().max() <= 1e-5


def test_lagged_eos_check_trims_to_the_same_output(models, monkeypatch):
    """On CUDA the host checks for the end only every few steps; the steps run past it must not show."""
    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=[])[:, 9:]
    eos = sorted({int(free[r, 2]) for r in range(3)})
    every_step = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    monkeypatch.setattr(decode_session, "EOS_CHECK_EVERY", {"cpu": 7})
    lagged = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(lagged, every_step) and lagged.shape[1] < 9 + 7


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_incremental_logits_equal_full_forward(models, kernels, monkeypatch):
    monkeypatch.setenv("TTL_KERNELS", kernels)  # triton: rotary writes the cache itself (interpreter on CPU)
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    gen = torch.Generator().manual_seed(2)
    cont = torch.randint(0, ours.config.vocab_size, (3, 12), generator=gen)
    full_ids = torch.cat([ids, cont], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        truth = ours(full_ids, attention_mask=full_mask, position_ids=positions).logits
        decoder = KVDecoder(ours, mask, max_new_tokens=12)
        steps = [decoder.prefill(ids)] + [decoder.step(cont[:, t:t + 1]) for t in range(12)]
    assert torch.equal(decoder.position[:, 0], full_mask.sum(-1))  # transformers' per-row positions
    got = torch.stack(steps, dim=1)
    assert torch.isfinite(got).all()
    err = (got - truth[:, 8:]).abs().max().item()
    assert err <= 1e-5, err
    assert truth.abs().max() > 0.5


def test_generation_inside_a_callers_autocast_or_inference_mode(models):
    """generate() inside a training loop's bf16 autocast: the projections give bf16 keys and values, which the
    cache (float32 with the weights) refused; the decode steps follow the model's own autocast forward. A session
    is reused neither across autocast on and off nor out of torch.inference_mode, whose tensors may not be
    updated outside it."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    plain = ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[])
    cont = torch.randint(0, ours.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    full_ids, full_mask = torch.cat([ids, cont], dim=1), torch.cat([mask, torch.ones_like(cont)], dim=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[]).shape == plain.shape
        truth = ours(full_ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0)).logits
        decoder = KVDecoder(ours, mask, max_new_tokens=6)
        got = torch.stack([decoder.prefill(ids)] + [decoder.step(cont[:, t:t + 1]) for t in range(5)], dim=1)
    want = truth[:, ids.shape[1] - 1:-1].float()
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    with torch.inference_mode():
        assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[]), plain)
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=4, eos_token_id=[]), plain)


def test_greedy_with_triton_kernels_matches_transformers(models, monkeypatch):
    monkeypatch.setenv("TTL_KERNELS", "triton")
    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size)
    ref = hf_greedy(hf, ids, mask, max_new_tokens=12, repetition_penalty=1.3, eos_token_id=[])
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=12, repetition_penalty=1.3, eos_token_id=[])
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kernels, copies", [("torch", 2), ("triton", 0)])
def test_decode_step_kernels(models, kernels, copies, monkeypatch):
    # batch-1 decoding is mostly kernel launches: the rotary kernel writes the cache (two copies a layer
    # fewer) and the angles come from a table (no trigonometry in the step)
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            RecordOps.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("TTL_KERNELS", kernels)
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    with torch.no_grad():
        decoder = KVDecoder(ours, mask, max_new_tokens=2)
        decoder.prefill(ids)
        with RecordOps():
            decoder.step(ids[:, -1:])
    assert RecordOps.names.count("index_copy_") == copies * ours.config.num_hidden_layers
    assert not {"cos", "sin"} & set(RecordOps.names)


def test_decode_angle_table_is_the_models_own_angles(models):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    decoder = KVDecoder(ours, mask, max_new_tokens=30)
    positions = torch.arange(decoder.angle_table.shape[0])[None].expand(2, -1) - torch.tensor([[0], [3]])
    cos, sin = ours.backbone.rotary(positions.clamp_min(0), torch.float32)
    table = decoder.angle_table[positions.clamp_min(0)]
    assert torch.equal(table[:, :, 0], cos) and torch.equal(table[:, :, 1], sin)


def test_seed_reproduces_samples_and_num_return_sequences(models):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=2)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, min_p=0.02,
                  repetition_penalty=1.1, eos_token_id=[], num_return_sequences=3)
    a = ttl_core.generate(ours, ids, mask, seed=7, **kwargs)
    b = ttl_core.generate(ours, ids, mask, seed=7, **kwargs)
    c = ttl_core.generate(ours, ids, mask, seed=8, **kwargs)
    assert a.shape == (6, 9 + 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :9], ids.repeat_interleave(3, dim=0))
    assert len({tuple(r) for r in a[:3, 9:].tolist()}) > 1  # the copies of a prompt sample differently
    torch.manual_seed(0)
    d = ttl_core.generate(ours, ids, mask, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(d, ttl_core.generate(ours, ids, mask, **kwargs))


def test_reused_session_matches_a_fresh_one(models, tmp_path, monkeypatch):
    """A call with the same shapes and settings reuses the last call's buffers: nothing of that call leaks."""
    _, ours = models
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=20, repetition_penalty=1.3, eos_token_id=[5, 6], seed=4)
    first, first_mask = left_padded(ours.config.vocab_size, seed=10)  # other padding: rows 1, 2 more masked
    ids, mask = left_padded(ours.config.vocab_size, seed=11, pads=(4, 0, 2))
    decode_session._SESSIONS.clear()
    fresh = ttl_core.generate(ours, ids, mask, **kwargs)
    ttl_core.generate(ours, first, first_mask, **kwargs)
    session = decode_session._SESSIONS[ours]
    reused = ttl_core.generate(ours, ids, mask, **kwargs)
    assert decode_session._SESSIONS[ours] is session and torch.equal(reused, fresh)
    replaced = weakref.ref(session)
    del session
    ttl_core.generate(ours, ids, mask, **{**kwargs, "top_k": 21})
    assert replaced() is None  # other settings: a new session, and the old one's memory is freed at once

    # what a captured step bakes in changes: a new session (a LoRA merge flips a flag, not a weight address)
    lora_model = ttl_core.load_pretrained(tmp_path_hf(tmp_path, "lora"))
    torch.manual_seed(5)  # the adapters' draws: fixed, so no near-tie between tokens can differ from run to run
    apply_lora(lora_model, r=4, targets="all-linear")
    for layer in lora_layers(lora_model).values():
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.2)
    unmerged = ttl_core.generate(lora_model, ids, mask, max_new_tokens=8)
    session = decode_session._SESSIONS[lora_model]
    merge_lora(lora_model)
    assert torch.equal(ttl_core.generate(lora_model, ids, mask, max_new_tokens=8), unmerged)
    assert decode_session._SESSIONS[lora_model] is not session
    session = decode_session._SESSIONS[lora_model]
    lora_model.train()
    ttl_core.generate(lora_model, ids, mask, max_new_tokens=8)
    assert decode_session._SESSIONS[lora_model] is not session
    for variable, choice in (("TTL_KERNELS", "torch"), ("TTL_ATTENTION", "eager")):  # what the step runs
        session = decode_session._SESSIONS[lora_model]
        monkeypatch.setenv(variable, choice)
        ttl_core.generate(lora_model, ids, mask, max_new_tokens=8)
        assert decode_session._SESSIONS[lora_model] is not session, variable
    del lora_model

    hf_generation_model(seed=5).save_pretrained(tmp_path)
    other = ttl_core.load_pretrained(tmp_path)
    ttl_core.generate(other, ids, mask, max_new_tokens=4)
    assert other in decode_session._SESSIONS
    del other
    gc.collect()
    assert all(m is ours for m in decode_session._SESSIONS.keys())  # a cached session keeps no model alive


def test_scores_without_a_distribution_raise_like_transformers(tmp_path):
    """Logits so large that logits / temperature overflows float32 (at a temperature above the smallest one
    taken) leave softmax nothing to sample from: transformers' torch.multinomial raises, and so does ttl (once
    the graph-friendly decode loop is done) rather than emit token 0."""
    hf = hf_generation_model()
    with torch.no_grad():
        hf.lm_head.weight *= 1e4
    hf.save_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path)
    ids, mask = left_padded(hf.config.vocab_size)
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=1e-36, eos_token_id=[])
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        hf.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    with pytest.raises(GenerationError, match="sampling met scores with no distribution") as info:
        ttl_core.generate(ours, ids, mask, seed=0, **kwargs)
    assert "\n" not in str(info.value)
    assert ttl_core.generate(ours, ids, mask, seed=0, **{**kwargs, "temperature": 1.0}).shape == (3, 12)


def test_greedy_decoding_of_nan_logits_raises_rather_than_emit_token_0(models):
    """One NaN weight makes every logit NaN, and argmax then picks token 0 at every step (as transformers' greedy
    search does), which a caller takes for text: ttl raises as it does when sampling. The weight repaired in place
    (a checkpoint loaded into the model), the next call reuses the session, whose cache must not keep the NaN
    keys and values: masked slots still meet a zero probability, and 0 * NaN is NaN."""
    broken, kwargs = copy.deepcopy(models[1]), dict(max_new_tokens=3, do_sample=False, eos_token_id=[])
    weight, ids, mask = broken.backbone.layers[0].mlp.down.weight, *left_padded(broken.config.vocab_size)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(GenerationError, match="greedy decoding met scores with no distribution") as info:
        ttl_core.generate(broken, ids, mask, **kwargs)
    assert "\n" not in str(info.value)
    with torch.no_grad():
        weight.copy_(models[1].backbone.layers[0].mlp.down.weight)
    repaired = ttl_core.generate(broken, ids, mask, **kwargs)
    assert torch.equal(repaired, ttl_core.generate(models[1], ids, mask, **kwargs))


def gpu_models(tmp_path, dtype, attention="sdpa"):
    hf = hf_generation_model(max_position_embeddings=512)
    hf.save_pretrained(tmp_path)
    return ttl_core.load_pretrained(tmp_path, dtype=dtype, device="cuda", attention=attention)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager_decoding(tmp_path, dtype, attention):
    """Token for token, sampling included (the graph replays a seeded or the global RNG), and a second call that
    reuses the captured graph with other prompts; "auto" decodes with flash-attn in bf16 where it is installed."""
    ours = gpu_models(tmp_path, dtype, attention)
    ids, mask = cuda_batch(ours.config.vocab_size)
    other = torch.randint(4, ours.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(2))
    other = other.cuda().masked_fill(mask == 0, PAD)
    for kwargs in (dict(repetition_penalty=1.2),
                   dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, seed=3,
                        num_return_sequences=2),
                   dict(eos_token_id=[5, 6, 7, 8]),
                   dict(do_sample=True, top_h=0.9, typical_p=0.9, eta_cutoff=1e-3, no_repeat_ngram_size=3,
                        min_new_tokens=20, eos_token_id=[5, 6, 7, 8], bad_words_ids=[[9], [10, 11]],
                        suppress_tokens=[4], sequence_bias={(12, 13): -2.0}, begin_suppress_tokens=[15],
                        forced_eos_token_id=5, remove_invalid_values=True, exponential_decay_length_penalty=(30, 1.05),
                        renormalize_logits=True)):
        ttl_core.generate(ours, ids, mask, max_new_tokens=64, **kwargs)
        torch.manual_seed(7)
        graphed = ttl_core.generate(ours, other, mask, max_new_tokens=64, **kwargs)
        torch.manual_seed(7)
        eager = ttl_core.generate(ours, other, mask, max_new_tokens=64, cuda_graph=False, **kwargs)
        assert torch.equal(graphed, eager), kwargs


@pytest.mark.gpu
def test_cuda_greedy_matches_transformers_fp32(tmp_path):
    hf, ours = cuda_models(tmp_path)
    ids, mask = cuda_batch(hf.config.vocab_size)
    ref = hf_greedy(hf, ids, mask, max_new_tokens=48, repetition_penalty=1.2, eos_token_id=[])
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=48, repetition_penalty=1.2,
                                         eos_token_id=[]), ref)


@pytest.mark.gpu
def test_flash_attn_decoding_matches_sdpa(tmp_path):
    """flash_attn_with_kvcache decoding (bf16) is as close to the fp32 truth as SDPA's bf16 decoding is
    (flash-attn's own criterion: at most twice PyTorch's low-precision error)."""
    pytest.importorskip("flash_attn")
    truth_model = gpu_models(tmp_path, torch.float32)
    sdpa = ttl_core.load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", attention="sdpa")
    flash = ttl_core.load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", attention="auto")
    ids, mask = cuda_batch(sdpa.config.vocab_size)
    decoders = [KVDecoder(m, mask, max_new_tokens=8) for m in (truth_model, sdpa, flash)]
    assert not decoders[1].flash and decoders[2].flash
    tokens = torch.randint(4, sdpa.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        logits = [[d.prefill(ids)] + [d.step(tokens[:, t:t + 1]) for t in range(8)] for d in decoders]
    truth, low, got = (torch.stack(x, 1).float() for x in logits)
    assert torch.isfinite(got).all()
    sdpa_err, flash_err = (low - truth).abs().max(), (got - truth).abs().max()
    assert flash_err <= 2 * sdpa_err, (flash_err, sdpa_err)


def test_repetition_penalty_scores_ignore_left_padding_like_transformers(tmp_path, monkeypatch):
    """Every step's processed scores of a left-padded batch equal transformers' `output_scores` for each row
    generated alone, on a model whose padding-token logit is not zero: a penalty on the left-padding id (which
    is no prompt token) would show there. Each row alone, because transformers 5.17 penalizes left padding in
    a batch (5.25 no longer does)."""
    hf = hf_causal_lm(seed=7)
    hf.save_pretrained(tmp_path / "m")
    ours = ttl_core.load_pretrained(tmp_path / "m")
    pads = (0, 4, 6)
    ids, mask = left_padded(hf.config.vocab_size, seed=12, pads=pads)
    assert not torch.isin(ids[mask == 1], torch.tensor(PAD)).any()  # PAD is only padding
    recorded = []
    real = decode_session.process_logits

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        recorded.append(out.clone())
        return out

    monkeypatch.setattr(decode_session, "process_logits", recording)
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=6, repetition_penalty=1.5, eos_token_id=[],
                            pad_token_id=PAD)
    alone = [hf.generate(ids[row:row + 1, pad:], max_new_tokens=6, do_sample=False, repetition_penalty=1.5,
                         eos_token_id=[], pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
             for row, pad in enumerate(pads)]
    assert torch.equal(got[:, :ids.shape[1]], ids)
    for row, (pad, ref) in enumerate(zip(pads, alone)):
        assert torch.equal(got[row:row + 1, pad:], ref.sequences)
    expected = torch.cat([torch.stack(ref.scores, 1) for ref in alone])
    scores = torch.stack(recorded, 1)
    assert scores.shape == expected.shape and expected[:, 0, PAD].abs().min() > 1e-2
    assert (scores - expected).abs().max() <= 1e-4


def test_padding_with_an_eos_id_and_a_lagged_check_trims_like_transformers(models, monkeypatch):
    """pad_token_id equal to an EOS id (Llama's usual set-up): rows that finished keep emitting that id, which
    must not count as finishing again when the host checks only every few steps (as on CUDA)."""
    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=[])[:, 9:]
    eos = sorted({int(free[0, 1]), int(free[1, 3]), int(free[2, 4])})
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, eos_token_id=eos,
                      pad_token_id=eos[0])
    assert ref.shape[1] < 9 + 7  # every row finished before the first lagged check
    monkeypatch.setattr(decode_session, "EOS_CHECK_EVERY", {"cpu": 7})
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos[0])
    assert got.shape == ref.shape and torch.equal(got, ref)


def test_left_padding_survives_kernels_that_return_nan_for_keyless_queries(models, monkeypatch):
    """Some SDPA kernels (not the CPU one) return NaN for a query that may attend to no key; prefill must give
    padding queries a key, or NaN reaches the cache and every later step. Emulated around torch's SDPA."""
    import ttl_core.attention as attention_module

    hf, ours = models
    ids, mask = left_padded(hf.config.vocab_size)
    ref = hf_greedy(hf, ids, mask, max_new_tokens=8, eos_token_id=[])
    real = attention_module.F.scaled_dot_product_attention

    def nan_for_keyless_queries(q, k, v, attn_mask=None, **kwargs):
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is None:
            return out
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        return out.masked_fill(~allowed.any(-1, keepdim=True), float("nan"))

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", nan_for_keyless_queries)
    with torch.no_grad():
        decoder = KVDecoder(ours, mask, max_new_tokens=8)
        assert torch.isfinite(decoder.prefill(ids)).all()
        assert all(torch.isfinite(t).all() for t in decoder.cache.keys + decoder.cache.values)
    assert torch.equal(ttl_core.generate(ours, ids, mask, max_new_tokens=8, eos_token_id=[]), ref)


def test_decoding_stops_once_every_row_has_finished(models, monkeypatch):
    """No decode step runs after the step where the last row finished (the output would be the same, trimmed,
    but every extra step is a wasted forward pass)."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=[])[:, 9:]
    eos = sorted({int(free[r, 2]) for r in range(3)})
    steps = []
    real = KVDecoder.step
    monkeypatch.setattr(KVDecoder, "step", lambda self, tokens: steps.append(1) or real(self, tokens))
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert len(steps) == got.shape[1] - 9 - 1 <= 2  # the prefill gives the first token


def test_flash_attn_kernel_is_looked_up_once(monkeypatch):
    """`StaticKVCache.attend` asks for flash-attn's kernel in every layer of every decode step: the import and
    the signature check (tens of microseconds, in an eager decode loop) run once, as `flash_attn_module`'s do."""
    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_leftpad=None,
                                causal=False):
        return q

    signature, checked = inspect.signature, []
    monkeypatch.setattr(inspect, "signature", lambda fn: checked.append(fn) or signature(fn))
    fake = types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    lookup = kv_cache._flash_attn_with_kvcache
    lookup.cache_clear()
    try:
        assert [lookup() for _ in range(3)] == [flash_attn_with_kvcache] * 3
        assert checked == [flash_attn_with_kvcache]
    finally:
        lookup.cache_clear()  # later tests see the real (absent) package again


def test_a_call_of_another_shape_frees_the_last_session_before_allocating(models, monkeypatch):
    """The cached session of another shape (its KV cache, buffers and CUDA graph pool) is released before the
    new one is allocated, so the two never hold memory at once, e.g. in a chat whose prompt grows each turn."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size)
    ttl_core.generate(ours, ids, mask, max_new_tokens=4)
    last = weakref.ref(decode_session._SESSIONS[ours])
    alive_at_build, session_class = [], generate_module.DecodeSession

    def session(*args, **kwargs):
        alive_at_build.append(last() is not None)
        return session_class(*args, **kwargs)

    monkeypatch.setattr(generate_module, "DecodeSession", session)  # where generate() builds one
    ttl_core.generate(ours, ids, mask, max_new_tokens=5)
    assert alive_at_build == [False]
    reused = decode_session._SESSIONS[ours]
    ttl_core.generate(ours, ids, mask, max_new_tokens=5)
    assert decode_session._SESSIONS[ours] is reused and alive_at_build == [False]  # same shape: reused
