"""One step of pretraining, and the eval loss it is judged by: the pieces `ttl_core.train`'s loop calls each step.

`model_inputs` turns a loader batch into the model's arguments, `train_step` accumulates the step's micro-batches and
applies one optimizer update, `evaluate` scores the first batches of a val.bin. Losses are summed over tokens and
divided by the target tokens of the whole step (all micro-batches, all ranks), so that gradient accumulation and data
parallelism give the update of one big batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .attention import document_layout
from .distributed import World, all_reduce_sum, set_gradient_sync
from .mixture import val_loader
from .noise_scale import NoiseScale
from .optim import apply_update, clip_gradients, gradient_figures, gradient_parts, stop_if_not_finite
from .profiling import annotate
from .run_config import RunConfig, TrainConfig
from .spikes import SpikeDetector

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to the run's `train.dtype` on `device`; float32 runs without autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[dtype])


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, document_masking: bool,
                 bos_id: int | None) -> dict[str, Any]:
    """Keyword arguments for the model from a loader batch. With document masking, attention stays within
    each document, positions restart at each document, and the token that begins the next document is not
    a prediction target."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "targets": batch["labels"].to(device, non_blocking=True)}
    if document_masking:
        position_ids, cu_seqlens, max_seqlen = document_layout(batch["doc_starts"])
        # non_blocking as above: a blocking copy to the GPU waits for all the work queued before it
        inputs.update(position_ids=position_ids.to(device, non_blocking=True),
                      cu_seqlens=cu_seqlens.to(device, non_blocking=True), max_seqlen=max_seqlen)
        if bos_id is not None:
            inputs["targets"] = inputs["targets"].masked_fill(inputs["targets"] == bos_id, -100)
    return inputs


def count_targets(micro_batches: list[dict[str, Any]], world: World) -> torch.Tensor:
    """Target tokens in the whole optimizer step, over every micro-batch and every rank, counted on the
    device (no host sync before the forward pass)."""
    local = torch.stack([(mb["targets"] != -100).sum() for mb in micro_batches]).sum().float().reshape(1)
    return all_reduce_sum(local.to(world.reduce_device), world)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]],
               train: TrainConfig, world: World, lr: float,
               scaler: torch.amp.GradScaler | None,
               noise: NoiseScale | None = None,
               spikes: SpikeDetector | None = None) -> tuple[float, float, dict[str, float | bool | list[str]]]:
    """One optimizer update from the step's micro-batches; returns (mean cross-entropy per target token, not
    label-smoothed, gradient norm before clipping, figures to log: the grad scaler's, `z_loss` with `train.z_loss`,
    `smoothed_loss` with `train.label_smoothing`, grad_norm/PART (`gradient_parts`) with `train.log_grad_norms`,
    and given a `noise`, its figures where the step has a small batch (`ttl_core.noise_scale`)); given `spikes`, a
    step whose loss or norm spikes (`ttl_core.spikes`) is not applied and logs `skipped` and `spike`. Raises
    TrainingError, before touching the weights, on a non-finite loss or gradient norm (with an fp16 grad scaler, which
    skips such steps itself, only once its loss scale is down to MIN_LOSS_SCALE): clipping would turn every gradient
    into NaN and the update would write NaN into every weight."""
    n_targets = count_targets(micro_batches, world).clamp_min(1.0)
    # each rank's gradient is averaged over ranks by DDP/FSDP, hence the factor world.size
    scale = world.size / n_targets.to(world.device)
    sums = torch.zeros(3, device=world.device)  # the objective (cross-entropy + z-loss), its z-loss part, the NLL
    # small_batch_terms, summed over ranks in the loss's all-reduce, and N: in the one host sync
    small, small_size = sums.new_empty(0), noise.small_batch_size(len(micro_batches)) if noise else 0
    for i, inputs in enumerate(micro_batches):
        set_gradient_sync(model, i == len(micro_batches) - 1)
        with annotate(f"forward {i}"), autocast(world.device, train.dtype):
            out = model(**inputs, loss_reduction="sum", z_loss=train.z_loss, label_smoothing=train.label_smoothing)
        sums[0] += out.loss.detach().float()
        for part, value in enumerate((out.z_loss, out.nll), start=1):  # None where its setting is off: no kernel
            if value is not None:
                sums[part] += value.float()
        with annotate(f"backward {i}"):
            scaled = out.loss * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        if i + 1 == small_size:  # the small batch's backward done: read before the next micro-batch adds to it
            small = noise.small_batch(model, [mb["targets"] for mb in micro_batches[:small_size]], scale,
                                      len(micro_batches), n_targets)
    totals = all_reduce_sum(torch.cat([sums, small[:3]]), world)
    means = totals[:3] / n_targets.to(world.device)
    parts = gradient_parts(model) if train.log_grad_norms else {}
    grad_norms = clip_gradients(model, optimizer, train, scaler, parts)
    # one host sync for every figure: the loss must be known before the weights change, and a second sync
    # for the norm after the update would drain the GPU again before the next step's work is queued
    objective, z_part, nll, grad_norm, *rest = torch.cat([means, grad_norms.to(means).reshape(-1), totals[3:],
                                                          small[3:]]).tolist()
    part_norms, noise_terms = rest[:len(parts)], rest[len(parts):]
    stop_if_not_finite(optimizer, {"loss": objective, **gradient_figures(grad_norm, scaler)})
    spike = spikes.update(objective, grad_norm) if spikes else {}  # decided on the figures just read back
    figures = {**apply_update(optimizer, lr, grad_norm, scaler, skip=bool(spike)), **dict(zip(parts, part_norms)),
               **spike, **({"z_loss": z_part} if train.z_loss else {}),
               # a skipped batch is no sample of the data trained on: it leaves the noise scale's averages alone
               **(noise.update(grad_norm**2, *noise_terms) if noise_terms and not spike else {})}
    if train.label_smoothing:  # "loss" stays the plain cross-entropy, so that runs with and without it compare
        return nll, grad_norm, {**figures, "smoothed_loss": objective - z_part}
    return objective - z_part, grad_norm, figures


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: Path, run: RunConfig, world: World, bos_id: int | None) -> float:
    """Mean loss per target token over the first `eval_batches` global batches of val.bin (fewer if it holds
    fewer), in file order: each rank evaluates its micro-batch of each, so the tokens evaluated grow with the
    number of processes."""
    train, loader = run.train, val_loader(data_dir, run, world)
    model.eval()
    totals = torch.zeros(2, device=world.device)
    for _, batch in zip(range(train.eval_batches), loader):
        inputs = model_inputs(batch, world.device, run.data.document_masking, bos_id)
        with autocast(world.device, train.dtype):
            totals[0] += model(**inputs, loss_reduction="sum").loss.float()
        totals[1] += (inputs["targets"] != -100).sum()
    model.train()
    totals = all_reduce_sum(totals, world)
    return float(totals[0] / totals[1].clamp_min(1))
