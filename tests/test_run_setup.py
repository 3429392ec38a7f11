"""What `ttl_core.run_setup` settles before any weights are read, checked piece by piece where whole runs leave it
unchecked: the last step and the option a refusal names, the data directory chosen, the runtime fields a run from a
checkpoint takes, what a plan on a run directory leaves (it removes, prints and warns of nothing); and the prompt of
the end-of-run sample (ttl_core.train)."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import load_script
from train_helpers import random_model, run_config, set_arguments
from ttl_core import save_pretrained
from ttl_core.distributed import World
from ttl_core.errors import ConfigError, DataNotReady
from ttl_core.generate import generate
from ttl_core.run_setup import planned_last_step, planned_model_config, resolve_data, set_up_run
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import build_or_load_model, sample_text
import ttl_core.train as ttl_train

pretrain = load_script("pretrain")
CPU = torch.device("cpu")


def test_the_last_step_is_max_steps_or_an_earlier_stop_after_and_a_refusal_names_the_option_that_set_it():
    train = run_config("train.max_steps=5").train
    assert planned_last_step(train, 0, None, None) == 5
    assert planned_last_step(train, 2, 3, None) == 3
    assert planned_last_step(train, 2, 9, None) == 5
    assert planned_last_step(train, 5, 3, None) is None  # a finished run is complete whatever the slice asked
    with pytest.raises(ConfigError, match="is at step 4, and --stop-after is 3: nothing to train; raise --stop-after"):
        planned_last_step(train, 4, 3, "RUN/checkpoints/step-000004")
    # a --stop-after past max_steps stops at max_steps: that is what the refusal names, and what to raise
    with pytest.raises(ConfigError, match="is at step 6, and train.max_steps is 5: nothing to train; raise --max-"):
        planned_last_step(train, 6, 9, "RUN/checkpoints/step-000006")


def test_data_is_the_data_option_then_the_configs_path_then_the_directory_the_resumed_run_recorded(tmp_path):
    """--data overrides the config's [data] path, as the option's help says, and both the directory a resumed
    checkpoint records (which a resume without either takes, and announces)."""
    given, configured, recorded = (tmp_path / name for name in ("given", "configured", "recorded"))
    for directory in (given, configured, recorded):
        directory.mkdir()
        (directory / "meta.json").write_text("{}")
    world, checkpoint = World(0, 1, CPU), (tmp_path / "run" / "checkpoints" / "step-000001", str(recorded))
    for data_dir, path, chosen in ((str(given), str(configured), given), (None, str(configured), configured),
                                   (None, "", recorded)):
        run = run_config(f"data.path={str(path)!r}")
        assert resolve_data(run, data_dir, tmp_path / "run", world, 400, checkpoint, announce=False,
                            planning=False) == chosen


def test_a_plan_without_out_does_not_take_a_run_directory_in_the_working_directory_for_its_own(tmp_path,
                                                                                                 monkeypatch):
    """With no --out the plan has no run directory, so the sample corpus a run would prepare is not prepared yet,
    even where ./RUN/data (the name the message uses) holds a prepared directory."""
    (tmp_path / "RUN" / "data").mkdir(parents=True)
    (tmp_path / "RUN" / "data" / "meta.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotReady, match="the bundled sample corpus is prepared into RUN/data when the run starts"):
        resolve_data(run_config(), None, None, World(0, 1, CPU), 400, None, announce=False, planning=True)
    assert resolve_data(run_config(), None, tmp_path / "RUN", World(0, 1, CPU), 400, None, announce=False,
                        planning=True) == tmp_path / "RUN" / "data"


def test_a_plan_on_a_run_directory_removes_no_partial_checkpoint_and_prints_the_plan_alone(data_dir, tmp_path,
                                                                                             capsys):
    """What an interrupted save left is the run's to remove, when it starts; a plan writes nothing. A --resume
    plan of a run with no complete checkpoint yet plans it from step 1 and says nothing more."""
    partial = tmp_path / "run" / "checkpoints" / ".step-000002.partial"
    partial.mkdir(parents=True)
    argv = ["--out", str(tmp_path / "run"), "--data", str(data_dir), "--plan", *set_arguments("train.max_steps=4")]
    for resume in ([], ["--resume"]):
        assert pretrain.main([*argv, *resume]) == 0
        assert capsys.readouterr().out.startswith("steps 1-4 (4 optimizer steps) on 1 process\n")
        assert partial.is_dir()


def test_a_resume_with_no_checkpoint_yet_says_it_starts_at_step_0_and_a_fresh_run_says_nothing_of_it(data_dir,
                                                                                                       tmp_path,
                                                                                                       capsys):
    for resume in (True, False):
        setup = set_up_run(run_config("train.max_steps=2"), tmp_path / "run", str(data_dir), resume, None, None,
                           World(0, 1, CPU))
        assert (setup.resume_from, setup.first_step, setup.last_step) == (None, 0, 2)
        said = capsys.readouterr().out
        assert (f"no complete checkpoint in {tmp_path / 'run'}; starting from step 0\n" in said) == resume


def test_a_checkpoint_fixes_the_architecture_but_takes_the_runtime_fields_set(tmp_path):
    """The kernels and the attention backend say how a model runs, not what it is: set on a run from a checkpoint
    (resumed or --init-from), they apply; a field of the architecture that differs is refused."""
    save_pretrained(random_model(run_config()), tmp_path / "source")
    run = run_config('model.attention="eager"', 'model.kernels="torch"')
    for resume_from, init_from in ((tmp_path / "source", None), (None, str(tmp_path / "source"))):
        config = planned_model_config(run, resume_from, init_from)
        assert (config.attention, config.kernels, config.hidden_size) == ("eager", "torch", 64)
        with pytest.raises(ConfigError, match="--set model.hidden_size=32 contradicts"):
            planned_model_config(run_config("model.hidden_size=32"), resume_from, init_from)
        model = build_or_load_model(config, 0, resume_from, init_from, CPU)  # and the model built runs so
        assert (model.config.attention, model.config.kernels) == ("eager", "torch")


def test_a_plan_does_not_warn_of_embedding_rows_no_token_uses_though_its_run_does(data_dir, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pretrain.main(["--data", str(data_dir), "--plan", *set_arguments("model.vocab_size=4096")]) == 0
    assert capsys.readouterr().out.startswith("steps 1-")
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_the_end_of_run_sample_continues_the_prompt_as_written_and_only_up_to_the_context(tmp_path, data_dir,
                                                                                           monkeypatch):
    """The prompt is encoded without an end of text (which a tokenizer adding one by default would append: the
    model would sample after a finished document), and the tokens asked for are cut to what the context leaves."""
    tokenizer = Tokenizer.from_pretrained(data_dir)
    tokenizer.add_eos_token = True
    prompt = "O rio corre devagar entre as pedras da serra, e a cidade acorda com o cheiro de pão quente. " * 2
    ids = tokenizer.encode(prompt, add_eos=False)
    assert 40 < len(ids) < 60  # of the micro model's 64 positions
    save_pretrained(random_model(run_config()).eval(), tmp_path / "checkpoint")
    calls = []

    def recorded_generate(model, input_ids, *args, max_new_tokens, **kwargs):
        calls.append((input_ids[0].tolist(), max_new_tokens))
        return generate(model, input_ids, *args, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(ttl_train, "generate", recorded_generate)
    text = sample_text(tmp_path / "checkpoint", tokenizer, prompt, max_new_tokens=40, seed=0)
    assert calls == [(ids, 64 - len(ids))] and text.startswith(tokenizer.decode(ids))
