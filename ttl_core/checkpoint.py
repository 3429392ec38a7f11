"""Training checkpoints: an HF-format model directory plus the state that makes resuming exact.

`RUN/checkpoints/step-000120/` holds `model.safetensors` + `config.json` (+ the tokenizer), loadable by
transformers as is, and beside them `trainer_state.json` (step, data position, run config) and
`optimizer.pt` (optimizer moments and RNG states; read back with `weights_only=True`), and with `train.ema_decay` the
moving average of the weights as a model directory of its own, `ema/` (see `ttl_core.ema`). A checkpoint is
written into a hidden `.step-000120.partial` directory and renamed into place only when complete, so a
crash at any moment leaves the previous checkpoint as the newest complete one; an old checkpoint is renamed
to a hidden `.step-000100.old` before it is deleted, so no crash leaves a half-deleted one under its name.
What a crash cannot break, disk trouble or a copy cut short still can: resuming from a damaged checkpoint
names its broken file and the older checkpoint that looks complete (`point_to_older_checkpoint`); the SHA-256
digests that trainer_state.json records of the other files, and of its own content, catch damage that leaves a
file's structure intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError, TTLError, is_integer, is_number
from .fileio import (atomic_write, file_sha256, read_json, remove_dir_atomically, remove_path, write_dir_atomically,
                     write_json)
from .hf import check_weight_files, save_pretrained

if TYPE_CHECKING:
    from .distributed import World
    from .tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there go without the run-directory guard
    fcntl = None

STEP_DIR = re.compile(r"step-(\d{6,})")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
SHA256 = "sha256"  # trainer_state.json's record of the checkpoint's other files: name (ema/NAME in ema/) -> digest
EMA_DIR = "ema"  # the moving average of the weights, an HF model directory inside the checkpoint
STATE_SHA256 = "state_sha256"  # trainer_state.json's digest of its own content (see `state_digest`)
ZIP_LOCAL_HEADER = b"PK\x03\x04"  # how the zip archive torch.save writes begins


def checkpoint_root(run_dir: str | Path) -> Path:
    """The directory holding a run's `step-N` checkpoints."""
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (partial ones are never listed). A link whose target
    is missing is listed, for a resume to name it rather than silently fall back to an older checkpoint."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (p.is_dir() or p.is_symlink()) and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None when the run has none."""
    dirs = complete_checkpoints(run_dir)
    return dirs[-1] if dirs else None


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[bool]:
    """Hold the run directory for one run; yields False when another run holds it (that one would have its
    checkpoint in progress deleted, and checkpoints and metrics interleaved). The lock is the kernel's (`flock`
    on the directory), so a killed run leaves nothing behind that blocks its resumption. Where there is no
    flock (Windows) or the file system cannot lock a directory, it yields True without a guard."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield True
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        except OSError:
            held = True  # NFS emulates flock with write locks, which a directory opened read-only cannot take
        yield held
    finally:
        os.close(fd)  # releases the lock


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete what an interrupted save (`.step-N.partial`) or deletion (`.step-N.old`) left behind."""
    root = checkpoint_root(run_dir)
    for partial in root.glob(".step-*") if root.is_dir() else []:
        remove_path(partial)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s dropout stream in a run seeded with `seed` (in [0, 2**32)): `seed` XOR a
    bijective 32-bit mix of the rank (murmur3's finalizer, which maps 0 to 0). Rank 0 keeps `seed`, so a
    one-process run draws as it always did; within a run every rank gets its own seed (the mix is one-to-one),
    and across runs a collision needs two seeds whose XOR is that of two ranks' mixes, which scatter over 32
    bits (seed + rank would give seed 1's rank 0 the stream of seed 0's rank 1). 32 bits, as torch's CPU generator
    reads only the low 32 bits of a seed: seed + rank * 2**32 would be the same stream on every rank."""
    mixed = ((rank ^ (rank >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF  # murmur3's fmix32, as written there
    mixed = ((mixed ^ (mixed >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    mixed ^= mixed >> 16
    return seed ^ mixed


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from (python, numpy, torch, this process's CUDA
    device), as this process holds them; a checkpoint saves every rank's (`full_rng_states`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators `rng_state()` saved (CUDA's only where CUDA is available)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12-04 held every device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)  # a run may resume on fewer GPUs than it saved from


def set_rank_rng_state(saved: list[dict[str, Any]] | dict[str, Any] | None, seed: int, world: World) -> None:
    """Give this rank its own random streams once the weights are built (drawn alike on every rank from `seed`):
    the state a checkpoint saved for it (`saved`, one state per rank), else torch's generators seeded with
    `rank_seed(seed, rank)` (no step draws from python's or numpy's). Rank 0 keeps the stream `seed` started,
    so a one-process run draws as it always has. An older checkpoint's single state (every rank then drew alike)
    is rank 0's alone: handing it to every rank would bring the shared dropout masks back."""
    states = [saved] if isinstance(saved, dict) else saved or []
    if world.rank < len(states):
        set_rng_state(states[world.rank])
    elif world.rank > 0:
        torch.manual_seed(rank_seed(seed, world.rank))
    if states and len(states) != world.size and world.is_main:
        print(_other_world_size_note(len(states), world.size))


def _other_world_size_note(saved_ranks: int, ranks: int) -> str:
    """The line that says a resume on `ranks` processes of a checkpoint saved by `saved_ranks` draws other dropout
    masks than the uninterrupted run."""
    first, last = sorted((saved_ranks, ranks))
    span = f"rank {first}" if last - first == 1 else f"ranks {first}-{last - 1}"
    change = (f"new streams from train.seed for {span}" if ranks > saved_ranks
              else f"the states saved for {span} go unused")
    return (f"the checkpoint holds the random states of {saved_ranks} process{'es' if saved_ranks > 1 else ''}, "
            f"this run has {ranks}: {change}, so dropout masks (if any) differ from the uninterrupted run's")


def state_digest(trainer_state: dict[str, Any]) -> str:
    """The SHA-256 of a trainer state's content as JSON (keys sorted; its own digest left out): a damaged byte
    that leaves the file valid JSON (a step or data position one bit off) changes it, the layout does not."""
    content = {key: value for key, value in trainer_state.items() if key != STATE_SHA256}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def verify_digests(checkpoint: Path, trainer_state: dict[str, Any]) -> None:
    """Raise CheckpointError naming the first file whose bytes differ from the digest saved with the checkpoint
    (checkpoints written before digests were recorded have none to check)."""
    digests = trainer_state.get(SHA256, {})
    # names of the checkpoint's own files only: an edited one must not send the check to a file elsewhere
    if not isinstance(digests, dict) or not all(isinstance(d, str) and n in (Path(n).name, f"{EMA_DIR}/{Path(n).name}")
                                                for n, d in digests.items()):
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: '{SHA256}' must map the checkpoint's file names to "
                              "digests")
    for name, digest in digests.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} is not a training checkpoint: {name} is missing")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: damaged since it was saved (its bytes no longer match the digest in "
                                  f"{TRAINER_STATE})")


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any], trainer_state: dict[str, Any], tokenizer: Tokenizer | None = None, keep: int = 2,
    scaler_state: dict[str, Any] | None = None, rng_states: list[dict[str, Any]] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones.

    `model` supplies the config and architecture, `model_state` the full (gathered) weights; the
    optimizer state, every rank's `rng_state()` (`rng_states`, from `full_rng_states`; this process's alone by
    default) and an fp16 run's gradient-scaler state go to `optimizer.pt`, `trainer_state` to JSON; `ema_state`, the
    full moving average of the weights, to `ema/`, a model directory as the checkpoint's own."""
    def write(partial: Path) -> None:
        save_pretrained(model, partial, state_dict=model_state, tokenizer=tokenizer)
        if ema_state is not None:
            save_pretrained(model, partial / EMA_DIR, state_dict=ema_state, tokenizer=tokenizer)
        atomic_write(partial / OPTIMIZER_STATE,
                     lambda tmp: torch.save({"optimizer": optimizer_state, "rng": rng_states or [rng_state()],
                                             **({"scaler": scaler_state} if scaler_state else {})}, tmp))
        # every other file's digest, for a resume to tell a byte damaged since (a disk error, a bad copy) that
        # leaves the files' structure readable; ~1.5 GB/s, about a second per save of ttl-160m with its optimizer
        digests = {f.relative_to(partial).as_posix(): file_sha256(f) for f in sorted(partial.rglob("*")) if f.is_file()}
        # as read back (JSON makes tuples lists and keys strings), for the digest to match on reading
        state = json.loads(json.dumps({"step": step, **trainer_state, SHA256: digests}))
        write_json(partial / TRAINER_STATE, {**state, STATE_SHA256: state_digest(state)})

    final = write_dir_atomically(checkpoint_root(run_dir) / f"step-{step:06d}", write)
    # a directory named step-N is always complete: one killed while being deleted is gone from that name
    for old in complete_checkpoints(run_dir)[:-keep]:
        try:
            remove_dir_atomically(old)
        except OSError as e:  # the new checkpoint is safe: a file held open (Windows, NFS) must not end the run
            warnings.warn(f"could not remove the old checkpoint {old} ({e.strerror or e}); delete it by hand")
    return final


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """trainer_state.json of a complete checkpoint (step, data position, run config), checked against the digest
    of its own content, without reading optimizer.pt: what a resume checks before loading anything heavy. A
    missing, damaged or malformed file raises CheckpointError naming it."""
    if checkpoint.is_symlink() and not checkpoint.exists():
        raise CheckpointError(f"{checkpoint} links to {os.readlink(checkpoint)}, which is missing")
    state_path, optimizer_path = checkpoint / TRAINER_STATE, checkpoint / OPTIMIZER_STATE
    for path in (state_path, optimizer_path):
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} is not a training checkpoint: {path.name} is missing")
    trainer_state = read_json(state_path, CheckpointError, expect=object)
    recorded = trainer_state.get(STATE_SHA256) if isinstance(trainer_state, dict) else None
    if recorded is not None and recorded != state_digest(trainer_state):  # none recorded before 2026-12-05
        raise CheckpointError(f"{state_path}: damaged since it was saved (its content no longer matches the digest "
                              "it records)")
    step = trainer_state.get("step") if isinstance(trainer_state, dict) else None
    if not (is_integer(step) and step >= 0) or not isinstance(trainer_state.get("data"), dict):
        raise CheckpointError(f"{state_path}: expected a step number and the data position")
    # one copied back under another step's name would be resumed from, then overwritten and pruned as that step
    if (named := STEP_DIR.fullmatch(checkpoint.name)) and int(named.group(1)) != step:
        raise CheckpointError(f"{state_path}: records step {step}, not the step {int(named.group(1))} its directory "
                              "is named for")
    return trainer_state


def load_optimizer_file(checkpoint: Path, mmap: bool = False) -> dict[str, Any]:
    """optimizer.pt of a checkpoint: {"optimizer": ..., "rng": ..., and "scaler" for fp16 runs}. A damaged or
    malformed file raises CheckpointError naming it. `mmap` maps the tensors instead of reading them (to check a
    checkpoint without loading it)."""
    optimizer_path = checkpoint / OPTIMIZER_STATE
    # torch.save writes a zip archive whose directory comes last: an empty or cut-off file has none (torch's
    # own error for it is a paragraph about miniz); one whose first bytes are garbled torch.load would unpickle in
    # its legacy format, failing with whatever the garbage provokes (a UnicodeDecodeError, ...)
    if not zipfile.is_zipfile(optimizer_path) or not _starts_as_zip(optimizer_path):
        raise CheckpointError(f"{optimizer_path}: empty, truncated or corrupt (not the complete zip archive "
                              "torch.save writes)")
    try:
        saved = torch.load(optimizer_path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        # weights_only loading refuses any pickle that would build objects: the file is never executed
        raise CheckpointError(f"{optimizer_path}: unreadable trainer state ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict) or not {"optimizer", "rng"} <= set(saved):
        raise CheckpointError(f"{optimizer_path}: expected the optimizer and RNG states")
    return saved


def check_optimizer_file(checkpoint: Path, saved: dict[str, Any], model: torch.nn.Module) -> None:
    """Raise CheckpointError naming optimizer.pt when what `load_optimizer_file` read from it (`saved`) does not fit
    `model` (one from another model's run, or a file written otherwise), where torch would fail naming no file or
    load moments that break the next step: see `_check_optimizer_state` and `_check_rng_states`."""
    path = checkpoint / OPTIMIZER_STATE
    if saved["optimizer"] != {}:  # {} before the first update
        shapes = {name: param.shape for name, param in model.named_parameters() if param.requires_grad}
        _check_optimizer_state(path, saved["optimizer"], shapes)
    _check_rng_states(path, saved["rng"])


def _check_optimizer_state(path: Path, state: Any, shapes: dict[str, torch.Size]) -> None:
    """A name-keyed optimizer state, as `full_optimizer_state` saves it, must hold every trainable parameter (of
    `shapes`) and no other, in its groups and its per-parameter state; each step count a number >= 0 and each
    moment a floating-point tensor of its parameter's shape."""
    groups, per_param = (state.get("param_groups"), state.get("state")) if isinstance(state, dict) else (None, None)
    if not (isinstance(groups, list) and isinstance(per_param, dict)
            and all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups)):
        raise CheckpointError(f"{path}: the optimizer state is not the parameter groups and per-parameter state ttl "
                              "saves")
    grouped = [name for group in groups for name in group["params"]]
    if sorted(grouped) != sorted(shapes) or set(per_param) != set(shapes):
        differ = sorted(set(shapes) ^ set(grouped) | set(shapes) ^ set(per_param))
        listed = f"not both hold {differ[:3]}" if differ else "its groups list a parameter twice"
        raise CheckpointError(f"{path}: an optimizer state for other parameters than the model's ({listed}): saved "
                              "by another model's run?")
    for name, values in per_param.items():
        wrong = next((key for key, value in (values.items() if isinstance(values, dict) else [("state", values)])
                      if not _fits_parameter(key, value, shapes[name])), None)
        if wrong is not None:
            expected = ("a step count >= 0" if wrong == "step" else
                        f"a floating-point tensor of the parameter's shape {tuple(shapes[name])}")
            raise CheckpointError(f"{path}: optimizer state {name}.{wrong} is not {expected}: saved by another "
                                  "model's run?")


def _fits_parameter(key: str, value: Any, shape: torch.Size) -> bool:
    """Whether one entry of a parameter's optimizer state is what ttl saves: a step count >= 0 under "step", else a
    floating-point tensor of the parameter's `shape`."""
    if key == "step":
        step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        return is_number(step) and 0 <= step < math.inf
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == shape


def _check_rng_states(path: Path, saved: Any) -> None:
    """Every random-number generator state saved (one per rank, or one of an older checkpoint) must be one the
    generators take: each is tried, then this process's own states are put back."""
    kept = rng_state()
    try:  # the generators' own setters know what a state must hold
        for state in saved if isinstance(saved, list) else [saved]:
            set_rng_state(state)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unusable random-number generator state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        set_rng_state(kept)


def load_trainer_state(checkpoint: Path, mmap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`read_trainer_state`, `load_optimizer_file`) of a complete checkpoint."""
    return read_trainer_state(checkpoint), load_optimizer_file(checkpoint, mmap)


def _starts_as_zip(path: Path) -> bool:
    """Whether the file begins as torch.save's zip archive does (`zipfile.is_zipfile` reads only its end)."""
    with open(path, "rb") as f:
        return f.read(len(ZIP_LOCAL_HEADER)) == ZIP_LOCAL_HEADER


def looks_complete(checkpoint: Path) -> bool:
    """Whether every file of a training checkpoint is there and readable, as far as can be told without reading
    the weights or the optimizer moments: the JSON files, the safetensors headers (which a cut-off file fails), the
    moving average's (ema/) where there is one, and optimizer.pt's structure."""
    try:
        check_weight_files(checkpoint)
        if (checkpoint / EMA_DIR).is_dir():
            check_weight_files(checkpoint / EMA_DIR)
        load_trainer_state(checkpoint, mmap=True)
    except TTLError:  # a config.json edited to values out of range is a ConfigError
        return False
    return True


@contextlib.contextmanager
def point_to_older_checkpoint(run_dir: str | Path, newest: Path | None) -> Iterator[None]:
    """Add to a CheckpointError raised while resuming from `newest`, the run's newest checkpoint, which older
    checkpoint looks complete and how to resume from it. The run never falls back by itself: that would
    silently drop the training since, which the user may still recover (a copy cut short can be copied again)."""
    try:
        yield
    except CheckpointError as e:
        if newest is None:  # not resuming: an --init-from directory's error stands as it is
            raise
        older = [p for p in complete_checkpoints(run_dir) if p != newest]
        if not older:  # starting again in the same directory is refused while it holds a checkpoint
            raise CheckpointError(f"{e}; it is the run's only checkpoint: restore it from a copy, or start the run "
                                  "again with another --out") from None
        usable = next((p for p in reversed(older) if looks_complete(p)), None)
        if usable is None:
            raise CheckpointError(f"{e}; no older checkpoint ({', '.join(p.name for p in older)}) looks complete "
                                  "either") from None
        # a name outside STEP_DIR's pattern: never listed, resumed from or pruned, and not hidden (which is deleted)
        raise CheckpointError(f"{e}; the older {usable.name} looks complete: to resume from it instead (losing the "
                              f"training after it), move the damaged one aside (mv {newest} {newest}.damaged) and "
                              "run again with --resume") from None
