"""Weights written as transformers writes them: safetensors files of at most a given size (`max_shard_size`, read
as transformers reads "2GB" or "40Kb"), with an index when there are several."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError
from .fileio import atomic_write, write_json


def parse_shard_size(size: int | str) -> int:
    """A shard size in bytes, from an int or transformers' strings ("2GB", "500MiB", "40Kb" in bits)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return _at_least_a_byte(size, size)
    if not isinstance(size, str):
        raise CheckpointError(f"max_shard_size must be a byte count or a size such as '2GB', got {size!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"cannot parse shard size {size!r} (examples: '2GB', '500MB', '1GiB')")
    unit = match.group(2) or "B"
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    size_bytes = int(float(match.group(1)) * units[unit.lower()])
    # as transformers reads them, "5Gb", "500Mb" and "40Kb" are bits
    return _at_least_a_byte(size_bytes // 8 if len(unit) == 2 and unit.endswith("b") else size_bytes, size)


def _at_least_a_byte(size_bytes: int, given: int | str) -> int:
    if size_bytes < 1:  # every tensor would silently become a shard of its own
        raise CheckpointError(f"max_shard_size must be at least one byte, got {given!r}")
    return size_bytes


def write_shards(directory: Path, tensors: list[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[Path]:
    """Write (name, tensor) pairs as one file or as shards with an index; return the stale weight files, which the
    caller removes once the new config is written (`remove_stale`)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, t))
        shard_bytes += size
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        # slices of fused parameters share storage, which safetensors refuses: give each its own copy
        payload = {n: t.detach().to("cpu").clone().contiguous() for n, t in shard}
        atomic_write(directory / fname, lambda tmp, p=payload: save_file(p, str(tmp), metadata={"format": "pt"}))
    index = directory / "model.safetensors.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        write_json(index, {"metadata": {"total_size": total},
                           "weight_map": {n: fname for fname, shard in zip(names, shards) for n, _ in shard}})
    return [f for f in directory.glob("model*.safetensors*")
            if f.name not in names and not (len(shards) > 1 and f == index) and not f.name.endswith(".tmp")]


def remove_stale(stale: list[Path]) -> None:
    """Remove the weight files `write_shards` found stale: model.safetensors loads before an index, so whichever of
    these removals a crash interrupts, the directory loads the new weights or (shards replacing one file, until it
    goes) the old ones."""
    for f in stale:
        f.unlink()
