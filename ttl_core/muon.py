"""Muon (Keller Jordan, 2024) on the decoder blocks' projection matrices, AdamW on every other parameter, as one
optimizer, so the training loop sets one lr, the fp16 grad scaler unscales and steps one object and a checkpoint
saves one state dict.

ttl fuses projections (q, k, v into `qkv`; gate, up into `gate_up`), and orthogonalising the fused matrix is not
Muon on each projection: each group of Muon parameters names the `rows` of its pieces, and each piece is
orthogonalised alone and scaled for its own shape, as `torch.optim.Muon` treats transformers' separate q_proj,
k_proj, ... The momentum and the weight decay are elementwise, so they act on the fused tensor whole.

Under FSDP2 a parameter, its gradient and its momentum are DTensors of which each process holds a block of rows:
the momentum and the weight decay stay on the blocks, the update is gathered whole for Newton-Schulz, and each
process orthogonalises the pieces it holds rows of (the same bfloat16 iteration of the same matrix as one process
would run) and adds their rows to its block."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor, Shard

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
    `weight_decay`, `momentum`, `nesterov`, `ns_steps` and `adjust_lr` (see `adjusted_lr`)."""

    def __init__(self, adamw: torch.optim.AdamW, muon_groups: list[dict[str, Any]]):
        for group in muon_groups:
            for param in group["params"]:
                if param.dim() != 2 or param.shape[0] != sum(group["rows"]):
                    raise ValueError(f"Muon needs 2-D parameters of {sum(group['rows'])} rows, "
                                     f"got {tuple(param.shape)}")
        self.adamw = adamw
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
        for group in self.param_groups:
            if "rows" in group:
                for param in group["params"]:
                    if param.grad is not None:
                        self._muon_update(param, group)
        return loss

    def _muon_update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        momentum = state["momentum_buffer"].lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
        param.mul_(1 - group["lr"] * group["weight_decay"])
        whole = update.full_tensor() if isinstance(update, DTensor) else update  # a collective: every rank calls it
        block, first = owned_rows(param)
        start = 0
        for rows in group["rows"]:
            piece = whole[start:start + rows]
            low, high = max(start, first), min(start + rows, first + block.shape[0])
            if low < high:  # a piece with none of this process's rows is the other processes' to orthogonalise
                block[low - first:high - first].add_(orthogonalized(piece, group["ns_steps"])[low - start:high - start],
                                                     alpha=-adjusted_lr(group["lr"], group["adjust_lr"], piece.shape))
            start += rows


def owned_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of `param` this process updates and the index of the first: all of them from 0, or under FSDP2 (a
    DTensor sharded on dim 0, cut as torch.chunk cuts it: blocks of ceil(rows / processes) rows, the last ones
    shorter or empty) its own block."""
    if not isinstance(param, DTensor):
        return param, 0
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"Muon needs parameters sharded on dim 0 alone, got placements {param.placements}")
    rows_per_block = -(-param.shape[0] // param.device_mesh.size())
    return param.to_local(), min(param.device_mesh.get_local_rank() * rows_per_block, param.shape[0])
