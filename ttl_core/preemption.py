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
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from .distributed import World

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# EX_TEMPFAIL (sysexits.h, "try again later"): a requeue script tells a run the scheduler stopped (requeue it with
# --resume) from one that finished (0), was refused (2) or crashed (1). A Ctrl-C keeps the 130 of an interrupted
# program, so that a run a person stopped is not requeued.
EXIT_STATUS = {signal.SIGTERM: 75, signal.SIGUSR1: 75, signal.SIGINT: 130}


class StopOnSignal:
    """From construction until `restore()`, STOP_SIGNALS ask the training loop to stop after the step in progress
    instead of ending the process (in the main thread only: Python runs handlers nowhere else, so a `train()`
    called from another thread keeps the process's handlers; and not those the process ignores). `restore()` puts
    the previous handlers back."""

    def __init__(self, world: World):
        self.world = world
        self.received: signal.Signals | None = None
        # every rank creates it here, at the same point of the run, as a new group must be (and before the
        # handlers change, so that a failure here leaves them as they were)
        self._group = dist.new_group(backend="gloo") if world.distributed else None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            # a signal the process was started ignoring stays ignored (a shell's background job, nohup)
            self._previous = {sig: signal.signal(sig, self._request) for sig in STOP_SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}

    def _request(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait for the checkpoint
        self.received = self.received or signal.Signals(signum)

    def agreed(self) -> signal.Signals | None:
        """The stop signal if any rank received one, else None: the same answer on every rank. Every rank must
        call it at the same point of each step (a collective when distributed; a gloo all-reduce of one number)."""
        if self._group is None:
            return self.received
        # the largest signal number wins, so all ranks report (and exit with the status of) the same signal
        number = torch.tensor([int(self.received or 0)])
        dist.all_reduce(number, op=dist.ReduceOp.MAX, group=self._group)
        return signal.Signals(int(number)) if int(number) else None

    def restore(self) -> None:
        """Put back the handlers found at construction and release the group."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
