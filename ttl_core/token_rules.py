"""transformers' logits processors that act on scores by what a row holds so far or by its length, in
transformers' order: sequence_bias, the repetition penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens (and
min_length), prefix_allowed_tokens_fn, forced_bos_token_id, forced_eos_token_id, remove_invalid_values,
exponential_decay_length_penalty, suppress_tokens and begin_suppress_tokens. The warpers that follow them when
sampling are in `ttl_core.sampling`.

Everything is set up once per decoding session in fixed-shape tensors: a step is device work only, so it can be
captured in a CUDA graph, except with a `prefix_allowed_tokens_fn`, which the host calls for each row.
"""

from __future__ import annotations

import math

import torch

from .errors import GenerationError

# decoding settings (see ttl_core.sampling.DECODING_DEFAULTS) that TokenRules applies
TOKEN_RULE_SETTINGS = ("sequence_bias", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                       "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                       "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the scores of tokens marked in `seen` (batch, vocab) are divided by
    `penalty` when positive and multiplied by it when negative."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def _decay_factor(factor: float, power: int) -> float:
    """factor ** power - 1, +-inf past the float range (where transformers' own Python power overflows)."""
    try:
        return factor ** power - 1
    except OverflowError:
        return -math.inf if factor < 0 and power % 2 else math.inf


class _SequenceBias:
    """Adds `bias` to a token's score where it would complete its sequence: always for one-token sequences, and
    where a row ends with the rest of the sequence for longer ones (its left padding counts, as in transformers).
    Sequences are grouped by length as transformers groups them, so the bias adds up in its order."""

    def __init__(self, sequences: dict[tuple[int, ...], float], vocab: int, device: torch.device):
        self.single = torch.zeros(vocab, dtype=torch.float, device=device)
        singles = [(ids[0], bias) for ids, bias in sequences.items() if len(ids) == 1]
        if singles:
            self.single[[i for i, _ in singles]] = torch.tensor([bias for _, bias in singles], device=device)
        by_prefix_length: dict[int, list] = {}
        for ids, bias in sequences.items():
            if len(ids) > 1:
                by_prefix_length.setdefault(len(ids) - 1, []).append((ids, bias))
        self.groups = [(torch.tensor([ids[:-1] for ids, _ in group], device=device),
                        torch.tensor([ids[-1] for ids, _ in group], device=device),
                        torch.tensor([bias for _, bias in group], dtype=torch.float, device=device),
                        torch.arange(-(len(group[0][0]) - 1), 0, device=device))
                       for group in by_prefix_length.values()]

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor | None, length: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores) + self.single
        for prefixes, last_tokens, biases, offsets in self.groups:
            tails = rows.index_select(1, (length + offsets).clamp_min(0))  # each row's last len(prefix) tokens
            matches = (tails[:, None] == prefixes).all(dim=-1) & (length >= prefixes.shape[1])
            bias.index_add_(1, last_tokens, torch.where(matches, biases, 0.0))
        return scores + bias


class TokenRules:
    """The processors of TOKEN_RULE_SETTINGS that are on for one decoding session of `prompt_len`-column prompts
    and `max_new_tokens` new tokens; `needs_rows` says whether a call needs each whole row so far (its prompt,
    left padding included, then its new tokens) and `penalizes` whether it needs the tokens each row has seen,
    which the caller keeps. Prompt lookup (`ttl_core.prompt_lookup`) reads rows up to `past_end` columns longer:
    its drafts may run past the last new token, and transformers checks them against the rules there too."""

    def __init__(self, settings: dict, eos: list[int], vocab: int, prompt_len: int, max_new_tokens: int,
                 device: torch.device, past_end: int = 0):
        self.vocab, self.max_new_tokens = vocab, max_new_tokens
        columns = prompt_len + max_new_tokens + past_end
        self.sequence_bias = (_SequenceBias(dict(settings["sequence_bias"]), vocab, device)
                              if settings["sequence_bias"] else None)
        self.penalty = settings["repetition_penalty"]
        self.penalizes = self.penalty != 1.0
        # as in transformers, a bad word that is one EOS id is no bad word
        bad_words = {ids: float("-inf") for ids in settings["bad_words_ids"] or () if ids not in [(i,) for i in eos]}
        self.bad_words = _SequenceBias(bad_words, vocab, device) if bad_words else None
        self.ngram_size = settings["no_repeat_ngram_size"]
        if self.ngram_size > columns:  # no n-gram ever fits
            self.ngram_size = 0
        if self.ngram_size:
            self.ngram_starts = torch.arange(columns - self.ngram_size + 1, device=device)
            self.ngram_prefix = torch.arange(1 - self.ngram_size, 0, device=device)  # the n - 1 last, as offsets
        self.min_new_tokens = settings["min_new_tokens"] if eos else 0
        self.eos = self._mask(eos if self.min_new_tokens else (), device)
        # transformers forces its BOS id where the row is one token long: the first new token of a one-column prompt
        forces_bos = settings["forced_bos_token_id"] is not None and prompt_len == 1
        self.forced_bos = self._forcing(self._mask((settings["forced_bos_token_id"],) if forces_bos else (), device))
        self.forced_eos = self._forcing(self._mask(settings["forced_eos_token_id"], device))
        self.remove_invalid = settings["remove_invalid_values"]
        decay = settings["exponential_decay_length_penalty"]
        self.decay_eos = torch.tensor(eos, dtype=torch.long, device=device) if decay and eos else None
        if decay:  # step s > start multiplies |EOS scores| by factor ** (s - start) - 1, rounded as transformers does
            start, factor = decay
            self.decay = torch.tensor([_decay_factor(factor, step - start) if step > start else 0.0
                                       for step in range(columns - prompt_len)], dtype=torch.float, device=device)
        self.suppressed = self._mask(settings["suppress_tokens"], device)
        self.suppressed_first = self._mask(settings["begin_suppress_tokens"], device)
        self.first_step = 1 if forces_bos else 0  # transformers suppresses after the forced BOS
        # (the function, the rows of each prompt: transformers hands the function a prompt's index)
        self.allowed_tokens, self.rows_per_prompt = settings.get("prefix_allowed_tokens_fn") or (None, 1)
        biases = [rule for rule in (self.sequence_bias, self.bad_words) if rule is not None]
        self.needs_rows = bool(self.ngram_size or self.allowed_tokens) or any(rule.groups for rule in biases)
        masks = (self.eos, self.forced_bos, self.forced_eos, self.suppressed, self.suppressed_first)
        self.blocks = bool(self.ngram_size or biases or self.allowed_tokens  # these may leave no token
                           or any(mask is not None for mask in masks))
        self.active = self.blocks or self.penalizes or self.remove_invalid or self.decay_eos is not None

    def _mask(self, ids: tuple[int, ...] | None, device: torch.device) -> torch.Tensor | None:
        """(vocab,) True at `ids`; None for no ids."""
        if not ids:
            return None
        return torch.isin(torch.arange(self.vocab, device=device), torch.tensor(ids, dtype=torch.long, device=device))

    @staticmethod
    def _forcing(mask: torch.Tensor | None) -> torch.Tensor | None:
        """The scores of a step that forces the ids of `mask`: 0 there, -inf elsewhere."""
        return None if mask is None else torch.where(mask, 0.0, float("-inf"))

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor | None, length: torch.Tensor,
                 step: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """`scores` (batch, vocab, fp32) for the token after `step` new ones, `length` tokens in each row; `seen`
        (batch, vocab) marks the tokens of each row so far (left padding excluded) where the penalty is on."""
        if self.sequence_bias is not None:
            scores = self.sequence_bias(scores, rows, length)
        if self.penalizes:
            scores = apply_repetition_penalty(scores, seen, self.penalty)
        if self.ngram_size:
            scores = scores.masked_fill(self._repeated_ngram_ends(scores, rows, length), float("-inf"))
        if self.bad_words is not None:
            scores = self.bad_words(scores, rows, length)
        if self.min_new_tokens:
            scores = scores.masked_fill(self.eos & (step < self.min_new_tokens), float("-inf"))
        if self.allowed_tokens is not None:
            scores = self._only_allowed(scores, rows[:, :int(length)])
        if self.forced_bos is not None:
            scores = torch.where(step == 0, self.forced_bos, scores)
        if self.forced_eos is not None:
            scores = torch.where(step == self.max_new_tokens - 1, self.forced_eos, scores)
        if self.remove_invalid:
            finfo = torch.finfo(scores.dtype)
            scores = scores.nan_to_num(nan=0.0, posinf=finfo.max, neginf=finfo.min)
        if self.decay_eos is not None:
            eos_scores = scores.index_select(1, self.decay_eos)
            penalty = (eos_scores.abs() * self.decay.index_select(0, step.long())).masked_fill(
                ~eos_scores.isfinite(), 0.0)
            scores = scores.scatter(1, self.decay_eos.expand_as(eos_scores), eos_scores + penalty)
        if self.suppressed is not None:
            scores = scores.masked_fill(self.suppressed, float("-inf"))
        if self.suppressed_first is not None:
            scores = scores.masked_fill(self.suppressed_first & (step == self.first_step), float("-inf"))
        return scores

    def _only_allowed(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """-inf on the tokens `prefix_allowed_tokens_fn(prompt index, row so far)` does not allow; as in
        transformers, a prompt none of whose rows has an allowed token left at a finite score gets 0 on them."""
        allowed = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(rows):
            prompt = row // self.rows_per_prompt
            ids = torch.as_tensor(self.allowed_tokens(prompt, tokens), dtype=torch.long, device=scores.device)
            if ids.numel() == 0:
                raise GenerationError(f"prefix_allowed_tokens_fn allowed no token for prompt {prompt}: its "
                                      "constraint cannot be met")
            if ((ids < 0) | (ids >= self.vocab)).any():
                raise GenerationError(f"prefix_allowed_tokens_fn allowed ids outside the vocabulary [0, {self.vocab}) "
                                      f"for prompt {prompt}")
            allowed[row, ids] = 0.0
        kept = scores + allowed
        unmet = kept.amax(dim=-1).isneginf().view(-1, self.rows_per_prompt).all(dim=-1, keepdim=True)
        return torch.where(unmet.repeat_interleave(self.rows_per_prompt, dim=0), allowed, kept)

    def _repeated_ngram_ends(self, scores: torch.Tensor, rows: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(batch, vocab): the tokens that would end an n-gram already in the row: one starting inside the row
        whose first n - 1 tokens are the row's last n - 1."""
        ngrams = rows.unfold(1, self.ngram_size, 1)
        prefix = rows.index_select(1, (length + self.ngram_prefix).clamp_min(0))
        repeated = (ngrams[..., :-1] == prefix[:, None]).all(dim=-1) & (self.ngram_starts <= length - self.ngram_size)
        ends = ngrams[..., -1].clamp_min(0)  # past the row's end beam search keeps -1, which no n-gram counts
        return torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, ends, repeated.int()) > 0
