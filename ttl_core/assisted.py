"""Assisted (speculative) decoding (`generate(assistant_model=draft)`), step for step as transformers' assisted
decoding runs it with its `AssistedCandidateGenerator`.

A smaller model with the same vocabulary (TeenyTinyLlama's 160m for its 460m) drafts up to `num_assistant_tokens`
tokens a step over a static KV cache of its own, each chosen from its logits after the call's processors, as
transformers' assistant decodes with the call's settings: greedily, or drawn where the call samples (from logits
warped twice, as there, where the call's warpers are passed to an assistant that adds its own). It stops after
an EOS id or a token it gave less than `assistant_confidence_threshold` probability. The model verifies the drafts in
one pass (`ttl_core.prompt_lookup.decode`): greedy keeps them up to the first it would not have chosen, sampling as
speculative sampling accepts them; the draft cache then forgets the rejected ones (`KVDecoder.rewind`).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import GenerationError, is_integer, is_number
from .kv_cache import KVDecoder
from .model import LlamaForCausalLM
from .prompt_lookup import processed_scores, check_one_row
from .sampling import process_logits, sample

# transformers' defaults, read from the assistant's generation config (there a call's own values are ignored)
ASSISTANT_DEFAULTS = {"num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
                      "assistant_confidence_threshold": 0.4}
SCHEDULES = ("constant", "heuristic", "heuristic_transient")


def assistant_settings(assistant: Any, model: LlamaForCausalLM, given: dict[str, Any], length: int, rows: int,
                       num_beams: int, num_return_sequences: int, guidance_scale: float, watermark: Any,
                       lookup: Any) -> dict[str, Any] | None:
    """The drafting settings of a call with `assistant` (None without one): each of `given` (the call's) where not
    None, else the assistant's `generation_config` value (its generation_config.json's, or as a program set it), else
    transformers' default; a GenerationError naming what is wrong (`length`: prompt plus new tokens, `rows`: prompt
    rows, `lookup`: prompt lookup's settings)."""
    if assistant is None:
        named = next((name for name, value in given.items() if value is not None), None)
        if named is not None:
            raise GenerationError(f"{named} takes effect only with assistant_model")
        return None
    if not isinstance(assistant, LlamaForCausalLM):
        raise GenerationError(f"assistant_model must be a ttl LlamaForCausalLM, got {type(assistant).__name__}")
    ours, theirs = model.config.vocab_size, assistant.config.vocab_size
    if ours != theirs:
        raise GenerationError(f"assistant_model's vocabulary of {theirs} tokens is not the model's {ours}: it must "
                              "draft with the same tokenizer")
    here, there = model.lm_head.weight.device, assistant.lm_head.weight.device
    if here != there:
        raise GenerationError(f"assistant_model is on {there}, the model on {here}")
    if length > assistant.config.max_position_embeddings:
        raise GenerationError(f"the prompt and new tokens ({length}) exceed assistant_model's context of "
                              f"{assistant.config.max_position_embeddings} positions")
    check_one_row("assisted decoding (assistant_model)", rows, num_beams, num_return_sequences, guidance_scale,
                  watermark)
    if lookup is not None:
        raise GenerationError("assistant_model and prompt_lookup_num_tokens are two sources of drafts: pass one")
    saved = assistant.generation_config or {}
    settings = {name: given.get(name) if given.get(name) is not None else
                saved.get(name) if saved.get(name) is not None else default
                for name, default in ASSISTANT_DEFAULTS.items()}
    tokens, schedule, threshold = settings.values()
    if not (is_integer(tokens) and tokens >= 1):
        raise GenerationError(f"num_assistant_tokens must be a positive integer, got {tokens!r}")
    if schedule not in SCHEDULES:
        raise GenerationError(f"num_assistant_tokens_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not (is_number(threshold) and 0 <= threshold <= 1):
        raise GenerationError(f"assistant_confidence_threshold must be a probability in [0, 1], got {threshold!r}")
    return settings


class AssistantDrafts:
    """The draft model's side of assisted decoding, a draft source for `ttl_core.prompt_lookup.decode`: its KV cache
    holds the row so far and the drafts the model kept. Built once per session; `start` begins a call."""

    def __init__(self, assistant: LlamaForCausalLM, state: Any, attention_mask: torch.Tensor, max_new_tokens: int,
                 settings: dict[str, Any], eos: list[int]):
        # rewinding masks slots again, which flash-attn's cache kernel would not read
        self.decoder = KVDecoder(assistant, attention_mask, max_new_tokens, flash=False)
        self.state, self.eos, self.device = state, eos, attention_mask.device
        self.initial_tokens = settings["num_assistant_tokens"]
        self.adapts = settings["num_assistant_tokens_schedule"] != "constant"
        self.threshold = settings["assistant_confidence_threshold"]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Prefill the draft cache with the prompt. Every call starts from `num_assistant_tokens`: a "heuristic"
        schedule's count is not carried over to the next call, where transformers leaves it on the assistant's
        generation config."""
        self.decoder.reset(attention_mask)
        self.logits = self.decoder.prefill(input_ids)  # after the cached tokens, until more are fed
        self.cached = input_ids.shape[1]
        self.num_tokens, self.drafted = self.initial_tokens, 0

    def propose(self, row: list[int], max_length: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `num_tokens` drafts after `row` that leave room for the model's own token before `max_length`,
        and the processed scores each was chosen from (None without drafts)."""
        limit = min(self.num_tokens, max_length - len(row) - 1)
        self.start_row, self.drafted = len(row), 0
        if limit <= 0:
            return [], None
        logits = self.logits if self.cached == len(row) else self._feed(row[self.cached:])
        drafted, scores = [], []
        while True:
            if not bool(torch.isfinite(logits).all()):  # sampled drafts would be garbage, or multinomial's error
                raise GenerationError("assistant_model's logits hold NaN or inf (are its weights finite?)")
            scores.append(processed_scores(self.state, logits, row, drafted))
            if self.state.do_sample:  # transformers' assistant warps twice: with the call's warpers and its own
                scores[-1] = process_logits(scores[-1], True, **self.state.processors)
            token = int(sample(scores[-1], self.state.generator) if self.state.do_sample else scores[-1].argmax())
            drafted.append(token)
            # transformers' ConfidenceCriteria, which a threshold of 0 turns off
            doubtful = self.threshold > 0 and float(scores[-1].softmax(dim=-1)[0, token]) < self.threshold
            if len(drafted) == limit or token in self.eos or doubtful:
                break
            logits = self._feed([token])
        self.drafted = len(drafted)
        return drafted, torch.cat(scores)

    def kept(self, count: int) -> None:
        """The model kept `count` of the last drafts: the cache forgets the rest, and the schedule adapts."""
        if not self.drafted:
            return
        fed = self.drafted - 1  # the last draft was never fed
        self.decoder.rewind(fed - min(count, fed))
        self.cached = self.start_row + min(count, fed)
        if self.adapts:
            self.num_tokens = self.num_tokens + 2 if count == self.drafted else max(1, self.num_tokens - 1)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` to the draft cache; the logits after the last of them."""
        logits = self.decoder.verify(torch.tensor([tokens], device=self.device))[:, -1]
        self.decoder.accept(len(tokens))
        self.cached += len(tokens)
        return logits
