"""`scripts/pretrain.py --plan` refuses what the run refuses, in the run's words (settings, data, checkpoints to
resume or start from, a missing compiler), and names only what is not prepared yet; a plan from a checkpoint counts
what the run will train."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from helpers import load_script
from train_helpers import run_config, set_arguments
from ttl_core import load_pretrained
from ttl_core.cli import run_cli
from ttl_core.data import prepare_data
from ttl_core.errors import CheckpointError, ConfigError, DataError
from ttl_core.train import train

pretrain = load_script("pretrain")


@pytest.mark.parametrize("overrides, flags, refusal", [
    ([], ["--stop-after", "0"], "--stop-after must be a step >= 1, got 0"),
    (["train.log_noise_scale=true"], [], "train.log_noise_scale compares a small batch with the whole step"),
    (["train.log_noise_scale=true", "train.distributed=fsdp", "train.grad_accum_steps=2"], [],
     "train.log_noise_scale under FSDP compares each process's share of the step with the whole step"),
    (["train.seq_len=4096"], [], "train.seq_len 4096 exceeds the model's max_position_embeddings"),
    (["model.vocab_size=100"], [], "has 400 tokens but the model's vocab_size is 100"),
])
def test_plan_refuses_what_the_run_refuses(data_dir, tmp_path, overrides, flags, refusal):
    args = ["--data", str(data_dir), *flags, *set_arguments(*overrides)]
    for mode in (["--out", str(tmp_path / "run")], ["--plan"]):  # the run, then its plan: the same refusal
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            pretrain.main([*args, *mode])
    assert not (tmp_path / "run").exists()


def test_a_plan_on_data_of_a_vocabulary_larger_than_the_models_is_refused_as_the_run_is(data_dir, tmp_path):
    """meta.json's vocab_size above the model's (a tokenizer swapped in the data directory): the run's refusal, which
    the plan made no more (the two kept copies of the run's checks)."""
    shutil.copytree(data_dir, tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1000}))
    for mode in (["--out", str(tmp_path / "run")], ["--plan"]):
        with pytest.raises(ConfigError, match="meta.json records a vocab_size of 1000, but the model's vocab_size is "):
            pretrain.main(["--data", str(tmp_path / "data"), *set_arguments(), *mode])


def test_a_resumed_plan_on_another_global_batch_is_refused_as_the_resume_is(data_dir, tmp_path):
    train(run_config("train.max_steps=4"), tmp_path / "run", data_dir=str(data_dir), stop_after=1)
    args = ["--out", str(tmp_path / "run"), "--data", str(data_dir), "--resume", *set_arguments("train.max_steps=4")]
    with pytest.raises(DataError, match=r"global_batch is 4 \(micro_batch_size 4 x 1 process\), here 8 .*: keep "):
        pretrain.main([*args, "--plan", "--plan-processes", "2"])  # what torchrun on 2 processes would be refused
    with pytest.raises(DataError, match=r"global_batch is 4 .*, here 8\b"):
        pretrain.main([*args, "--set", "train.micro_batch_size=8"])  # the resume itself, on one process


def test_a_plan_of_a_finished_run_says_it_is_complete_as_the_run_does(data_dir, tmp_path, capsys):
    train(run_config("train.max_steps=2"), tmp_path / "run", data_dir=str(data_dir))
    capsys.readouterr()
    args = ["--out", str(tmp_path / "run"), "--data", str(data_dir), "--resume", *set_arguments("train.max_steps=2")]
    assert pretrain.main([*args, "--plan"]) == 0
    complete = f"{tmp_path / 'run' / 'checkpoints' / 'step-000002'} is at train.max_steps (step 2): the run is complete"
    assert capsys.readouterr().out.splitlines() == [f"{complete}, nothing is left to plan"]
    assert pretrain.main(args) == 0  # the requeued run itself
    assert capsys.readouterr().out.splitlines()[-1] == complete


def test_a_plan_from_a_checkpoint_on_data_of_another_tokenizer_is_refused_as_the_run_is(data_dir, halves, tmp_path):
    train(run_config("train.max_steps=1"), tmp_path / "source", data_dir=str(data_dir))
    args = ["--init-from", str(tmp_path / "source" / "checkpoints" / "step-000001"), "--data", str(halves / "a"),
            *set_arguments()]
    for mode in (["--out", str(tmp_path / "run")], ["--plan"]):
        with pytest.raises(ConfigError, match=f"{halves / 'a'} was tokenized with another tokenizer than "):
            pretrain.main([*args, *mode])


def test_a_plan_from_a_tied_config_whose_stored_head_differs_counts_the_untied_head_the_run_trains(data_dir, tmp_path,
                                                                                                      capsys):
    """transformers keeps such a checkpoint's LM head untied, and so does the run's load: the plan, which reads no
    weights but those two, counts the head's parameters too."""
    train(run_config("train.max_steps=1"), tmp_path / "source", data_dir=str(data_dir))
    source = tmp_path / "source" / "checkpoints" / "step-000001"
    hf_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    (source / "config.json").write_text(json.dumps({**hf_config, "tie_word_embeddings": True}), encoding="utf-8")
    with pytest.warns(UserWarning, match="kept untied"):
        trained = load_pretrained(source)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="kept untied"):
        assert pretrain.main(["--plan", "--init-from", str(source), "--data", str(data_dir), *set_arguments()]) == 0
    assert f"parameters: {trained.num_parameters():,} (" in capsys.readouterr().out


def test_a_plan_from_a_tied_checkpoint_whose_weights_are_damaged_leaves_the_refusal_to_the_run(data_dir, tmp_path,
                                                                                                  capsys):
    """The plan reads a tied checkpoint's embedding and head, but weights it cannot read are named by the run, which
    points to the checkpoint to take instead: the plan is made from config.json."""
    train(run_config("train.max_steps=1", "model.tie_word_embeddings=true"), tmp_path / "source",
          data_dir=str(data_dir))
    source = tmp_path / "source" / "checkpoints" / "step-000001"
    with open(source / "model.safetensors", "r+b") as f:
        f.truncate(100)
    args = ["--init-from", str(source), "--data", str(data_dir), *set_arguments()]
    assert pretrain.main(["--plan", *args]) == 0
    assert "parameters: " in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="model.safetensors"):
        pretrain.main(["--out", str(tmp_path / "run"), *args])


def test_the_evaluated_directories_are_checked_as_the_run_checks_them(halves, tmp_path, capsys):
    mix = "data.mix={a = {path = \"%s\", weight = 3}, b = {path = \"%s\", weight = 1}}" % (halves / "a", halves / "b")
    clash = "data.eval={a = \"%s\"}" % (halves / "b")
    for mode in (["--out", str(tmp_path / "run")], ["--plan"]):  # an eval set named as a source: refused alike
        with pytest.raises(ConfigError, match="data.eval set 'a' has the name of a data.mix source"):
            pretrain.main([*mode, *set_arguments(mix, clash)])
    no_val = tmp_path / "no_val"  # evaluation on, and no validation split: the run is refused, the plan names it
    prepare_data([halves / "a.txt"], no_val, tokenizer=halves / "a", val_fraction=0, workers=1)
    with pytest.raises(ConfigError, match="has no validation split"):
        pretrain.main(["--out", str(tmp_path / "run"), "--data", str(no_val), *set_arguments()])
    assert pretrain.main(["--plan", "--data", str(no_val), *set_arguments()]) == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith(f"eval: not planned: {no_val} has no validation split")


def test_a_plan_without_resume_on_a_run_directory_with_checkpoints_is_refused_as_the_run_is(data_dir, tmp_path):
    train(run_config("train.max_steps=1"), tmp_path / "run", data_dir=str(data_dir))
    args = ["--out", str(tmp_path / "run"), "--data", str(data_dir), *set_arguments("train.max_steps=2")]
    for mode in ([], ["--plan"]):
        with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume to continue"):
            pretrain.main([*args, *mode])


def test_a_compiled_cpu_plan_without_a_compiler_is_refused_as_the_run_is(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("ttl_core.run_setup.cpp_compiler", lambda: None)
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    args = ["--data", str(data_dir), *set_arguments("train.compile=true")]
    for mode in (["--out", str(tmp_path / "run")], ["--plan"]):
        with pytest.raises(ConfigError, match="train.compile on the CPU needs a C\\+\\+ compiler"):
            pretrain.main([*args, *mode])


def test_a_plan_refuses_the_noise_scale_its_processes_cannot_measure_as_training_does(capsys):
    """train.log_noise_scale in one process with one micro-batch per step is refused when the run starts: its plan
    says so in the same line rather than planning a run that will not start; two processes are planned."""
    args = ["--plan", *set_arguments("train.log_noise_scale=true", "train.grad_accum_steps=1")]
    with pytest.raises(SystemExit) as exit:
        run_cli(pretrain.main, args)
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: train.log_noise_scale compares a small batch with the whole step: one "
                                       "process needs train.grad_accum_steps >= 2 (its first micro-batch is the small "
                                       "one), got 1; or launch 2 or more with torchrun (each one's own micro-batch)\n")
    assert pretrain.main([*args, "--plan-processes", "2"]) == 0
    assert capsys.readouterr().out.startswith("steps 1-")


def test_a_plan_refuses_the_data_the_run_refuses_and_names_only_data_not_prepared(halves, tmp_path, capsys):
    """--data beside a data.mix, a resumed mixture run given other data, and a damaged train split are the run's
    refusals, not data to prepare: the plan refuses them alike; a mixture source without meta.json is named."""
    mix = "data.mix={a = {path = \"%s\", weight = 3}, b = {path = \"%s\", weight = 1}}" % (halves / "a", halves / "b")
    run_dir = tmp_path / "run"
    train(run_config(mix, "train.max_steps=4"), run_dir, stop_after=1)
    damaged = tmp_path / "damaged"
    shutil.copytree(halves / "a", damaged)
    with open(damaged / "train.bin", "ab") as f:
        f.write(b"\0")  # half a token more than meta.json records
    for args, refusal in [
        (["--data", str(halves / "a"), *set_arguments(mix)],
         "names one data directory, but the config sets a data.mix"),
        (["--out", str(run_dir), "--resume", "--data", str(halves / "a"), *set_arguments("train.max_steps=4")],
         "was trained on a data mixture (a, b)"),
        (["--data", str(damaged), *set_arguments()], "train.bin: "),
    ]:
        with pytest.raises((ConfigError, DataError), match=re.escape(refusal)):
            pretrain.main(["--plan", *args])
    unprepared = "data.mix={a = {path = \"%s\", weight = 1}}" % (tmp_path / "missing")
    assert pretrain.main(["--plan", *set_arguments(unprepared)]) == 0
    assert (f"data: not planned: data.mix source 'a': {tmp_path / 'missing'} is not a prepared data directory (no "
            "meta.json)") in capsys.readouterr().out
    held_out = "data.eval={wiki = \"%s\"}" % (tmp_path / "missing")  # an eval set not prepared yet: named too
    assert pretrain.main(["--plan", "--data", str(halves / "a"), *set_arguments(held_out)]) == 0
    assert capsys.readouterr().out.splitlines()[-2].startswith(
        f"eval: not planned: data.eval set 'wiki': {tmp_path / 'missing'} is not a prepared data directory")
