"""The gradient noise scale during pretraining (`train.log_noise_scale`): the "simple" noise scale of McCandlish et
al. 2018 ("An Empirical Model of Large-Batch Training"), B_simple = tr(Σ) / |G|², in target tokens. |G| is the true
gradient's norm and Σ the per-token gradient covariance; B_simple estimates the critical batch size, past which a
bigger batch buys little more progress per step.

The estimator: with |G_b|² the squared norm of a mean gradient over b target tokens and |G_B|² that over B,
E|G_b|² = |G|² + tr(Σ) / b, so that each step gives the unbiased estimates

    |G|² ≈ (B |G_B|² - b |G_b|²) / (B - b)        tr(Σ) ≈ (|G_b|² - |G_B|²) / (1/b - 1/B).

The big batch is the whole step: B its N target tokens (all micro-batches, all processes), |G_B|² its gradient norm
before clipping squared (`grad_sq_big`, grad_norm²). The small batch is each process's first micro-batch: its
gradient is read right after its backward, before the next micro-batch accumulates into it (DDP all-reduces only
at the last micro-batch, so it is the process's own), rescaled from the step's normalisation (world size / N) to
the mean over its b_r target tokens. |G_b|² (`grad_sq_small`) is the mean over processes of their squared norms,
and 1/b the mean of 1/b_r (E|G_b|² is linear in 1/b), both over the processes whose first micro-batch has a
target. Both estimates are noisy, so each is averaged by an exponential moving average of decay
`train.noise_scale_ema` from 0, and `noise_scale` is the ratio of the two averages (their common start-up bias
cancels in it); it can be negative while the average of |G|² is.

Cost: one foreach norm over the gradients per step and no copy of them; three numbers more in the step's all-reduce
and four in its one host read. A step with one micro-batch per process (a batch ramp's first), or without a target
in any process's first, logs none and leaves the averages as they were. Target tokens are those the loss counts:
not document masking's BOS targets nor any -100.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .run_config import TrainConfig


def validate_noise_scale(t: TrainConfig) -> None:
    """Refuse a noise_scale_ema outside [0, 1), and train.log_noise_scale where the first micro-batch's own gradient
    cannot be read: one micro-batch per step (it is the whole step's), FSDP (which holds it unsharded inside its own
    state) or float16 (loss-scaled by the grad scaler)."""
    if not 0 <= t.noise_scale_ema < 1:
        raise ConfigError(f"train.noise_scale_ema must lie in [0, 1) (0: no averaging), got {t.noise_scale_ema}")
    if not t.log_noise_scale:
        return
    if t.grad_accum_steps < 2:
        raise ConfigError("train.log_noise_scale compares each process's first micro-batch with the whole step: it "
                          f"needs train.grad_accum_steps >= 2, got {t.grad_accum_steps}")
    if t.distributed == "fsdp" or t.dtype == "float16":
        raise ConfigError(f"train.log_noise_scale reads the first micro-batch's gradient, which "
                          f"{'FSDP keeps inside its own state' if t.distributed == 'fsdp' else 'float16 loss-scales'}: "
                          f"use train.distributed=\"ddp\" and a dtype other than float16")


def noise_estimates(small_sq: float, big_sq: float, small: float, big: float) -> tuple[float, float]:
    """The unbiased estimates (|G|², tr(Σ)) from squared gradient norms over `small` and `big` target tokens."""
    return (big * big_sq - small * small_sq) / (big - small), (small_sq - big_sq) / (1 / small - 1 / big)


def small_batch_terms(model: torch.nn.Module, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[|G_b|², 1/b, 1] of the micro-batch whose backward (of its summed loss times `scale`) alone filled the gradients
    of `model`, b its target tokens; zeros where it has none (no small batch); on the device, no host sync."""
    tokens = (targets != -100).sum().reshape(1)
    has_targets, b = (tokens > 0).to(scale.dtype), tokens.clamp_min(1)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return torch.cat([has_targets * (norm / (scale * b)).square(), has_targets / b, has_targets])


class NoiseScale:
    """The moving averages of |G|² and tr(Σ), on the host in float64; `state_dict` goes into checkpoints' trainer
    state, so that a resumed run continues them exactly (from a checkpoint without them, they start afresh)."""

    def __init__(self, decay: float, state: dict[str, float] | None = None):
        self.decay = decay
        self.grad_sq, self.trace = (state["grad_sq"], state["trace"]) if state else (0.0, 0.0)

    def update(self, big_sq: float, small_sq_sum: float, inverse_small_sum: float, processes: float,
               big: float) -> dict[str, float]:
        """The step's figures from `small_batch_terms` summed over the processes (`processes` of them with a target in
        their first micro-batch) and the whole step's |G_B|² over `big` target tokens, the averages updated with
        them; none for a step without a small batch or whose small batch is all of it."""
        if not processes or processes / inverse_small_sum >= big:
            return {}
        small_sq, small = small_sq_sum / processes, processes / inverse_small_sum
        grad_sq, trace = noise_estimates(small_sq, big_sq, small, big)
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        return {"noise_scale": self.trace / self.grad_sq if self.grad_sq else math.nan, "grad_sq_small": small_sq,
                "grad_sq_big": big_sq}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self.grad_sq, "trace": self.trace}
