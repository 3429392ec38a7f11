"""Where a training step's time goes: `train.profile_steps = [start, stop]` runs optimizer steps start..stop under
torch.profiler.

The training loop enters `StepProfiler.step(N)` around each step's work (its batches and `train_step`). The profiler
starts as step `start` begins and stops as step `stop`'s update ends: the trace holds those steps, each a `step N`
range, and what runs between them (logging, evaluation, checkpoints inside the window), and `annotate` names the
pieces of a step (`forward I` and `backward I` per micro-batch, `clip gradients`, `optimizer update`). Every rank
writes its trace; rank 0 prints the operators that took the most self time and saves that table too.

Operator shapes, Python stacks and memory are not recorded: each multiplies a trace's size and the profiler's
overhead (stacks most), and the named ranges already tell which part of the step an operator ran in. The profiler
starts as the window's first step begins, with no warm-up step (a resumed run, or a window from step 1, has none to
give), so that step may carry its start-up cost: to time a step alone, start the window a step before it. Profiling
draws no random numbers and changes no computation, so a run trains bit for bit alike with or without it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from .distributed import World
from .fileio import atomic_write

TOP_OPERATORS = 25


def annotate(name: str) -> contextlib.AbstractContextManager:
    """A range named `name` in the trace of a running profiler; without one, nothing at all (a `record_function`
    costs microseconds even with no profiler to see it)."""
    return record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


class StepProfiler:
    """Profiles the optimizer steps of `window` (`train.profile_steps`: [start, stop], or [] for none) that a run
    resumed after step `resumed_at` (0: a new run) trains, into `out_dir`/profile. A resumed run profiles what is left
    of the window and warns that the rest was trained before, or that all of it was."""

    def __init__(self, window: list[int], out_dir: Path, world: World, resumed_at: int):
        self.out_dir, self.world = out_dir / "profile", world
        self.first, self.last = (max(window[0], resumed_at + 1), window[1]) if window else (1, 0)
        if window and self.first > window[0] and world.is_main:
            left = (f"profiling steps {self.first}-{self.last} only" if self.first <= self.last
                    else "nothing is profiled")
            warnings.warn(f"train.profile_steps {window}: this run resumes after step {resumed_at}, so {left}",
                          stacklevel=2)
        self.profiler: profile | None = None
        self.completed = 0  # the last step the profiler saw end

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around optimizer step `step`'s work: starts the profiler as the window's first step begins, names the
        step in the trace, and writes the trace as the window's last ends. A step that raises stops the profiler
        and writes nothing: the error comes out as it was, without a trace export before it."""
        if not self.first <= step <= self.last:
            yield
            return
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.world.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=False)
            self.profiler.start()
        try:
            with record_function(f"step {step}"):
                yield
        except BaseException:
            self.profiler.stop()
            self.profiler = None
            raise
        self.completed = step
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop the profiler if it runs and write what it recorded: the window, or the steps of it that ran when the
        run stopped inside it (--stop-after, a signal). Call it once the loop ends, however it ends."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        steps = f"steps{self.first}-{self.completed}"
        self.out_dir.mkdir(parents=True, exist_ok=True)  # by every rank: another node may not see rank 0's
        atomic_write(self.out_dir / f"rank{self.world.rank}-{steps}.json",
                     lambda tmp: profiler.export_chrome_trace(str(tmp)))
        if self.world.is_main:
            cuda = self.world.device.type == "cuda"
            table = (f"steps {self.first}-{self.completed} on rank 0: the {TOP_OPERATORS} operators with the most self "
                     f"{'CUDA' if cuda else 'CPU'} time\n{top_operators(profiler, cuda)}")
            atomic_write(self.out_dir / f"{steps}.txt", lambda tmp: tmp.write_text(table, encoding="utf-8"))
            tqdm.write(f"{table}\nsaved in {self.out_dir / steps}.txt; each rank R's trace in "
                       f"{self.out_dir}/rank<R>-{steps}.json (chrome://tracing or ui.perfetto.dev)")


def top_operators(profiler: profile, cuda: bool) -> str:
    """torch's table of the TOP_OPERATORS operators with the most self time (on a GPU, device time: the kernels'),
    with CPU (and CUDA) columns. The named ranges are left out: a range's device time spans the kernels in it."""
    averages = profiler.key_averages()
    averages[:] = [event for event in averages if not event.is_user_annotation]
    return averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                          row_limit=TOP_OPERATORS)
