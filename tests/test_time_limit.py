"""--time-limit: a run stops as on SIGUSR1 (the step's checkpoint, exit status 75) after the step at which one more
step and a checkpoint would pass its wall-clock budget. ttl_core.preemption's clock is replaced by one that only the
steps and the saves move, each by a chosen number of seconds, so that the step a run stops at is known in advance."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, forked_exit_codes, load_script, run_torchrun
import test_preemption
from test_preemption import signal_during_step
from train_helpers import losses, run_config, same_weights, set_arguments
from ttl_core.checkpoint import complete_checkpoints, load_trainer_state
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.model import LlamaForCausalLM
import ttl_core.preemption as preemption
from ttl_core.preemption import TIME_LIMIT, StopOnSignal, TimeLimit, duration_seconds
import ttl_core.train as ttl_train
from ttl_core.train import train

RUN = ("train.max_steps=5", "train.save_every=100")  # test_preemption's `straight` run
STEP_S, LIMIT_S, PLOT_S, SAMPLE_S = 60.0, 300.0, 50.0, 30.0
pretrain = load_script("pretrain")
# test_preemption's fixtures, here too: its uninterrupted run, and Ctrl-C sent as a terminal sends it
straight, ctrl_c_as_in_a_terminal = test_preemption.straight, test_preemption.ctrl_c_as_in_a_terminal


def fake_clock(monkeypatch, save_s: float, setup_s: float = 0.0) -> list[float]:
    """Replace the time limit's clock by one that each optimizer step moves by STEP_S, each checkpoint's save by
    `save_s`, building the model by `setup_s`, drawing loss.png by PLOT_S and the end-of-run sample by SAMPLE_S
    seconds; [now] is returned, for a test to read or move."""
    now = [0.0]
    monkeypatch.setattr(preemption, "monotonic", lambda: now[0])
    for name, seconds in (("train_step", STEP_S), ("save_checkpoint", save_s), ("build_or_load_model", setup_s),
                          ("plot_metrics", PLOT_S), ("sample_text", SAMPLE_S)):
        def advancing(*args, real=getattr(ttl_train, name), seconds=seconds, **kwargs):
            now[0] += seconds
            return real(*args, **kwargs)
        monkeypatch.setattr(ttl_train, name, advancing)
    return now


@pytest.mark.parametrize("text, seconds", [("3h30m", 12600), ("90m", 5400), ("2h", 7200), ("45s", 45),
                                           ("1.5h", 5400), ("1h0m30s", 3630), ("5400", 5400), ("0.5", 0.5),
                                           (" 90M ", 5400)])
def test_durations_read_as_seconds(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h0m", "3x", "30m3h", "-5", "inf", "nan", "1e3", "h", "3h 30m", "1.h",
                                  "9" * 400, "9" * 306 + "h"])  # too many digits for a float: infinite
def test_a_bad_time_limit_is_refused_in_one_line(text, capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        duration_seconds(text)
    with pytest.raises(SystemExit) as exit:
        pretrain.main(["--out", "RUN", "--time-limit", text])
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f"argument --time-limit: expected a duration such as 3h30m, 90m, 1.5h, 45s or 5400 (seconds), more than "
        f"zero, got {text!r}")


def test_a_time_limit_beside_plan_or_not_positive_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        pretrain.main(["--plan", "--time-limit", "1h"])
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "--time-limit has no effect with --plan")
    # True would be a limit of one second; 10**400 seconds overflow a float deadline
    for seconds in (0, -1.0, float("nan"), float("inf"), "1h", True, 10**400):
        with pytest.raises(ConfigError, match=f"^time_limit must be a positive number of seconds, got {seconds!r}$"):
            train(run_config(*RUN), tmp_path / "run", time_limit=seconds)
    assert not (tmp_path / "run").exists()


def test_the_margin_is_the_slowest_step_and_the_slowest_save(monkeypatch):
    """Before a save was timed, a save is bounded by 16 bytes per parameter at 25 MB/s; a save's seconds count in
    the margin, not in the step they follow."""
    now = [100.0]
    monkeypatch.setattr(preemption, "monotonic", lambda: now[0])
    limit = TimeLimit(30)
    now[0] += 5  # setup: counts against the limit, not as a step
    limit.loop_starts(parameters=10_000_000)  # 160 MB: 6.4 s
    now[0] += 3
    assert not limit.out_of_time() and limit.margin() == pytest.approx(3 + 6.4)
    with limit.saving():
        now[0] += 7
    now[0] += 2
    assert not limit.out_of_time() and limit.margin() == 3 + 7  # the slower step and the save
    now[0] += 4
    assert limit.out_of_time()  # at 121, 4 + 7 more pass 130
    assert (now[0], limit.margin()) == (121, 11)


def test_the_margin_keeps_the_slowest_step_and_save_of_the_run_not_the_last(monkeypatch):
    """Steps and saves of random lengths, the slowest of each not the last: `margin(k)` is k slowest steps and the
    slowest save, whatever came after them."""
    step_s, save_s = (torch.rand(6, dtype=torch.float64) * 10 + 1 for _ in range(2))
    step_s[-1], save_s[-1] = 0.5, 0.5  # the last step and save are the fastest
    now = [100.0]
    monkeypatch.setattr(preemption, "monotonic", lambda: now[0])
    limit = TimeLimit(1e6)
    limit.loop_starts(parameters=1)
    for step, save in zip(step_s.tolist(), save_s.tolist()):
        now[0] += step
        with limit.saving():
            now[0] += save
        assert not limit.out_of_time()
    for steps in (1, 3):
        assert limit.margin(steps) == pytest.approx(steps * step_s.max().item() + save_s.max().item(), rel=1e-12)


@pytest.mark.parametrize("save_s, limit_s, setup_s, stopped_at", [(10.0, LIMIT_S, 0.0, 4), (40.0, LIMIT_S, 0.0, 3),
                                                                   (10.0, LIMIT_S, 100.0, 3), (10.0, 30.0, 0.0, 1),
                                                                   (40.0, 390.0, 0.0, 4)])
def test_a_run_stops_when_its_next_step_and_a_save_would_not_fit(tmp_path, data_dir, monkeypatch, capsys, save_s,
                                                                  limit_s, setup_s, stopped_at):
    """Steps of 60 s against a limit of 300 s, a checkpoint every second step: 10 s saves leave room for step 4 (after
    step 3, at 190 s, 60 + 10 more fit), 40 s saves do not (at 220 s), nor do 10 s saves after a setup of 100 s (at 290
    s). Step 4's own save counts before the check after it: with 40 s saves and a limit of 390 s, step 5 and its save
    would pass the limit after it (320 + 100 s), though they would fit before it. A limit shorter than a step still lets
    the run train its first step and save it: refusing would need the step's time before it ran, and a requeued run
    advances by a step each time rather than not at all."""
    now = fake_clock(monkeypatch, save_s, setup_s)
    result = train(run_config(*RUN, "train.save_every=2"), tmp_path, data_dir=str(data_dir), time_limit=limit_s)
    assert (result.last_step, result.stopped_by) == (stopped_at, TIME_LIMIT)
    assert complete_checkpoints(tmp_path)[-1] == result.checkpoint and result.checkpoint.name.endswith(
        str(stopped_at))
    assert (f"stopped on the time limit at step {stopped_at}, saved in {result.checkpoint}; continue with --resume"
            in capsys.readouterr().out)
    assert now[0] <= limit_s or stopped_at == 1  # the run ended in time, loss.png left to the resumed run
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("spare_s, stopped_at", [(-0.01, 1), (0.01, 2)])
def test_before_its_first_save_a_run_bounds_the_save_by_its_model_s_size(tmp_path, data_dir, monkeypatch, spare_s,
                                                                         stopped_at):
    """Steps of 60 s and no save timed yet: after step 1 the margin is a step and the first save's bound, 16 bytes
    per parameter at 25 MB/s. A limit 0.01 s short of two steps and the bound stops the run after step 1; 0.01 s
    more lets step 2 run."""
    fake_clock(monkeypatch, save_s=0.0)
    run = run_config(*RUN)
    with torch.device("meta"):
        bound = LlamaForCausalLM(run.model_config()).num_parameters() * 16 / 25e6
    result = train(run, tmp_path, data_dir=str(data_dir), time_limit=2 * STEP_S + bound + spare_s)
    assert (result.last_step, result.stopped_by) == (stopped_at, TIME_LIMIT)


@pytest.mark.parametrize("limit_s, plotted, sampled", [(1000.0, True, True), (450.0, True, False),
                                                     (350.0, False, False)])
def test_a_finished_run_draws_and_samples_only_within_its_time_limit(tmp_path, data_dir, monkeypatch, capsys, limit_s,
                                                                     plotted, sampled):
    """Steps of 60 s and saves of 10 s (at steps 2, 4 and 5) end step 5 at 330 s. loss.png is drawn where the limit
    still holds the margin (60 + 10 s), the sample of 3 tokens where it holds 3 steps and a save (loading the
    checkpoint reads what a save wrote; each token is a forward, no slower than a step): 1000 s hold both, 450 s
    the plot alone (at 380 s, 190 s more would pass it), 350 s neither. Each skipped one is said in a line."""
    now = fake_clock(monkeypatch, save_s=10.0)
    result = train(run_config(*RUN, "train.save_every=2", "train.sample_tokens=3"), tmp_path, data_dir=str(data_dir),
                   time_limit=limit_s)
    assert (result.last_step, result.stopped_by) == (5, None)
    assert ((tmp_path / "loss.png").exists(), result.sample is not None) == (plotted, sampled)
    assert now[0] == 330 + PLOT_S * plotted + SAMPLE_S * sampled <= limit_s
    out = capsys.readouterr().out
    assert ("loss.png not drawn: the time limit leaves no room for it (scripts/plot_metrics.py RUN draws it)\n"
            in out) != plotted
    assert ("no sample generation: the time limit leaves no room for it (scripts/generate.py samples the checkpoint)"
            "\n" in out) != sampled


CLOCKED = """
import os, runpy, sys
import ttl_core.preemption as preemption, ttl_core.train as train
step_s, save_s, statuses = float(sys.argv.pop(1)), float(sys.argv.pop(1)), sys.argv.pop(1)
rank, now = os.environ.get("RANK", "0"), [0.0]
def advancing(real, seconds):
    def call(*args, **kwargs):
        now[0] += seconds
        return real(*args, **kwargs)
    return call
if rank == "0":  # the other ranks keep the real clock
    preemption.monotonic = lambda: now[0]
    train.train_step = advancing(train.train_step, step_s)
    train.save_checkpoint = advancing(train.save_checkpoint, save_s)
sys.argv.pop(0)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    open(os.path.join(statuses, "rank-" + rank), "w").write(str(e.code))
    raise
"""


def clocked_script(tmp_path: Path, save_s: float) -> list[str]:
    """A script that runs `scripts/pretrain.py ARGS` with rank 0's clock moved 60 s by each step and `save_s` by
    each save, writing each rank's exit status into `tmp_path`."""
    (tmp_path / "clocked.py").write_text(CLOCKED)
    script = ROOT / "scripts" / "pretrain.py"
    return [str(tmp_path / "clocked.py"), str(STEP_S), str(save_s), str(tmp_path), str(script)]


@pytest.mark.slow
def test_pretrain_stops_on_the_time_limit_with_75_and_a_resume_gets_a_fresh_limit(tmp_path, data_dir, straight,
                                                                                  monkeypatch):
    """The stopped run's checkpoint resumes bit for bit as the uninterrupted one (losses and weights); the resumed
    run counts its own 300 s from its start (counted from the first run's, it would stop after step 4)."""
    clocked, *arguments = clocked_script(tmp_path, 40.0)
    args = ["--data", data_dir, "--out", tmp_path / "run", "--time-limit", "5m",
            *set_arguments(*RUN, "train.save_every=2")]
    done = subprocess.run([sys.executable, clocked, *arguments, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 75, done.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    assert f"stopped on the time limit at step 3, saved in {checkpoint}; continue with --resume\n" in done.stdout
    now = fake_clock(monkeypatch, save_s=40.0)
    now[0] = 260.0  # where the first run's clock stopped
    resumed = train(run_config(*RUN, "train.save_every=2"), tmp_path / "run", data_dir=str(data_dir), resume=True,
                    time_limit=LIMIT_S)
    assert (resumed.last_step, resumed.stopped_by) == (5, None)
    assert losses(tmp_path / "run") == losses(straight) and len(losses(straight)) == 5
    assert same_weights(tmp_path / "run" / "checkpoints" / "step-000005", straight / "checkpoints" / "step-000005")


def test_a_signal_with_the_time_limit_is_reported_as_the_signal(tmp_path, data_dir, monkeypatch):
    """Both at step 3: a Ctrl-C stays a stop a person asked for (130, not requeued)."""
    fake_clock(monkeypatch, save_s=40.0)
    signal_during_step(monkeypatch, 3, signal.SIGINT)  # wraps the clocked step
    result = train(run_config(*RUN, "train.save_every=2"), tmp_path, data_dir=str(data_dir), time_limit=LIMIT_S)
    assert (result.last_step, result.stopped_by) == (3, signal.SIGINT)


def _agree_on_two_ranks(rank: int, out_of_time: bool, signum: int, store: str) -> None:
    """A forked rank of a two-process gloo group whose time limit has run out or not, and which received `signum`
    (0: none): exits with 1 when the ranks agreed on the time limit, else with the agreed signal's number."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    limit = TimeLimit(0.001 if out_of_time else 3600)
    if out_of_time:  # the time since the start counts as a step: under half the limit in, one more would still fit
        time.sleep(0.002)
    stop = StopOnSignal(World(rank, 2, torch.device("cpu")), limit)
    if signum:
        os.kill(os.getpid(), signum)
    agreed = stop.agreed()
    stop.restore()
    dist.destroy_process_group()
    os._exit(1 if agreed == TIME_LIMIT else int(agreed or 0))


@pytest.mark.parametrize("out_of_time, received, agreed", [((True, False), (0, 0), 1), ((False, True), (0, 0), 1),
                                                           ((True, False), (0, signal.SIGUSR1), signal.SIGUSR1),
                                                           ((False, False), (0, 0), 0)])
def test_ranks_agree_on_the_time_limit_of_any_and_a_signal_goes_first(tmp_path, out_of_time, received, agreed):
    store = str(tmp_path / "store")
    codes = forked_exit_codes(_agree_on_two_ranks,
                              [(rank, out_of_time[rank], received[rank], store) for rank in (0, 1)])
    assert codes == [int(agreed)] * 2


@pytest.mark.slow
def test_two_ranks_stop_after_the_same_step_when_only_rank_0_runs_out_of_time(tmp_path, data_dir):
    args = ["--data", data_dir, "--out", tmp_path / "run", "--time-limit", "5m",
            *set_arguments(*RUN, "train.save_every=2")]
    done = run_torchrun(*clocked_script(tmp_path, 40.0), *args)
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)] == ["75", "75"], done.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    assert f"stopped on the time limit at step 3, saved in {checkpoint}; continue with --resume" in done.stdout
    assert complete_checkpoints(tmp_path / "run")[-1] == checkpoint
    assert len(load_trainer_state(checkpoint)[1]["rng"]) == 2  # saved by both ranks together
