"""Text generation over a static KV cache, with transformers' sampling semantics and CUDA-graph decoding.

`generate()` prefills the (left-padded) prompts once, then decodes one token per step. Every tensor a decode
step touches is preallocated with a fixed shape and address: the per-layer keys and values, the attention
mask over the whole cache, the positions, the output buffer and the RNG. So on CUDA the step (model forward,
logits processors, sampling and bookkeeping) is captured once in a CUDA graph and replayed, and the host
only launches graphs; it reads the device back only for the end-of-sequence check every few steps (or every
step when a streamer or stop strings need the new tokens on the host).

The logits processors and the sampler are in `ttl_core.sampling`; the streamer and the stop-string matcher in
`ttl_core.streamer`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import torch

import ttl_kernels

from .attention import causal_mask, requested_backend
from .beam_search import beam_search, check_beam_arguments
from .config import LlamaConfig
from .errors import GenerationError, is_integer
from .model import LlamaForCausalLM, autocast_dtype
from .sampling import (check_sampling_arguments, checked_inputs, checked_token_rules, decoding_settings,
                       global_generator, mark_seen, process_logits, sample, special_token_ids, stop_string_matcher,
                       unimplemented_settings)
from .streamer import HostWatch, StopStrings
from .token_rules import TOKEN_RULE_SETTINGS, TokenRules

# How often (in decode steps, per device type; 1 elsewhere) the host checks whether every row has finished. On
# CUDA a check is a device sync, while in between the host queues graph replays without waiting; the at most this
# many steps decoded past the end are trimmed, so the output is as if it checked every step.
EOS_CHECK_EVERY = {"cuda": 8}
# Eager decode steps (real steps, not thrown away) run before the step is captured in a CUDA graph, so lazy
# initialization (cuBLAS handles, Triton compilation and autotuning) happens outside the capture.
GRAPH_WARMUP_STEPS = 3


@functools.cache
def _flash_attn_with_kvcache():
    """flash-attn's `flash_attn_with_kvcache`, or None when flash-attn is missing or older than 2.6 (the
    first release with `cache_leftpad`, which left-padded batches need). Cached: every layer of every decode
    step asks, and the import and signature check cost tens of microseconds."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache if "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters else None


class StaticKVCache:
    """Keys and values of every layer for `max_len` positions, allocated once and written in place.

    Implements the model's cache protocol: `update(layer_idx, qkv, cos, sin, backend)` rotates the new
    tokens' queries and keys, writes the keys and values at the positions in `write_index` (a device tensor,
    so a decode step keeps static shapes; on the Triton path in the rotary kernel itself) and returns the
    queries and the first `visible` cached positions in the model's (batch, seq, kv_heads, head_dim) layout.
    For SDPA the storage is (batch, kv_heads, max_len, head_dim) per layer, which SDPA reads without a copy.
    With `flash=True` the storage is flash-attn's (batch, max_len, kv_heads, head_dim) and, while `attends`
    is set, the model calls `attend()` instead, which appends and attends in one `flash_attn_with_kvcache`
    kernel (`seqlens`: the absolute cache lengths, `leftpad`: each row's left padding, int32 as flash-attn wants)."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 flash: bool = False):
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        shape = (batch, max_len, kv_heads, head_dim) if flash else (batch, kv_heads, max_len, head_dim)
        self.seq_dim = 1 if flash else 2
        # zeros, not empty: masked-out slots are still multiplied by a zero probability, and 0 * NaN is NaN
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.write_index: torch.Tensor | None = None
        self.visible = max_len
        self.attends = False
        self.seqlens = self.leftpad = None

    def update(self, layer_idx: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate the new tokens' fused projection (batch, new, heads + 2 * kv_heads, head_dim), write their
        keys and values at `write_index`; return the rotated queries and the cached keys and values."""
        keys, values = (store.transpose(1, 2) if self.seq_dim == 2 else store
                        for store in (self.keys[layer_idx], self.values[layer_idx]))
        q = ttl_kernels.rotary_into_cache(qkv, cos, sin, keys, values, self.write_index, backend=backend)
        return q, keys[:, :self.visible], values[:, :self.visible]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v at `seqlens` and attend q over each row's cache (flash layout only)."""
        return _flash_attn_with_kvcache()(q, self.keys[layer_idx], self.values[layer_idx], k=k, v=v,
                                          cache_seqlens=self.seqlens, cache_leftpad=self.leftpad, causal=True)


class KVDecoder:
    """Runs a causal LM over a `StaticKVCache`: `prefill(input_ids)` over left-padded prompts, then
    `step(tokens)` one token per row. Returns the last position's logits (batch, vocab) in the model's dtype.

    Positions follow transformers: each row counts from 0 at its first real token (cumsum of the mask - 1).
    A decode step's tensors keep their shapes and addresses, so it can be captured in a CUDA graph, and
    `reset(attention_mask)` starts over with new prompts of the same shape in the same tensors."""

    def __init__(self, model: LlamaForCausalLM, attention_mask: torch.Tensor, max_new_tokens: int,
                 flash: bool | None = None):
        self.model_ref = weakref.ref(model)  # cached decoders (see _Session) must not keep their model alive
        batch, prompt_len = attention_mask.shape
        device = attention_mask.device
        dtype = autocast_dtype(device.type) or model.lm_head.weight.dtype  # the projections' (the keys' and values')
        if flash is None:
            flash = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                     and requested_backend(model.config.attention) in ("auto", "flash_attn")
                     and _flash_attn_with_kvcache() is not None)
        self.flash = flash
        # a multiple of 16 keeps the mask rows aligned for SDPA's memory-efficient kernel; extra slots stay masked
        max_len = -(-(prompt_len + max_new_tokens) // 16) * 16
        self.prompt_len = prompt_len
        self.key_ok = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        # The decode steps' mask, additive (0 or -inf) in the model's dtype: SDPA turns a boolean mask into
        # that form in every layer's call, two kernels a layer. It starts with the prompt's real keys and
        # each step opens the column of its new token (one kernel).
        self.key_bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        self.key_index = torch.arange(max_len, device=device)
        # rotary (cos, sin) of every position the cache can hold, as the model computes them: a step gathers
        # its rows in one kernel instead of computing them in seven
        cos, sin = model.backbone.rotary(self.key_index[None], model.backbone.embed.weight.dtype)
        self.angle_table = torch.stack((cos[0], sin[0]), dim=1)  # (max_len, 2, head_dim)
        self.prompt_positions = torch.zeros(batch, prompt_len, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.decode_index = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = StaticKVCache(model.config, batch, max_len, device, dtype, flash=flash)
        if flash:
            self.cache.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
            self.cache.leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor) -> None:
        """Forget the cached prompts; the next `prefill` takes prompts padded as `attention_mask` says."""
        real = attention_mask.bool()
        self.key_ok[:, :self.prompt_len].copy_(real)
        self.key_bias.zero_().masked_fill_(~self.key_ok | (self.key_index >= self.prompt_len), float("-inf"))
        self.prompt_positions.copy_((real.long().cumsum(-1) - 1).clamp_min(0))
        self.position.copy_(self.prompt_positions[:, -1:] + 1)
        self.decode_index.fill_(self.prompt_len)
        for store in self.cache.keys + self.cache.values:
            store.zero_()  # masked slots are multiplied by zero probabilities: keep NaN from older calls out
        if self.flash:
            self.cache.seqlens.fill_(self.prompt_len)
            self.cache.leftpad.copy_((~real).sum(-1))

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompts; logits of each row's next token."""
        cache, n = self.cache, self.prompt_len
        cache.write_index = torch.arange(n, device=input_ids.device)
        cache.visible, cache.attends = n, False
        # A padding query may attend itself: a query with no key at all makes some SDPA kernels return NaN,
        # which would land in the cache; real queries never see padding keys either way.
        mask = causal_mask(n, n, input_ids.device, key_padding=self.key_ok[:, :n])
        mask = mask | torch.eye(n, dtype=torch.bool, device=input_ids.device)
        logits = self.model_ref()(input_ids, attention_mask=mask, position_ids=self.prompt_positions, kv_cache=cache,
                            logits_to_keep=1).logits[:, -1]
        cache.write_index = self.decode_index
        cache.visible, cache.attends = cache.max_len, self.flash
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (batch, 1) at the next position; logits of the token after it."""
        # every row sees at least its new token, so no row of this additive mask is all -inf
        self.key_bias.index_fill_(1, self.decode_index, 0.0)
        angles = self.angle_table[self.position]  # (batch, 1, 2, head_dim)
        logits = self.model_ref()(tokens, attention_mask=self.key_bias[:, None, None, :], position_ids=self.position,
                                  kv_cache=self.cache, logits_to_keep=1, angles=angles.unbind(2)).logits[:, -1]
        self.decode_index.add_(1)
        self.position.add_(1)
        if self.flash:
            self.cache.seqlens.add_(1)
        return logits


class _Decoding:
    """What a generation tracks on the device: the tokens produced (in a fixed-size buffer), which rows have
    finished and after how many tokens, which tokens each row has seen (for the repetition penalty), the whole
    rows where the token rules read them, and the sampling RNG. `advance(logits)` is the whole per-step update, in
    place, so it can be part of a CUDA graph; `reset(...)` starts a new generation in the same tensors."""

    def __init__(self, prompt_shape: torch.Size, max_new_tokens: int, vocab: int, eos: list[int], pad: int | None,
                 do_sample: bool, seeded: bool, processors: dict, rules: dict, device: torch.device):
        batch, self.prompt_len = prompt_shape
        self.max_new_tokens, self.vocab, self.pad_id = max_new_tokens, vocab, 0 if pad is None else pad
        self.out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.done_at = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = torch.tensor(self.pad_id, dtype=torch.long, device=device)
        self.rules = TokenRules(rules, eos, vocab, self.prompt_len, max_new_tokens, device)
        self.rows = (torch.zeros(batch, self.prompt_len + max_new_tokens, dtype=torch.long, device=device)
                     if self.rules.needs_rows else None)
        # a spare last column: see mark_seen
        self.seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device) if self.rules.penalizes else None
        # a seeded call draws from a generator of its own, else from torch's global RNG (which transformers draws from)
        self.generator = (torch.Generator(device=device) if seeded else global_generator(device)) if do_sample else None
        # whether every row's scores had a finite max (neither NaN nor +inf nor all -inf): else softmax has no
        # distribution and argmax no answer (a NaN wins it); a graph cannot raise, so the host reads this at the end
        self.scores_ok = torch.ones((), dtype=torch.bool, device=device)
        self.do_sample, self.processors = do_sample, processors

    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int | None) -> None:
        self.out.fill_(self.pad_id)
        self.column.zero_()
        self.finished.zero_()
        self.done_at.fill_(self.max_new_tokens)
        if self.seen is not None:
            mark_seen(self.seen, input_ids, attention_mask != 0)
        self.scores_ok.fill_(True)
        if self.generator is not None and seed is not None:
            self.generator.manual_seed(seed)
        if self.rows is not None:
            self.rows[:, :self.prompt_len].copy_(input_ids)

    def advance(self, logits: torch.Tensor) -> None:
        seen = None if self.seen is None else self.seen[:, :self.vocab]
        raw = logits.float()
        logits = (self.rules(raw, self.rows, self.prompt_len + self.column, self.column, seen) if self.rules.active
                  else raw)
        scores = process_logits(logits, self.do_sample, **self.processors)
        if self.do_sample:
            finite = torch.isfinite(scores.amax(dim=-1))
        else:  # argmax has an answer (as transformers') where only the rules put inf: 0 where they left no token
            finite = ~torch.isnan(scores.amax(dim=-1))
            if not self.rules.remove_invalid:  # which asks for the model's NaN and inf to pass
                finite &= torch.isfinite(raw.amax(dim=-1))
        self.scores_ok &= finite.all()
        token = sample(scores, self.generator) if self.do_sample else scores.argmax(dim=-1)
        token = torch.where(self.finished, self.pad, token)
        self.out.index_copy_(1, self.column, token[:, None])
        if self.rows is not None:
            self.rows.index_copy_(1, self.prompt_len + self.column, token[:, None])
        self.column.add_(1)
        if self.eos is not None:
            hit = (token[:, None] == self.eos).any(dim=-1) & ~self.finished
            self.done_at.copy_(torch.where(hit, self.column, self.done_at))
            self.finished |= hit
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        self.tokens.copy_(token[:, None])

    def finish_row(self, row: int, produced: int) -> None:
        """Mark a row finished from the host (a stop string was found after `produced` tokens)."""
        self.finished[row] = True
        self.done_at[row] = produced


class _CudaGraphStep:
    """Calls `fn` eagerly for the first `GRAPH_WARMUP_STEPS` calls (on a side stream, as CUDA-graph capture
    wants), then captures it once and replays the graph for every later call. `fn` must only update
    preallocated tensors in place; the generator, if any, is registered so sampling stays seeded."""

    def __init__(self, fn, generator: torch.Generator | None):
        self.fn, self.generator, self.calls, self.graph = fn, generator, 0, None
        self.side = torch.cuda.Stream()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.calls < GRAPH_WARMUP_STEPS:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.fn()
            torch.cuda.current_stream().wait_stream(self.side)
            self.calls += 1
            return
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self.fn()  # recorded, not run
        self.graph = graph
        graph.replay()


class _Session:
    """The decoder, the decoding state and the (graphed) decode step of one shape of generation. The last one
    is kept per model, so a later call with the same shapes and settings reuses its buffers and its captured
    CUDA graph instead of allocating and capturing again; `lock` keeps concurrent calls from sharing it."""

    def __init__(self, key: tuple, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, eos: list[int], pad: int | None, do_sample: bool, seeded: bool,
                 processors: dict, rules: dict, cuda_graph: bool):
        self.key, self.lock = key, threading.Lock()
        self.decoder = KVDecoder(model, attention_mask, max_new_tokens)
        self.state = _Decoding(input_ids.shape, max_new_tokens, model.config.vocab_size, eos, pad, do_sample, seeded,
                               processors, rules, input_ids.device)

        decoder, state = self.decoder, self.state  # not `self`: no reference cycle holding the cache past its use

        def step() -> None:
            state.advance(decoder.step(state.tokens))

        self.step = _CudaGraphStep(step, self.state.generator) if cuda_graph else step


# model -> its last _Session (weak keys: a cached session never keeps a model alive)
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_fingerprint(model) -> tuple:
    """What a session bakes in besides the contents of tensors: every module's identity and plain settings
    (training mode, a LoRA layer's `merged` flag and scale, ...), every parameter's and buffer's address, the
    kernel and attention choices of the environment, autocast's dtype (the cache's) and inference mode (whose
    tensors may not be updated outside it). A session is reused only while these are unchanged."""
    settings = tuple((id(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))
                     for m in model.modules())
    environment = (os.environ.get("TTL_KERNELS"), os.environ.get("TTL_ATTENTION"),
                   autocast_dtype(model.lm_head.weight.device.type), torch.is_inference_mode_enabled())
    return settings + environment + tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def _acquire_session(model: LlamaForCausalLM, key: tuple, build: Callable[[], _Session]) -> _Session:
    """The model's cached session if built for `key` and free, locked for this call; else a new one from `build`."""
    session = _SESSIONS.get(model)
    if session is not None and session.lock.acquire(blocking=False):
        if session.key == key:
            return session
        # another shape: free its cache, buffers and graph before `build` allocates the new ones
        if _SESSIONS.get(model) is session:
            del _SESSIONS[model]
        session.lock.release()
    del session
    session = build()
    session.lock.acquire()
    _SESSIONS[model] = session
    return session


@torch.no_grad()
def generate(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, num_return_sequences: int | None = None, seed: int | None = None,
             stop_strings: str | list[str] | None = None, tokenizer: Any = None, streamer: Any = None,
             cuda_graph: bool = True, max_length: int | None = None, min_new_tokens: int | None = None,
             min_length: int | None = None, typical_p: float | None = None, epsilon_cutoff: float | None = None,
             eta_cutoff: float | None = None, top_h: float | None = None, no_repeat_ngram_size: int | None = None,
             sequence_bias: dict | list | None = None, bad_words_ids: list[list[int]] | None = None,
             suppress_tokens: list[int] | None = None, begin_suppress_tokens: list[int] | None = None,
             forced_eos_token_id: int | list[int] | None = None, forced_bos_token_id: int | None = None,
             remove_invalid_values: bool | None = None, exponential_decay_length_penalty: tuple | None = None,
             renormalize_logits: bool | None = None, max_time: float | None = None, num_beams: int | None = None,
             length_penalty: float | None = None, early_stopping: bool | str | None = None) -> torch.Tensor:
    """Continue each prompt row of `input_ids` (batch, seq), left-padded per `attention_mask`, by up to
    `max_new_tokens` tokens; returns (batch * num_return_sequences, seq + new) like transformers'
    `generate()`: the prompts followed by the new tokens, rows that finished early padded with
    `pad_token_id`, and no columns after the step where every row had finished.

    As in transformers, `max_length` and `min_length` count the prompt's columns (left padding included), and
    `max_new_tokens` wins over `max_length`, `min_new_tokens` over `min_length`; until a row has `min_new_tokens`
    new tokens, its EOS ids are never chosen.
    Greedy unless `do_sample`; the processors and their order are transformers' (see `ttl_core.sampling`).
    A decoding setting left None comes, as in transformers, from the checkpoint's generation_config.json (also
    its `max_length` and `min_length`), else from `ttl_core.sampling.DECODING_DEFAULTS`
    (20 new tokens, fewer where the context ends first; greedy; one sequence a prompt; sampling without top-k,
    where transformers' default keeps the top 50). `num_beams` > 1 runs transformers' beam search, or beam sampling
    with `do_sample` (`ttl_core.beam_search`). Checkpoint settings ttl does not implement (contrastive search,
    guidance, ...: `ttl_core.sampling.UNIMPLEMENTED_SETTINGS`) are left out with a warning naming them.
    `eos_token_id` (an id or a list, `[]` for none) and `stop_strings` (`[]` for none; the checkpoint's where a
    `tokenizer` is given, as in transformers) finish a row; a stop string matches, as in transformers, where it ends
    within a new token, in the text of the whole row (prompt included, special tokens as their text), which needs
    `tokenizer` (see `ttl_core.streamer.StopStrings`).
    `eos_token_id` and `pad_token_id` default to the checkpoint's generation_config.json, else to the model
    config's; the padding id then to the first EOS id. Without `attention_mask`, prompt tokens equal to a
    padding id that is no EOS id count as padding, as in transformers. Sampling draws transformers' tokens: with
    `seed=s` those it draws after `torch.manual_seed(s)`; without, from torch's global RNG where it stands.
    `streamer` (one row only: ttl's `TextStreamer`, or transformers' `TextStreamer`, `TextIteratorStreamer` or
    any `BaseStreamer`) gets, as from transformers, `put()` with the prompt, then with each new token as it is
    produced (CPU LongTensors), then `end()`, also when the call fails. On CUDA the decode step runs as a CUDA
    graph unless `cuda_graph=False`. The last call's KV cache, buffers and graph stay with the model until it is
    freed or called with other shapes or settings: a repeated call allocates and captures nothing."""
    try:
        if not hasattr(model, "lm_head"):
            raise GenerationError(f"generation needs a causal LM, got {type(model).__name__}")
        prompt_len = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0
        settings = decoding_settings(model.generation_config, prompt_len, model.config.max_position_embeddings,
                                     max_length, min_length, max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                                     top_h=top_h, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                                     epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                                     repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                     num_return_sequences=num_return_sequences, sequence_bias=sequence_bias,
                                     bad_words_ids=bad_words_ids, suppress_tokens=suppress_tokens,
                                     begin_suppress_tokens=begin_suppress_tokens,
                                     forced_eos_token_id=forced_eos_token_id, forced_bos_token_id=forced_bos_token_id,
                                     remove_invalid_values=remove_invalid_values,
                                     exponential_decay_length_penalty=exponential_decay_length_penalty,
                                     renormalize_logits=renormalize_logits, max_time=max_time, num_beams=num_beams,
                                     length_penalty=length_penalty, early_stopping=early_stopping)
        max_new_tokens, do_sample, num_return_sequences, max_time, num_beams, length_penalty, early_stopping = (
            settings.pop(name) for name in ("max_new_tokens", "do_sample", "num_return_sequences", "max_time",
                                            "num_beams", "length_penalty", "early_stopping"))
        passed = {"stop_strings"} if stop_strings is not None or tokenizer is not None else set()
        ignored = unimplemented_settings(model.generation_config, passed)
        if ignored:
            warnings.warn(f"the checkpoint's generation_config.json sets {', '.join(ignored)}, which ttl's generate() "
                          "does not implement: it decodes as if they were unset, unlike transformers' generate()",
                          stacklevel=3)  # the caller of generate(), past torch.no_grad's wrapper
        eos, pad = special_token_ids(model, eos_token_id, pad_token_id)
        rules = {name: settings.pop(name) for name in TOKEN_RULE_SETTINGS}
        check_beam_arguments(num_beams, length_penalty, early_stopping, num_return_sequences)
        check_sampling_arguments(do_sample, num_return_sequences=num_return_sequences, max_time=max_time,
                                 num_beams=num_beams, repetition_penalty=rules["repetition_penalty"], **settings)
        rules = checked_token_rules(rules, model.config.vocab_size)
        input_ids, mask = checked_inputs(model, input_ids, attention_mask, max_new_tokens, eos, pad)
        stops = stop_string_matcher(model.generation_config, stop_strings, tokenizer)
        if stops is not None and pad is None:
            raise GenerationError("stop_strings need a pad_token_id (or an eos_token_id) to pad finished rows")
        if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**63):
            raise GenerationError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        deadline = None if max_time is None else time.monotonic() + max_time
        if num_beams > 1:
            if streamer is not None or stops is not None:  # transformers refuses a streamer there too
                raise GenerationError("beam search (num_beams > 1) takes no streamer or stop strings")
            input_ids, mask = input_ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
            return beam_search(KVDecoder(model, mask, max_new_tokens), input_ids, mask, max_new_tokens, eos, pad,
                               do_sample, seed, settings, rules, num_beams, length_penalty, early_stopping,
                               num_return_sequences, deadline)
        input_ids, mask = (t.repeat_interleave(num_return_sequences, dim=0) for t in (input_ids, mask))
        if streamer is not None and input_ids.shape[0] != 1:
            raise GenerationError(f"a streamer follows one sequence; this call generates {input_ids.shape[0]}")
        device = input_ids.device
        # not under autocast: a graph kept for later calls would read weight casts that autocast frees at its exit
        graphed = cuda_graph and device.type == "cuda" and autocast_dtype("cuda") is None
        key = (tuple(input_ids.shape), max_new_tokens, device, do_sample, seed is not None, tuple(settings.values()),
               tuple(rules.values()), tuple(eos), pad, graphed, _forward_fingerprint(model))
        session = _acquire_session(model, key, lambda: _Session(key, model, input_ids, mask, max_new_tokens, eos, pad,
                                                                do_sample, seed is not None, settings, rules, graphed))
        try:
            return _run(session, input_ids, mask, max_new_tokens, seed, streamer, stops, bool(eos or stops), deadline)
        finally:
            session.lock.release()
    finally:  # on errors too: a thread iterating the streamer would wait forever for its end
        if streamer is not None:
            streamer.end()


def _run(session: _Session, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, seed: int | None,
         streamer, stops: StopStrings | None, can_finish: bool, deadline: float | None) -> torch.Tensor:
    """Prefill, then decode until every row has finished, `max_new_tokens` are out or the `deadline` (of
    time.monotonic(), checked after each token as transformers' max_time is) has passed."""
    decoder, state = session.decoder, session.state
    decoder.reset(mask)
    state.reset(input_ids, mask, seed)
    # before the prefill: a streamer gets the prompt first, as from transformers
    watch = HostWatch(state, input_ids, streamer, stops) if streamer is not None or stops is not None else None
    state.advance(decoder.prefill(input_ids))
    check_every = 1 if watch is not None else EOS_CHECK_EVERY.get(input_ids.device.type, 1)
    produced = 1
    while True:
        if watch is not None:
            watch(produced)
        if produced == max_new_tokens or (deadline is not None and time.monotonic() > deadline):
            break
        if can_finish and produced % check_every == 0 and bool(state.finished.all()):
            break
        session.step()
        produced += 1
    if not bool(state.scores_ok):
        cause = (f"logits / temperature {state.processors['temperature']} overflowed float32, or the model's logits "
                 "did" if state.do_sample else "the model's logits hold NaN or inf (are its weights finite?)")
        if state.do_sample and state.rules.blocks:  # transformers fails there too
            cause += ", or the token rules (min_new_tokens, no_repeat_ngram_size, bad_words_ids, ...) left no token"
        if state.rules.sequence_bias is not None:
            cause += ", or sequence_bias put inf in them (inf - inf is NaN; inf has no probability)"
        if state.rules.decay_eos is not None:
            cause += ", or exponential_decay_length_penalty grew the EOS scores past float32"
        raise GenerationError(f"{'sampling' if state.do_sample else 'greedy decoding'} met scores with no "
                              f"distribution (NaN or inf): {cause}")
    length = min(produced, int(state.done_at.max())) if can_finish else produced
    return torch.cat([input_ids, state.out[:, :length]], dim=1)
