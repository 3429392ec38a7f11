"""Training checkpoints: an HF-format model directory plus the state that makes resuming exact.

`RUN/checkpoints/step-000120/` holds `model.safetensors` + `config.json` (+ the tokenizer), loadable by
transformers as is, and beside them `trainer_state.json` (step, data position, run config) and
`optimizer.pt` (optimizer moments and RNG states; read back with `weights_only=True`). A checkpoint is
written into a hidden `.step-000120.partial` directory and renamed into place only when complete, so a
crash at any moment leaves the previous checkpoint as the newest complete one; an old checkpoint is renamed
to a hidden `.step-000100.old` before it is deleted, so no crash leaves a half-deleted one under its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .errors import CheckpointError
from .fileio import atomic_write, remove_dir_atomically, remove_path, write_dir_atomically, write_json
from .hf import save_pretrained

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there go without the run-directory guard
    fcntl = None

STEP_DIR = re.compile(r"step-(\d{6,})")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    """The directory holding a run's `step-N` checkpoints."""
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (partial ones are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
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


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from (python, numpy, torch, this process's CUDA
    device). Rank 0's state stands for every rank's: all are seeded alike and draw alike."""
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


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any], trainer_state: dict[str, Any], tokenizer: Tokenizer | None = None, keep: int = 2,
    scaler_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones.

    `model` supplies the config and architecture, `model_state` the full (gathered) weights; the
    optimizer state, `rng_state()` and an fp16 run's gradient-scaler state go to `optimizer.pt`,
    `trainer_state` to JSON."""
    def write(partial: Path) -> None:
        save_pretrained(model, partial, state_dict=model_state, tokenizer=tokenizer)
        atomic_write(partial / OPTIMIZER_STATE,
                     lambda tmp: torch.save({"optimizer": optimizer_state, "rng": rng_state(),
                                             **({"scaler": scaler_state} if scaler_state else {})}, tmp))
        write_json(partial / TRAINER_STATE, {"step": step, **trainer_state})

    final = write_dir_atomically(checkpoint_root(run_dir) / f"step-{step:06d}", write)
    # a directory named step-N is always complete: one killed while being deleted is gone from that name
    for old in complete_checkpoints(run_dir)[:-keep]:
        try:
            remove_dir_atomically(old)
        except OSError as e:  # the new checkpoint is safe: a file held open (Windows, NFS) must not end the run
            warnings.warn(f"could not remove the old checkpoint {old} ({e.strerror or e}); delete it by hand")
    return final


def load_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state JSON, {"optimizer": ..., "rng": ..., and "scaler" for fp16 runs}) of a complete checkpoint."""
    try:
        trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        saved = torch.load(checkpoint / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{checkpoint} is not a training checkpoint: {Path(e.filename).name} is missing") from None
    except EOFError:  # torch.load of an empty or cut-off file, often without a message
        raise CheckpointError(f"{checkpoint / OPTIMIZER_STATE}: empty or truncated") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RuntimeError, pickle.UnpicklingError) as e:
        # weights_only loading refuses any pickle that would build objects: the file is never executed
        raise CheckpointError(f"{checkpoint}: unreadable trainer state ({str(e).splitlines()[0]})") from None
    step = trainer_state.get("step") if isinstance(trainer_state, dict) else None
    if not isinstance(step, int) or step < 0 or not isinstance(trainer_state.get("data"), dict):
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: expected a step number and the data position")
    if not isinstance(saved, dict) or not {"optimizer", "rng"} <= set(saved):
        raise CheckpointError(f"{checkpoint / OPTIMIZER_STATE}: expected the optimizer and RNG states")
    return trainer_state, saved
