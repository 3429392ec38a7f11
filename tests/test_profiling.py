"""`train.profile_steps = [start, stop]`: a torch.profiler trace of those optimizer steps from every rank, and rank 0's
table of the operators that took the most time, in RUN/profile; the run trains bit for bit as without it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import profile

from helpers import ROOT, run_torchrun
from train_helpers import losses, run_config, same_weights, set_arguments
from ttl_core.cli import _show_warning as show_warning
from ttl_core.errors import ConfigError, TrainingError
from ttl_core.profiling import annotate, top_operators
from ttl_core.run_config import load_run_config
import ttl_core.train as ttl_train
from ttl_core.train import train

# two micro-batches a step, dropout (the profiler must draw none of its random numbers), an evaluation inside the window
RUN = ("train.max_steps=4", "train.grad_accum_steps=2", "model.attention_dropout=0.1", "train.eval_every=2")


@pytest.fixture(scope="module")
def unprofiled(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("unprofiled") / "run"
    train(run_config(*RUN), run_dir, data_dir=str(data_dir))
    return run_dir


def annotations(trace: Path) -> list[str]:
    """The named ranges of a Chrome trace, in the order they begin (the file must be JSON with traceEvents)."""
    events = json.loads(trace.read_text())["traceEvents"]
    return [e["name"] for e in sorted(events, key=lambda e: e.get("ts", 0)) if e.get("cat") == "user_annotation"]


def step_ranges(trace: Path) -> list[str]:
    return [name for name in annotations(trace) if name.startswith("step ")]


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step-000004"


def test_a_profiled_run_writes_its_window_s_trace_and_table_and_trains_bit_for_bit_as_without(tmp_path, data_dir,
                                                                                              unprofiled, capsys):
    train(run_config(*RUN, "train.profile_steps=[2, 3]"), tmp_path, data_dir=str(data_dir))
    assert losses(tmp_path) == losses(unprofiled) and len(losses(tmp_path)) == 4
    assert same_weights(final_checkpoint(tmp_path), final_checkpoint(unprofiled))
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0-steps2-3.json", "steps2-3.txt"]
    trace = tmp_path / "profile" / "rank0-steps2-3.json"
    assert step_ranges(trace) == ["step 2", "step 3"]
    pieces = ["forward 0", "backward 0", "forward 1", "backward 1", "clip gradients", "optimizer update"]
    assert [name for name in annotations(trace) if not name.startswith(("step ", "Optimizer."))] == pieces * 2
    table = (tmp_path / "profile" / "steps2-3.txt").read_text()
    assert table.startswith("steps 2-3 on rank 0: the 25 operators with the most self CPU time\n")
    assert "aten::mm" in table and "Self CPU" in table and "step 2" not in table  # the ranges are not operators
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("window, error", [
    ("[3, 2]", r"train.profile_steps must be \[start, stop\], two integers with 1 <= start <= stop .*got \[3, 2\]$"),
    ("[0, 2]", r"must be \[start, stop\], .*got \[0, 2\]$"), ("[2]", r"must be \[start, stop\], .*got \[2\]$"),
    ("[2, 3.0]", r"must be \[start, stop\], .*got \[2, 3.0\]$"),
    ("[3, 5]", r"^train.profile_steps \[3, 5\] ends past train.max_steps=4$"),
    ("3", r"^train.profile_steps must be a list, got 3$")])
def test_a_bad_window_is_refused_in_one_line(window, error):
    with pytest.raises(ConfigError, match=error) as refused:
        load_run_config(None, ["train.max_steps=4", f"train.profile_steps={window}"])
    assert "\n" not in str(refused.value)


def stop_with(monkeypatch, how: str) -> dict:
    """train()'s arguments that stop a run after its step 2, as --stop-after or a scheduler's SIGTERM does."""
    if how == "stop_after":
        return {"stop_after": 2}
    real, calls = ttl_train.train_step, []

    def step_with_a_signal(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttl_train, "train_step", step_with_a_signal)
    return {}


@pytest.mark.parametrize("how", ["stop_after", "sigterm"])
def test_a_run_stopped_inside_the_window_writes_the_steps_it_trained_and_its_resume_profiles_the_rest(
        tmp_path, data_dir, unprofiled, monkeypatch, how):
    """A resumed run profiles what is left of its window, and says that it trained the rest before; once the window
    has passed, it profiles nothing and says so (a requeue passes the same config again and again: not refused)."""
    run = run_config(*RUN, "train.profile_steps=[2, 3]")
    assert train(run, tmp_path, data_dir=str(data_dir), **stop_with(monkeypatch, how)).last_step == 2
    assert not torch.autograd._profiler_enabled()
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["rank0-steps2-2.json", "steps2-2.txt"]
    assert step_ranges(tmp_path / "profile" / "rank0-steps2-2.json") == ["step 2"]
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"^train.profile_steps \[2, 3\]: this run resumes after step 2, so "
                                         r"profiling steps 3-3 only$"):
        train(run, tmp_path, data_dir=str(data_dir), resume=True, stop_after=3)
    assert step_ranges(tmp_path / "profile" / "rank0-steps3-3.json") == ["step 3"]
    with pytest.warns(UserWarning, match=r"resumes after step 3, so nothing is profiled$"):
        train(run, tmp_path, data_dir=str(data_dir), resume=True)
    assert len(list((tmp_path / "profile").iterdir())) == 4
    assert losses(tmp_path) == losses(unprofiled)
    assert same_weights(final_checkpoint(tmp_path), final_checkpoint(unprofiled))


def test_the_resume_warning_starts_a_line_of_its_own(tmp_path, data_dir, unprofiled, capsys):
    """The warning of a run resumed past its window comes before the progress bar, not glued to its first line."""
    shutil.copytree(unprofiled, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_warning  # as the scripts print a warning: one line, on stderr
        train(run_config(*RUN, "train.max_steps=5", "train.profile_steps=[2, 3]"), tmp_path / "run",
              data_dir=str(data_dir), resume=True)
    assert re.search(r"(^|\n)warning: train.profile_steps \[2, 3\]: .* nothing is profiled\n", capsys.readouterr().err)


def test_a_profiled_step_that_raises_stops_the_profiler_and_writes_nothing(tmp_path, data_dir, monkeypatch):
    real, calls = ttl_train.train_step, []

    def failing_third_step(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise TrainingError("loss became nan")
        return real(*args, **kwargs)

    monkeypatch.setattr(ttl_train, "train_step", failing_third_step)
    with pytest.raises(TrainingError, match="step 3: loss became nan"):
        train(run_config(*RUN, "train.profile_steps=[2, 3]"), tmp_path, data_dir=str(data_dir))
    assert not torch.autograd._profiler_enabled() and not (tmp_path / "profile").exists()


def test_annotations_are_ranges_under_a_profiler_and_nothing_without_one():
    """Without a profiler, annotate() makes no record_function (which costs microseconds a step even unseen)."""
    assert isinstance(annotate("forward 0"), contextlib.nullcontext)
    with profile() as running:
        with annotate("forward 0"):
            torch.randn(4, 4).sum()
    assert "forward 0" in {event.key for event in running.key_averages()}


def test_the_table_leaves_out_a_named_range_however_much_self_time_it_has():
    """A range's self time is what runs in it outside the operators (Python, waiting): on a GPU its kernels' time.
    A range that waits 50 ms would top a table sorted by self time were ranges not left out."""
    with profile() as running:
        with annotate("waiting range"):
            time.sleep(0.05)
            torch.randn(64, 64) @ torch.randn(64, 64)
    table = top_operators(running, cuda=False)
    assert "aten::mm" in table and "waiting range" not in table


@pytest.mark.slow
def test_every_rank_of_a_ddp_run_writes_its_trace_and_rank_0_the_table(tmp_path, data_dir):
    done = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "run",
                        *set_arguments("train.max_steps=3", "train.eval_every=0", "train.profile_steps=[2, 3]"))
    assert done.returncode == 0, done.stderr[-3000:]
    profiled = tmp_path / "run" / "profile"
    assert sorted(p.name for p in profiled.iterdir()) == ["rank0-steps2-3.json", "rank1-steps2-3.json",
                                                          "steps2-3.txt"]
    for rank in (0, 1):
        assert step_ranges(profiled / f"rank{rank}-steps2-3.json") == ["step 2", "step 3"]
    assert done.stdout.count("steps 2-3 on rank 0: the 25 operators") == 1
