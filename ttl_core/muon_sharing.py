"""Muon's Newton-Schulz shared out between the processes of a DDP or FSDP run. Every process would otherwise
orthogonalise every piece it steps rows of: under DDP all of them, N times the work of one process. Instead each
piece goes to one process (`balanced_owners`), which orthogonalises it alone, and the results travel to every
process in one collective (`exchanged`). They travel in bfloat16, as Newton-Schulz leaves them, so each process
adds to its rows the very tensor it would have computed itself: the step is the unshared one to the bit."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import World


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """The multiply-adds (times 2) of `steps` quintic iterations on a rows x cols matrix, taken wide (m <= n):
    X·Xᵀ and (bA + cA²)·X are 2m²n each, A² is 2m³."""
    m, n = sorted((rows, cols))
    return steps * (4 * m * m * n + 2 * m ** 3)


def balanced_owners(costs: list[int], processes: int) -> list[int]:
    """The process that orthogonalises each piece: the costliest piece first, each to the process with the least
    work so far (the lowest rank among equals). Integers and a stable order: every process gets the same answer."""
    owners, loads = [0] * len(costs), [0] * processes
    for piece in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owners[piece] = loads.index(min(loads))
        loads[owners[piece]] += costs[piece]
    return owners


def exchanged(ours: list[torch.Tensor], shapes: list[tuple[int, int]], owners: list[int],
              world: World) -> list[torch.Tensor]:
    """Every piece's orthogonalised update, on every process: `ours` holds this process's pieces' (those `owners`
    gives it, in order), `shapes` every piece's. Each process's are packed into one bfloat16 buffer, padded to the
    longest, and the buffers gathered in one collective. `orthogonalized` hands a tall piece back as the transpose
    of a wide matrix, and the copies keep that layout, so a process adds them to its rows exactly as the owner's."""
    sizes = [0] * world.size
    for (rows, cols), owner in zip(shapes, owners):
        sizes[owner] += rows * cols
    padding = torch.zeros(max(sizes) - sizes[world.rank], dtype=torch.bfloat16, device=world.device)
    packed = torch.cat([*((piece.T if piece.size(0) > piece.size(1) else piece).flatten() for piece in ours),
                        padding])
    gathered = torch.empty(world.size * max(sizes), dtype=torch.bfloat16, device=world.device)
    # end to end, not stacked (gloo's way); torch 2.13 renamed all_gather_into_tensor, and ttl runs on torch 2.9 up
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, packed)
    gathered = gathered.view(world.size, max(sizes))
    updates, offsets = [], [0] * world.size
    for (rows, cols), owner in zip(shapes, owners):
        flat = gathered[owner, offsets[owner]:offsets[owner] + rows * cols]
        updates.append(flat.view(cols, rows).T if rows > cols else flat.view(rows, cols))
        offsets[owner] += rows * cols
    return updates
