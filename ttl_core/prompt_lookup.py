"""Prompt-lookup decoding (`generate(prompt_lookup_num_tokens=k)`), step for step as transformers' assisted decoding
runs it with its `PromptLookupCandidateGenerator`.

Each step drafts up to k tokens by finding the row's last n-gram earlier in the row (n from `max_matching_ngram_size`
down to 1, the leftmost match first) and copying what followed it; the model scores the row's newest token and the
drafts in one pass over the KV cache (`KVDecoder.verify`), every position gets the processors as if it were a step of
its own, and the step keeps the drafts up to the first one the model would not have chosen (its argmax, or with
`do_sample` one draw over all positions at once) plus the model's own token there. Greedy rows are plain greedy
decoding's (up to the rounding of a pass over several tokens); sampled ones follow transformers' draws, which differ
from plain sampling's. One row only, decoded eagerly: each step needs the drafts and the accepted count on the host.
`decode` takes its drafts from any source; assisted decoding's draft model (`ttl_core.assisted`) is the other one.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .errors import GenerationError, is_integer
from .kv_cache import KVDecoder
from .sampling import draw, process_logits, sample


def checked_lookup(num_tokens: Any, max_ngram: Any, ngram_given: bool, rows: int, num_beams: int,
                   num_return_sequences: int, guidance_scale: float, watermark: Any) -> tuple[int, int] | None:
    """(draft tokens, largest n-gram) of a prompt-lookup call, None without `num_tokens`; a GenerationError naming
    what it cannot run with (`ngram_given`: the call itself passed `max_ngram`; `rows`: prompt rows)."""
    if num_tokens is None:
        if ngram_given:
            raise GenerationError("max_matching_ngram_size takes effect only with prompt_lookup_num_tokens")
        return None
    for name, value in (("prompt_lookup_num_tokens", num_tokens), ("max_matching_ngram_size", max_ngram)):
        if value is not None and not (is_integer(value) and value >= 1):
            raise GenerationError(f"{name} must be a positive integer, got {value!r}")
    check_one_row("prompt lookup (prompt_lookup_num_tokens)", rows, num_beams, num_return_sequences, guidance_scale,
                  watermark)
    return num_tokens, max_ngram or 2  # transformers' default n-gram size


def check_one_row(what: str, rows: int, num_beams: int, num_return_sequences: int, guidance_scale: float,
                  watermark: Any) -> None:
    """A GenerationError where a drafting decoder (`what`) is asked for what it cannot run with."""
    if num_beams > 1:
        raise GenerationError(f"{what} does not run with beam search (num_beams > 1)")
    if rows != 1 or num_return_sequences != 1:  # transformers refuses both
        raise GenerationError(f"{what} decodes one sequence, got {rows} prompt rows and "
                              f"num_return_sequences={num_return_sequences}")
    if guidance_scale != 1 or watermark is not None:
        raise GenerationError(f"ttl's {what} takes no classifier-free guidance (guidance_scale) or watermarking_config")


def processed_scores(state: Any, logits: torch.Tensor, row: list[int], drafted: list[int]) -> torch.Tensor:
    """`logits` (1, vocab) after every processor, for the token after `row` followed by `drafted` tokens: what
    transformers' processors make of them with those tokens as the row so far (written into `state.rows`, where
    the rules read it)."""
    length = len(row) + len(drafted)
    if state.rows is not None and drafted:
        state.rows[0, len(row):length] = torch.tensor(drafted)
    scores = logits.float()
    if state.rules.active:
        seen = None
        if state.seen is not None:
            seen = state.seen.clone()
            seen[0, drafted] = True
            seen = seen[:, :state.vocab]
        step = torch.tensor([length - state.prompt_len], device=scores.device)
        scores = state.rules(scores, state.rows, step + state.prompt_len, step, seen)
    return process_logits(scores, state.do_sample, **state.processors)


def draft(state: Any, row: list[int], num_tokens: int, max_ngram: int, max_length: int, eos: list[int]) -> list[int]:
    """The tokens transformers' PromptLookupCandidateGenerator proposes after `row` (prompt included): those after
    the leftmost earlier occurrence of its last n tokens, n from `max_ngram` down to 1, at most `num_tokens` of them
    and none past the row's current end or `max_length`; cut before the first one the processors forbid (-inf, or
    float32's lowest, on all-ones logits), then before the first EOS id. A match whose first token is forbidden
    gives way to the next; none where one more token reaches `max_length`."""
    length = len(row)
    if length + 1 == max_length:
        return []
    checks = state.rules.blocks or state.do_sample or state.rules.remove_invalid  # else nothing can be forbidden
    ones = torch.ones(1, state.vocab, device=state.out.device)
    lowest = torch.finfo(torch.float32).min
    # by drafted tokens: in a repetitive row many matches propose the same ones, and every match's first token is
    # checked against the same row; transformers runs the processors again for each match
    forbidden: dict[tuple[int, ...], bool] = {}
    for size in range(min(max_ngram, length - 1), 0, -1):
        tail = row[-size:]
        for start in range(length - size + 1):
            begin = start + size
            end = min(begin + num_tokens, length, max_length)
            if row[start:begin] != tail or begin >= end:
                continue
            chosen = row[begin:end]
            for i in range(len(chosen) if checks else 0):
                key = tuple(chosen[:i + 1])
                if key not in forbidden:
                    score = float(processed_scores(state, ones, row, chosen[:i])[0, chosen[i]])
                    forbidden[key] = score in (float("-inf"), lowest)
                if forbidden[key]:
                    chosen = chosen[:i]
                    break
            if not chosen:
                continue
            return next((chosen[:i] for i, token in enumerate(chosen) if token in eos), chosen)
    return []


class LookupDrafts:
    """Prompt lookup as a draft source for `decode`: drafts from the row itself, no draft scores."""

    def __init__(self, state: Any, num_tokens: int, max_ngram: int, eos: list[int]):
        self.state, self.num_tokens, self.max_ngram, self.eos = state, num_tokens, max_ngram, eos

    def propose(self, row: list[int], max_length: int) -> tuple[list[int], None]:
        """The `draft` after `row`, and no draft scores."""
        return draft(self.state, row, self.num_tokens, self.max_ngram, max_length, self.eos), None

    def kept(self, count: int) -> None:
        """`count` of the drafts were kept: nothing to roll back here."""


def decode(decoder: KVDecoder, state: Any, input_ids: torch.Tensor, drafts: Any, eos: list[int], watch: Any,
           deadline: float | None) -> int:
    """Decode `input_ids` (one row) into `state` (ttl_core.decode_session's decoding state, reset, with rows as long as
    any draft reaches) over `decoder` (reset), each step verifying the tokens `drafts.propose(row, max_length)`
    returns (a list, and the draft model's processed scores for them or None) and telling `drafts.kept(count)` how
    many were kept; `watch` (or None) gets each step's accepted tokens. Returns the number of new tokens."""
    row = input_ids[0].tolist()
    max_length = len(row) + state.max_new_tokens
    head = decoder.prefill(input_ids)[:, None]  # the first step's pass is the prefill's, as in transformers
    produced = 0
    while True:
        drafted, draft_scores = drafts.propose(row, max_length)
        budget = max_length - len(row)
        verified = drafted[:budget - 1]  # the model need not score drafts that could never be kept
        fed = ([] if head is not None else row[-1:]) + verified
        logits = decoder.verify(torch.tensor([fed], device=input_ids.device)) if fed else head
        if head is not None and fed:
            logits = torch.cat([head, logits], dim=1)
        raw = logits[0].float()
        scores = torch.cat([processed_scores(state, raw[i:i + 1], row, drafted[:i]) for i in range(len(verified) + 1)])
        if state.do_sample and draft_scores is not None:
            matches, chosen = speculative_sampling(scores, draft_scores, drafted, state.generator)
        else:
            # transformers draws all draft positions at once, including those past the budget
            padded = torch.cat([scores, scores.new_zeros(len(drafted) - len(verified), scores.shape[1])])
            chosen = (sample(padded, state.generator) if state.do_sample else padded.argmax(dim=-1)).tolist()
            matches = next((i for i, token in enumerate(drafted) if token != chosen[i]), len(drafted))
        accepted = chosen[:matches + 1][:budget]
        accepted = next((accepted[:i + 1] for i, token in enumerate(accepted) if token in eos), accepted)
        decoder.accept(len(fed) - len(verified) + len(accepted) - 1)
        drafts.kept(min(matches, len(accepted)))
        count = len(accepted)
        state.check_scores(scores[:count], raw[:count])
        columns = torch.arange(produced, produced + count, device=state.out.device)
        tokens = torch.tensor([accepted], device=state.out.device)
        state.record(columns, tokens, scores[:count, None], raw[:count, None])
        row += accepted
        produced += count
        if accepted[-1] in eos:
            state.finish_row(0, produced)
        if watch is not None:
            watch(produced, count)
        head = None
        if bool(state.finished[0]) or produced == state.max_new_tokens or (
                deadline is not None and time.monotonic() > deadline):
            return produced


def speculative_sampling(scores: torch.Tensor, draft_scores: torch.Tensor, drafted: list[int],
                         generator: torch.Generator | None) -> tuple[int, list[int]]:
    """(drafts kept, the kept drafts and one token more) as transformers' `_speculative_sampling` chooses them from
    the model's processed `scores` (one row a draft and one more) and the draft model's `draft_scores` (one a draft),
    with its draws: keep draft i with probability min(1, p_i / q_i) (one uniform draw a draft), then draw from
    max(0, p - q) renormalized at the first rejection, or from p after the last draft."""
    p, q = scores.softmax(dim=-1), draft_scores.softmax(dim=-1)
    index = torch.arange(len(drafted), device=scores.device)
    ids = torch.tensor(drafted, device=scores.device)
    accepted = torch.rand(len(drafted), generator=generator, device=scores.device) < p[index, ids] / q[index, ids]
    matches = int((~accepted).cumsum(dim=-1).lt(1).sum())
    following = p[matches]
    if matches < len(drafted):
        following = (following - q[matches]).clamp_min(0)
        following = following / following.sum()
    return matches, drafted[:matches] + draw(following[None], generator).tolist()
