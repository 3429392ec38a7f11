"""A scheduler's signal (SIGTERM, SIGUSR1) or Ctrl-C ends a run after the optimizer step in progress, with a
checkpoint of that step from which --resume continues bit for bit. The signals are sent from inside the run at a
chosen step (a wrapped train_step), never by a timer racing the steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, forked_exit_codes, free_port, load_script
from train_helpers import corpus_file, losses, run_config, same_state, same_weights, set_arguments
from ttl_core.checkpoint import complete_checkpoints, load_trainer_state
from ttl_core.data import prepare_data
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.preemption import StopOnSignal
from ttl_core.tokenizer import Tokenizer
import ttl_core.checkpoint as ttl_checkpoint
import ttl_core.train as ttl_train
from ttl_core.train import train

RUN = ("train.max_steps=5", "train.save_every=100")


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
    """A shell's background job (a CI runner's, say) starts with SIGINT ignored, which ttl leaves ignored, as
    Python does: these tests send it as a terminal's Ctrl-C would reach a run."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run the signalled ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(run_config(*RUN), run_dir, data_dir=str(data_dir))
    return run_dir


def signal_during_step(monkeypatch, step: int, signum: int) -> None:
    """Send `signum` to this process at the start of optimizer step `step` (counted from this train() call)."""
    real, calls = ttl_train.train_step, []

    def step_with_a_signal(*args, **kwargs):
        calls.append(step)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttl_train, "train_step", step_with_a_signal)


def handlers() -> list:
    return [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_checkpoints_the_step_in_progress_and_resume_continues_bit_for_bit(tmp_path, data_dir, straight,
                                                                                    monkeypatch, capsys, signum):
    before = handlers()
    signal_during_step(monkeypatch, 3, signum)
    result = train(run_config(*RUN), tmp_path, data_dir=str(data_dir))
    assert (result.last_step, result.stopped_by) == (3, signum) and handlers() == before
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000003"] == [result.checkpoint.name]
    assert (f"stopped on {signal.Signals(signum).name} at step 3, saved in {result.checkpoint}; continue with "
            f"--resume") in capsys.readouterr().out
    monkeypatch.undo()
    assert train(run_config(*RUN), tmp_path, data_dir=str(data_dir), resume=True).stopped_by is None
    assert losses(tmp_path) == losses(straight) and len(losses(straight)) == 5
    assert same_weights(tmp_path / "checkpoints" / "step-000005", straight / "checkpoints" / "step-000005")


def test_a_requeue_with_init_from_resumes_from_the_run_s_checkpoint_not_from_the_init_weights(tmp_path, data_dir,
                                                                                             straight, monkeypatch):
    """A requeue script passes the same --resume --init-from DIR (and --set dropout) to every submission: the first,
    on a run without a checkpoint, starts from DIR's weights; a later one continues from the run's own checkpoint and
    its config (DIR's weights would silently throw away the training since, and DIR's dropout of 0 refuse the --set),
    bit for bit as a run from DIR that was never stopped."""
    init, run = str(straight / "checkpoints" / "step-000005"), run_config(*RUN, "model.attention_dropout=0.1")
    train(run, tmp_path / "uninterrupted", data_dir=str(data_dir), init_from=init)
    signal_during_step(monkeypatch, 3, signal.SIGTERM)
    first = train(run, tmp_path / "requeued", data_dir=str(data_dir), resume=True, init_from=init)
    assert (first.last_step, first.stopped_by) == (3, signal.SIGTERM)
    monkeypatch.undo()
    train(run, tmp_path / "requeued", data_dir=str(data_dir), resume=True, init_from=init)
    assert losses(tmp_path / "requeued") == losses(tmp_path / "uninterrupted") != losses(straight)
    assert same_weights(*(tmp_path / run / "checkpoints" / "step-000005" for run in ("requeued", "uninterrupted")))


def test_a_requeue_with_init_from_checks_the_data_s_tokenizer_against_the_run_s_checkpoint(tmp_path, data_dir):
    """The run's data gave an added token the id 400, past DIR's 400-token tokenizer (in DIR's 416-row table): data
    whose id 400 is another added token agrees with DIR's tokenizer on every id DIR has, but would train the
    checkpoint's row 400 on another token; a requeue on it is refused as any resume on other data is."""
    train(run_config("train.max_steps=1", "model.vocab_size=416"), tmp_path / "init", data_dir=str(data_dir))
    init = str(tmp_path / "init" / "checkpoints" / "step-000001")
    for name in ("ano", "mes"):
        tokenizer = Tokenizer.from_pretrained(init)
        assert tokenizer.add_special_tokens([f"<{name}>"]) == [400]
        prepare_data([corpus_file(tmp_path)], tmp_path / name, tokenizer=tokenizer)
    run = run_config(*RUN, "model.vocab_size=416")
    train(run, tmp_path / "run", data_dir=str(tmp_path / "ano"), resume=True, init_from=init, stop_after=1)
    with pytest.raises(ConfigError, match="another tokenizer than .*step-000001's: resume on the data the run was"):
        train(run, tmp_path / "run", data_dir=str(tmp_path / "mes"), resume=True, init_from=init)


def test_a_step_just_saved_is_not_saved_again_and_a_second_signal_while_saving_changes_nothing(tmp_path, data_dir,
                                                                                              monkeypatch):
    real, saves = ttl_train.save_checkpoint, []

    def save_and_signal_again(run_dir, step, *args, **kwargs):
        saves.append(step)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler that repeats itself
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ttl_train, "save_checkpoint", save_and_signal_again)
    signal_during_step(monkeypatch, 2, signal.SIGUSR1)
    result = train(run_config(*RUN[:1], "train.save_every=2"), tmp_path, data_dir=str(data_dir))
    assert (result.last_step, result.stopped_by, saves) == (2, signal.SIGUSR1, [2])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002"]


def test_a_second_ctrl_c_while_saving_stops_at_once_and_leaves_the_previous_checkpoint(tmp_path, data_dir, straight,
                                                                                      monkeypatch):
    real, interrupted = ttl_checkpoint.save_pretrained, []

    def save_then_interrupt(model, path, **kwargs):
        real(model, path, **kwargs)
        if "step-000003" in str(path):  # the weights are written, the rest of the checkpoint is not
            interrupted.append(path)
            os.kill(os.getpid(), signal.SIGINT)

    before = handlers()
    monkeypatch.setattr(ttl_checkpoint, "save_pretrained", save_then_interrupt)
    signal_during_step(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(*RUN[:1], "train.save_every=2"), tmp_path, data_dir=str(data_dir))
    # the first Ctrl-C let step 3 finish and its save begin; the second stopped the save
    assert handlers() == before and interrupted and len(losses(tmp_path)) == 3
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002"]
    monkeypatch.undo()
    assert train(run_config(*RUN), tmp_path, data_dir=str(data_dir), resume=True).last_step == 5
    assert losses(tmp_path) == losses(straight)


def test_a_signal_the_process_ignores_stays_ignored(tmp_path, data_dir, monkeypatch):
    """A shell starts a background job with SIGINT ignored (so that a Ctrl-C meant for the shell spares it), nohup
    and other launchers likewise: a run keeps ignoring what its process was set to ignore."""
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signal_during_step(monkeypatch, 2, signal.SIGINT)
        result = train(run_config(*RUN), tmp_path, data_dir=str(data_dir))
        assert (result.last_step, result.stopped_by) == (5, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, ignored)


def test_a_signal_during_the_last_step_ends_the_run_as_finished(tmp_path, data_dir, monkeypatch, capsys):
    """The run ends after its last step anyway: a signal during it is no stop to report (a requeue script would
    run the finished job again on the 75 it exits with)."""
    signal_during_step(monkeypatch, 2, signal.SIGTERM)
    result = train(run_config("train.max_steps=2"), tmp_path, data_dir=str(data_dir))
    assert (result.last_step, result.stopped_by, result.checkpoint.name) == (2, None, "step-000002")
    assert "stopped on" not in capsys.readouterr().out


def test_the_first_signal_received_is_the_one_reported():
    """A Ctrl-C then a scheduler's SIGTERM in one step is a stop a person asked for (exit 130, not requeued)."""
    stop = StopOnSignal(World(0, 1, torch.device("cpu")))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() is signal.SIGINT
    finally:
        stop.restore()


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_ctrl_c_while_a_stop_is_pending_stops_at_once(first):
    """Whatever asked for the stop (a scheduler or a first Ctrl-C), a person's Ctrl-C then does not wait for the
    checkpoint; a repeated SIGTERM or SIGUSR1 changes nothing."""
    stop = StopOnSignal(World(0, 1, torch.device("cpu")))
    try:
        os.kill(os.getpid(), first)
        os.kill(os.getpid(), signal.SIGTERM if first == signal.SIGINT else first)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() is first
    finally:
        stop.restore()


def _agree_on_two_ranks(rank: int, signum: int, store: str) -> None:
    """A forked rank of a two-process gloo group: receive `signum` (0: none), exit with the agreed signal."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    stop = StopOnSignal(World(rank, 2, torch.device("cpu")))
    if signum:
        os.kill(os.getpid(), signum)
    agreed = stop.agreed()
    stop.restore()
    dist.destroy_process_group()
    os._exit(int(agreed or 0))


@pytest.mark.parametrize("received, agreed", [((signal.SIGTERM, signal.SIGTERM), signal.SIGTERM),
                                              ((signal.SIGUSR1, signal.SIGTERM), signal.SIGTERM),
                                              ((0, signal.SIGUSR1), signal.SIGUSR1), ((0, 0), 0)])
def test_ranks_agree_on_the_largest_signal_any_of_them_received(tmp_path, received, agreed):
    """Every rank reports the same signal, hence exits with the same status: the largest number any rank got
    (torchrun and SLURM signal every rank, often with the same one)."""
    codes = forked_exit_codes(_agree_on_two_ranks, [(rank, signum, str(tmp_path / "store"))
                                                    for rank, signum in enumerate(received)])
    assert codes == [int(agreed)] * 2


SIGNALLER = """
import os, runpy, signal, sys
import ttl_core.train as train
step, name, rank = int(sys.argv.pop(1)), sys.argv.pop(1), sys.argv.pop(1)
real, calls = train.train_step, []
def step_with_a_signal(*args, **kwargs):
    calls.append(step)
    if len(calls) == step and os.environ.get("RANK", "0") == rank:
        os.kill(os.getpid(), getattr(signal, name))
    return real(*args, **kwargs)
train.train_step = step_with_a_signal
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def pretrain_with_a_signal(tmp_path: Path, step: int, name: str, rank: int, args: list, env: dict):
    """scripts/pretrain.py ARGS, signalled with `name` at the start of its step `step` on rank `rank` (unstarted)."""
    signaller = tmp_path / "signaller.py"
    signaller.write_text(SIGNALLER)
    return subprocess.Popen([sys.executable, str(signaller), str(step), name, str(rank),
                             str(ROOT / "scripts" / "pretrain.py"), *map(str, args)],
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_args(data_dir: Path, run_dir: Path, *more: str) -> list:
    return ["--data", data_dir, "--out", run_dir, *set_arguments(*RUN, *more)]


@pytest.mark.slow
def test_pretrain_stopped_by_sigterm_exits_75_with_one_line_saying_how_to_continue(tmp_path, data_dir):
    done = pretrain_with_a_signal(tmp_path, 2, "SIGTERM", 0, cli_args(data_dir, tmp_path / "run"), {})
    out, err = done.communicate(timeout=300)
    assert done.returncode == 75, err[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert f"stopped on SIGTERM at step 2, saved in {checkpoint}; continue with --resume\n" in out
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-000002"]


def test_pretrain_stopped_by_ctrl_c_exits_130_not_the_requeue_status(tmp_path, data_dir, monkeypatch, capsys):
    """A requeue script resumes a run that exits 75 (a scheduler's stop); one a person stopped keeps the 130 of an
    interrupted program."""
    signal_during_step(monkeypatch, 2, signal.SIGINT)
    assert load_script("pretrain").main(list(map(str, cli_args(data_dir, tmp_path / "run")))) == 130
    assert "stopped on SIGINT at step 2" in capsys.readouterr().out


def two_ranks(tmp_path: Path, args: list, signal_at: int | None = None) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each of two gloo ranks of scripts/pretrain.py ARGS; with `signal_at`,
    rank 1 alone gets SIGUSR1 at the start of that step."""
    port = free_port()
    ranks = [pretrain_with_a_signal(tmp_path, signal_at or 0, "SIGUSR1", 1, args,
                                    {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]
        return [(rank.returncode, *output) for rank, output in zip(ranks, outputs)]
    finally:
        for rank in ranks:  # a rank left waiting at a collective must not outlive the test
            if rank.poll() is None:
                rank.kill()
                rank.wait()


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, data_dir):
    """torchrun's ranks may receive a signal during different steps (here rank 1 alone gets one): they agree on the
    step to stop after and save it together, as the checkpoint an uninterrupted pair writes at that step (weights,
    optimizer moments, random state, data position: all that --resume restores)."""
    stopped = two_ranks(tmp_path, cli_args(data_dir, tmp_path / "run", "train.max_steps=3"), signal_at=2)
    assert [status for status, _, _ in stopped] == [75, 75], stopped[0][2][-2000:] + stopped[1][2][-2000:]
    assert "stopped on SIGUSR1 at step 2" in stopped[0][1]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-000002"]
    whole = two_ranks(tmp_path, cli_args(data_dir, tmp_path / "whole", "train.max_steps=3", "train.save_every=2"))
    assert [status for status, _, _ in whole] == [0, 0], whole[0][2][-2000:]
    (state, saved), (whole_state, whole_saved) = [load_trainer_state(run / "checkpoints" / "step-000002")
                                                  for run in (tmp_path / "run", tmp_path / "whole")]
    # Python's and NumPy's generators are unseeded, each process's own: the training draws from torch's alone
    torch_states = [[rank["torch"] for rank in checkpoint["rng"]] for checkpoint in (saved, whole_saved)]
    assert state["data"] == whole_state["data"] and len(torch_states[0]) == 2 and same_state(*torch_states)
    assert same_state(saved["optimizer"], whole_saved["optimizer"])
    assert same_weights(*[run / "checkpoints" / "step-000002" for run in (tmp_path / "run", tmp_path / "whole")])
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")[:2]
