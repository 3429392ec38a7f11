"""The gradient noise scale during pretraining (`train.log_noise_scale`): the "simple" noise scale of McCandlish et
al. 2018 ("An Empirical Model of Large-Batch Training"), B_simple = tr(Σ) / |G|², in target tokens. |G| is the true
gradient's norm and Σ the per-token gradient covariance; B_simple estimates the critical batch size, past which a
bigger batch buys little more progress per step.

The estimator: with |G_b|² the squared norm of a mean gradient over b target tokens and |G_B|² that over B,
E|G_b|² = |G|² + tr(Σ) / b, so that each step gives the unbiased estimates

    |G|² ≈ (B |G_B|² - b |G_b|²) / (B - b)        tr(Σ) ≈ (|G_b|² - |G_B|²) / (1/b - 1/B).

The big batch is the whole step: B its N target tokens (all micro-batches, all processes), |G_B|² its gradient norm
before clipping squared (`grad_sq_big`, grad_norm²). The small batch is each process's own. Under DDP (or in one
process), of a step of several micro-batches, its first, whose gradient is read right after its backward, before the
next micro-batch accumulates into it (DDP all-reduces only at the last; the first rather than all of the process's:
the farther b lies below B, the less noisy the estimate of tr(Σ)); of a step of one micro-batch per process
(grad_accum_steps 1, or a batch ramp's first steps), that micro-batch, whose gradient the communication hook
`reduce_as_ddp` reads in DDP's buckets before their all-reduce. Under FSDP, the process's whole share of the step (all
its micro-batches): FSDP2 keeps the gradients it accumulates unsharded in its own state, and reduce-scatters them
inside the last backward, block by block, where `NotingReduceScatter` reads each FSDP module's part before it is
reduced. Each is rescaled from the step's normalisation (world size / N) to the mean over its b_r target tokens.
|G_b|² (`grad_sq_small`) is the mean over processes of their squared norms, and 1/b the mean of 1/b_r (E|G_b|² is
linear in 1/b), both over the processes whose small batch has a target. Both estimates are noisy, so each is averaged
by an exponential moving average of decay `train.noise_scale_ema` from 0, and `noise_scale` is the ratio of the two
averages (their common start-up bias cancels in it); it can be negative while the average of |G|² is.

Cost: one norm over the gradients per step and no copy of them (DDP's hook: its norms, and a pass over each bucket to
scale it, which DDP's own reduction does while copying the gradients in; FSDP: one norm of each reduce-scatter's
input); three numbers more in the step's all-reduce and four in its one host read. DDP's hook is registered only for
a run with steps of one micro-batch, and stops measuring at its first step of several (a batch ramp only grows). One
process with one micro-batch per step has no small batch and is refused, and so is one process under FSDP (its share
is the whole step); a step of one micro-batch in one process (a batch ramp's first), without a target in any process's
small batch, whose one small batch with targets holds all of them, or skipped as a spike (`ttl_core.spikes`: its batch
is not trained on), logs none and leaves the averages as they were.
Target tokens are those the loss counts: not document masking's BOS targets nor any -100.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError

if TYPE_CHECKING:
    from .run_config import TrainConfig


def validate_noise_scale(t: TrainConfig, processes: int | None = None) -> None:
    """Refuse a noise_scale_ema outside [0, 1), and train.log_noise_scale where no process's own gradient can be
    read: float16 (loss-scaled by the grad scaler), FSDP where this torch keeps its reduce-scatter elsewhere
    (`fsdp_reduce_scatter`), or, given the number of `processes` (a run knows it, a config does not), one process whose
    small batch would be the whole step: under FSDP (its share of the step) or with one micro-batch per step."""
    if not 0 <= t.noise_scale_ema < 1:
        raise ConfigError(f"train.noise_scale_ema must lie in [0, 1) (0: no averaging), got {t.noise_scale_ema}")
    if not t.log_noise_scale:
        return
    if t.dtype == "float16":
        raise ConfigError("train.log_noise_scale reads each process's own gradient, which float16 loss-scales: use "
                          "train.dtype=\"bfloat16\" or \"float32\"")
    if processes == 1 and t.distributed == "fsdp":
        raise ConfigError("train.log_noise_scale under FSDP compares each process's share of the step with the whole "
                          "step, which one process's is: launch 2 or more with torchrun, or use "
                          "train.distributed=\"ddp\" (its first micro-batch is then the small one)")
    if t.distributed == "fsdp":  # a torch that moved FSDP2's reduce-scatter: named here, before anything is made
        fsdp_reduce_scatter()
    if processes == 1 and t.grad_accum_steps == 1:
        raise ConfigError("train.log_noise_scale compares a small batch with the whole step: one process needs "
                          "train.grad_accum_steps >= 2 (its first micro-batch is the small one), got 1; or launch 2 or "
                          "more with torchrun (each one's own micro-batch)")


def noise_estimates(small_sq: float, big_sq: float, small: float, big: float) -> tuple[float, float]:
    """The unbiased estimates (|G|², tr(Σ)) from squared gradient norms over `small` and `big` target tokens."""
    return (big * big_sq - small * small_sq) / (big - small), (small_sq - big_sq) / (1 / small - 1 / big)


def small_batch_terms(norm: torch.Tensor, targets: list[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """[|G_b|², 1/b, 1] of the micro-batches of `targets` whose backwards (of the summed loss times `scale`) gave
    gradients of norm `norm`, b their target tokens; zeros where they have none (no small batch); no host sync."""
    tokens = torch.stack([(t != -100).sum() for t in targets]).sum().reshape(1)
    has_targets, b = (tokens > 0).to(scale.dtype), tokens.clamp_min(1)
    return torch.cat([has_targets * (norm / (scale * b)).square(), has_targets / b, has_targets])


class ProcessGradient:
    """This process's gradient norm as its reduction reads it, from the norms of its parts noted while `measuring`:
    each parameter's in DDP's buckets before their all-reduce (`reduce_as_ddp`, given DDP's `group`), or each FSDP
    module's before its reduce-scatter (`NotingReduceScatter`). Combined in the parts' order, not the order they come
    in (DDP rebuilds its buckets after its first backward, which `distributed.settle_buckets` runs before the hook is
    registered, and a summing order that followed the buckets would hang on their layout); on the device, no host
    sync."""

    def __init__(self, parts: list[Any], group: dist.ProcessGroup | None = None):
        self.group, self.measuring = group, True
        self.position = {id(part): i for i, part in enumerate(parts)}
        self.norms: list[torch.Tensor | None] = [None] * len(parts)

    def note(self, part: Any, gradient: torch.Tensor) -> None:
        if self.measuring:
            self.norms[self.position[id(part)]] = torch.linalg.vector_norm(gradient)

    def norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack(self.norms))


def reduce_as_ddp(state, bucket):  # unannotated: DDP checks a hook's annotations, which this module keeps as strings
    """A DDP communication hook (a ProcessGradient, a dist.GradBucket -> a Future of the reduced bucket): the norms
    of the bucket's gradients noted in `state`, then the all-reduce DDP does without a hook, to the bit. DDP
    multiplies each gradient by 1/world size as it copies it into the bucket (torch's allreduce_hook divides the
    bucket instead, which rounds otherwise unless the world size is a power of 2); given a hook, it copies the
    gradients in as they are, and takes the future's tensor as the reduced bucket."""
    for parameter, grad in zip(bucket.parameters(), bucket.gradients()):
        state.note(parameter, grad)
    buffer = bucket.buffer()
    buffer.mul_(1 / dist.get_world_size(state.group))
    return dist.all_reduce(buffer, group=state.group, async_op=True).get_future().then(lambda done: done.value()[0])


class NotingReduceScatter:
    """FSDP2's reduce-scatter of one FSDP `module`'s gradients, made by FSDP's own (`reduce_scatter`: to the bit),
    after noting in `gradient` the norm of its input: this process's unsharded gradients of the module's parameters,
    flattened and zero-padded, summed over its micro-batches (FSDP reduce-scatters once a step, at the last). FSDP
    divides that input by nothing first (it pre-divides, against overflow, only gradients of a dtype other than
    float32 and bfloat16; ttl's parameters, hence gradients, are float32, and it sets no gradient divide factor); on a
    GPU the norm runs on FSDP's reduce-scatter stream, which the step's stream waits for at the end of the backward."""

    def __init__(self, gradient: ProcessGradient, module: FSDPModule, reduce_scatter: Any):
        self.gradient, self.module, self.reduce_scatter = gradient, module, reduce_scatter

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.reduce_scatter.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, op: Any,
                 async_op: bool = False) -> dist.Work | None:
        self.gradient.note(self.module, input_tensor)
        return self.reduce_scatter(output_tensor, input_tensor, group, op, async_op)


def fsdp_reduce_scatter() -> Any:
    """FSDP2's own reduce-scatter, which torch exports under no public name: imported here, so that only a run
    measuring the noise scale under FSDP depends on where this torch keeps it."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    except ImportError:
        raise ConfigError(f"train.log_noise_scale under FSDP reads FSDP2's reduce-scatter, which torch "
                          f"{torch.__version__} keeps elsewhere than torch 2.13 does: use train.distributed=\"ddp\""
                          ) from None
    return DefaultReduceScatter()


class NoiseScale:
    """The moving averages of |G|² and tr(Σ), on the host in float64; `state_dict` goes into checkpoints' trainer
    state, so that a resumed run continues them exactly (from a checkpoint without them, they start afresh).
    `process_gradient` reads each process's gradient as its reduction does: under DDP, of a step of one micro-batch
    (None: such a step has no small batch), under FSDP (`whole_share`), of all the process's micro-batches."""

    def __init__(self, decay: float, state: dict[str, float] | None = None,
                 process_gradient: ProcessGradient | None = None, whole_share: bool = False):
        self.decay, self.process_gradient, self.whole_share = decay, process_gradient, whole_share
        self.grad_sq, self.trace = (state["grad_sq"], state["trace"]) if state else (0.0, 0.0)

    def small_batch_size(self, micro_batches: int) -> int:
        """How many of a step's `micro_batches` (the first ones) make this process's small batch."""
        return micro_batches if self.whole_share else 1

    def small_batch(self, model: torch.nn.Module, targets: list[torch.Tensor], scale: torch.Tensor,
                    micro_batches: int, n_targets: torch.Tensor) -> torch.Tensor:
        """After the backward of the last micro-batch of this process's small batch (of `targets`, of the step's
        `micro_batches`, each's summed loss times `scale`): `small_batch_terms` of it and N (`n_targets`); empty
        without one."""
        if micro_batches > 1 and not self.whole_share:  # the first micro-batch's gradient, before the next adds to it
            if self.process_gradient:  # a batch ramp only grows: no step of one micro-batch follows
                self.process_gradient.measuring = False
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        elif self.process_gradient:
            norm = self.process_gradient.norm()
        else:
            return scale.new_empty(0)
        return torch.cat([small_batch_terms(norm, targets, scale), n_targets.to(scale)])

    def update(self, big_sq: float, small_sq_sum: float, inverse_small_sum: float, processes: float,
               big: float) -> dict[str, float]:
        """The step's figures from `small_batch_terms` summed over the processes (`processes` of them with a target in
        their small batch) and the whole step's |G_B|² over `big` target tokens, the averages updated with them; none
        for a step without a small batch or whose small batch is all of it."""
        if not processes:
            return {}
        small_sq, small = small_sq_sum / processes, processes / inverse_small_sum
        # b and B count targets, so that b is B or at most B - 1; but b comes from float32 1/b's (2.9999999 for 3)
        if small > big - 0.5:
            return {}
        grad_sq, trace = noise_estimates(small_sq, big_sq, small, big)
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        return {"noise_scale": self.trace / self.grad_sq if self.grad_sq else math.nan, "grad_sq_small": small_sq,
                "grad_sq_big": big_sq}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self.grad_sq, "trace": self.trace}


def start_noise_scale(model: torch.nn.Module, t: TrainConfig, state: dict[str, float] | None,
                      resumed_at: int) -> NoiseScale | None:
    """The run's NoiseScale (None without train.log_noise_scale), its averages from a checkpoint's `state`. Each FSDP
    module of an FSDP model (the root, each block) gets a `NotingReduceScatter`; a DDP model whose steps after
    `resumed_at` (0: a fresh run) may have one micro-batch per process gets `reduce_as_ddp` as its communication hook
    (not past a batch ramp's: it would measure nothing, and cost a pass over each bucket)."""
    if not t.log_noise_scale:
        return None
    if isinstance(model, FSDPModule):
        modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
        process_gradient = ProcessGradient(modules)
        for module in modules:
            module.set_custom_reduce_scatter(NotingReduceScatter(process_gradient, module, fsdp_reduce_scatter()))
        return NoiseScale(t.noise_scale_ema, state, process_gradient, whole_share=True)
    if not isinstance(model, DistributedDataParallel) or t.grad_accum_at(resumed_at + 1) > 1:
        return NoiseScale(t.noise_scale_ema, state)
    process_gradient = ProcessGradient([p for p in model.parameters() if p.requires_grad], model.process_group)
    model.register_comm_hook(process_gradient, reduce_as_ddp)
    return NoiseScale(t.noise_scale_ema, state, process_gradient)
