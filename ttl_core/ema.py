"""An exponential moving average of the weights during pretraining (`train.ema_decay`).

After each optimizer update the fp16 grad scaler did not skip (a skipped step changed no weight, so it adds nothing to
the average), every trainable parameter's average moves to ema = d * ema + (1 - d) * weight, in float32, with
d = min(ema_decay, (1 + step) / (10 + step)) at optimizer step `step` (TensorFlow's ExponentialMovingAverage with
num_updates): the average starts as the run's first weights (random ones, for a new model), and this warm-up of the
decay lets it leave them within a few steps instead of about 1 / (1 - ema_decay) of them.

The average lives in a second copy of the model, whose parameters are the averaged weights (no gradients, no optimizer
state): it costs what the averaged tensors cost (buffers are a few bytes), needs no swapping of weights in and out of
the training model to be evaluated or saved, and leaves the training weights untouched. Under FSDP it is sharded as
the training model is, each rank averaging its own shards; under DDP every rank holds the whole average and applies
the same update to the same weights: no communication but to evaluate it and to gather it for a checkpoint's `ema/`.

Each evaluation scores the average as it scores the training weights, on the same batches and questions (one more
pass over each val split and task): `averaged_names` gives its figures names of their own.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import EMA_DIR
from .distributed import World, full_model_state, unwrap, wrap_model
from .errors import ConfigError
from .hf import load_pretrained


def ema_decay_at(decay: float, step: int) -> float:
    """The decay applied after optimizer step `step` (from 1): `decay`, warmed up as (1 + step) / (10 + step)."""
    return min(decay, (1 + step) / (10 + step))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a DTensor), a plain tensor as it is. The average and the training
    model are sharded alike but on meshes of their own, which DTensor would refuse to combine."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def averaged_names(figures: dict[str, float]) -> dict[str, float]:
    """An eval record's figures (`eval_figures`, `task_figures`) as the average's: eval_loss as eval_loss/ema, and
    KIND/NAME as KIND/ema/NAME (eval_loss/ema/NAME of a data.mix source or data.eval set, acc/ema/NAME and
    acc_norm/ema/NAME of a task); no perplexities, each the exp of a loss logged beside it."""
    return {f"{kind}/ema{sep}{name}": value for key, value in figures.items()
            for kind, sep, name in [key.partition("/")] if kind != "eval_ppl"}


def check_average_names(names: Iterable[str], decay: float) -> None:
    """With an average (`decay`), refuse a data.mix source or data.eval set named ema or ema/NAME: its eval_loss/NAME
    would be one of the average's (`averaged_names`). The config's names, and a resumed run's mixture recorded."""
    if decay and (clash := next((name for name in names if name.split("/")[0] == "ema"), "")):
        raise ConfigError(f"a data.mix source or data.eval set named {clash!r} would log eval_loss/{clash}, a name "
                          "train.ema_decay keeps for the average's figures (ttl_core.ema): rename it")


class WeightEMA:
    """The moving average of a model's trainable weights, held in `module`, a copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []

    def attach(self, model: torch.nn.Module, distributed: str, world: World) -> None:
        """Follow `model`, the training model as `wrap_model` wrapped it: under FSDP the average is sharded as it."""
        if distributed == "fsdp":
            self.module = wrap_model(self.module, "fsdp", world)
        averages = dict(unwrap(self.module).named_parameters())
        self.pairs = [(averages[name], param) for name, param in unwrap(model).named_parameters()
                      if param.requires_grad]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the weights after optimizer step `step`: one fused kernel, no host sync."""
        averages, weights = zip(*((local_tensor(a), local_tensor(w)) for a, w in self.pairs))
        torch._foreach_lerp_(averages, weights, 1.0 - ema_decay_at(self.decay, step))

    def evaluate(self, figures_of: Callable[[torch.nn.Module], dict[str, float]]) -> dict[str, float]:
        """The eval figures `figures_of(module)` of the averaged weights, under the average's names (`averaged_names`;
        every rank calls it). FSDP keeps the root's parameters gathered after a forward, for the backward that
        follows in training: the average, never trained, lets go of them, or its next evaluation would run on these
        stale copies."""
        try:
            return averaged_names(figures_of(self.module))
        finally:
            if hasattr(self.module, "reshard"):
                self.module.reshard()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The averaged weights in full on the CPU (on rank 0 when sharded; a collective), as `full_model_state`."""
        return full_model_state(self.module)


def start_ema(model: torch.nn.Module, decay: float, resume_from: Path | None, world: World) -> WeightEMA | None:
    """The run's average of `model`'s weights (None with `decay` 0), before the model is wrapped: the one the
    checkpoint resumed saved, else the weights now. A run resumed from a checkpoint without one (trained with
    ema_decay 0) starts it from the resumed weights, and says so."""
    if not decay:
        return None
    ema = WeightEMA(model, decay)
    if resume_from is not None and (resume_from / EMA_DIR).is_dir():
        saved = load_pretrained(resume_from / EMA_DIR, dtype=torch.float32, device="cpu")
        ema.module.load_state_dict(saved.state_dict())
    elif resume_from is not None and world.is_main:
        warnings.warn(f"{resume_from} holds no average of the weights (its run had train.ema_decay = 0): the average "
                      f"starts from the resumed weights")
    return ema
