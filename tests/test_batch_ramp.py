"""The batch-size warmup (train.batch_ramp_steps, train.batch_ramp_start): the accumulation schedule, a ramped run
against a plain loop drawing the same micro-batches, its logs and tokens axis, resume mid-ramp, two processes."""

from __future__ import annotations

import itertools
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT, run_script, run_torchrun
from train_helpers import losses, run_config, same_weights, set_arguments
from ttl_core.checkpoint import read_trainer_state
from ttl_core.compare import load_run, summarize, tokens_seen
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.loader import PackedLoader
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.optim import build_optimizer, lr_at
from ttl_core.run_config import TrainConfig, describe_batch, load_run_config
from ttl_core.step import model_inputs, train_step
import ttl_core.train as ttl_train
from ttl_core.train import train

# 5 steps, ramping from 1 to 3 micro-batches of 4 x 32 tokens by step 4: 2 * (step - 1) // 3 more than 1
RAMP = ["train.max_steps=5", "train.grad_accum_steps=3", "train.batch_ramp_steps=4", "train.batch_ramp_start=1",
        "train.eval_every=0"]
RAMP_COUNTS = [1, 1, 2, 3, 3]
CPU = torch.device("cpu")


@pytest.mark.parametrize("accum, start, ramp, counts", [
    (8, 1, 8, [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]),  # one more micro-batch a step
    (8, 1, 4, [1, 3, 5, 8, 8]),  # 7/3 a step, rounded down
    (4, 1, 10, [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]),  # each count held 3 steps, the whole batch from step 10
    (6, 2, 3, [2, 4, 6, 6]),
    (6, 5, 2, [5, 6, 6]),
    (3, 1, 0, [3, 3, 3]),  # no ramp
])
def test_the_accumulation_schedule_is_the_line_from_start_to_the_whole_batch_rounded_down(accum, start, ramp, counts):
    t = TrainConfig(micro_batch_size=4, seq_len=16, grad_accum_steps=accum, batch_ramp_steps=ramp,
                    batch_ramp_start=start)
    assert [t.grad_accum_at(step) for step in range(1, len(counts) + 1)] == counts
    assert [t.tokens_at(step) for step in range(1, len(counts) + 1)] == [4 * 16 * count for count in counts]


def test_every_ramp_rises_from_its_start_and_reaches_the_whole_batch_at_its_last_step_not_before():
    for accum, ramp in itertools.product(range(2, 10), range(2, 14)):
        for start in range(1, accum):
            t = TrainConfig(grad_accum_steps=accum, batch_ramp_steps=ramp, batch_ramp_start=start, max_steps=20)
            counts = [t.grad_accum_at(step) for step in range(1, 21)]
            assert all(isinstance(c, int) for c in counts) and counts[0] == start
            assert all(a <= b for a, b in zip(counts, counts[1:])), (accum, ramp, start, counts)
            assert counts[ramp - 1:] == [accum] * (21 - ramp) and accum not in counts[:ramp - 1]


def plain_loop(run, data_dir, counts: list[int]) -> list[float]:
    """The losses of `run` trained by hand: ttl's model, optimizer and step, `counts[s - 1]` micro-batches drawn in
    order from one loader at step s."""
    t = run.train
    torch.manual_seed(t.seed)
    model = LlamaForCausalLM(run.model_config()).train()
    optimizer = build_optimizer(model, t, CPU)
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=t.seed)
    record = []
    for step, count in enumerate(counts, start=1):
        micro = [model_inputs(next(loader), CPU, False, None) for _ in range(count)]
        record.append(train_step(model, optimizer, micro, t, World(0, 1, CPU), lr_at(step, t), None)[0])
    return record


@pytest.fixture(scope="module")
def ramped(data_dir, tmp_path_factory):
    """A 5-step ramped run (RAMP)."""
    out = tmp_path_factory.mktemp("ramped") / "run"
    train(run_config(*RAMP), out, data_dir=str(data_dir))
    return out


def test_a_ramped_run_trains_as_a_plain_loop_on_the_schedule_s_micro_batches(ramped, data_dir, tmp_path, capsys):
    """Bit for bit: the loop draws each step's count of micro-batches from the loader, in order, and the loss is
    the mean over all of the step's targets; step 1 is a grad_accum_steps=1 run's step 1. batch_tokens (and hence
    compare_runs' tokens axis) and the data position in the checkpoint follow the schedule."""
    run = run_config(*RAMP)
    assert [run.train.grad_accum_at(step) for step in range(1, 6)] == RAMP_COUNTS
    assert losses(ramped) == plain_loop(run, data_dir, RAMP_COUNTS)
    train(run_config("train.max_steps=1", "train.grad_accum_steps=1", "train.eval_every=0"), tmp_path / "one",
          data_dir=str(data_dir))
    assert "tokens per optimizer step (4 x 1 x 32 x 1 process)\n" in capsys.readouterr().out
    assert losses(tmp_path / "one") == losses(ramped)[:1]

    records = [r for r in read_metrics(ramped / "metrics.jsonl") if "loss" in r]
    batch_tokens = [4 * count * 32 for count in RAMP_COUNTS]
    assert [r["batch_tokens"] for r in records] == batch_tokens
    seen = list(itertools.accumulate(batch_tokens))
    assert tokens_seen(load_run(ramped, "ramped")) == dict(zip(range(1, 6), seen))
    assert summarize(load_run(ramped, "ramped"), 0.0)["tokens"] == seen[-1] == 4 * 32 * 10
    position = read_trainer_state(ramped / "checkpoints" / "step-000005")["data"]
    assert (position["epoch"], position["batch"]) == (0, sum(RAMP_COUNTS))  # the loader counts micro-batches


def test_a_ramped_step_s_throughput_counts_its_own_micro_batches(data_dir, tmp_path, monkeypatch):
    """tokens_per_s (and the MFU figured from it) of a step in the ramp is its own batch over its time, not the
    whole batch's: a clock that only the steps move times each step at 1 s."""
    monkeypatch.setattr(ttl_train, "time", SimpleNamespace(perf_counter=itertools.count().__next__))
    train(run_config(*RAMP), tmp_path / "run", data_dir=str(data_dir), stop_after=3)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["tokens_per_s"] for r in records] == [r["batch_tokens"] for r in records] == [
        4 * count * 32 for count in RAMP_COUNTS[:3]]


def test_the_banner_names_the_batch_the_ramp_starts_from(data_dir, tmp_path, capsys):
    train(run_config(*RAMP), tmp_path / "run", data_dir=str(data_dir), stop_after=1)
    assert ("384 tokens per optimizer step (4 x 3 x 32 x 1 process), ramped up over steps 1-4 from 128 at step 1 "
            "(1 of its 3 micro-batches)\n") in capsys.readouterr().out


def test_the_banner_of_several_processes_counts_the_ramp_s_start_on_all_of_them():
    t = TrainConfig(micro_batch_size=3, grad_accum_steps=5, seq_len=16, batch_ramp_steps=4, batch_ramp_start=2)
    assert describe_batch(t, 3) == ("720 tokens per optimizer step (3 x 5 x 16 x 3 processes), ramped up over steps "
                                    "1-4 from 288 at step 1 (2 of its 5 micro-batches)")  # 3 x 2 x 16 x 3 processes


def test_resume_mid_ramp_is_bit_exact_and_a_changed_ramp_continues_from_the_data_position(ramped, data_dir,
                                                                                           tmp_path):
    """Stopped after step 2 (the ramp's next step draws 2 micro-batches), resumed: the uninterrupted run, bit for
    bit. Resumed without the ramp instead (a schedule change, taken as given): the whole batch from step 3 on,
    drawn from where step 2 left the loader."""
    sliced, changed = tmp_path / "sliced", tmp_path / "changed"
    train(run_config(*RAMP, "train.save_every=100"), sliced, data_dir=str(data_dir), stop_after=2)
    shutil.copytree(sliced, changed)
    train(run_config(*RAMP), sliced, data_dir=str(data_dir), resume=True)
    assert losses(sliced) == losses(ramped)
    assert same_weights(sliced / "checkpoints" / "step-000005", ramped / "checkpoints" / "step-000005")

    train(run_config(*RAMP, "train.batch_ramp_steps=0"), changed, data_dir=str(data_dir), resume=True)
    counts = [1, 1, 3, 3, 3]
    assert [r["batch_tokens"] for r in read_metrics(changed / "metrics.jsonl") if "loss" in r] == \
        [4 * count * 32 for count in counts]
    assert losses(changed) == plain_loop(run_config(*RAMP), data_dir, counts)
    assert read_trainer_state(changed / "checkpoints" / "step-000005")["data"]["batch"] == sum(counts)


@pytest.mark.slow
def test_two_processes_ramp_as_one_with_the_same_global_batch(tmp_path, data_dir):
    """Each step's loss and grad norm, and its batch_tokens, alike on 2 processes of 2 rows and 1 of 4, to float
    rounding: each rank sums its rows' terms and the ranks' sums are added, another order than one process's
    (docs/training.md, "Several processes"), which moves these figures (about 6 and 2) by a few float32 roundings: at
    most 1.6e-6 over 5 seeds, 1 or 2 threads, machine load and 4 CPU kernel variants (ATEN_CPU_CAPABILITY, MKL_CBWR),
    and on this seed the same figures run after run. A rank that drops a micro-batch at step 4 moves its loss by
    4.5e-3."""
    one = run_script("pretrain", "--data", data_dir, "--out", tmp_path / "one",
                     *set_arguments(*RAMP, "train.micro_batch_size=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*RAMP, "train.micro_batch_size=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "128 at step 1 (1 of its 3 micro-batches)" in two.stdout
    records = [[r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r] for run in ("one", "two")]
    assert [r["batch_tokens"] for r in records[1]] == [r["batch_tokens"] for r in records[0]] == \
        [4 * count * 32 for count in RAMP_COUNTS]
    for key in ("loss", "grad_norm"):  # every step's figures in the message: which key, which step, how far
        alone, split = ([r[key] for r in run] for run in records)
        assert split == pytest.approx(alone, abs=1e-5), f"{key} by step: {alone} in one process, {split} in two"


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_ramp_steps=-1"], r"^train.batch_ramp_steps must be 0 \(no ramp\) or lie in \[2, max_steps=10\], "
                                    r"got -1$"),
    (["train.batch_ramp_steps=1"], r"^train.batch_ramp_steps must be 0 \(no ramp\) or lie in \[2, max_steps=10\]"),
    (["train.batch_ramp_steps=11"], r"lie in \[2, max_steps=10\], got 11$"),
    (["train.batch_ramp_steps=5", "train.grad_accum_steps=1"],
     r"^train.batch_ramp_steps=5 ramps the micro-batches accumulated up to train.grad_accum_steps, which is 1: "),
    (["train.batch_ramp_steps=5", "train.batch_ramp_start=0"],
     r"^train.batch_ramp_start \(micro-batches at step 1\) must lie in \[1, grad_accum_steps - 1 = 3\], got 0$"),
    (["train.batch_ramp_steps=5", "train.batch_ramp_start=4"], r"must lie in \[1, grad_accum_steps - 1 = 3\], got 4$"),
    (["train.batch_ramp_start=2"], r"^train.batch_ramp_start=2 needs a batch ramp: set train.batch_ramp_steps"),
    (["train.batch_ramp_steps=2.5"], r"^train.batch_ramp_steps must be an integer, got 2.5$"),
])
def test_bad_ramps_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_run_config(None, ["train.max_steps=10", "train.warmup_steps=2", "train.grad_accum_steps=4", *overrides])
    assert "\n" not in str(e.value)
