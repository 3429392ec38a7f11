"""Text watermarking as transformers' `WatermarkLogitsProcessor` applies it (Kirchenbauer et al., 2023, "A Watermark
for Large Language Models"), so that transformers' `WatermarkDetector` finds the watermark in what ttl generates.

At each step a row's previous token (with "lefthash"), or each of its 40 likeliest next tokens together with the
tokens before it (with "selfhash"), seeds a generator whose permutation of the vocabulary picks the "green" tokens,
whose scores gain `bias`. The seeds are read on the host, one row at a time, as transformers reads them: a decoding
step that watermarks cannot be a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import GenerationError, is_integer, is_number
from .generate_output import settings_dict

WATERMARK_DEFAULTS = {"greenlist_ratio": 0.25, "bias": 2.0, "hashing_key": 15485863, "seeding_scheme": "lefthash",
                      "context_width": 1}
_TABLE_SIZE = 1_000_003  # the hash table selfhash reads, a permutation drawn from the hashing key
_SELFHASH_CANDIDATES = 40  # the likeliest next tokens selfhash tries, as many as transformers tries


def checked_watermark(config: Any) -> tuple | None:
    """A `watermarking_config` (a dict, or transformers' WatermarkingConfig) as the tuple of its settings in
    WATERMARK_DEFAULTS' order, each checked (one-line errors); None for none."""
    if config is None:
        return None
    settings = settings_dict(config, "watermarking_config", "WatermarkingConfig")
    if "ngram_len" in settings:
        raise GenerationError("SynthID text watermarking (a watermarking_config with ngram_len) is not implemented")
    unknown = sorted(set(settings) - set(WATERMARK_DEFAULTS))
    if unknown:
        raise GenerationError(f"watermarking_config has unknown settings {unknown}; it takes "
                              f"{list(WATERMARK_DEFAULTS)}")
    merged = {**WATERMARK_DEFAULTS, **{name: value for name, value in settings.items() if value is not None}}
    if not (is_number(merged["greenlist_ratio"]) and 0 < merged["greenlist_ratio"] < 1):
        raise GenerationError(f"watermarking_config greenlist_ratio must be in (0, 1), got "
                              f"{merged['greenlist_ratio']!r}")
    if not (is_number(merged["bias"]) and not math.isnan(merged["bias"])):  # NaN scores would win argmax
        raise GenerationError(f"watermarking_config bias must be a number other than NaN, got {merged['bias']!r}")
    if not (is_integer(merged["hashing_key"]) and -2**63 <= merged["hashing_key"] < 2**64):  # what seeds a generator
        raise GenerationError(f"watermarking_config hashing_key must be an integer in [-2**63, 2**64), got "
                              f"{merged['hashing_key']!r}")
    if merged["seeding_scheme"] not in ("lefthash", "selfhash"):
        raise GenerationError(f"watermarking_config seeding_scheme must be 'lefthash' or 'selfhash', got "
                              f"{merged['seeding_scheme']!r}")
    if not (is_integer(merged["context_width"]) and merged["context_width"] >= 1):
        raise GenerationError(f"watermarking_config context_width must be an integer >= 1, got "
                              f"{merged['context_width']!r}")
    return tuple(merged[name] for name in WATERMARK_DEFAULTS)


class Watermark:
    """Adds the bias to each row's green tokens, given the scores (rows, vocab) after every other processor and each
    row's tokens so far (prompt and left padding included, as transformers reads the rows)."""

    def __init__(self, settings: tuple, vocab: int, device: torch.device):
        ratio, self.bias, self.key, self.scheme, self.width = settings
        self.vocab, self.green_count = vocab, int(vocab * ratio)
        self.generator = torch.Generator(device=device)
        if self.scheme == "selfhash":
            self.generator.manual_seed(self.key)
            self.table = torch.randperm(_TABLE_SIZE, generator=self.generator, device=device)

    def green_tokens(self, context: torch.Tensor) -> torch.Tensor:
        """The green tokens after `context` (a row's tokens), seeded by its last `context_width` tokens."""
        context = context[-self.width:]
        if self.scheme == "selfhash":  # int64 products that may wrap, as transformers' do
            seed = int((self.key * (self.table[context % _TABLE_SIZE] + 1)
                        * (self.table[context[-1] % _TABLE_SIZE] + 1)).min())
        else:
            seed = self.key * int(context[-1])
        self.generator.manual_seed(seed % (2**64 - 1))
        return torch.randperm(self.vocab, device=context.device, generator=self.generator)[:self.green_count]

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`scores` (rows, vocab) with the bias added to each row's green tokens, seeded from `rows`' tokens."""
        if rows.shape[1] < self.width:  # too short to seed from: transformers leaves the scores as they are
            return scores
        scores = scores.clone()
        for row, (context, row_scores) in enumerate(zip(rows, scores)):
            if self.scheme == "selfhash":  # keep the likely tokens that are green after themselves
                candidates = row_scores.sort(descending=True)[1][:_SELFHASH_CANDIDATES]
                green = [token for token in candidates
                         if bool((self.green_tokens(torch.cat([context, token[None]])) == token).any())]
                if not green:
                    continue
                green = torch.stack(green)
            else:
                green = self.green_tokens(context)
            scores[row, green] += self.bias
        return scores
