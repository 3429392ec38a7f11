"""The optimizer side of a training step, shared by pretraining (`ttl_core.train`) and fine-tuning
(`ttl_core.finetune`): AdamW with no-decay groups (or Muon on the decoder blocks' projections, `ttl_core.muon`), the
warmup and decay schedule, gradient clipping, the fp16 grad scaler's step, and the stop on a non-finite loss or gradient
before it reaches the weights."""

from __future__ import annotations

import math

import torch

from .distributed import World, full_tensor, unwrap
from .errors import TrainingError
from .lora_targets import linear_slices
from .muon import MuonAndAdamW
from .profiling import annotate
from .run_config import TrainConfig

# fp16's grad scaler skips a step whose gradients are not finite and halves its loss scale. Gradients that are
# still not finite at a scale of 1 or less were not pushed out of float16's range by the scaling: they are NaN,
# or beyond float16 unscaled, which the scaler would skip for ever (the scale halving to 0) without a word.
MIN_LOSS_SCALE = 1.0


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device: torch.device,
                    world: World | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with those whose name (any of a tied weight's names) contains a
    `train.no_decay` fragment in a group without weight decay (fused kernels on CUDA); with `train.optimizer`
    "muon", the decoder blocks' projection matrices are Muon's instead (see `ttl_core.muon`), whose Newton-Schulz
    work the processes of `world` (a DDP or FSDP run's) share."""
    # a tied weight counts under each of its names (the LM head tied to the embedding is listed as the embedding's)
    excluded = {id(param) for name, param in model.named_parameters(remove_duplicate=False)
                if any(f in name for f in train.no_decay)}
    muon_rows = projection_rows(model) if train.optimizer == "muon" else {}
    decay, no_decay, muon_groups = [], [], {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        weight_decay = 0.0 if id(param) in excluded else train.weight_decay
        if id(param) in muon_rows:
            muon_groups.setdefault((muon_rows[id(param)], weight_decay), []).append(param)
        else:
            (no_decay if id(param) in excluded else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=tuple(train.betas),
                              eps=train.eps, fused=device.type == "cuda")
    if not muon_groups:
        return adamw
    return MuonAndAdamW(adamw, [{"params": params, "rows": list(rows), "lr": train.lr, "weight_decay": weight_decay,
                                 "momentum": train.muon_momentum, "nesterov": train.muon_nesterov,
                                 "ns_steps": train.muon_ns_steps, "adjust_lr": train.muon_adjust_lr}
                                for (rows, weight_decay), params in muon_groups.items()], world)


def projection_rows(model: torch.nn.Module) -> dict[int, tuple[int, ...]]:
    """id of each decoder-block projection weight -> the row counts of the projections fused in it (q, k, v;
    gate, up; or the one of o_proj, down_proj), as transformers' Llama holds them apart."""
    model = unwrap(model)
    return {id(model.get_submodule(path).weight): tuple(stop - start for start, stop in slices.values())
            for path, (_, slices) in linear_slices(model).items()}


def lr_at(step: int, train: TrainConfig) -> float:
    """The lr of optimizer step `step` (from 1): linear warmup from lr/warmup to lr over `warmup_steps`, then
    `lr` until the decay starts (at once with `decay_steps` 0, else `decay_steps` before `max_steps`), then the
    `schedule`'s decay, which reaches `min_lr` just after step `max_steps`, so the last update is not spent at the
    floor (with `min_lr` 0 it would change nothing). Past the warmup this is transformers' schedule of the same
    shape (`get_cosine_with_min_lr_schedule_with_warmup`, `get_linear_schedule_with_warmup`, `get_wsd_schedule`),
    whose warmup starts one step behind, at lr 0."""
    if step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    decay_start = train.max_steps - train.decay_steps if train.decay_steps else train.warmup_steps
    progress = min(1.0, max(0.0, (step - 1 - decay_start) / max(1, train.max_steps - decay_start)))
    remaining = {"cosine": 0.5 * (1.0 + math.cos(math.pi * progress)), "linear": 1.0 - progress,
                 "1-sqrt": 1.0 - math.sqrt(progress), "constant": 1.0}[train.schedule]
    return train.min_lr + (train.lr - train.min_lr) * remaining


def gradient_parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The trainable parameters by the part of the model they belong to, keyed by the figure its gradient norm is
    logged as: grad_norm/embed, grad_norm/layers.N (decoder block N), grad_norm/norm (the final norm) and
    grad_norm/lm_head, absent when tied (its weight is the embedding's, listed once), or a classifier's
    grad_norm/score: each parameter is in one part. A part with nothing trainable (under LoRA, say) is left out."""
    parts: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            path = name.removeprefix("backbone.").split(".")
            part = ".".join(path[:2] if path[0] == "layers" else path[:1])
            parts.setdefault(f"grad_norm/{part}", []).append(param)
    return parts


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig,
                   scaler: torch.amp.GradScaler | None = None,
                   parts: dict[str, list[torch.nn.Parameter]] | None = None) -> torch.Tensor:
    """Unscale the accumulated gradients (fp16) and clip them to `train.grad_clip` (0: no clipping); returns
    the gradient norm before clipping as a device tensor (no host sync). Given `parts` (`gradient_parts`), a
    vector instead: that norm, then each part's, unscaled and before clipping too."""
    with annotate("clip gradients"):
        if scaler:
            scaler.unscale_(optimizer)
        part_norms = gradient_norms_by_part(parts) if parts else None  # before clipping rescales the gradients
        if train.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        else:  # the norm alone: clipping to infinity would still rescale every gradient by 1, a pass over all of them
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        grad_norm = full_tensor(grad_norm)
    return grad_norm if part_norms is None else torch.cat([grad_norm.reshape(1), part_norms])


def gradient_norms_by_part(parts: dict[str, list[torch.nn.Parameter]]) -> torch.Tensor:
    """The norm of each part's gradients, in the order of `parts`. Under FSDP each rank holds shards of every
    gradient: the norms of all of them are reduced in one collective (a part's norm reduced alone would cost one
    per part)."""
    grads = [[p.grad for p in params if p.grad is not None] for params in parts.values()]
    norms = full_tensor(torch.stack([torch.linalg.vector_norm(grad) for part in grads for grad in part]))
    return torch.stack([torch.linalg.vector_norm(part) for part in norms.split([len(part) for part in grads])])


def apply_update(optimizer: torch.optim.Optimizer, lr: float, grad_norm: float,
                 scaler: torch.amp.GradScaler | None = None, skip: bool = False) -> dict[str, float | bool]:
    """Set the learning rate, step the optimizer (through the scaler for fp16) and zero the gradients. With a
    scaler, returns the step's `loss_scale` (the one its gradients were scaled by) and whether the scaler `skipped`
    it; else {}. Only a step with an inf or NaN gradient, hence a non-finite `grad_norm`, can be skipped: only then
    is the scale read back after the update (a host sync that waits for it) to tell. `skip` (a loss spike,
    `ttl_core.spikes`) drops the gradients without a step, weights and optimizer state as they were, and returns
    `skipped` true; a scaler still closes its step (its scale moves on as after any step with finite gradients)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    figures: dict[str, float | bool] = {"skipped": True} if skip else {}
    with annotate("optimizer update"):
        if scaler:
            scale = scaler.get_scale()  # no wait: the loss and norm were just read back
            if not skip:
                scaler.step(optimizer)
            scaler.update()  # halves the scale after a step with an inf or NaN gradient
            figures = {"loss_scale": scale,
                       "skipped": skip or not math.isfinite(grad_norm) and scaler.get_scale() < scale}
        elif not skip:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return figures


def optimizer_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, lr: float,
                     scaler: torch.amp.GradScaler | None = None,
                     parts: dict[str, list[torch.nn.Parameter]] | None = None) -> tuple[float, dict[str, float | bool]]:
    """Clip, then apply the accumulated gradients; returns the gradient norm before clipping and the figures to
    log: the grad scaler's from `apply_update`, and given `parts` (`gradient_parts`), each part's gradient norm
    under its name. A non-finite norm (with a grad scaler, at a loss scale down to MIN_LOSS_SCALE) raises
    TrainingError before the weights change (see `train_step`)."""
    grad_norm, *part_norms = clip_gradients(model, optimizer, train, scaler, parts).reshape(-1).tolist()
    stop_if_not_finite(optimizer, gradient_figures(grad_norm, scaler))
    return grad_norm, {**apply_update(optimizer, lr, grad_norm, scaler), **dict(zip(parts or {}, part_norms))}


def gradient_figures(grad_norm: float, scaler: torch.amp.GradScaler | None) -> dict[str, float]:
    """The gradient norm for `stop_if_not_finite` to check: always without a grad scaler; with one, only once
    the loss scale is down to MIN_LOSS_SCALE (above it the scaler skips the step and lowers the scale itself).
    The scale is read (a host sync) only for a norm that is not finite."""
    if scaler is None:
        return {"gradient norm": grad_norm}
    if not math.isfinite(grad_norm) and scaler.get_scale() <= MIN_LOSS_SCALE:
        return {f"gradient norm at fp16 loss scale {scaler.get_scale():g}": grad_norm}
    return {}


def stop_if_not_finite(optimizer: torch.optim.Optimizer, figures: dict[str, float]) -> None:
    """Raise TrainingError naming the first of `figures` that is NaN or infinite, with the gradients dropped
    so the weights stay as they were."""
    for name, value in figures.items():
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"{name} became {value}")
