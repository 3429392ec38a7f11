"""Text generation over a static KV cache, with transformers' sampling semantics and CUDA-graph decoding.

`generate()` checks its arguments and settles each setting (the call's, a passed generation_config's, the model's,
the default), then runs beam search or decodes: it prefills the (left-padded) prompts once, then decodes one token
per step, on CUDA as a CUDA graph replayed step after step.

The decoding state, the graphed step and the session a model keeps for its next call are in
`ttl_core.decode_session`, the KV cache and the decoder in `ttl_core.kv_cache`, the logits processors in
`ttl_core.token_rules` and `ttl_core.sampling` (with the sampler), the streamer and the stop-string matcher in
`ttl_core.streamer`, prompt-lookup decoding (several tokens a step, eagerly) in `ttl_core.prompt_lookup`, assisted
decoding's draft model in `ttl_core.assisted`, the dict output in `ttl_core.generate_output`.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable

import torch

from .assisted import assistant_settings
from .beam_search import beam_search, check_beam_arguments
from .decode_session import DecodeSession, acquire_session, forward_fingerprint, run_session
from .errors import GenerationError, is_integer
from .generate_output import GenerateOutput, passed_generation_config, setting_source
from .kv_cache import KVDecoder
from .model import LlamaForCausalLM, autocast_dtype
from .prompt_embeds import checked_prompt, prompt_length
from .prompt_lookup import checked_lookup
from .sampling import (check_sampling_arguments, checked_token_rules, decoding_settings, special_token_ids,
                       stop_string_matcher, unconditional_inputs, unimplemented_settings)
from .streamer import checked_criteria, host_watch
from .token_rules import TOKEN_RULE_SETTINGS
from .watermark import checked_watermark


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
        source_of = functools.partial(setting_source, passed=passed, model_settings=model.generation_config)
        settings = decoding_settings(saved, source_of, prompt_len, model.config.max_position_embeddings,
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
            source = "" if watermarking_config is not None else f"{source_of('watermarking_config')}: "
            raise GenerationError(f"{source}{e}") from None
        given = {"stop_strings"} if stop_strings is not None or tokenizer is not None else set()
        ignored = unimplemented_settings(saved, source_of, given)
        if ignored:
            warnings.warn(f"{' and '.join(ignored)}, which ttl's generate() does not implement: it decodes as if they "
                          "were unset, unlike transformers' generate()",
                          stacklevel=3)  # the caller of generate(), past torch.no_grad's wrapper
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
        stops = stop_string_matcher(saved, stop_strings, tokenizer, source_of)
        criteria = checked_criteria(stopping_criteria)
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
               guidance_scale, unconditional_shape, watermark, lookup, forward_fingerprint(model),
               None if assistant is None else (tuple(drafting.values()), forward_fingerprint(assistant_model)))
        session = acquire_session(model, key, lambda: DecodeSession(
            key, model, input_ids, mask, max_new_tokens, eos, pad, do_sample, seed is not None, settings, rules,
            graphed, keep_scores, keep_logits, guidance_scale, None if unconditional is None else unconditional[1],
            watermark, lookup, assistant))
        try:
            watch = host_watch(session.state, input_ids, streamer, stops, criteria)  # before the prefill
            sequences = run_session(session, input_ids, mask, max_new_tokens, seed, watch,
                                    bool(eos or stops or criteria), deadline, unconditional, eos, inputs_embeds)
            if not as_dict:
                return sequences
            return GenerateOutput(sequences, *session.state.kept_steps(sequences.shape[1] - input_ids.shape[1]))
        finally:
            session.lock.release()
    finally:  # on errors too: a thread iterating the streamer would wait forever for its end
        if streamer is not None:
            streamer.end()
