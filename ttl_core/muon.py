"""Muon (Keller Jordan, 2024) on the decoder blocks' projection matrices, AdamW on every other parameter, as one
optimizer, so the training loop sets one lr, the fp16 grad scaler unscales and steps one object and a checkpoint
saves one state dict.

ttl fuses projections (q, k, v into `qkv`; gate, up into `gate_up`), and orthogonalising the fused matrix is not
Muon on each projection: each group of Muon parameters names the `rows` of its pieces, and each piece is
orthogonalised alone and scaled for its own shape, as `torch.optim.Muon` treats transformers' separate q_proj,
k_proj, ... The momentum and the weight decay are elementwise, so they act on the fused tensor whole.

Under FSDP2 a parameter, its gradient and its momentum are DTensors of which each process holds a block of rows:
the momentum and the weight decay stay on the blocks, each piece of the update is put together whole for
Newton-Schulz, and each process adds the rows it holds of each piece's orthogonalised update to its block.

Alone, a process orthogonalises every piece it holds rows of (under FSDP, gathering every matrix whole). Given the
`world` of a DDP or FSDP run, each piece is orthogonalised by one process (`ttl_core.muon_sharing`), which under FSDP
receives only its pieces' rows and sends each process only the rows it holds of the results: the same bfloat16
iteration of the same matrix as one process would run, so either way the step is one process's to the bit."""

from __future__ import annotations

import math
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.distributed.tensor import DTensor, Shard

from .distributed import World
from .muon_sharing import balanced_owners, exchanged, gathered_to_owners, newton_schulz_flops, scattered_from_owners

if TYPE_CHECKING:
    from .run_config import TrainConfig

# the quintic Newton-Schulz iteration's coefficients and the floor of the norm it starts from (Keller Jordan's,
# and torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def orthogonalized(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """`matrix` with its singular values pushed towards 1 (near it, not onto it: the coefficients buy speed) by
    `steps` quintic Newton-Schulz iterations in bfloat16, in the order of torch.optim.Muon's operations, so the
    result is its result to the bit. The wide orientation keeps the Gram matrix the smaller one."""
    a, b, c = NS_COEFFICIENTS
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(torch.bfloat16, copy=True)  # a copy: a bfloat16 momentum buffer would be divided in place
    x = x.T if tall else x
    x.div_(x.norm().clamp(min=NS_EPS))  # a Frobenius norm of 1 bounds the spectral norm by 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust: str, shape: torch.Size) -> float:
    """The lr of an orthogonalised update of a `shape` matrix: "match_rms_adamw" (Moonshot's) gives the update the
    RMS of a typical AdamW update, so Muon shares AdamW's lr and weight decay; "original" (Keller Jordan's) scales
    tall matrices only."""
    rows, cols = shape
    return lr * (0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols)))


class MuonAndAdamW(torch.optim.Optimizer):
    """`adamw`'s groups, stepped by `adamw` itself (torch's AdamW, bit for bit), and `muon_groups`, each with its
    `params` (2-D), `rows` (the row count of each piece the parameters are cut into along dim 0), `lr`,
    `weight_decay`, `momentum`, `nesterov`, `ns_steps` and `adjust_lr` (see `adjusted_lr`). Given the `world` of a
    DDP or FSDP run, its processes share the Newton-Schulz work: every one of them must step."""

    def __init__(self, adamw: torch.optim.AdamW, muon_groups: list[dict[str, Any]], world: World | None = None):
        for group in muon_groups:
            for param in group["params"]:
                if param.dim() != 2 or param.shape[0] != sum(group["rows"]):
                    raise ValueError(f"Muon needs 2-D parameters of {sum(group['rows'])} rows, "
                                     f"got {tuple(param.shape)}")
        self.adamw, self.world = adamw, world
        super().__init__([*adamw.param_groups, *muon_groups], {})  # the same group dicts as adamw's
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loading replaces the group dicts and the state; `adamw` is pointed at the new ones."""
        super().load_state_dict(state_dict)
        self.adamw.param_groups = [group for group in self.param_groups if "rows" not in group]
        self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.adamw.step(closure)
        # every process lists the same pieces in the same order: (parameter, its group, first row, row count)
        pieces = [(param, group, start, rows) for group in self.param_groups if "rows" in group
                  for param in group["params"] if param.grad is not None
                  for start, rows in zip(accumulate(group["rows"], initial=0), group["rows"])]
        if self.world is not None and self.world.distributed:
            self._shared_muon_step(pieces)
            return loss
        for param, group, start, rows in pieces:
            if start == 0:  # under FSDP gathered whole (a collective: every process gathers every parameter)
                whole = self._moved_update(param, group)
                whole = whole.full_tensor() if isinstance(whole, DTensor) else whole
            held = held_rows(param, start, rows)[1]
            if held.stop > held.start:  # else the other processes' piece to orthogonalise
                update = orthogonalized(whole[start:start + rows], group["ns_steps"])
                step_rows(param, group, start, update.shape, update[held])
        return loss

    def _shared_muon_step(self, pieces: list[tuple[torch.Tensor, dict[str, Any], int, int]]) -> None:
        """Each piece orthogonalised by one process, the processes' work balanced by its FLOPs. Under DDP every
        result is sent to every process, which steps every row; under FSDP see `_sharded_muon_step`."""
        shapes = [(rows, param.shape[1]) for param, _, _, rows in pieces]
        owners = balanced_owners([newton_schulz_flops(*shape, group["ns_steps"])
                                  for shape, (_, group, _, _) in zip(shapes, pieces)], self.world.size)
        if any(isinstance(param, DTensor) for param, _, _, _ in pieces):
            self._sharded_muon_step(pieces, shapes, owners)
            return
        ours = []
        for (param, group, start, rows), owner in zip(pieces, owners):
            if start == 0:
                whole = self._moved_update(param, group)
            if owner == self.world.rank:
                ours.append(orthogonalized(whole[start:start + rows], group["ns_steps"]))
        for (param, group, start, _), update in zip(pieces, exchanged(ours, shapes, owners, self.world)):
            step_rows(param, group, start, update.shape, update)

    def _sharded_muon_step(self, pieces: list[tuple[torch.Tensor, dict[str, Any], int, int]],
                           shapes: list[tuple[int, int]], owners: list[int]) -> None:
        """Under FSDP each process sends the rows it holds of each piece's update to the piece's owner, which
        orthogonalises the piece whole, and gets back the rows it holds of each result: two all_to_alls."""
        held, counts = [], []
        for param, group, start, rows in pieces:
            if start == 0:  # bfloat16 loses nothing: `orthogonalized` casts to it before anything else
                block = self._moved_update(param, group).to_local().to(torch.bfloat16)
            held.append(block[held_rows(param, start, rows)[0]])
            counts.append(rows_per_process(param, start, rows))
        mine = [i for i, owner in enumerate(owners) if owner == self.world.rank]
        ours = [orthogonalized(piece, pieces[i][1]["ns_steps"])
                for i, piece in zip(mine, gathered_to_owners(held, counts, owners, self.world))]
        for (param, group, start, _), shape, update in zip(
                pieces, shapes, scattered_from_owners(ours, shapes, counts, owners, self.world)):
            step_rows(param, group, start, shape, update)

    def _moved_update(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Move `param`'s momentum, decay its weights and return its (Nesterov) update: under FSDP a DTensor of
        which this process holds its block of rows."""
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        momentum = state["momentum_buffer"].lerp_(grad, 1 - group["momentum"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        return grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum


def step_rows(param: torch.Tensor, group: dict[str, Any], start: int, shape: tuple[int, int],
              update: torch.Tensor) -> None:
    """Add `update`, the rows this process holds of the orthogonalised update of `param`'s `shape` piece whose
    first row is `param`'s row `start`, to those rows at the piece's adjusted lr."""
    block, _ = owned_rows(param)
    block[held_rows(param, start, shape[0])[0]].add_(update, alpha=-adjusted_lr(group["lr"], group["adjust_lr"], shape))


def held_rows(param: torch.Tensor, start: int, rows: int) -> tuple[slice, slice]:
    """Of `param`'s rows start..start+rows, where those this process holds (maybe none) lie in its block (see
    `owned_rows`) and in the piece."""
    block, first = owned_rows(param)
    low = max(start, first)
    high = max(low, min(start + rows, first + block.shape[0]))
    return slice(low - first, high - first), slice(low - start, high - start)


def rows_per_process(param: torch.Tensor, start: int, rows: int) -> list[int]:
    """How many of `param`'s rows start..start+rows each process holds, `param` a DTensor (see `owned_rows`)."""
    firsts = block_firsts(param)
    return [max(0, min(start + rows, end) - max(start, first)) for first, end in zip(firsts, firsts[1:])]


def owned_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of `param` this process updates and the index of the first: all of them from 0, or under FSDP2 (a
    DTensor sharded on dim 0) its own block."""
    if not isinstance(param, DTensor):
        return param, 0
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"Muon needs parameters sharded on dim 0 alone, got placements {param.placements}")
    return param.to_local(), block_firsts(param)[param.device_mesh.get_local_rank()]


def block_firsts(param: DTensor) -> list[int]:
    """The first row of each process's block of `param`'s rows, then the row count: cut as torch.chunk cuts it,
    blocks of ceil(rows / processes) rows, the last ones shorter or empty."""
    rows, processes = param.shape[0], param.device_mesh.size()
    return [min(rank * -(-rows // processes), rows) for rank in range(processes + 1)]


def is_hf_projection(name: str) -> bool:
    """Whether `name` is a projection matrix of transformers' Llama decoder layers (q, k, v, o, gate, up, down):
    what a transformers run hands torch.optim.Muon, one matrix for each piece ttl's fused ones are cut into."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


class TorchMuonAndAdamW:
    """torch.optim.Muon over a transformers Llama's projection matrices, with `train`'s lr, weight decay and
    muon options, and `adamw` (built over the other parameters) stepped as one optimizer: the transformers run
    that ttl's `train.optimizer = "muon"` is checked (tests/test_muon.py) and timed (bench_train) against."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, adamw: torch.optim.Optimizer):
        self.muon = torch.optim.Muon([p for name, p in model.named_parameters() if is_hf_projection(name)],
                                     lr=train.lr, weight_decay=train.weight_decay, momentum=train.muon_momentum,
                                     nesterov=train.muon_nesterov, ns_steps=train.muon_ns_steps,
                                     adjust_lr_fn=train.muon_adjust_lr)
        self.adamw = adamw
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)
