"""Each rank's own random streams: the seed derivation, the per-rank RNG states a checkpoint holds (and the one
state of older checkpoints), and, under torchrun, different dropout masks per rank that resume bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import ROOT, run_torchrun
from train_helpers import losses, prepared_corpus, run_config, set_arguments
from ttl_core import load_pretrained
from ttl_core.checkpoint import load_trainer_state, rank_seed, rng_state, save_checkpoint, set_rank_rng_state
from ttl_core.distributed import World, full_rng_states
from ttl_core.model import LlamaForCausalLM

CPU = torch.device("cpu")


def test_rank_seeds_are_distinct_and_rank_0_keeps_the_run_seed():
    """Distinct in the low 32 bits, all that torch's CPU generator reads of a seed, over every rank of a run and
    over the ranks of runs with nearby or common seeds (seed + rank would collide: seed 1's rank 0, seed 0's rank 1)."""
    seeds = [0, 1, 2, 3, 42, 1234, 2**32 - 1]
    assert [rank_seed(s, 0) for s in seeds] == seeds
    derived = [rank_seed(s, r) for s in seeds for r in range(1024)]
    assert len({d & 0xFFFFFFFF for d in derived}) == len(derived) and max(derived) < 2**32
    assert len({rank_seed(7, r) for r in range(1 << 16)}) == 1 << 16


def draws() -> list[float]:
    return torch.rand(4).tolist()


def test_each_rank_resumes_its_own_saved_state():
    torch.manual_seed(1)
    rank_0 = rng_state()
    torch.manual_seed(2)
    rank_1 = rng_state()
    expected = draws()
    torch.manual_seed(3)
    set_rank_rng_state([rank_0, rank_1], 0, World(1, 2, CPU))
    assert draws() == expected


@pytest.mark.parametrize("saved", ["old", "none"])
def test_without_a_saved_state_rank_0_keeps_its_stream_and_the_others_draw_from_the_seed(saved, capsys):
    """A fresh run (None), and a checkpoint from before per-rank states (one state, rank 0's, which every rank
    shared) resumed on 2 processes: rank 1 takes the stream a fresh run's rank 1 draws, not rank 0's."""
    torch.manual_seed(5)
    state = rng_state()
    expected = draws()
    torch.manual_seed(5)
    set_rank_rng_state(state if saved == "old" else None, 9, World(0, 2, CPU))
    assert draws() == expected  # a one-process run is what it always was
    set_rank_rng_state(state if saved == "old" else None, 9, World(1, 2, CPU))
    rank_1 = draws()
    torch.manual_seed(rank_seed(9, 1))
    assert rank_1 == draws() != expected
    assert ("differ from the uninterrupted run's" in capsys.readouterr().out) == (saved == "old")


def test_resuming_on_another_number_of_processes_says_the_dropout_masks_differ(capsys):
    set_rank_rng_state([rng_state(), rng_state()], 0, World(0, 4, CPU))
    assert capsys.readouterr().out.strip() == (
        "the checkpoint holds the random states of 2 processes, this run has 4: new streams from train.seed for "
        "ranks 2-3, so dropout masks (if any) differ from the uninterrupted run's")
    set_rank_rng_state([rng_state(), rng_state()], 0, World(0, 1, CPU))
    assert "this run has 1: the states saved for rank 1 go unused, so dropout" in capsys.readouterr().out
    set_rank_rng_state([rng_state(), rng_state()], 0, World(1, 4, CPU))
    assert capsys.readouterr().out == ""  # rank 0 alone says it, not every process


def test_a_checkpoint_holds_one_rng_state_per_rank(tmp_path):
    model = LlamaForCausalLM(run_config().model_config())
    torch.manual_seed(11)
    save_checkpoint(tmp_path, 1, model, model.state_dict(), {}, {"data": {}})
    expected = draws()
    saved = load_trainer_state(tmp_path / "checkpoints" / "step-000001")[1]["rng"]
    assert isinstance(saved, list) and len(saved) == 1 and len(full_rng_states(World(0, 1, CPU))) == 1
    set_rank_rng_state(saved, 0, World(0, 1, CPU))
    assert draws() == expected


RECORDER = """
import hashlib, json, os, runpy, sys
import torch
import ttl_core.train as train
record = {"weights": None, "draws": []}
wrap_model, train_step = train.wrap_model, train.train_step

def recording_wrap(model, *args):  # the weights each rank built, before FSDP shards them
    record["weights"] = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return wrap_model(model, *args)

def recording_step(*args, **kwargs):  # a dropout draw from the state the step's dropout starts from
    with torch.random.fork_rng(devices=[]):
        record["draws"].append(torch.nn.functional.dropout(torch.ones(64), 0.5).nonzero().flatten().tolist())
    return train_step(*args, **kwargs)

train.wrap_model, train.train_step = recording_wrap, recording_step
try:
    runpy.run_path(sys.argv.pop(1), run_name="__main__")
finally:
    with open(os.environ["RECORD"] + os.environ["RANK"], "w") as f:
        json.dump(record, f)
"""


@pytest.mark.slow
def test_two_ranks_draw_different_dropout_masks_and_each_resumes_its_own(tmp_path):
    """FSDP on 2 processes with attention dropout: both ranks build the same weights, draw different masks at
    every step, and a launch resumed from the step-2 checkpoint repeats steps 3-4 bit for bit."""
    data = prepared_corpus(tmp_path)
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    args = [ROOT / "scripts" / "pretrain.py", "--data", data, "--save-every", "2",
            *set_arguments("train.max_steps=4", "train.micro_batch_size=2", "model.attention_dropout=0.1",
                           "train.distributed=\"fsdp\"", "train.eval_every=0")]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = run_torchrun(recorder, *args, "--out", straight, env={"RECORD": str(tmp_path / "straight-")})
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    done = run_torchrun(recorder, *args, "--out", resumed, "--resume", env={"RECORD": str(tmp_path / "resumed-")})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"straight-{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert all(a != b for a, b in zip(ranks[0]["draws"], ranks[1]["draws"])) and len(ranks[0]["draws"]) == 4
    for rank in (0, 1):
        assert json.loads((tmp_path / f"resumed-{rank}").read_text())["draws"] == ranks[rank]["draws"][2:]
    assert losses(resumed) == losses(straight)[2:]
    a, b = (load_pretrained(run / "checkpoints" / "step-000004") for run in (straight, resumed))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
