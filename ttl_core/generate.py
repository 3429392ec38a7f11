"""Text generation over a static KV cache, with transformers' sampling semantics and CUDA-graph decoding.

`generate()` prefills the (left-padded) prompts once, then decodes one token per step. Every tensor a decode
step touches is preallocated with a fixed shape and address: the per-layer keys and values, the attention
mask over the whole cache, the positions, the output buffer and the RNG. So on CUDA the step (model forward,
logits processors, sampling and bookkeeping) is captured once in a CUDA graph and replayed, and the host
only launches graphs; it reads the device back only for the end-of-sequence check every few steps (or every
step when a streamer or stop strings need the new tokens on the host).

The KV cache and the decoder are in `ttl_core.kv_cache`, the logits processors in `ttl_core.token_rules` and
`ttl_core.sampling` (with the sampler), the streamer and the stop-string matcher in `ttl_core.streamer`, prompt-lookup
decoding (several tokens a step, eagerly) in `ttl_core.prompt_lookup`, assisted decoding's draft model in
`ttl_core.assisted`, the dict output in `ttl_core.generate_output`.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import torch

from .assisted import AssistantDrafts, assistant_settings
from .beam_search import beam_search, check_beam_arguments
from .errors import GenerationError, is_integer
from .generate_output import GenerateOutput, passed_generation_config
from .kv_cache import KVDecoder
from .model import LlamaForCausalLM, autocast_dtype
from .prompt_embeds import checked_prompt, prompt_length
from .prompt_lookup import LookupDrafts, checked_lookup, decode as drafted_decode
from .sampling import (apply_guidance, check_sampling_arguments, checked_token_rules,
                       decoding_settings, global_generator, mark_seen, process_logits,
                       sample, special_token_ids, stop_string_matcher, unconditional_inputs, unimplemented_settings)
from .streamer import HostWatch, checked_criteria, host_watch
from .token_rules import TOKEN_RULE_SETTINGS, TokenRules
from .watermark import Watermark, checked_watermark

# How often (in decode steps, per device type; 1 elsewhere) the host checks whether every row has finished. On
# CUDA a check is a device sync, while in between the host queues graph replays without waiting; the at most this
# many steps decoded past the end are trimmed, so the output is as if it checked every step.
EOS_CHECK_EVERY = {"cuda": 8}
# Eager decode steps (real steps, not thrown away) run before the step is captured in a CUDA graph, so lazy
# initialization (cuBLAS handles, Triton compilation and autotuning) happens outside the capture.
GRAPH_WARMUP_STEPS = 3


class _Decoding:
    """What a generation tracks on the device: the tokens produced (in a fixed-size buffer), which rows have
    finished and after how many tokens, which tokens each row has seen (for the repetition penalty), the whole
    rows where the token rules read them, the sampling RNG, and each step's scores and logits where they are asked
    for. `advance(logits)` is the whole per-step update, in place, so it can be part of a CUDA graph; `reset(...)`
    starts a new generation in the same tensors."""

    def __init__(self, prompt_shape: torch.Size, max_new_tokens: int, vocab: int, eos: list[int], pad: int | None,
                 do_sample: bool, seeded: bool, processors: dict, rules: dict, device: torch.device,
                 keep_scores: bool = False, keep_logits: bool = False, guidance_scale: float = 1.0,
                 watermark: tuple | None = None, past_end: int = 0):
        batch, self.prompt_len = prompt_shape
        self.max_new_tokens, self.vocab, self.pad_id = max_new_tokens, vocab, 0 if pad is None else pad
        self.out = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.done_at = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = torch.tensor(self.pad_id, dtype=torch.long, device=device)
        # past_end: columns prompt lookup's drafts may reach past the last new token (see ttl_core.prompt_lookup)
        self.rules = TokenRules(rules, eos, vocab, self.prompt_len, max_new_tokens, device, past_end)
        self.watermark = None if watermark is None else Watermark(watermark, vocab, device)
        self.rows = (torch.zeros(batch, self.prompt_len + max_new_tokens + past_end, dtype=torch.long, device=device)
                     if self.rules.needs_rows or self.watermark is not None else None)
        # a spare last column: see mark_seen
        self.seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device) if self.rules.penalizes else None
        # a seeded call draws from a generator of its own, else from torch's global RNG (which transformers draws from)
        self.generator = (torch.Generator(device=device) if seeded else global_generator(device)) if do_sample else None
        # see check_scores; a graph cannot raise, so the host reads this at the end
        self.scores_ok = torch.ones((), dtype=torch.bool, device=device)
        self.do_sample, self.processors, self.guidance_scale = do_sample, processors, guidance_scale
        self.kept_scores = torch.zeros(max_new_tokens, batch, vocab, device=device) if keep_scores else None
        self.kept_logits = torch.zeros(max_new_tokens, batch, vocab, device=device) if keep_logits else None

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

    def advance(self, logits: torch.Tensor, unconditional_logits: torch.Tensor | None = None) -> None:
        """One step: choose each row's token from the model's `logits` (and, with guidance, those the model gave
        the unconditional context)."""
        seen = None if self.seen is None else self.seen[:, :self.vocab]
        raw = logits = logits.float()
        if unconditional_logits is not None:
            logits = apply_guidance(logits, unconditional_logits, self.guidance_scale)
        if self.rules.active:
            logits = self.rules(logits, self.rows, self.prompt_len + self.column, self.column, seen)
        watermark = None
        if self.watermark is not None:  # eager steps only: it reads each row's seed on the host
            watermark = functools.partial(self.watermark, rows=self.rows[:, :self.prompt_len + int(self.column)])
        scores = process_logits(logits, self.do_sample, watermark=watermark, **self.processors)
        self.check_scores(scores, raw)
        token = sample(scores, self.generator) if self.do_sample else scores.argmax(dim=-1)
        token = torch.where(self.finished, self.pad, token)
        self.record(self.column, token[:, None], scores[None], raw[None])
        self.column.add_(1)
        if self.eos is not None:
            hit = (token[:, None] == self.eos).any(dim=-1) & ~self.finished
            self.done_at.copy_(torch.where(hit, self.column, self.done_at))
            self.finished |= hit
        self.tokens.copy_(token[:, None])

    def record(self, columns: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, raw: torch.Tensor) -> None:
        """Write new `tokens` (rows, n) at `columns` (n,) and, where kept, the `scores` and model logits `raw`
        (n, rows, vocab) they were chosen from."""
        for kept, values in ((self.kept_scores, scores), (self.kept_logits, raw)):
            if kept is not None:
                kept.index_copy_(0, columns, values)
        self.out.index_copy_(1, columns, tokens)
        if self.rows is not None:
            self.rows.index_copy_(1, self.prompt_len + columns, tokens)
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)

    def check_scores(self, scores: torch.Tensor, raw: torch.Tensor) -> None:
        """Note in `scores_ok` whether every row of `scores` (from the model's logits `raw`) has a finite max
        (neither NaN nor +inf nor all -inf): else softmax has no distribution and argmax no answer (a NaN wins it)."""
        if self.do_sample:
            finite = torch.isfinite(scores.amax(dim=-1))
        else:  # argmax has an answer (as transformers') where only the rules put inf: 0 where they left no token
            finite = ~torch.isnan(scores.amax(dim=-1))
            if not self.rules.remove_invalid:  # which asks for the model's NaN and inf to pass
                finite &= torch.isfinite(raw.amax(dim=-1))
        self.scores_ok &= finite.all()

    def kept_steps(self, steps: int) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """(scores, logits) of the first `steps` decoding steps, one (rows, vocab) tensor a step (None where not
        kept), copied out of the buffers the next call reuses."""
        return tuple(None if kept is None else kept[:steps].clone().unbind(0)
                     for kept in (self.kept_scores, self.kept_logits))

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
                 processors: dict, rules: dict, cuda_graph: bool, keep_scores: bool, keep_logits: bool,
                 guidance_scale: float, unconditional_mask: torch.Tensor | None, watermark: tuple | None,
                 lookup: tuple[int, int] | None, assistant: tuple[LlamaForCausalLM, dict] | None):
        self.key, self.lock, self.lookup = key, threading.Lock(), lookup  # lookup: (draft tokens, n-gram size)
        # drafts are verified through the mask, which flash-attn's cache kernel does not read
        self.decoder = KVDecoder(model, attention_mask, max_new_tokens,
                                 flash=False if lookup or assistant else None)
        # classifier-free guidance runs the model a second time, on the unconditional context, in a cache of its own
        self.unconditional = (None if unconditional_mask is None
                              else KVDecoder(model, unconditional_mask, max_new_tokens))
        self.state = _Decoding(input_ids.shape, max_new_tokens, model.config.vocab_size, eos, pad, do_sample, seeded,
                               processors, rules, input_ids.device, keep_scores, keep_logits, guidance_scale,
                               watermark, lookup[0] if lookup else 0)
        self.assistant = None if assistant is None else AssistantDrafts(
            assistant[0], self.state, attention_mask, max_new_tokens, assistant[1], eos)

        # not `self`: no reference cycle holding the caches past their use
        decoder, unconditional, state = self.decoder, self.unconditional, self.state

        def step() -> None:
            state.advance(decoder.step(state.tokens),
                          None if unconditional is None else unconditional.step(state.tokens))

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
def generate(model: LlamaForCausalLM, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
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
             length_penalty: float | None = None, early_stopping: bool | str | None = None,
             output_scores: bool | None = None, output_logits: bool | None = None,
             return_dict_in_generate: bool | None = None, guidance_scale: float | None = None,
             negative_prompt_ids: torch.Tensor | None = None,
             negative_prompt_attention_mask: torch.Tensor | None = None, watermarking_config: Any = None,
             prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
             generation_config: Any = None, prompt_lookup_num_tokens: int | None = None,
             max_matching_ngram_size: int | None = None, assistant_model: LlamaForCausalLM | None = None,
             num_assistant_tokens: int | None = None, num_assistant_tokens_schedule: str | None = None,
             assistant_confidence_threshold: float | None = None,
             use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
             stopping_criteria: Any = None) -> torch.Tensor | GenerateOutput:
    """Continue each prompt row of `input_ids` (batch, seq), left-padded per `attention_mask`, by up to
    `max_new_tokens` tokens; returns (batch * num_return_sequences, seq + new) like transformers'
    `generate()`: the prompts followed by the new tokens, rows that finished early padded with
    `pad_token_id`, and no columns after the step where every row had finished. With `return_dict_in_generate`,
    a `GenerateOutput` holds them, with each step's scores (`output_scores`) and logits (`output_logits`).

    As in transformers, `max_length` and `min_length` count the prompt's columns (left padding included), and
    `max_new_tokens` wins over `max_length`, `min_new_tokens` over `min_length`; until a row has `min_new_tokens`
    new tokens, its EOS ids are never chosen.
    Greedy unless `do_sample`; the processors and their order are transformers' (see `ttl_core.sampling`).
    A decoding setting left None comes, as in transformers, from a `generation_config` passed (a dict or
    transformers' GenerationConfig), else from the checkpoint's generation_config.json (also their `max_length` and
    `min_length`), else from `ttl_core.sampling.DECODING_DEFAULTS`
    (20 new tokens, fewer where the context ends first; greedy; one sequence a prompt; sampling without top-k,
    where transformers' default keeps the top 50). `num_beams` > 1 runs transformers' beam search, or beam sampling
    with `do_sample` (`ttl_core.beam_search`). `guidance_scale` != 1 applies transformers' classifier-free guidance
    (unconditioned on `negative_prompt_ids`, else on each prompt's last token); `watermarking_config` its
    watermark (`ttl_core.watermark`); `prefix_allowed_tokens_fn(prompt index, row so far)` the ids each step may
    choose. `prompt_lookup_num_tokens=k` drafts up to k tokens a step from the row itself, as transformers' prompt
    lookup does (`ttl_core.prompt_lookup`; one row, eagerly); `assistant_model` drafts them with a smaller model of the
    same vocabulary, as transformers' assisted decoding does (`ttl_core.assisted`; one row, eagerly). Checkpoint
    settings ttl does not implement (contrastive search, token healing, ...: `ttl_core.sampling.UNIMPLEMENTED_SETTINGS`)
    are left out with a warning.
    `eos_token_id` (an id or a list, `[]` for none) and `stop_strings` (`[]` for none; the checkpoint's where a
    `tokenizer` is given, as in transformers) finish a row; a stop string matches, as in transformers, where it ends
    within a new token, in the text of the whole row (prompt included, special tokens as their text), which needs
    `tokenizer` (see `ttl_core.streamer.StopStrings`).
    `eos_token_id` and `pad_token_id` default to a passed `generation_config`'s, else to the model's
    `generation_config` (the checkpoint's generation_config.json, else the ids of the config the model was built from,
    as in transformers: a later change to `model.config` is not read); the padding id then to the first EOS id. Without
    `attention_mask`, prompt tokens equal to a padding id that is no EOS id count as padding, as in transformers.
    Sampling draws transformers' tokens: with `seed=s` those it draws after `torch.manual_seed(s)`; without, from
    torch's global RNG where it stands.
    `streamer` (one row only: ttl's `TextStreamer`, or transformers' `TextStreamer`, `TextIteratorStreamer` or
    any `BaseStreamer`) gets, as from transformers, `put()` with the prompt, then with each new token as it is
    produced (CPU LongTensors), then `end()`, also when the call fails. On CUDA the decode step runs as a CUDA
    graph unless `cuda_graph=False`. The last call's KV cache, buffers and graph stay with the model until it is
    freed or called with other shapes or settings: a repeated call allocates and captures nothing. `use_cache` is
    taken, as code written for transformers passes it, and changes nothing: transformers' tokens are the same
    either way, and ttl always decodes from its cache. `inputs_embeds` are prefilled in place of the prompt ids (see
    `ttl_core.prompt_embeds`); `stopping_criteria` are asked after each token (`ttl_core.streamer.HostWatch`)."""
    try:
        if not hasattr(model, "lm_head"):
            raise GenerationError(f"generation needs a causal LM, got {type(model).__name__}")
        if not (use_cache is None or isinstance(use_cache, bool)):
            raise GenerationError(f"use_cache must be True, False or None, got {use_cache!r}")
        prompt_len = prompt_length(input_ids, inputs_embeds)
        passed = passed_generation_config(generation_config)
        saved = {**(model.generation_config or {}), **passed} if passed else model.generation_config
        settings = decoding_settings(saved, prompt_len, model.config.max_position_embeddings,
                                     max_length, min_length, passed=passed, max_new_tokens=max_new_tokens,
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
                                     length_penalty=length_penalty, early_stopping=early_stopping,
                                     return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                                     output_logits=output_logits, guidance_scale=guidance_scale,
                                     watermarking_config=watermarking_config,
                                     prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                                     max_matching_ngram_size=max_matching_ngram_size)
        max_new_tokens, do_sample, num_return_sequences, max_time, num_beams, length_penalty, early_stopping = (
            settings.pop(name) for name in ("max_new_tokens", "do_sample", "num_return_sequences", "max_time",
                                            "num_beams", "length_penalty", "early_stopping"))
        outputs = {name: settings.pop(name) for name in ("return_dict_in_generate", "output_scores", "output_logits")}
        guidance_scale = settings.pop("guidance_scale")
        lookup = settings.pop("prompt_lookup_num_tokens"), settings.pop("max_matching_ngram_size")
        try:
            watermark = checked_watermark(settings.pop("watermarking_config"))
        except GenerationError as e:  # name where a bad configuration came from
            source = ("" if watermarking_config is not None else "generation_config: "
                      if "watermarking_config" in passed else "generation_config.json: ")
            raise GenerationError(f"{source}{e}") from None
        given = {"stop_strings"} if stop_strings is not None or tokenizer is not None else set()
        ignored = unimplemented_settings(saved, given)
        if ignored:
            whose = "the generation_config passed or " if passed else ""
            warnings.warn(f"{whose}the checkpoint's generation_config.json sets {', '.join(ignored)}, which ttl's "
                          "generate() does not implement: it decodes as if they were unset, unlike transformers' "
                          "generate()", stacklevel=3)  # the caller of generate(), past torch.no_grad's wrapper
        eos, pad = special_token_ids(model, eos_token_id, pad_token_id, passed)
        rules = {name: settings.pop(name) for name in TOKEN_RULE_SETTINGS}
        check_beam_arguments(num_beams, length_penalty, early_stopping, num_return_sequences)
        check_sampling_arguments(do_sample, num_return_sequences=num_return_sequences, max_time=max_time,
                                 num_beams=num_beams, repetition_penalty=rules["repetition_penalty"], **settings,
                                 **outputs)
        as_dict = outputs["return_dict_in_generate"]
        keep_scores, keep_logits = as_dict and outputs["output_scores"], as_dict and outputs["output_logits"]
        rules = checked_token_rules(rules, model.config.vocab_size)
        if prefix_allowed_tokens_fn is not None:
            if not callable(prefix_allowed_tokens_fn):
                raise GenerationError(f"prefix_allowed_tokens_fn must be a function (prompt index, row so far) -> "
                                      f"allowed ids, got a {type(prefix_allowed_tokens_fn).__name__}")
            rules["prefix_allowed_tokens_fn"] = (prefix_allowed_tokens_fn, max(num_beams, num_return_sequences))
        readers = {"beam search": num_beams > 1, "guidance": guidance_scale != 1,
                   "prompt lookup": lookup[0] is not None, "assistant_model": assistant_model is not None}
        input_ids, mask, inputs_embeds = checked_prompt(model, input_ids, attention_mask, max_new_tokens, eos, pad,
                                                        inputs_embeds, readers)
        unconditional = unconditional_inputs(model, input_ids, guidance_scale, negative_prompt_ids,
                                             negative_prompt_attention_mask, max_new_tokens)
        stops, criteria = stop_string_matcher(saved, stop_strings, tokenizer), checked_criteria(stopping_criteria)
        if (stops is not None or criteria) and pad is None:
            raise GenerationError(f"{'stopping_criteria' if stops is None else 'stop_strings'} need a pad_token_id (or "
                                  "an eos_token_id) to pad finished rows")
        if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**63):
            raise GenerationError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        deadline = None if max_time is None else time.monotonic() + max_time
        lookup = checked_lookup(*lookup, max_matching_ngram_size is not None, input_ids.shape[0], num_beams,
                                num_return_sequences, guidance_scale, watermark)
        drafting = dict(num_assistant_tokens=num_assistant_tokens,
                        num_assistant_tokens_schedule=num_assistant_tokens_schedule,
                        assistant_confidence_threshold=assistant_confidence_threshold)
        drafting = assistant_settings(assistant_model, model, drafting, input_ids.shape[1] + max_new_tokens,
                                      input_ids.shape[0], num_beams, num_return_sequences, guidance_scale, watermark,
                                      lookup)
        assistant = None if drafting is None else (assistant_model, drafting)
        if num_beams > 1:
            if streamer is not None or stops is not None or criteria:  # transformers refuses a streamer there too
                raise GenerationError("beam search (num_beams > 1) takes no streamer, stop strings or "
                                      "stopping_criteria")
            input_ids, mask = input_ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
            guidance = None
            if unconditional is not None:
                ids, uncond_mask = (t.repeat_interleave(num_beams, 0) for t in unconditional)
                guidance = (guidance_scale, KVDecoder(model, uncond_mask, max_new_tokens), ids)
            found = beam_search(KVDecoder(model, mask, max_new_tokens), input_ids, mask, max_new_tokens, eos, pad,
                                do_sample, seed, settings, rules, num_beams, length_penalty, early_stopping,
                                num_return_sequences, deadline, keep_scores, keep_logits, guidance, watermark)
            return GenerateOutput(*found) if as_dict else found[0]
        input_ids, mask = (t.repeat_interleave(num_return_sequences, dim=0) for t in (input_ids, mask))
        inputs_embeds = None if inputs_embeds is None else inputs_embeds.repeat_interleave(num_return_sequences, 0)
        if unconditional is not None:
            unconditional = tuple(t.repeat_interleave(num_return_sequences, dim=0) for t in unconditional)
        if streamer is not None and input_ids.shape[0] != 1:
            raise GenerationError(f"a streamer follows one sequence; this call generates {input_ids.shape[0]}")
        device = input_ids.device
        # not under autocast: a graph kept for later calls would read weight casts that autocast frees at its exit
        graphed = (cuda_graph and device.type == "cuda" and autocast_dtype("cuda") is None and watermark is None
                   and prefix_allowed_tokens_fn is None and lookup is None and assistant is None)  # host code a step
        unconditional_shape = None if unconditional is None else tuple(unconditional[0].shape)
        key = ((input_ids.shape[1], *mask.shape), max_new_tokens, device, do_sample, seed is not None,
               tuple(settings.values()), tuple(rules.values()), tuple(eos), pad, graphed, keep_scores, keep_logits,
               guidance_scale, unconditional_shape, watermark, lookup, _forward_fingerprint(model),
               None if assistant is None else (tuple(drafting.values()), _forward_fingerprint(assistant_model)))
        session = _acquire_session(model, key, lambda: _Session(
            key, model, input_ids, mask, max_new_tokens, eos, pad, do_sample, seed is not None, settings, rules,
            graphed, keep_scores, keep_logits, guidance_scale, None if unconditional is None else unconditional[1],
            watermark, lookup, assistant))
        try:
            watch = host_watch(session.state, input_ids, streamer, stops, criteria)  # before the prefill
            sequences = _run(session, input_ids, mask, max_new_tokens, seed, watch, bool(eos or stops or criteria),
                             deadline, unconditional, eos, inputs_embeds)
            if not as_dict:
                return sequences
            return GenerateOutput(sequences, *session.state.kept_steps(sequences.shape[1] - input_ids.shape[1]))
        finally:
            session.lock.release()
    finally:  # on errors too: a thread iterating the streamer would wait forever for its end
        if streamer is not None:
            streamer.end()


def _run(session: _Session, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, seed: int | None,
         watch: HostWatch | None, can_finish: bool, deadline: float | None,
         unconditional: tuple[torch.Tensor, torch.Tensor] | None, eos: list[int],
         inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill (also guidance's `unconditional` ids and mask), then decode until every row has finished,
    `max_new_tokens` are out or the `deadline` (of time.monotonic(), checked after each token as transformers'
    max_time is, or each prompt-lookup step) has passed; `watch` (or None) sees each step's new tokens."""
    decoder, state = session.decoder, session.state
    decoder.reset(mask)
    state.reset(input_ids, mask[:, mask.shape[1] - input_ids.shape[1]:], seed)  # no columns where only embedded
    unconditional_logits = None
    if unconditional is not None:
        session.unconditional.reset(unconditional[1])
        unconditional_logits = session.unconditional.prefill(unconditional[0])
    if session.assistant is not None:
        session.assistant.start(input_ids, mask)
    if session.lookup is not None or session.assistant is not None:
        drafts = session.assistant or LookupDrafts(state, *session.lookup, eos)
        produced = drafted_decode(decoder, state, input_ids, drafts, eos, watch, deadline)
    else:
        state.advance(decoder.prefill(input_ids, inputs_embeds), unconditional_logits)
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
        if state.rules.blocks and (state.do_sample or state.processors["renormalize_logits"]):  # else greedy picks 0
            cause += (", or the token rules (min_new_tokens, no_repeat_ngram_size, bad_words_ids, ...) left no token"
                      + ("" if state.do_sample else " (NaN once renormalize_logits log-softmaxes it)"))
        if state.do_sample and state.guidance_scale != 1:  # scale * (log-probability difference) may overflow
            cause += f", or guidance_scale {state.guidance_scale} did"
        if state.rules.sequence_bias is not None:
            cause += ", or sequence_bias put inf in them (inf - inf is NaN; inf has no probability)"
        if state.rules.decay_eos is not None:
            cause += ", or exponential_decay_length_penalty grew the EOS scores past float32"
        if state.watermark is not None and not abs(state.watermark.bias) < torch.finfo(torch.float32).max:
            cause += f", or watermarking_config's bias {state.watermark.bias} took them to inf or NaN"
        raise GenerationError(f"{'sampling' if state.do_sample else 'greedy decoding'} met scores with no "
                              f"distribution (NaN or inf): {cause}")
    length = min(produced, int(state.done_at.max())) if can_finish else produced
    return torch.cat([input_ids, state.out[:, :length]], dim=1)
