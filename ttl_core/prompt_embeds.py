"""`generate(inputs_embeds=...)`: prompts given as embeddings (soft prompts, another model's features), as
transformers' decoder-only `generate()` takes them. The prefill runs the model on the embeddings; every later step
is the usual one. The token rules, the streamer and the output start from the ids given with the embeddings, or,
given none, from no prompt token at all: as in transformers, the output then holds only the new tokens, and a
repetition penalty or n-gram ban sees no prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import GenerationError
from .sampling import check_room, checked_inputs, checked_mask

if TYPE_CHECKING:
    from .model import LlamaForCausalLM


def prompt_length(input_ids: Any, inputs_embeds: Any) -> int:
    """The prompt's length as `max_length` counts it: the embedded positions where given, else the ids' (0 for what
    is no prompt: `checked_prompt` names it)."""
    prompt, dim = (inputs_embeds, 1) if isinstance(inputs_embeds, torch.Tensor) else (input_ids, -1)
    return prompt.shape[dim] if isinstance(prompt, torch.Tensor) and prompt.dim() > max(dim, 0) else 0


def checked_prompt(model: LlamaForCausalLM, input_ids: Any, attention_mask: Any, max_new_tokens: int, eos: list[int],
                   pad: int | None, inputs_embeds: Any, prompt_readers: dict[str, bool],
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(prompt ids, attention mask, embeddings or None) of a `generate()` call, on the model's device. Without
    `inputs_embeds`: `ttl_core.sampling.checked_inputs`. With them, (batch, seq, hidden_size), in the embedding
    table's dtype: the `input_ids` given with them (of the same batch and seq), else (batch, 0) ids; the
    `attention_mask` given, else, as in transformers, the one the ids show, or all ones (embeddings show no padding
    token). `prompt_readers`: whether the call asks
    for each decoding method that runs the model on the prompt's ids (refused with embeddings)."""
    if inputs_embeds is None:
        return *checked_inputs(model, input_ids, attention_mask, max_new_tokens, eos, pad), None
    asked = [name for name, used in prompt_readers.items() if used]
    if asked:
        raise GenerationError(f"inputs_embeds are decoded greedily or by sampling only, not with {asked[0]}, which "
                              "runs the model on the prompt's ids")
    hidden = model.config.hidden_size
    if not (isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.is_floating_point() and inputs_embeds.dim() == 3
            and inputs_embeds.shape[-1] == hidden):
        raise GenerationError(f"inputs_embeds must be a floating-point tensor shaped (batch, seq, {hidden})")
    batch_seq = inputs_embeds.shape[:2]
    if inputs_embeds.numel() == 0:
        raise GenerationError(f"empty prompt: inputs_embeds has shape {tuple(inputs_embeds.shape)}")
    embed = model.get_input_embeddings().weight
    inputs_embeds = inputs_embeds.to(embed.device, embed.dtype)
    if input_ids is None:
        check_room(model, batch_seq[1], max_new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones(batch_seq, dtype=torch.long, device=embed.device)
        mask = checked_mask(attention_mask, batch_seq, "inputs_embeds' (batch, seq)", embed.device)
        return torch.zeros(batch_seq[0], 0, dtype=torch.long, device=embed.device), mask, inputs_embeds
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != batch_seq:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids given with inputs_embeds must be the ids they embed, shaped "
                              f"{tuple(batch_seq)}, got {shape}")
    return *checked_inputs(model, input_ids, attention_mask, max_new_tokens, eos, pad), inputs_embeds
