"""What `ttl_core.generate(..., return_dict_in_generate=True)` returns, and the generation settings a model keeps
(`model.generation_config`) or a call passes (`generate(generation_config=)`)."""

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


def settings_dict(config: Any, name: str, transformers_class: str) -> dict[str, Any]:
    """A configuration argument as a dict: a dict itself, or what the `to_dict()` of transformers' class of that
    name (or anything with one) gives; a one-line error naming `name` otherwise."""
    settings = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(settings, dict):
        raise GenerationError(f"{name} must be a dict or a transformers {transformers_class}, got a "
                              f"{type(config).__name__}")
    return settings


def passed_generation_config(generation_config: Any) -> dict[str, Any]:
    """The settings a `generation_config` passed to `generate()` sets: a dict's, or those of transformers'
    GenerationConfig (anything with `to_dict()`) that are not None, which win over the checkpoint's as there."""
    if generation_config is None:
        return {}
    settings = settings_dict(generation_config, "generation_config", "GenerationConfig")
    return {name: value for name, value in settings.items() if value is not None}


def setting_source(name: str, passed: dict[str, Any], model_settings: GenerationSettings | None) -> str:
    """Where a setting that `generate()`'s own arguments leave unset comes from, as messages name it:
    "generation_config" where the generation_config the call passed (`passed`, see `passed_generation_config`) sets it,
    else the `source` of the model's settings (config.json where it has none: its ids are then the config's)."""
    if name in passed:
        return "generation_config"
    return "config.json" if model_settings is None else model_settings.source


class GenerationSettings(dict):
    """A model's `generation_config`: a dict whose settings are also read and written by attribute as transformers'
    GenerationConfig's are, so that `model.generation_config.pad_token_id = ...` sets what `generate()` then uses. A
    setting never set is an AttributeError naming it, where transformers would give its default: `generate()` applies
    those defaults, but only where neither call nor model sets one. `source` names the settings' origin in messages:
    the checkpoint's generation_config.json, the model's config.json (`from_model_config`), or, once a program sets one
    (by attribute or item) or assigns settings (a dict or transformers' GenerationConfig), "model.generation_config"."""

    def __init__(self, settings: dict[str, Any] | None = None, source: str = "generation_config.json"):
        super().__init__(settings or {})
        object.__setattr__(self, "source", source)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationSettings:
        """What transformers' `GenerationConfig.from_model_config` gives a Llama config (and its `save_pretrained`
        writes): the special token ids that are set, and its fixed flags."""
        ids = {name: getattr(config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(config, name) is not None}
        return cls({"use_cache": True, "output_attentions": False, "output_hidden_states": False, **ids,
                    "_from_model_config": True}, source="config.json")

    @classmethod
    def assigned(cls, settings: Any) -> GenerationSettings | None:
        """What `model.generation_config = settings` keeps: None, these settings themselves (a loader passes
        generation_config.json's so), or, as set by the program, a dict's or those of transformers' GenerationConfig
        (anything with `to_dict()`) that are set."""
        if settings is None or isinstance(settings, GenerationSettings):
            return settings
        if isinstance(settings, dict):
            return cls(settings, source="model.generation_config")
        return cls(passed_generation_config(settings), source="model.generation_config")

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no generation setting {name!r} in the model's generation_config") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self._set_by_program()

    def update(self, *args: Any, **settings: Any) -> None:  # dict's own skips __setitem__
        super().update(*args, **settings)
        self._set_by_program()

    def setdefault(self, name: str, default: Any = None) -> Any:
        if name not in self:
            self[name] = default
        return self[name]

    def __ior__(self, other: Any) -> GenerationSettings:
        self.update(other)
        return self

    def _set_by_program(self) -> None:
        object.__setattr__(self, "source", "model.generation_config")  # no longer what a file or the config says

    def __reduce__(self) -> tuple:  # copies (the EMA's deepcopy of a model) keep the source: dict's rebuild by item
        return type(self), (dict(self), self.source)

    def to_dict(self) -> dict[str, Any]:
        return dict(self)
