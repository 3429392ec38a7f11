"""Process groups and model wrapping for `torchrun` launches: DDP or FSDP2 (`fully_shard`), gloo on CPU, NCCL
on GPU. A plain `python` launch is a world of one and every helper here degrades to a no-op.

Checkpoints always hold *full* weights and optimizer state keyed by parameter name (gathered through
`torch.distributed.checkpoint.state_dict`), so a run saved by FSDP on 8 GPUs resumes in one CPU process and
its model directory is an ordinary HF checkpoint; they also hold every rank's RNG state, as each rank draws
its own dropout masks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from .checkpoint import rng_state
from .errors import ConfigError

T = TypeVar("T")


@dataclass
class World:
    """This process's place in the launch: its rank, the number of processes and its device."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def reduce_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _launch_variable(name: str, default: str | None = None) -> int:
    """An integer torchrun sets in each process's environment."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer (torchrun sets it)") from None


def init_world(device: str) -> World:
    """Join the process group torchrun describes (if any) and pick this process's device. A launch environment
    torchrun did not set (variables left over from another launcher) is a ConfigError, before any group is
    joined: torch's rendezvous would fail with a traceback, or wait for peers that never come."""
    size = _launch_variable("WORLD_SIZE", "1")
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} must be >= 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    if size == 1:
        return World(0, 1, torch.device(device))
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                          "set: launch multi-process runs with torchrun, which sets them for every process")
    rank, local_rank = _launch_variable("RANK"), _launch_variable("LOCAL_RANK", "0")
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside [0, {size}) for WORLD_SIZE={size}")
    if device == "cuda" and local_rank >= torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ConfigError(f"LOCAL_RANK={local_rank} needs CUDA device {local_rank}, but this machine has {gpus}: "
                          f"start at most {gpus} process{'es' if gpus > 1 else ''} per node "
                          f"(torchrun --nproc_per_node {gpus})")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=target if device == "cuda" else None)
    return World(rank, size, target)


def close_world(world: World) -> None:
    """Tear down the process group `init_world` joined (nothing for a world of one)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every process gets here (nothing for a world of one)."""
    if world.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over processes, in place (the tensor itself when alone)."""
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (FSDP's partial norms reduced over the ranks: a collective); a plain
    tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def on_rank_0(world: World, work: Callable[[], T]) -> T | None:
    """`work()` on rank 0 while the other ranks wait; its result on rank 0, None on the others. When it fails,
    every rank stops: rank 0 with its error, the others with one line pointing to it, where they would otherwise
    fail at their next collective with a traceback about the peer that left (or, under a launcher other than
    torchrun, wait there until it timed out)."""
    result, failure = None, None
    if world.is_main:
        try:
            result = work()
        except Exception as e:  # raised again below, once every rank knows
            failure = e
    if all_reduce_sum(torch.tensor([float(failure is not None)], device=world.reduce_device), world).item():
        if failure is not None:
            raise failure
        raise ConfigError("rank 0 stopped the run; its error says why")
    return result


def wrap_model(model: torch.nn.Module, mode: str, world: World,
               autocast: contextlib.AbstractContextManager | None = None) -> torch.nn.Module:
    """DDP, or FSDP2 with each decoder block as its own shard unit; the model itself when alone. `autocast` is the
    run's forward context, which DDP's `settle_buckets` runs in."""
    if not world.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        settle_buckets(ddp, world.device, autocast or contextlib.nullcontext())
        return ddp
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    # A group of FSDP's own, not the world group: DTensor's caches keep FSDP's mesh and its group alive past
    # destroy_process_group, and gloo then released the run's last works (held back by its final barrier)
    # during interpreter shutdown, where a thread taking the GIL aborts the process (1 run in 30). The mesh's
    # device type is the run's: FSDP2's default, the machine's accelerator, would move a gloo run to CUDA.
    mesh = DeviceMesh.from_group(dist.new_group(), world.device.type)
    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def settle_buckets(ddp: torch.nn.Module, device: torch.device, autocast: contextlib.AbstractContextManager) -> None:
    """One throwaway backward (of one token, its gradients dropped) before the first step, so that every step of a
    run, resumed or not, all-reduces in the same gradient buckets. DDP all-reduces its first backward in one bucket
    of every gradient and rebuilds the buckets after it, in the order the gradients came; with 3 or more processes a
    ring all-reduce adds each element's shares in an order set by its place in the bucket, so a resumed run's first
    step, back in the one bucket, came out a float32 rounding off the uninterrupted run's."""
    was_training = ddp.training
    ddp.eval()  # no dropout, which would draw from the random streams the run's steps draw from
    try:
        with autocast:  # the run's: an attention backend asked for by name may need its half precision
            logits = ddp(torch.zeros(1, 1, dtype=torch.long, device=device)).logits
        logits.float().sum().backward()
    finally:
        ddp.train(was_training)
    for p in ddp.parameters():
        p.grad = None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module with the model's own attributes (config, backbone) under DDP's wrapper."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module with every parameter whole, for code that calls its submodules (`model.backbone`) rather than
    its forward: FSDP2 gathers the root's own parameters (embeddings, final norm, LM head) only in the root's
    forward, so they are unsharded here (a collective: every rank must enter), and sharded again after."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield unwrap(model)
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered in full on the CPU (on rank 0 when sharded), under ttl's names."""
    return get_model_state_dict(unwrap(model), options=FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, gathered in full (on rank 0 when sharded); {} before the
    first update (the fp16 grad scaler skipped every step so far)."""
    fresh = not optimizer.state
    state = get_optimizer_state_dict(unwrap(model), optimizer, options=FULL)  # called on every rank: a collective
    if fresh:  # torch made the state it gathered by a step at lr 0, which AdamW would count in its bias correction
        optimizer.state.clear()
        return {}
    return state


def full_rng_states(world: World) -> list[dict[str, Any]] | None:
    """Every rank's `rng_state()`, in rank order, on rank 0 (None on the others; a collective all ranks call).
    Pickled through the group (a few KB each), CUDA generator states included, which are CPU tensors."""
    if not world.distributed:
        return [rng_state()]
    states = [None] * world.size if world.is_main else None
    dist.gather_object(rng_state(), states, dst=0)
    return states


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state into a (possibly sharded) optimizer. The checkpoint supplies
    the moments and step counts; the hyperparameters (weight decay, betas, eps) stay the ones the optimizer
    was built with, so a resumed run applies the config it was started with, as it does for the lr. An empty
    `state` (saved before the first update) leaves the optimizer as built."""
    if not state:
        return
    # the loader maps onto the optimizer's existing per-parameter state, so create it first with a step
    # that changes nothing (zero gradients, learning rate 0)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
