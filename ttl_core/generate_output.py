"""What `ttl_core.generate(..., return_dict_in_generate=True)` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import GenerationError


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns, as transformers' GenerateDecoderOnlyOutput (and,
    with beams, GenerateBeamDecoderOnlyOutput) holds it: `sequences` as `generate()` returns them; with
    `output_scores`, `scores`, one (rows, vocab) float32 tensor a decoding step: the scores the token was chosen from,
    after every processor (with beams, of each beam's log-probabilities) and, with beams, `sequences_scores`, each
    returned beam's length-penalized score; with `output_logits`, `logits`, the model's logits a step; with beams,
    `beam_indices`, the beam row each returned sequence's token came from at each new position (-1 past its end)."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    def __getitem__(self, key: str | int | slice) -> Any:
        """As transformers' outputs are read: by the name of a field that is set, or by position among them."""
        fields = {name: value for name, value in vars(self).items() if value is not None}
        return fields[key] if isinstance(key, str) else tuple(fields.values())[key]

    def transition_scores(self, normalize_logits: bool = False) -> torch.Tensor:
        """(rows, new tokens): each new token's score at the step that chose it, in the scores of the beam row it
        came from (log-softmaxed first with `normalize_logits`, which makes the greedy or sampled scores of a model
        log-probabilities), 0 past a beam's end: what transformers' `compute_transition_scores` computes."""
        if self.scores is None:
            raise GenerationError("transition scores need each step's scores: generate with output_scores=True")
        # (beam rows, vocab, steps), steps outermost in memory: transformers' layout, so the log-softmax rounds alike
        steps = torch.stack(self.scores).permute(1, 2, 0)
        if normalize_logits:
            steps = steps.log_softmax(dim=1)
        origins = self.beam_indices
        if origins is None:  # greedy or sampled: each row's tokens come from its own scores
            origins = torch.arange(self.sequences.shape[0], device=steps.device)[:, None].expand(-1, len(self.scores))
        ended = origins < 0
        new_tokens = int((~ended).sum(dim=-1).max())
        origins, ended = origins[:, :new_tokens].long().clamp_min(0), ended[:, :new_tokens]
        picked = steps[origins, self.sequences[:, -new_tokens:], torch.arange(new_tokens, device=steps.device)]
        return picked.masked_fill(ended, 0.0)


class GenerationSettings(dict):
    """A model's `generation_config`: the settings of its checkpoint's generation_config.json, a dict that is also
    read and written by attribute as transformers' GenerationConfig is, so that `model.generation_config.pad_token_id
    = ...` sets what `generate()` then uses. A setting never set is an AttributeError naming it, where transformers
    would give its default: `generate()` applies those defaults, but only where neither call nor checkpoint sets one."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no generation setting {name!r} in the model's generation_config") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value
