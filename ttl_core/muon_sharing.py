"""Muon's Newton-Schulz shared out between the processes of a DDP or FSDP run. Every process would otherwise
orthogonalise every piece it steps rows of: under DDP all of them, N times the work of one process. Instead each
piece goes to one process (`balanced_owners`), which orthogonalises it alone. Under DDP, where every process steps
every row, the results travel to every process in one all_gather (`exchanged`). Under FSDP, where each process holds
a block of each matrix's rows, one all_to_all sends each process's rows of each piece's update to its owner
(`gathered_to_owners`) and another sends each process the rows it holds of each result (`scattered_from_owners`):
about 2(N - 1)/N² of the projections' bfloat16 size received a step (ttl-160m: at most 108 of 216 MiB at N = 2, 51
at 8), where gathering them whole in float32 and every result received 1.5 to 2.7 times it. Everything travels in
bfloat16: the update as `orthogonalized` casts it first, the results as Newton-Schulz leaves them, so each process
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


# `orthogonalized` hands a tall piece back as the transpose of a wide matrix; its rows travel as that matrix's
# columns and are viewed back so: a process adds a transposed view to its rows, as the owner would, not a copy laid
# out otherwise (which an elementwise kernel may take another loop over)
def packed(rows: torch.Tensor, tall: bool) -> torch.Tensor:
    return (rows.T if tall else rows).flatten()


def unpacked(flat: torch.Tensor, rows: int, cols: int, tall: bool) -> torch.Tensor:
    return flat.view(cols, rows).T if tall else flat.view(rows, cols)


def exchanged(ours: list[torch.Tensor], shapes: list[tuple[int, int]], owners: list[int],
              world: World) -> list[torch.Tensor]:
    """Every piece's orthogonalised update, on every process: `ours` holds this process's pieces' (those `owners`
    gives it, in order), `shapes` every piece's. Each process's are packed into one bfloat16 buffer, padded to the
    longest, and the buffers gathered in one collective."""
    sizes = [0] * world.size
    for (rows, cols), owner in zip(shapes, owners):
        sizes[owner] += rows * cols
    padding = torch.zeros(max(sizes) - sizes[world.rank], dtype=torch.bfloat16, device=world.device)
    packed_ours = torch.cat([*(packed(piece, piece.size(0) > piece.size(1)) for piece in ours), padding])
    gathered = torch.empty(world.size * max(sizes), dtype=torch.bfloat16, device=world.device)
    # end to end, not stacked (gloo's way); torch 2.13 renamed all_gather_into_tensor, and ttl runs on torch 2.9 up
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, packed_ours)
    gathered = gathered.view(world.size, max(sizes))
    updates, offsets = [], [0] * world.size
    for (rows, cols), owner in zip(shapes, owners):
        updates.append(unpacked(gathered[owner, offsets[owner]:offsets[owner] + rows * cols], rows, cols, rows > cols))
        offsets[owner] += rows * cols
    return updates


def all_to_all(sent: list[list[torch.Tensor]], expected: list[list[int]], world: World) -> list[list[torch.Tensor]]:
    """One all_to_all_single of bfloat16 tensors: `sent[rank]` those for process `rank`, `expected[rank]` the sizes
    of those process `rank` sends here; what came, flat, by sender."""
    sent_sizes, expected_sizes = [sum(t.numel() for t in ts) for ts in sent], [sum(sizes) for sizes in expected]
    nothing = torch.empty(0, dtype=torch.bfloat16, device=world.device)  # torch.cat refuses an empty list
    flat = torch.cat([nothing, *(t.flatten() for ts in sent for t in ts)])
    came = torch.empty(sum(expected_sizes), dtype=torch.bfloat16, device=world.device)
    dist.all_to_all_single(came, flat, expected_sizes, sent_sizes)
    return [list(part.split(sizes)) for part, sizes in zip(came.split(expected_sizes), expected)]


def gathered_to_owners(held: list[torch.Tensor], counts: list[list[int]], owners: list[int],
                       world: World) -> list[torch.Tensor]:
    """This process's pieces (those `owners` gives it, in order), whole and row-major, from the rows each process
    holds: `held[i]` this process's rows of piece i (bfloat16), `counts[i][rank]` how many of them process `rank`
    holds (the piece's rows in the order of the ranks)."""
    mine = [i for i, owner in enumerate(owners) if owner == world.rank]
    sent = [[] for _ in range(world.size)]
    for rows, owner in zip(held, owners):
        sent[owner].append(rows)
    came = all_to_all(sent, [[counts[i][rank] * held[i].size(1) for i in mine] for rank in range(world.size)], world)
    return [torch.cat([came[rank][j].view(counts[i][rank], held[i].size(1)) for rank in range(world.size)])
            for j, i in enumerate(mine)]


def scattered_from_owners(ours: list[torch.Tensor], shapes: list[tuple[int, int]], counts: list[list[int]],
                          owners: list[int], world: World) -> list[torch.Tensor]:
    """Of every piece's orthogonalised update, the rows this process holds (in bfloat16, maybe none), from its
    owner: `ours` holds this process's pieces' whole, `shapes` and `counts` every piece's (as above)."""
    sent = [[] for _ in range(world.size)]
    for update, i in zip(ours, (i for i, owner in enumerate(owners) if owner == world.rank)):
        for rank, rows in enumerate(update.split(counts[i])):
            sent[rank].append(packed(rows, update.size(0) > update.size(1)))
    came = all_to_all(sent, [[counts[i][world.rank] * shapes[i][1] for i, owner in enumerate(owners) if owner == rank]
                             for rank in range(world.size)], world)
    came = [iter(parts) for parts in came]
    return [unpacked(next(came[owner]), counts[i][world.rank], cols, rows > cols)
            for i, ((rows, cols), owner) in enumerate(zip(shapes, owners))]
