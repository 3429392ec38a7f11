"""The decoding machinery under `ttl_core.generate`: the state one generation keeps on the device, the decode step
as a CUDA graph, and the session (decoder, state, graphed step) a model keeps for its next call.

Every tensor a decode step touches is preallocated with a fixed shape and address: the per-layer keys and values, the
attention mask over the whole cache, the positions, the output buffer and the RNG. So on CUDA the step (model
forward, logits processors, sampling and bookkeeping) is captured once in a CUDA graph and replayed, and the host
only launches graphs; it reads the device back only for the end-of-sequence check every few steps (or every step
when a streamer or stop strings need the new tokens on the host). The last session stays with the model, so a
repeated call of the same shapes and settings allocates and captures nothing.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import weakref
from typing import Callable

import torch

from .assisted import AssistantDrafts
from .errors import GenerationError
from .kv_cache import KVDecoder
from .model import LlamaForCausalLM, autocast_dtype
from .prompt_lookup import LookupDrafts, decode as drafted_decode
from .sampling import apply_guidance, global_generator, mark_seen, process_logits, sample
from .streamer import HostWatch
from .token_rules import TokenRules
from .watermark import Watermark


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


class DecodeSession:
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


# model -> its last DecodeSession (weak keys: a cached session never keeps a model alive)
_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_fingerprint(model: LlamaForCausalLM) -> tuple:
    """What a session bakes in besides the contents of tensors: every module's identity and plain settings
    (training mode, a LoRA layer's `merged` flag and scale, ...), every parameter's and buffer's address, the
    kernel and attention choices of the environment, autocast's dtype (the cache's) and inference mode (whose
    tensors may not be updated outside it). A session is reused only while these are unchanged."""
    settings = tuple((id(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))
                     for m in model.modules())
    environment = (os.environ.get("TTL_KERNELS"), os.environ.get("TTL_ATTENTION"),
                   autocast_dtype(model.lm_head.weight.device.type), torch.is_inference_mode_enabled())
    return settings + environment + tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def acquire_session(model: LlamaForCausalLM, key: tuple, build: Callable[[], DecodeSession]) -> DecodeSession:
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


def run_session(session: DecodeSession, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                seed: int | None, watch: HostWatch | None, can_finish: bool, deadline: float | None,
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
