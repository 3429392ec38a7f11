"""Skipping the update of a loss or gradient-norm spike during pretraining (`train.skip_spikes_sigma`).

A step whose loss or gradient norm lies more than `sigma` standard deviations above the mean of that figure over
the last `window` steps is a spike: its update is skipped (no optimizer step, the gradients dropped, the EMA and the
noise scale's averages left alone), its batch is not trained on again, and the lr schedule moves on, as after a step
the fp16 grad scaler skips.

- The loss is the objective the update is the gradient of: the cross-entropy plus the z-loss term, label-smoothed
  with `train.label_smoothing`. The gradient norm is the one before clipping (unscaled with fp16).
- The standard deviation is the population one (the window is all there is to measure). No step is skipped before
  the window is full: early training moves too fast for a few steps to say what is normal.
- Every step's figures enter the window, a skipped step's too. A window that left skipped steps out would never
  take in a lasting change of level (a new data source's higher loss, gradient norms that grow) and would skip every
  step after it. Admitted, a step up of any size d over a steady window (std s << d) is skipped until about a
  fraction 1 / (1 + sigma²) of the window holds it, then the mean and std reach it: 4 steps for sigma 6 and a window
  of 128 (exactly so with s = 0; the new level's own noise can add a step or two). The price: after a spike the
  window's std is larger, the detector duller, for `window` steps.
- A step with a figure that is not finite is left out altogether: a NaN or infinite loss stops the run
  (`stop_if_not_finite`), and an infinite or NaN gradient norm with fp16 is the grad scaler's to skip.

Each figure is decided on the host from the numbers the step reads back anyway (no host sync of its own). Under DDP
and FSDP every process reads the same numbers (the all-reduced loss, the global gradient norm of the all-reduced
gradients), so all take the same decision. `state_dict` goes into checkpoints' trainer state, so that a resumed
run skips exactly the steps the uninterrupted one skips; from a checkpoint without it the windows start empty.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .run_config import TrainConfig

FIGURES = ("loss", "grad_norm")


def validate_spikes(t: TrainConfig) -> None:
    """skip_spikes_sigma is a finite number >= 0 (0: off), skip_spikes_window an integer >= 2 (one step has no
    spread). Written so that NaN fails."""
    if not 0 <= t.skip_spikes_sigma < math.inf:
        raise ConfigError(f"train.skip_spikes_sigma must be a finite number >= 0 (0: never skip), got "
                          f"{t.skip_spikes_sigma}")
    if t.skip_spikes_window < 2:
        raise ConfigError(f"train.skip_spikes_window must be >= 2 (steps whose spread is measured), got "
                          f"{t.skip_spikes_window}")


class SpikeDetector:
    """The last `window` losses and gradient norms, and the decision whether a step's figures spike above them."""

    def __init__(self, sigma: float, window: int, state: dict[str, list[float]] | None = None):
        self.sigma = sigma
        # a resume with a smaller window keeps the newest of the saved values
        self.history = {name: deque((state or {}).get(name, ()), maxlen=window) for name in FIGURES}

    def update(self, loss: float, grad_norm: float) -> dict[str, list[str]]:
        """{"spike": the names of the figures that spike} for a step to skip, else {}; the step's figures are then
        added to their windows (none of a step with a non-finite one)."""
        figures = dict(zip(FIGURES, (loss, grad_norm)))
        if not all(map(math.isfinite, figures.values())):
            return {}
        spikes = [name for name, value in figures.items() if self._is_spike(self.history[name], value)]
        for name, value in figures.items():
            self.history[name].append(value)
        return {"spike": spikes} if spikes else {}

    def _is_spike(self, window: deque, value: float) -> bool:
        """Whether `value` lies more than `sigma` standard deviations above the mean of a full `window`."""
        if len(window) < window.maxlen:
            return False
        # the rises of `value` over the window, not the window's own values: a value equal to all of a constant
        # window rises by exactly 0 (from their mean rounded an ulp below them, it was skipped), and one above them
        # rises by far more than the rounding left in the std
        rises = [value - x for x in window]
        rise = math.fsum(rises) / len(rises)
        return rise > self.sigma * math.sqrt(math.fsum((r - rise) ** 2 for r in rises) / len(rises))

    def state_dict(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self.history.items()}


def spike_detector(train: TrainConfig, trainer_state: dict[str, Any] | None) -> SpikeDetector | None:
    """The run's detector, its windows those of the checkpoint resumed (`trainer_state`); None with the option off."""
    if not train.skip_spikes_sigma:
        return None
    return SpikeDetector(train.skip_spikes_sigma, train.skip_spikes_window, (trainer_state or {}).get("spikes"))
