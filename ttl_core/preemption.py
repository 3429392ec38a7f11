"""Stopping a training run cleanly when a scheduler asks: SIGTERM (what SLURM, Kubernetes and torchrun send
before they kill), SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit) and SIGINT (Ctrl-C).

A signal only records itself; the training loop asks `StopOnSignal.agreed()` once per optimizer step, after the
update, and on an answer saves that step's checkpoint and returns. The save never runs inside a handler, so a
second signal cannot re-enter it: a repeated SIGTERM or SIGUSR1 changes nothing, and a second Ctrl-C ends the run
at once, as Ctrl-C always did (the atomic checkpoint write leaves the previous checkpoint whole).

Under torchrun every rank gets the signal, but possibly during different steps: `agreed()` all-reduces what each
rank received, so all of them stop after the same step. It does so on a gloo group of its own, over a CPU tensor:
the flag never touches the GPU, so checking it adds no host-device sync to a CUDA step (a flag on the GPU would
be read back after the step's queued optimizer update).

A `TimeLimit` (--time-limit) stops a run the same way when its wall-clock budget would not hold one more step and
a checkpoint: for schedulers and notebooks that kill at a limit without a warning signal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import re
import signal
import sys
import threading
from collections.abc import Iterator
from time import monotonic  # by name: the tests replace this module's clock
from types import FrameType

import torch
import torch.distributed as dist

from .distributed import World
from .errors import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TIME_LIMIT = "the time limit"  # what `agreed()` answers (and `RunResult.stopped_by` holds) when a TimeLimit ran out
# EX_TEMPFAIL (sysexits.h, "try again later"): a requeue script tells a run the scheduler stopped (requeue it with
# --resume) from one that finished (0), was refused (2) or crashed (1). A Ctrl-C keeps the 130 of an interrupted
# program, so that a run a person stopped is not requeued.
EXIT_STATUS = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130, TIME_LIMIT: 75}

# Until a run has timed a checkpoint of its own, a save is assumed to write (and read back, for its digests) 16 bytes
# per parameter, an upper bound of what any run keeps (float32 weights, two optimizer moments, the EMA), at 25 MB/s:
# a slow network mount's pace (a local disk is several times faster); about 100 s for ttl-160m.
FIRST_SAVE_BYTES_PER_PARAMETER = 16
FIRST_SAVE_BYTES_PER_S = 25e6
NUMBER = r"\d+(?:\.\d+)?"
DURATION = re.compile(rf"({NUMBER})|(?:({NUMBER})h)?(?:({NUMBER})m)?(?:({NUMBER})s)?")  # seconds, or h, m, s


def duration_seconds(text: str) -> float:
    """An argparse type for --time-limit: hours, minutes and seconds in that order (`3h30m`, `90m`, `1.5h`, `45s`),
    or a plain number of seconds (`5400`); more than zero in all."""
    match = DURATION.fullmatch(text.strip().lower())
    seconds = sum(float(part or 0) * size for part, size in zip(match.groups(), (1, 3600, 60, 1))) if match else 0
    if not 0 < seconds < math.inf:  # so many digits that a float holds them as infinity: no deadline to keep
        raise argparse.ArgumentTypeError(f"expected a duration such as 3h30m, 90m, 1.5h, 45s or 5400 (seconds), "
                                         f"more than zero, got {text!r}")
    return seconds


class TimeLimit:
    """A wall-clock budget of `seconds`, counted from construction (the start of `train()`: preparing the data and
    building the model count). Asked once per optimizer step, it answers whether the next step and a checkpoint
    would no longer fit: the slowest step it timed (an evaluation included once one ran, a save left out) plus the
    slowest save (the first-save bound above before one was timed)."""

    def __init__(self, seconds: float):
        # a bool is a Real (True: one second), as JSON and TOML let it pass for a number; no limit means it. The
        # bound is a float's: a larger int would overflow the deadline's arithmetic
        if not (isinstance(seconds, numbers.Real) and not isinstance(seconds, bool)
                and 0 < seconds < sys.float_info.max):
            raise ConfigError(f"time_limit must be a positive number of seconds, got {seconds!r}")
        self._checked = monotonic()  # the end of the last step timed
        self.deadline = self._checked + seconds
        self.slowest_step, self.slowest_save, self.first_save, self._saving = 0.0, None, 0.0, 0.0

    def loop_starts(self, parameters: int) -> None:
        """The training loop is about to run its first step, on a model of `parameters` parameters."""
        self._checked = monotonic()
        self.first_save = parameters * FIRST_SAVE_BYTES_PER_PARAMETER / FIRST_SAVE_BYTES_PER_S

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Time the checkpoint saved inside, for the margin (and leave it out of the next step's time)."""
        start = monotonic()
        yield
        took = monotonic() - start
        self._saving += took
        self.slowest_save = max(self.slowest_save or 0.0, took)

    def margin(self, steps: int = 1) -> float:
        """The seconds `steps` more steps and a checkpoint are expected to take, at most."""
        return steps * self.slowest_step + (self.first_save if self.slowest_save is None else self.slowest_save)

    def leaves(self, seconds: float) -> bool:
        """Whether `seconds` more would still end within the limit."""
        return monotonic() + seconds <= self.deadline

    def out_of_time(self) -> bool:
        """Whether the next step and a checkpoint would end past the limit; called once per step, after it and the
        checkpoint it is due for, if any (else that save would be in no margin)."""
        now = monotonic()
        self.slowest_step = max(self.slowest_step, now - self._checked - self._saving)
        self._checked, self._saving = now, 0.0
        return not self.leaves(self.margin())


class StopOnSignal:
    """From construction until `restore()`, STOP_SIGNALS ask the training loop to stop after the step in progress
    instead of ending the process (in the main thread only: Python runs handlers nowhere else, so a `train()`
    called from another thread keeps the process's handlers; and not those the process ignores), and so does
    `time_limit` running out. Construct it just before the first step, of a model of `parameters` parameters (the
    time limit's first-save bound). `restore()` puts the previous handlers back."""

    def __init__(self, world: World, time_limit: TimeLimit | None = None, parameters: int = 0):
        self.world, self.time_limit = world, time_limit
        self.received: signal.Signals | None = None
        # every rank creates it here, at the same point of the run, as a new group must be (and before the
        # handlers change, so that a failure here leaves them as they were)
        self._group = dist.new_group(backend="gloo") if world.distributed else None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            # a signal the process was started ignoring stays ignored (a shell's background job, nohup)
            self._previous = {sig: signal.signal(sig, self._request) for sig in STOP_SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}
        if time_limit is not None:
            time_limit.loop_starts(parameters)

    def _request(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait for the checkpoint
        self.received = self.received or signal.Signals(signum)

    def agreed(self) -> signal.Signals | str | None:
        """The stop signal if any rank received one, else TIME_LIMIT if any rank's time limit ran out, else None:
        the same answer on every rank. Every rank must call it at the same point of each step (a collective when
        distributed; a gloo all-reduce of one number)."""
        out_of_time = self.time_limit is not None and self.time_limit.out_of_time()  # timed on every call
        # the signal's number doubled, plus one when out of time: the largest wins, so all ranks report (and exit
        # with the status of) the same signal, and a signal goes before the time limit (a Ctrl-C stays a 130)
        number = 2 * int(self.received or 0) + out_of_time
        if self._group is not None:
            reduced = torch.tensor([number])
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self._group)
            number = int(reduced)
        return signal.Signals(number // 2) if number > 1 else TIME_LIMIT if number else None

    def saving(self) -> contextlib.AbstractContextManager:
        """Around a checkpoint's save: timed for the time limit's margin."""
        return self.time_limit.saving() if self.time_limit is not None else contextlib.nullcontext()

    def restore(self) -> None:
        """Put back the handlers found at construction and release the group."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
