"""Test helpers: running the scripts in `scripts/` as a user would, and measuring errors against a truth."""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import ttl_kernels

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = [importlib.import_module(f"ttl_kernels.{name}")
                  for name in ("rms_norm", "rotary", "swiglu", "cross_entropy", "flash_attention")]


def run_script(name: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/NAME.py ARGS...` with this checkout first on the import path (an editable install
    elsewhere, e.g. from another worktree, must not shadow it)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def run_torchrun(script: Path, *args: str, env: dict | None = None,
                 processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node PROCESSES SCRIPT ARGS...` (one thread per process) on this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(script), *map(str, args)], env=full_env, capture_output=True, text=True,
                          timeout=600)


def run_snippet(code: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python -c CODE ARGS...` on this checkout (one thread), and the lines it printed: torch 2.9 and 2.10's gloo
    prints lines of its own ("[Gloo] Rank 0 is connected to ..."), left out."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return done, [line for line in done.stdout.splitlines() if not line.startswith("[Gloo] ")]


def forked_exit_codes(target: Callable, rank_args: list[tuple]) -> list[int | None]:
    """The exit codes of `target(*args)` run in a forked process for each of `rank_args` (ranks of a gloo group, say),
    all started before any is waited for; one still running after a minute (left waiting at a collective) is killed
    rather than left to outlive the test."""
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=target, args=args) for args in rank_args]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
        if rank.is_alive():
            rank.kill()
    return [rank.exitcode for rank in ranks]


def free_port() -> int:
    """A free port for a test's process group: in 29700-29799, or under pytest-xdist in a range of 20 of its own
    per worker from 29700 on, so that two workers' tests never take the same port before either binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    first, count = (29700 + 20 * int(worker.removeprefix("gw")), 20) if worker else (29700, 100)
    for port in range(first, first + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + count - 1}")


def run_in_ascii_locale(code: str) -> subprocess.CompletedProcess:
    """`python -c CODE` with this checkout importable under an ASCII locale with UTF-8 mode off, where Python's
    default text encoding is ASCII (as a bare container's or a cluster node's often is)."""
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def load_script(name: str):
    """Import `scripts/NAME.py` as a fresh module, so a test can call its functions or `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # a dataclass in the script (check_goals) looks its module up
    environment = dict(os.environ)
    try:
        spec.loader.exec_module(script)
    finally:  # kernel_report drops TRITON_INTERPRET on import (it compiles for real): the tests after it interpret
        os.environ.clear()
        os.environ.update(environment)
    return script


# The project's tolerances: relative error against a float64 truth computed from the same inputs.
REL_TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def rel_err(got, truth) -> float:
    """max |got - truth| / max |truth| in float64; NaN when `got` holds a NaN or inf (or the truth is unusable), so
    it passes no comparison: an infinite error would pass `<= 2 * rel_err(reference, truth)` with a NaN reference."""
    got, truth = got.detach().double(), truth.detach().double()
    error = float((got - truth).abs().max() / truth.abs().max())  # torch's max propagates a NaN
    return error if math.isfinite(error) else math.nan


def largest(values: Iterable[float]) -> float:
    """The largest of `values`, NaN if any is NaN (Python's `max` keeps its first value when the next is NaN)."""
    return float(torch.tensor(list(values), dtype=torch.float64).max())


# Two heads' offset 2 * HEAD_STRIDE wraps in 32 bits to -128: past 2^31 elements, yet the stride is a 32-bit argument
HEAD_STRIDE = 2**31 - 64


def heads_far_apart(tokens: int, heads: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A float16 (tokens, heads, dim) view whose heads lie HEAD_STRIDE elements apart, filled with random values,
    in a storage whose first 256 elements (before the view) hold 7.0: where a head offset computed in 32 bits
    lands. The storage is address space (4 GiB a head) of which only the few pages written are ever backed.
    Skips the test where that address space cannot be reserved."""
    import pytest

    try:
        storage = torch.empty(256 + (heads - 1) * HEAD_STRIDE + tokens * dim, dtype=torch.float16)
    except RuntimeError:
        pytest.skip(f"cannot reserve {heads * 4} GiB of address space")
    storage[:256] = 7.0
    view = storage.as_strided((tokens, heads, dim), (dim, HEAD_STRIDE, 1), storage_offset=256)
    view.copy_(torch.randn(tokens, heads, dim, generator=torch.Generator().manual_seed(seed)))
    return view


def head_loss_case(seed: int, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable]:
    """(hidden (67, 24) needing a gradient, head weight (1003, 24), targets with every fourth ignored, a call of the
    fused linear cross-entropy, or of the cross-entropy of the logits, on them that takes the kernels' options)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(67, 24, generator=gen), torch.randn(1003, 24, generator=gen) * 0.3
    targets = torch.randint(0, 1003, (67,), generator=gen)
    targets[::4] = -100
    hidden.requires_grad_()
    call = (lambda **kw: ttl_kernels.fused_linear_cross_entropy(hidden, weight, targets, **kw)) if fused else (
        lambda **kw: ttl_kernels.cross_entropy(hidden @ weight.t(), targets, **kw))
    return hidden, weight, targets, call


def record_kernel_decisions(monkeypatch) -> dict[str, set[bool]]:
    """Each kernel module's answers to "Triton or the reference?" from here on, by module name: a test comparing
    the Triton path with the references means nothing unless the Triton path ran."""
    decisions: dict[str, set[bool]] = {}
    for module in KERNEL_MODULES:
        def recorded(*args, module=module, decide=module.use_triton):
            decision = decide(*args)
            decisions.setdefault(module.__name__, set()).add(decision)
            return decision
        monkeypatch.setattr(module, "use_triton", recorded)
    return decisions
