"""transformers' logits processors that bias, block or force single tokens by what a row holds so far:
sequence_bias, no_repeat_ngram_size, bad_words_ids, min_new_tokens (and min_length), forced_eos_token_id,
suppress_tokens and begin_suppress_tokens, applied in transformers' order.

transformers applies the first before the repetition penalty and the others after it; each of the others only
puts -inf on tokens (or, forcing, -inf on all tokens but the forced ones, which get 0), and the penalty leaves
-inf and 0 as they are, so `TokenRules` applies all of them first and the scores come out the same. Everything
is set up once per decoding session in fixed-shape tensors: a step is device work only, so it can be captured in
a CUDA graph.
"""

from __future__ import annotations

import torch

# decoding settings (see ttl_core.sampling.DECODING_DEFAULTS) that TokenRules applies
TOKEN_RULE_SETTINGS = ("sequence_bias", "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens",
                       "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens")


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
    left padding included, then its new tokens), which the caller keeps."""

    def __init__(self, settings: dict, eos: list[int], vocab: int, prompt_len: int, max_new_tokens: int,
                 device: torch.device):
        self.vocab, self.max_new_tokens = vocab, max_new_tokens
        self.sequence_bias = (_SequenceBias(dict(settings["sequence_bias"]), vocab, device)
                              if settings["sequence_bias"] else None)
        # as in transformers, a bad word that is one EOS id is no bad word
        bad_words = {ids: float("-inf") for ids in settings["bad_words_ids"] or () if ids not in [(i,) for i in eos]}
        self.bad_words = _SequenceBias(bad_words, vocab, device) if bad_words else None
        self.ngram_size = settings["no_repeat_ngram_size"]
        if self.ngram_size > prompt_len + max_new_tokens:  # no n-gram ever fits
            self.ngram_size = 0
        if self.ngram_size:
            self.ngram_starts = torch.arange(prompt_len + max_new_tokens - self.ngram_size + 1, device=device)
            self.ngram_prefix = torch.arange(1 - self.ngram_size, 0, device=device)  # the n - 1 last, as offsets
        self.min_new_tokens = settings["min_new_tokens"] if eos else 0
        self.eos = self._mask(eos if self.min_new_tokens else (), device)
        forced = self._mask(settings["forced_eos_token_id"], device)
        # the last step's scores when forcing: only the forced ids, at 0
        self.forced_eos = None if forced is None else torch.where(forced, 0.0, float("-inf"))
        self.suppressed = self._mask(settings["suppress_tokens"], device)
        self.suppressed_first = self._mask(settings["begin_suppress_tokens"], device)
        biases = [rule for rule in (self.sequence_bias, self.bad_words) if rule is not None]
        self.needs_rows = bool(self.ngram_size) or any(rule.groups for rule in biases)
        masks = (self.eos, self.forced_eos, self.suppressed, self.suppressed_first)
        self.active = bool(self.ngram_size or biases or any(mask is not None for mask in masks))

    def _mask(self, ids: tuple[int, ...] | None, device: torch.device) -> torch.Tensor | None:
        """(vocab,) True at `ids`; None for no ids."""
        if not ids:
            return None
        return torch.isin(torch.arange(self.vocab, device=device), torch.tensor(ids, dtype=torch.long, device=device))

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor | None, length: torch.Tensor,
                 step: torch.Tensor) -> torch.Tensor:
        """`scores` (batch, vocab, fp32) for the token after `step` new ones, `length` tokens in each row."""
        if self.sequence_bias is not None:
            scores = self.sequence_bias(scores, rows, length)
        if self.ngram_size:
            scores = scores.masked_fill(self._repeated_ngram_ends(scores, rows, length), float("-inf"))
        if self.bad_words is not None:
            scores = self.bad_words(scores, rows, length)
        if self.min_new_tokens:
            scores = scores.masked_fill(self.eos & (step < self.min_new_tokens), float("-inf"))
        if self.forced_eos is not None:
            scores = torch.where(step == self.max_new_tokens - 1, self.forced_eos, scores)
        if self.suppressed is not None:
            scores = scores.masked_fill(self.suppressed, float("-inf"))
        if self.suppressed_first is not None:
            scores = scores.masked_fill(self.suppressed_first & (step == 0), float("-inf"))
        return scores

    def _repeated_ngram_ends(self, scores: torch.Tensor, rows: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(batch, vocab): the tokens that would end an n-gram already in the row: one starting inside the row
        whose first n - 1 tokens are the row's last n - 1."""
        ngrams = rows.unfold(1, self.ngram_size, 1)
        prefix = rows.index_select(1, (length + self.ngram_prefix).clamp_min(0))
        repeated = (ngrams[..., :-1] == prefix[:, None]).all(dim=-1) & (self.ngram_starts <= length - self.ngram_size)
        ends = ngrams[..., -1].clamp_min(0)  # past the row's end beam search keeps -1, which no n-gram counts
        return torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, ends, repeated.int()) > 0
