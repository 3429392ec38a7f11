"""The learning-rate schedule: warmup, then transformers' schedules of the same shape, and warmup-stable-decay
runs whose decay branches off a resumed checkpoint."""

from __future__ import annotations

import pytest
import torch

from train_helpers import losses, prepared_corpus, run_config
from ttl_core.errors import ConfigError
from ttl_core.metrics import read_metrics
from ttl_core.optim import lr_at
from ttl_core.run_config import load_run_config
from ttl_core.train import train


def test_lr_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    t = load_run_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10",
                               "train.max_steps=110"]).train
    assert lr_at(1, t) == pytest.approx(0.1) and lr_at(10, t) == pytest.approx(1.0) == lr_at(11, t)
    assert lr_at(61, t) == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(110, t) > 0.1 and lr_at(111, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)


@pytest.mark.parametrize("warmup, min_lr", [(0, 0.0), (4, 0.0), (3, 0.1)])
def test_lr_schedule_is_transformers_cosine_after_the_warmup(warmup, min_lr):
    """Every step past the warmup uses transformers' lr; with min_lr 0 the last step still learns (a one-step
    fine-tune used to run at lr 0)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    t = load_run_config(None, ["train.lr=1.0", f"train.min_lr={min_lr}", f"train.warmup_steps={warmup}",
                               "train.max_steps=12"]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, 12, min_lr=min_lr)
    for step in range(1, 13):
        if step > warmup:
            assert lr_at(step, t) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), step
        optimizer.step()
        schedule.step()
    assert lr_at(12, t) > min_lr
    one_step = load_run_config(None, ["train.lr=1.0", "train.min_lr=0.0", "train.warmup_steps=0",
                                      "train.max_steps=1"]).train
    assert lr_at(1, one_step) == 1.0


@pytest.mark.parametrize("schedule, decay_steps, min_lr", [("linear", 0, 0.0), ("constant", 0, 0.0),
                                                           ("cosine", 5, 0.1), ("linear", 5, 0.1), ("1-sqrt", 5, 0.1),
                                                           ("1-sqrt", 9, 0.0)])
def test_other_schedules_are_transformers_after_the_warmup(schedule, decay_steps, min_lr):
    """Linear and constant decay from the warmup on, as transformers' schedules of those names; with `decay_steps`,
    warmup-stable-decay: lr until the last `decay_steps` steps, then transformers' `get_wsd_schedule` decay."""
    import transformers
    warmup, max_steps = 3, 12
    t = load_run_config(None, ["train.lr=1.0", f"train.min_lr={min_lr}", f"train.warmup_steps={warmup}",
                               f"train.max_steps={max_steps}", f"train.schedule=\"{schedule}\"",
                               f"train.decay_steps={decay_steps}"]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if decay_steps:
        reference = transformers.get_wsd_schedule(optimizer, warmup, decay_steps, max_steps, decay_type=schedule,
                                                  min_lr_ratio=min_lr)
    else:
        reference = {"linear": transformers.get_linear_schedule_with_warmup(optimizer, warmup, max_steps),
                     "constant": transformers.get_constant_schedule_with_warmup(optimizer, warmup)}[schedule]
    lrs = []
    for step in range(1, max_steps + 1):
        lrs.append(lr_at(step, t))
        if step > warmup:
            assert lrs[-1] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), step
        optimizer.step()
        reference.step()
    stable = max_steps - decay_steps if decay_steps else warmup
    assert lrs[warmup:stable + 1] == [1.0] * (stable + 1 - warmup)  # held until the decay's first step
    assert (lrs[-1] > min_lr and lrs[-1] < lrs[stable + 1]) if schedule != "constant" else lrs[-1] == 1.0


@pytest.mark.parametrize("overrides, message", [
    (["train.schedule=\"step\""], "train.schedule must be one of cosine, linear, 1-sqrt, constant, got 'step'"),
    (["train.decay_steps=-1"], r"train.decay_steps must lie in \[0, max_steps - warmup_steps = 90\]"),
    (["train.decay_steps=91"], r"train.decay_steps must lie in \[0, max_steps - warmup_steps = 90\]"),
    (["train.decay_steps=10", "train.schedule=\"constant\""], "needs a schedule that decays"),
])
def test_bad_schedules_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, ["train.warmup_steps=10", "train.max_steps=100", *overrides])


def test_a_decay_branched_off_a_resumed_stable_phase_is_the_shorter_run_itself(tmp_path):
    """Warmup-stable-decay's point: the stable phase does not depend on the run's length, so a run planned for 8
    steps, stopped after 4 and resumed with max_steps 6 decays over its last 2 steps exactly as a 6-step run does."""
    (tmp_path / "data").mkdir()
    data_dir = prepared_corpus(tmp_path / "data")
    wsd = ["train.schedule=\"1-sqrt\"", "train.decay_steps=2", "train.min_lr=0.0", "train.eval_every=0"]
    straight, branched = tmp_path / "straight", tmp_path / "branched"
    train(run_config("train.max_steps=6", *wsd), straight, data_dir=str(data_dir))
    train(run_config("train.max_steps=8", *wsd), branched, data_dir=str(data_dir), stop_after=4)
    train(run_config("train.max_steps=6", *wsd), branched, data_dir=str(data_dir), resume=True)
    assert losses(branched) == losses(straight) and len(losses(straight)) == 6
    lrs = [r["lr"] for r in read_metrics(branched / "metrics.jsonl") if "lr" in r]
    assert lrs == [1.5e-3, 3e-3, 3e-3, 3e-3, 3e-3, pytest.approx(3e-3 * (1 - 0.5 ** 0.5))]
