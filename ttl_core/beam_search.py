"""Beam search (`generate(num_beams=k)`), step for step as transformers' `generate()` runs it (its vectorized
beam search of release 5), over ttl's static KV cache.

Each prompt runs as k rows. A step scores every continuation of every running beam (its summed log-probability,
after the same processors as greedy decoding, applied to log-probabilities as transformers applies them), keeps the
best `max(2, 1 + #EOS ids) * k` of each prompt, lets the best k that did not stop (at an EOS id, the length limit or
`max_time`) run on, and files those that stopped among the k best finished hypotheses, scored by their summed
log-probability over (new tokens) ** length_penalty. The cache rows follow their beams. The loop ends as
transformers' does: when no running beam can still beat a finished one (`early_stopping` picks the heuristic),
when every beam has finished under `early_stopping=True`, or when every continuation stopped.
"""

from __future__ import annotations

import functools
import time

import torch

from .config import SIZE_LIMIT
from .errors import GenerationError, is_integer, is_number
from .kv_cache import KVDecoder
from .sampling import apply_guidance, global_generator, mark_seen, process_logits
from .token_rules import TokenRules
from .watermark import Watermark

_NEVER = -1.0e9  # transformers' score for "not a candidate"; its arithmetic is copied, so the order is too


def check_beam_arguments(num_beams: int, length_penalty: float, early_stopping: bool | str,
                         num_return_sequences: int) -> None:
    """Raise a GenerationError naming the first beam-search setting that is out of range or not implemented."""
    if not is_integer(num_beams) or not 1 <= num_beams < SIZE_LIMIT:  # its rows' origins are int32s
        raise GenerationError(f"num_beams must be an integer in [1, 2**31), got {num_beams!r}")
    if not is_number(length_penalty):
        raise GenerationError(f"length_penalty must be a number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):  # 1 == True, but the search tests `is True`
        raise GenerationError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise GenerationError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({num_beams})")


def beam_search(decoder: KVDecoder, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int],
                pad: int | None, do_sample: bool, seed: int | None, processors: dict, rules: dict, num_beams: int,
                length_penalty: float, early_stopping: bool | str, num_return_sequences: int,
                deadline: float | None, keep_scores: bool = False, keep_logits: bool = False,
                guidance: tuple | None = None, watermark: tuple | None = None) -> tuple:
    """The `num_return_sequences` best finished beams of each prompt row of `input_ids` (batch, seq), already
    repeated `num_beams` times each, as `decoder` (a `KVDecoder` over those rows) continues them, (batch *
    num_return_sequences, seq + new) like transformers' `generate()`; returned with what transformers' beam output
    holds beside them: each step's processed log-probabilities (with `keep_scores`, else None) and logits (with
    `keep_logits`), each returned beam's score (with `keep_scores`) and the beam rows its tokens came from. With
    `do_sample`, each step samples its candidates (without replacement, from the softmax of their summed scores)
    instead of taking the best, from a generator seeded with `seed`, else from torch's global one, as transformers'
    beam sampling does. `guidance` (scale, a `KVDecoder` over the unconditional rows, their ids) applies
    classifier-free guidance as transformers does with beams: its unconditional rows go on with the tokens of the
    beams that run on in their place, without following them (so their context mixes the beams'). `watermark` (the
    settings of `ttl_core.watermark.checked_watermark`) marks each step's log-probabilities as transformers does."""
    rows, prompt_len = input_ids.shape
    batch, device, vocab = rows // num_beams, input_ids.device, decoder.model_ref().config.vocab_size
    max_length = prompt_len + max_new_tokens
    keep = _candidate_count(num_beams, len(eos), vocab)
    length_penalty = _checked_length_penalty(length_penalty, max_new_tokens)
    running = torch.full((batch, num_beams, max_length), _padding_id(eos, pad), dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids.view(batch, num_beams, prompt_len)
    finished_sequences = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEVER  # the beams start as copies: only the first one may be extended at first
    finished_scores = torch.full((batch, num_beams), _NEVER, device=device)
    finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    # the flattened row each beam came from at each new position (-1: not generated), to reorder the cache with
    running_origins = torch.full((batch, num_beams, max_new_tokens), -1, dtype=torch.int32, device=device)
    finished_origins = running_origins.clone()
    first_k = torch.arange(keep, device=device) < num_beams
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    token_rules = TokenRules(rules, eos, vocab, prompt_len, max_new_tokens, device)
    watermark = None if watermark is None else Watermark(watermark, vocab, device)
    # as transformers, the warpers keep a token more than there are EOS ids, so that a beam can go on (where the
    # model has no EOS id at all, transformers keeps 2; ttl cannot tell that from eos_token_id=[] and keeps 1)
    processors = {**processors, "min_tokens_to_keep": len(eos) + 1}
    generator = None
    if do_sample:
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else global_generator(device)
    real = torch.cat([mask.bool(), torch.ones(rows, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    row_offsets = torch.arange(batch, device=device)[:, None] * num_beams

    kept_scores, kept_logits = [], []
    logits = decoder.prefill(input_ids)
    unconditional_logits = None if guidance is None else guidance[1].prefill(guidance[2])
    for cur_len in range(prompt_len, max_length):
        step = torch.full((1,), cur_len - prompt_len, device=device)
        flat = running.view(rows, max_length)
        log_probs = logits.float().log_softmax(dim=-1)
        if guidance is not None:
            log_probs = apply_guidance(log_probs, unconditional_logits, guidance[0])
        if token_rules.active:
            seen = None
            if token_rules.penalizes:  # the tokens of each beam so far, left padding excluded
                seen = torch.empty(rows, vocab + 1, dtype=torch.bool, device=device)
                seen = mark_seen(seen, flat[:, :cur_len], real[:, :cur_len])[:, :vocab]
            log_probs = token_rules(log_probs, flat, step + prompt_len, step, seen)
        marked = None if watermark is None else functools.partial(watermark, rows=flat[:, :cur_len])
        log_probs = process_logits(log_probs, do_sample, watermark=marked, **processors)
        if keep_scores:
            kept_scores.append(log_probs.clone())
        if keep_logits:
            kept_logits.append(logits.float().clone())
        totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = _top_candidates(totals, keep, generator, cur_len - prompt_len)
        top_beams, top_tokens = top_index // vocab, top_index % vocab
        top_sequences = torch.take_along_dim(running, top_beams[..., None], dim=1)
        top_sequences[:, :, cur_len] = top_tokens
        top_origins = torch.take_along_dim(running_origins, top_beams[..., None], dim=1)
        top_origins[:, :, cur_len - prompt_len] = top_beams + row_offsets
        stopped = torch.isin(top_tokens, eos_ids)
        if cur_len + 1 >= max_length or (deadline is not None and time.monotonic() > deadline):
            stopped = torch.ones_like(stopped)

        # the best k continuations that did not stop run on
        candidates = top_scores + stopped.to(torch.float32) * _NEVER
        next_index = torch.topk(candidates, k=num_beams)[1]
        running = torch.take_along_dim(top_sequences, next_index[..., None], dim=1)
        running_scores = torch.take_along_dim(candidates, next_index, dim=1)
        running_origins = torch.take_along_dim(top_origins, next_index[..., None], dim=1)

        # those of the first k that stopped join the finished hypotheses, if they beat one
        just_finished = stopped & first_k[None, :]
        scores = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        scores += (torch.all(finished, dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * _NEVER
        scores += (~improvable).to(torch.float32) * _NEVER
        scores += (~just_finished) * _NEVER
        merged_scores = torch.cat((finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        finished_sequences = torch.take_along_dim(torch.cat((finished_sequences, top_sequences), 1), best[..., None], 1)
        finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        finished_origins = torch.take_along_dim(torch.cat((finished_origins, top_origins), 1), best[..., None], 1)
        finished = torch.take_along_dim(torch.cat((finished, just_finished), dim=1), best, dim=1)

        new_tokens = cur_len + 1 - prompt_len
        hoped = max_length - prompt_len if early_stopping == "never" and length_penalty > 0.0 else new_tokens
        best_running = running_scores[:, :1] / (hoped ** length_penalty)
        worst_finished = torch.where(finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEVER)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        # topk ranks NaN first, where greedy decoding refuses it; read where the step waits on the host anyway, after
        # its work is queued (the step's results are dropped)
        if not do_sample and bool(totals.isnan().any()):
            raise GenerationError(f"beam search met NaN scores at new token {cur_len - prompt_len + 1}: "
                                  "renormalize_logits log-softmaxes a row the token rules left no token, or one with "
                                  "+inf (exponential_decay_length_penalty past float32, an infinite sequence_bias), to "
                                  "NaN, or the model's logits hold NaN")
        open_beams = not (bool(finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(stopped.all())):
            break
        source_rows = running_origins[..., cur_len - prompt_len].reshape(-1)
        for store in decoder.cache.keys + decoder.cache.values:  # the cache rows follow their beams
            store.copy_(store.index_select(0, source_rows))
        logits = decoder.step(running[:, :, cur_len].reshape(rows, 1))
        if guidance is not None:
            unconditional_logits = guidance[1].step(running[:, :, cur_len].reshape(rows, 1))

    sequences = finished_sequences[:, :num_return_sequences].reshape(-1, max_length)
    origins = finished_origins[:, :num_return_sequences].reshape(-1, max_new_tokens)
    new_tokens = int((origins + 1).bool().sum(dim=1).max())
    return (sequences[:, :prompt_len + new_tokens], tuple(kept_scores) if keep_scores else None,
            tuple(kept_logits) if keep_logits else None,
            finished_scores[:, :num_return_sequences].reshape(-1) if keep_scores else None, origins[:, :new_tokens])


def _candidate_count(num_beams: int, num_eos: int, vocab: int) -> int:
    """How many continuations each prompt keeps a step: as transformers, enough that `num_beams` run on even if
    every EOS id is among the best."""
    keep = max(2, 1 + num_eos) * num_beams
    if keep > num_beams * vocab:
        raise GenerationError(f"beam search keeps (1 + {num_eos} EOS ids) * {num_beams} beams = {keep} candidates, "
                              f"more than the {num_beams * vocab} there are")
    return keep


def _checked_length_penalty(length_penalty: float, max_new_tokens: int) -> float:
    """`length_penalty` as a float, refused where the largest length divisor it makes overflows one."""
    try:
        float(max_new_tokens) ** float(length_penalty)
    except OverflowError:
        raise GenerationError(f"length_penalty {length_penalty!r} is too large: (new tokens) ** length_penalty "
                              f"overflows a float at {max_new_tokens} new tokens") from None
    return float(length_penalty)  # an int's power of the length would be an int too large for a tensor


def _padding_id(eos: list[int], pad: int | None) -> int:
    """The id that pads short beams and the finished slots no beam filled. Transformers pads with the padding id,
    or the first EOS id where the padding id is 0 or None. Where transformers pads with -1, no token id (no EOS
    ids at all), or fails (an empty list, a padding id of 0), the padding id pads (docs/generation.md): -1 only
    where there is neither."""
    return eos[0] if eos and not pad else -1 if pad is None else pad


def _top_candidates(totals: torch.Tensor, keep: int, generator: torch.Generator | None,
                    new_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` continuations (score, index into beam * vocab) of each prompt's `totals`, best first: the top
    scores, or with a `generator` (beam sampling) drawn as transformers' torch.multinomial without replacement
    draws them, the top `keep` of p / Exp(1). `new_token` (from 0) names the step in the error."""
    if generator is None:
        return torch.topk(totals, keep)
    if not bool(torch.isfinite(totals.amax(dim=-1)).all()):  # transformers' torch.multinomial raises too
        raise GenerationError(f"beam sampling met scores with no distribution (NaN or inf) at new token "
                              f"{new_token + 1}: the model's logits, or the settings (a large "
                              "exponential_decay_length_penalty, token rules that leave no token) made them")
    race = torch.empty_like(totals).exponential_(generator=generator)
    top_index = torch.topk(totals.softmax(dim=-1) / race, keep)[1]
    top_scores, order = totals.gather(1, top_index).sort(dim=-1, descending=True)
    return top_scores, top_index.gather(1, order)
