"""Logits warpers with transformers' semantics and order, a sampler that needs no host sync, and `generate()`'s
arguments: their checks, and the defaults a call leaves to the checkpoint (decoding settings, EOS and padding ids).

`generate()` applies, like transformers' `generate()`: the token rules of `ttl_core.token_rules` (the repetition
penalty among them), then, only when sampling, temperature, top-h, top-k, top-p, min-p, typical-p and the epsilon and
eta cutoffs, then a log-softmax where `renormalize_logits` asks for one. Each function takes fp32 scores (batch,
vocab) and returns new ones, with -inf on filtered tokens; tests check each against the matching transformers
`LogitsProcessor` on random logits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import GenerationError, is_integer, is_number
from .generate_output import GenerationSettings, setting_source
from .streamer import StopStrings

if TYPE_CHECKING:
    from .model import LlamaForCausalLM

# The smallest temperature sampling takes: the smallest normal float32. Scores are float32, and below it
# logits / temperature overflows to inf for every logit of magnitude 4 or more (4 / 2**-126 > float32's
# max), which leaves softmax no distribution to sample from. Larger logits can still overflow at larger
# temperatures: `generate` reports that once it is done (transformers' torch.multinomial raises on it).
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


# generate()'s decoding settings where neither the call nor the checkpoint's generation_config.json sets them.
# top_k 0 is off, where transformers' own default is 50: pass top_k=50 to sample as its generate() does. The 20
# new tokens stop at the model's context, as transformers' default length does.
DECODING_DEFAULTS = {"max_new_tokens": 20, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_h": None,
                     "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                     "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_return_sequences": 1,
                     "sequence_bias": None, "bad_words_ids": None, "suppress_tokens": None,
                     "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                     "remove_invalid_values": False, "exponential_decay_length_penalty": None,
                     "renormalize_logits": False, "max_time": None, "num_beams": 1, "length_penalty": 1.0,
                     "early_stopping": False, "guidance_scale": 1.0, "watermarking_config": None,
                     "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None,
                     "return_dict_in_generate": False, "output_scores": False, "output_logits": False}


# generation_config.json settings with which transformers' generate() picks other tokens but which ttl does not
# implement, each with the value that changes nothing (None, an empty list and these values are ignored).
# stop_strings are implemented, but read only with a tokenizer: a call without one leaves them out.
UNIMPLEMENTED_SETTINGS = {
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": 0.0,
    "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "force_words_ids": None, "constraints": None, "stop_strings": None, "dola_layers": None, "token_healing": False}


def unimplemented_settings(checkpoint: dict | None, source_of: Callable[[str], str],
                           passed: set[str] = frozenset()) -> list[str]:
    """`SOURCE sets name=value, ...`, one for each place (`source_of(name)`, see
    `ttl_core.generate_output.setting_source`) that sets settings in `checkpoint` which transformers' generate() would
    apply but ttl's does not (UNIMPLEMENTED_SETTINGS), so that a caller can say its output will differ; names in
    `passed` (set by the call itself, which then wins in ttl too) are left out."""
    how = {"stop_strings": " (pass tokenizer= to apply them)"}
    sets: dict[str, list[str]] = {}
    for name, value in (checkpoint or {}).items():
        no_effect = (None, [], {}, UNIMPLEMENTED_SETTINGS.get(name))
        if name in UNIMPLEMENTED_SETTINGS and name not in passed and value not in no_effect:
            sets.setdefault(source_of(name), []).append(f"{name}={value!r}{how.get(name, '')}")
    return [f"{source} sets {', '.join(shown)}" for source, shown in sets.items()]


def stop_string_matcher(checkpoint: dict | None, stop_strings: str | list[str] | None, tokenizer: Any,
                        source_of: Callable[[str], str]) -> StopStrings | None:
    """What ends a row at a stop string: the call's `stop_strings` where given (`[]` for none), else, as in
    transformers' generate(), the saved ones (`checkpoint`'s; an error names `source_of("stop_strings")`) when the call
    passes a `tokenizer` to read the tokens' text with (without one, transformers raises; ttl leaves them out and
    `unimplemented_settings` names them)."""
    if stop_strings is not None:
        return StopStrings(stop_strings, tokenizer) if stop_strings else None
    saved = (checkpoint or {}).get("stop_strings") if tokenizer is not None else None
    try:
        return StopStrings(saved, tokenizer) if saved else None
    except GenerationError as e:
        raise GenerationError(f"{source_of('stop_strings')}: {e}") from None


def decoding_settings(checkpoint: dict | None, source_of: Callable[[str], str], prompt_len: int = 0,
                      context: int | None = None, max_length: int | None = None, min_length: int | None = None,
                      **given: Any) -> dict[str, Any]:
    """Each of DECODING_DEFAULTS' settings: the call's value where given (not None), else the saved one in
    `checkpoint` (the model's generation_config, which transformers' generate() applies too, under a generation_config
    the call passed), else the default; an error about a saved length names where it came from, `source_of(name)`.
    As there, a `max_length` (the call's, else the saved one; prompt included: `prompt_len` tokens) sets the number
    of new tokens where neither the call nor the checkpoint gives `max_new_tokens`, and a prompt that already fills
    it is an error; a `min_length` sets `min_new_tokens` likewise. The default number of new tokens stops at the
    model's `context`, as transformers' default length does."""
    saved = {name: value for name, value in (checkpoint or {}).items() if value is not None}
    merged = {**saved, **{name: value for name, value in given.items() if value is not None}}
    for length_name, new_tokens_name, given_length in (("max_length", "max_new_tokens", max_length),
                                                       ("min_length", "min_new_tokens", min_length)):
        total = given_length if given_length is not None else saved.get(length_name)
        if total is None:
            continue
        source = "" if given_length is not None else f"{source_of(length_name)}: "
        if not is_integer(total) or total < 0:  # also where the number of new tokens wins: a wrong value is an error
            raise GenerationError(f"{source}{length_name} must be an integer >= 0, got {total!r}")
        if merged.get(new_tokens_name) is not None:
            continue
        if length_name == "max_length" and total <= prompt_len:
            raise GenerationError(f"{source}the prompt's {prompt_len} tokens already fill max_length of {total}: no "
                                  "room for new tokens")
        if length_name == "max_length" and context is not None and total > context:
            raise GenerationError(f"{source}max_length of {total} exceeds the model's context of {context} positions")
        merged[new_tokens_name] = max(total - prompt_len, 0)
    if merged.get("max_new_tokens") is None and context is not None:
        if prompt_len >= context:
            raise GenerationError(f"the prompt's {prompt_len} tokens fill the model's context of {context} "
                                  "positions: no room for new tokens")
        merged["max_new_tokens"] = min(DECODING_DEFAULTS["max_new_tokens"], context - prompt_len)
    return {name: merged.get(name, default) for name, default in DECODING_DEFAULTS.items()}


def check_sampling_arguments(do_sample: bool, temperature: float, top_h: float | None, top_k: int, top_p: float,
                             min_p: float, typical_p: float, epsilon_cutoff: float, eta_cutoff: float,
                             repetition_penalty: float, num_return_sequences: int,
                             max_time: float | None = None, num_beams: int = 1, renormalize_logits: bool = False,
                             return_dict_in_generate: bool = False, output_scores: bool = False,
                             output_logits: bool = False) -> None:
    """Raise a GenerationError naming the first of `generate`'s sampling arguments (and its `max_time` and output
    flags) that is out of range."""
    for name, flag in (("do_sample", do_sample), ("renormalize_logits", renormalize_logits),
                       ("return_dict_in_generate", return_dict_in_generate), ("output_scores", output_scores),
                       ("output_logits", output_logits)):
        if not isinstance(flag, bool):  # a string such as "False" would otherwise be true
            raise GenerationError(f"{name} must be True or False, got {flag!r}")
    if max_time is not None and not (is_number(max_time) and max_time >= 0):
        raise GenerationError(f"max_time must be a number of seconds >= 0, got {max_time!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff),
                        ("repetition_penalty", repetition_penalty)):
        if not is_number(value):
            raise GenerationError(f"{name} must be a number, got {value!r}")
    if not temperature >= 0 or (do_sample and temperature == 0):  # written so that NaN fails too
        raise GenerationError(f"temperature must be positive when sampling (>= 0 otherwise), got {temperature}")
    if do_sample and temperature < MIN_TEMPERATURE:
        raise GenerationError(f"temperature {temperature} is too small to sample with: below {MIN_TEMPERATURE:.3g} "
                              f"(the smallest normal float32), logits / temperature overflows float32")
    if not is_integer(top_k) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise GenerationError(f"min_p must be in [0, 1], got {min_p}")
    if top_h is not None and not is_number(top_h):
        raise GenerationError(f"top_h must be a number, got {top_h!r}")
    if top_h is not None and not 0 < top_h <= 1:  # None is off (1 still keeps the 100 most likely at most)
        raise GenerationError(f"top_h must be in (0, 1], got {top_h}")
    if not 0 < typical_p <= 1:
        raise GenerationError(f"typical_p must be in (0, 1], got {typical_p}")
    for name, cutoff in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if not 0 <= cutoff < 1:
            raise GenerationError(f"{name} must be in [0, 1), got {cutoff}")
    if not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty must be positive, got {repetition_penalty}")
    if not is_integer(num_return_sequences) or num_return_sequences < 1:
        raise GenerationError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_return_sequences > 1 and not do_sample and num_beams == 1:
        raise GenerationError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")


def checked_inputs(model: LlamaForCausalLM, input_ids: Any, attention_mask: Any, max_new_tokens: int,
                   eos: list[int], pad: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate()`'s prompts as long ids on the model's device, and their attention mask (the one given, else
    the one transformers infers from padding ids), after the checks that name what is wrong with them."""
    config = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise GenerationError("input_ids must be an integer tensor shaped (batch, seq)")
    if input_ids.numel() == 0:
        raise GenerationError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    check_room(model, input_ids.shape[1], max_new_tokens)
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device, torch.long)
    if input_ids.min() < 0 or input_ids.max() >= config.vocab_size:
        raise GenerationError(f"input_ids hold ids outside the vocabulary [0, {config.vocab_size})")
    source = "attention_mask"
    if attention_mask is None:
        if pad is None or pad in eos or not bool((input_ids == pad).any()):
            return input_ids, torch.ones_like(input_ids)
        # as transformers does: padding tokens in the prompts (a padding id that is no EOS id) are padding
        attention_mask = (input_ids != pad).long()
        source = f"the attention mask inferred from the padding id {pad} in input_ids (pass one)"
    return input_ids, checked_mask(attention_mask, input_ids.shape, "input_ids", device, source)


def check_room(model: LlamaForCausalLM, prompt_len: int, max_new_tokens: Any) -> None:
    """A GenerationError unless `max_new_tokens` is a positive integer and the prompt and they fit the context."""
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total, context = prompt_len + max_new_tokens, model.config.max_position_embeddings
    if total > context:
        raise GenerationError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} exceeds "
                              f"the model's context of {context} positions")


def checked_mask(attention_mask: Any, shape: torch.Size, prompt_name: str, device: torch.device,
                 source: str = "attention_mask") -> torch.Tensor:
    """A prompt's attention mask as long 0/1 on `device`, after the checks that name what is wrong with it (`source`:
    where it came from): `shape` (batch, seq), that of the prompt named `prompt_name`; left padding only."""
    if not isinstance(attention_mask, torch.Tensor):
        raise GenerationError(f"attention_mask must be a tensor shaped like {prompt_name}, got a "
                              f"{type(attention_mask).__name__}")
    if attention_mask.shape != shape:
        raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} != {prompt_name} shape "
                              f"{tuple(shape)}")
    mask = attention_mask.to(device)
    if ((mask != 0) & (mask != 1)).any():  # before the integer conversion, which would make 0.5 a 0 and 1.5 a 1
        raise GenerationError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    empty = (mask.sum(-1) == 0).nonzero()
    if len(empty):
        raise GenerationError(f"row {empty[0].item()} of {source} attends to no token")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise GenerationError(f"{source} must be left-padded (padding before the tokens) for generation: tokenize "
                              "with padding_side=\"left\"")
    return mask


def unconditional_inputs(model: LlamaForCausalLM, input_ids: torch.Tensor, guidance_scale: float,
                         negative_prompt_ids: Any, negative_prompt_attention_mask: Any,
                         max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What classifier-free guidance runs the model on besides the prompts (`input_ids`, checked): the negative
    prompts (one a prompt row, left-padded per their mask) where given, else, as in transformers, each prompt's last
    token; None without guidance (`guidance_scale` 1)."""
    if not (is_number(guidance_scale) and math.isfinite(guidance_scale)):  # inf and NaN make every score inf or NaN
        raise GenerationError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale == 1:
        if negative_prompt_ids is not None or negative_prompt_attention_mask is not None:
            raise GenerationError("a negative prompt takes effect only with classifier-free guidance: pass "
                                  "guidance_scale != 1")
        return None
    if negative_prompt_ids is None:
        if negative_prompt_attention_mask is not None:
            raise GenerationError("negative_prompt_attention_mask needs negative_prompt_ids")
        return input_ids[:, -1:], torch.ones_like(input_ids[:, -1:])
    try:
        ids, mask = checked_inputs(model, negative_prompt_ids, negative_prompt_attention_mask, max_new_tokens, [], None)
    except GenerationError as e:
        raise GenerationError(f"negative prompt: {e}") from None
    if ids.shape[0] != input_ids.shape[0]:
        raise GenerationError(f"negative_prompt_ids has {ids.shape[0]} rows for {input_ids.shape[0]} prompt rows")
    return ids, mask


def _token_list(ids: Any, name: str, vocab: int) -> list[int]:
    """`ids` (None, an id or a list of ids, where, as transformers takes them, an id may be a NumPy integer or
    a 0-d tensor and the list a 1-d tensor or array) as a list of Python ints."""
    if hasattr(ids, "tolist"):  # torch and NumPy tensors, NumPy scalars
        ids = ids.tolist()
    ids = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids = [i.tolist() if hasattr(i, "tolist") else i for i in ids]
    for i in ids:
        if not is_integer(i) or not 0 <= i < vocab:
            raise GenerationError(f"{name} {i!r} is not a token id in [0, {vocab})")
    return ids


def checked_token_rules(rules: dict[str, Any], vocab: int) -> dict[str, Any]:
    """The settings of `ttl_core.token_rules.TOKEN_RULE_SETTINGS` checked (token ids inside the vocabulary, one-line
    errors) and made hashable, as a decoding session's key needs: id lists as tuples (None for
    none), a sequence_bias (transformers' dict, or the list of [ids, bias] pairs a generation_config.json holds) as
    pairs, the exponential decay's (start, factor) as a tuple."""
    checked = dict(rules)
    for name in ("min_new_tokens", "no_repeat_ngram_size"):
        if not is_integer(rules[name]) or rules[name] < 0:
            raise GenerationError(f"{name} must be an integer >= 0, got {rules[name]!r}")
    if not isinstance(rules["remove_invalid_values"], bool):
        raise GenerationError(f"remove_invalid_values must be True or False, got {rules['remove_invalid_values']!r}")
    for name in ("suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id"):
        checked[name] = tuple(_token_list(rules[name], name, vocab)) or None
    if rules["forced_bos_token_id"] is not None:
        forced_bos = _token_list(rules["forced_bos_token_id"], "forced_bos_token_id", vocab)
        if len(forced_bos) != 1:
            raise GenerationError(f"forced_bos_token_id must be one token id, got {rules['forced_bos_token_id']!r}")
        checked["forced_bos_token_id"] = forced_bos[0]
    decay = rules["exponential_decay_length_penalty"]
    if decay is not None:
        if not (isinstance(decay, (list, tuple)) and len(decay) == 2 and is_integer(decay[0]) and is_number(decay[1])):
            raise GenerationError("exponential_decay_length_penalty must be (start, factor): new tokens before the "
                                  f"penalty starts and the factor it grows by, got {decay!r}")
        if math.isnan(decay[1]):  # NaN EOS scores, which transformers' argmax would pick as if they were text
            raise GenerationError(f"exponential_decay_length_penalty's factor is NaN, got {decay!r}")
        checked["exponential_decay_length_penalty"] = (decay[0], float(decay[1]))
    for name in ("forced_bos_token_id", "forced_eos_token_id"):  # transformers refuses these: a step with no token
        forced = {checked[name]} if is_integer(checked[name]) else set(checked[name] or ())
        if forced and forced <= set(checked["suppress_tokens"] or ()):
            raise GenerationError(f"every {name} ({sorted(forced)}) is also in suppress_tokens: the new token "
                                  "it forces could be none of them")

    def sequence(ids: Any, name: str) -> tuple[int, ...]:
        if not isinstance(ids, (list, tuple)) or not ids:
            raise GenerationError(f"{name} must hold non-empty lists of token ids, got {ids!r}")
        return tuple(_token_list(list(ids), name, vocab))

    bad_words, bias = rules["bad_words_ids"], rules["sequence_bias"]
    if bad_words is not None:
        if not isinstance(bad_words, (list, tuple)):
            raise GenerationError(f"bad_words_ids must be a list of lists of token ids, got {bad_words!r}")
        checked["bad_words_ids"] = tuple(sequence(ids, "bad_words_ids") for ids in bad_words) or None
    if bias is not None:
        pairs = list(bias.items() if isinstance(bias, dict) else bias if isinstance(bias, (list, tuple)) else [bias])
        if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 and is_number(pair[1]) for pair in pairs):
            raise GenerationError(f"sequence_bias must map token id sequences to numbers, got {bias!r}")
        checked["sequence_bias"] = tuple((sequence(ids, "sequence_bias"), float(b)) for ids, b in pairs) or None
    return checked


def _without_none_marks(ids: object) -> object:
    """A checkpoint's id or list of ids without the -1 that old conversions write for "no such token", which
    transformers ignores (anything else that is no id is left for `_token_list` to name)."""
    def none_mark(i: object) -> bool:
        return is_integer(i) and i < 0

    if isinstance(ids, list):
        return [i for i in ids if not none_mark(i)]
    return None if none_mark(ids) else ids


def special_token_ids(model: LlamaForCausalLM, eos_token_id: int | list[int] | None, pad_token_id: int | None,
                      passed: dict[str, Any] | None = None) -> tuple[list[int], int | None]:
    """(EOS ids, padding id): the arguments where given, else those of the `generation_config` the call passed
    (`passed`, see `ttl_core.generate_output.passed_generation_config`), else the model's `generation_config` as
    transformers reads it (its checkpoint's generation_config.json, else the ids of the config it was built from); the
    padding id falls back to the first EOS id. An error names where a bad id came from."""
    config, passed = model.config, passed or {}
    defaults = model.generation_config
    if defaults is None:  # a program set it so
        defaults = GenerationSettings.from_model_config(config)

    def ids(name: str, given: int | list[int] | None) -> list[int]:  # an error names where a bad saved id came from
        if given is not None:
            return _token_list(given, name, config.vocab_size)
        saved = passed if name in passed else defaults
        return _token_list(_without_none_marks(saved.get(name)), f"{setting_source(name, passed, defaults)}: {name}",
                           config.vocab_size)

    eos, pad = ids("eos_token_id", eos_token_id), ids("pad_token_id", pad_token_id)
    if len(pad) > 1:
        raise GenerationError(f"pad_token_id must be one token id, got {pad}")
    return eos, pad[0] if pad else (eos[0] if eos else None)


def mark_seen(seen: torch.Tensor, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`seen` (rows, vocab + 1) set, in place, at each row's `ids` where `real` is true; the spare last column takes
    the rest (left padding, which transformers' repetition penalty leaves out). Returns `seen`."""
    return seen.zero_().scatter_(1, ids.masked_fill(~real, seen.shape[1] - 1), True)


def apply_guidance(scores: torch.Tensor, unconditional_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, as transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor applies it first of
    all processors: the log-probabilities of the model given the prompt pushed `scale` times as far from those given
    only the unconditional context (its logits, in the model's dtype, as transformers takes them)."""
    unconditional = unconditional_logits.log_softmax(dim=-1)
    return scale * (scores.log_softmax(dim=-1) - unconditional) + unconditional


def apply_top_k(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` (at least `min_tokens_to_keep`) highest scores of each row (ties with the k-th included);
    -inf elsewhere."""
    kth = torch.topk(scores, min(max(top_k, min_tokens_to_keep), scores.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose probabilities add up to at most 1 - top_p,
    always keeping the `min_tokens_to_keep` most likely (accumulated from the least likely up, as transformers
    does, so the float rounding at the boundary is the same)."""
    ascending, order = torch.sort(scores, dim=-1)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= 1 - top_p
    drop[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_min_p(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's highest probability, but never the
    `min_tokens_to_keep` most likely."""
    probs = scores.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    if min_tokens_to_keep > 1:  # the most likely token is never below the threshold
        drop.scatter_(-1, torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill(drop, float("-inf"))


def apply_typical_p(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: rank tokens by how far their surprisal is from the row's entropy and keep the
    closest, up to the first whose cumulative probability reaches `mass` (ties with it included,
    `min_tokens_to_keep` at least)."""
    log_probs = scores.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # nansum: 0 * -inf for filtered tokens
    distance, order = torch.sort((-log_probs - entropy).abs(), dim=-1)
    reached = (scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1) < mass).sum(dim=-1, keepdim=True)
    drop = distance > distance.gather(-1, reached.clamp_(max=scores.shape[-1] - 1))
    drop[..., :min_tokens_to_keep] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_epsilon_cutoff(scores: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Truncation sampling: drop tokens whose probability is below `epsilon`, but never the `min_tokens_to_keep`
    most likely."""
    return _drop_below(scores, scores.softmax(dim=-1), epsilon, min_tokens_to_keep)


def apply_eta_cutoff(scores: torch.Tensor, eta: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Entropy-dependent truncation: drop tokens whose probability is below min(eta, sqrt(eta) * exp(-entropy)),
    but never the `min_tokens_to_keep` most likely. The entropy's sum and eta's float32 square root are computed as
    transformers computes them (through torch.distributions.Categorical), so the threshold is its to the bit."""
    _, entropy = _categorical(scores)
    eta_tensor = torch.full_like(entropy, eta)  # a fill, not a host copy: fine inside a CUDA graph
    return _drop_below(scores, scores.softmax(dim=-1),
                       torch.minimum(eta_tensor, eta_tensor.sqrt() * torch.exp(-entropy))[..., None],
                       min_tokens_to_keep)


def apply_top_h(scores: torch.Tensor, top_h: float) -> torch.Tensor:
    """Top-H: of the 100 highest scores, renormalized, keep the most likely tokens while their terms -p log p add up
    to at most `top_h` times that distribution's entropy (the most likely one always); drop every other token."""
    top_scores, top_ids = torch.topk(scores, min(100, scores.shape[-1]), dim=-1)
    probs, entropy = _categorical(top_scores)
    keep = (-probs * probs.log()).cumsum(dim=-1) <= (entropy * top_h)[:, None]
    keep[:, 0] = True
    return scores.masked_fill(~torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_ids, keep), float("-inf"))


def _categorical(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, entropy) of each row's softmax as torch.distributions.Categorical computes them, which
    transformers' entropy-based warpers use (without its argument checks, which would sync the host)."""
    normalized = scores - scores.logsumexp(dim=-1, keepdim=True)
    probs = normalized.softmax(dim=-1)
    return probs, -(normalized.clamp(min=torch.finfo(scores.dtype).min) * probs).sum(dim=-1)


def _drop_below(scores: torch.Tensor, probs: torch.Tensor, threshold: float | torch.Tensor,
                min_tokens_to_keep: int) -> torch.Tensor:
    kth = torch.topk(scores, min(min_tokens_to_keep, scores.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill((probs < threshold) & (scores < kth), float("-inf"))


def process_logits(scores: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_h: float | None = None,
                   top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, typical_p: float = 1.0,
                   epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0, renormalize_logits: bool = False,
                   min_tokens_to_keep: int = 1,
                   watermark: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The processors transformers' `generate()` applies after the token rules (`ttl_core.token_rules`), in its
    order: the warpers when sampling, each keeping at least `min_tokens_to_keep` tokens (beam sampling keeps one
    more than there are EOS ids), then the `watermark` (see `ttl_core.watermark`), then a log-softmax where
    `renormalize_logits`. `scores` should be fp32."""
    if do_sample:
        if temperature != 1.0:
            scores = scores / temperature
        if top_h is not None:
            scores = apply_top_h(scores, top_h)
        if top_k:
            scores = apply_top_k(scores, top_k, min_tokens_to_keep)
        if top_p < 1.0:
            scores = apply_top_p(scores, top_p, min_tokens_to_keep)
        if min_p:
            scores = apply_min_p(scores, min_p, min_tokens_to_keep)
        if typical_p < 1.0:
            scores = apply_typical_p(scores, typical_p, min_tokens_to_keep)
        if epsilon_cutoff:
            scores = apply_epsilon_cutoff(scores, epsilon_cutoff, min_tokens_to_keep)
        if eta_cutoff:
            scores = apply_eta_cutoff(scores, eta_cutoff, min_tokens_to_keep)
    if watermark is not None:
        scores = watermark(scores)
    return scores.log_softmax(dim=-1) if renormalize_logits else scores


def global_generator(device: torch.device) -> torch.Generator:
    """The generator `torch.manual_seed` seeds for a CPU or CUDA device, which transformers' sampling draws from."""
    return torch.cuda.default_generators[device.index] if device.type == "cuda" else torch.default_generator


def sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from softmax(scores), without a host sync: the argmax of p / E with E drawn
    from Exp(1) picks token i with probability p_i (the exponential race). `torch.multinomial` draws one sample
    the same way, from the same draws, so transformers' tokens come out of the same generator state; but it
    checks the probabilities on the host first, which a CUDA graph cannot hold."""
    return draw(scores.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (each row's sum need not be 1), drawn as `torch.multinomial` draws one."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)
