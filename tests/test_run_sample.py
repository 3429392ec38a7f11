"""The sample a training run prints at its end: its prompt checked before any step, and a sample given whatever the
tokenizer or the checkpoint holds (no pad token, a padding token in the prompt, stop strings, rows of the model's
vocabulary the tokenizer lacks)."""

from __future__ import annotations

import json
import warnings

import pytest

from train_helpers import FAST, MICRO_MODEL, prepared_corpus, random_model, run_config
from ttl_core import save_pretrained
from ttl_core.errors import ConfigError
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import sample_text, train


def test_a_sample_prompt_that_fills_the_context_is_refused_before_training(tmp_path, data_dir):
    prompt = "O rio corre devagar entre as pedras. " * 10  # well over the 64-token context
    with pytest.raises(ConfigError, match="train.sample_prompt is longer than the model's context of 64 tokens"):
        train(run_config("train.sample_tokens=8", f'train.sample_prompt="{prompt}"'), tmp_path / "run",
              data_dir=str(data_dir))
    assert not (tmp_path / "run").exists()  # refused before a step: nothing left behind


def test_the_end_of_run_sample_needs_no_pad_token(tmp_path):
    """A tokenizer without a pad token (Llama-2 style, or a config's null pad_token) still gives the sample at the
    end of a run: generate() pads finished rows with EOS then (it was handed pad id -1, and refused it)."""

    data = prepared_corpus(tmp_path)
    config = json.loads((data / "tokenizer_config.json").read_text())
    (data / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    tokenizer = Tokenizer.from_pretrained(data)
    assert tokenizer.pad_id == -1
    run = run_config(*MICRO_MODEL, *FAST)
    save_pretrained(random_model(run).eval(), tmp_path / "checkpoint")
    text = sample_text(tmp_path / "checkpoint", tokenizer, "O rio", max_new_tokens=6, seed=0)
    assert text.startswith("O rio") and len(text) > len("O rio")


def test_the_end_of_run_sample_prompt_may_hold_the_padding_token(tmp_path, data_dir):
    """The sample's prompt is one row with no padding, so a "<pad>" in train.sample_prompt is a token: generate()
    took it for padding (as with no mask) and ended the run, its checkpoint written, with "must be left-padded"."""
    tokenizer = Tokenizer.from_pretrained(data_dir)
    ids = tokenizer.encode("O rio <pad> corre", add_eos=False)
    assert tokenizer.pad_id in ids
    save_pretrained(random_model(run_config(*MICRO_MODEL, *FAST)).eval(), tmp_path / "checkpoint")
    text = sample_text(tmp_path / "checkpoint", tokenizer, "O rio <pad> corre", max_new_tokens=6, seed=0)
    assert text.startswith(tokenizer.decode(ids)) and len(text) > len(tokenizer.decode(ids))


def test_the_end_of_run_sample_applies_the_checkpoint_s_stop_strings_without_a_false_warning(tmp_path, data_dir):
    """An --init-from checkpoint's generation_config.json may set stop_strings: the sample stops at them (ttl's
    generate() applies them given the tokenizer), where it warned that ttl "does not implement" them."""
    tokenizer = Tokenizer.from_pretrained(data_dir)
    save_pretrained(random_model(run_config(*MICRO_MODEL, *FAST)).eval(), tmp_path / "checkpoint")
    full = sample_text(tmp_path / "checkpoint", tokenizer, "O rio", max_new_tokens=12, seed=0)
    stop = full[-3:]  # the sample of 12 tokens ends with it: the same seed's longer one stops there (or before)
    assert len(full) > len("O rio") + 3
    (tmp_path / "checkpoint" / "generation_config.json").write_text(json.dumps({"stop_strings": [stop]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stopped = sample_text(tmp_path / "checkpoint", tokenizer, "O rio", max_new_tokens=40, seed=0)
    assert stopped.endswith(stop) and full.startswith(stopped)


def test_a_model_vocabulary_larger_than_the_data_s_is_warned_of_and_still_gives_the_end_of_run_sample(tmp_path,
                                                                                                        data_dir):
    """configs/ttl-160m.toml (32,000 tokens) on data prepared with a smaller --vocab-size trains, with a warning
    that the rows past the tokenizer's serve no token (not for a table padded to a multiple of 128, nor again on
    resume); the early model samples ids the tokenizer lacks, which the sample drops as transformers' decode
    does, instead of ending the run with an error after its last checkpoint is written."""
    with pytest.warns(UserWarning, match=r"^the model's vocab_size is 4096 but the tokenizer in \S+ has 400 tokens: "
                                         r"3696 rows of the embedding and LM head serve no token \(set model.vocab"):
        result = train(run_config("model.vocab_size=4096", "train.max_steps=1", "train.sample_tokens=20"),
                       tmp_path / "run", data_dir=str(data_dir))
    assert result.sample is not None and result.sample.startswith("O Brasil é")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(run_config("model.vocab_size=512", "train.max_steps=1", "train.sample_tokens=0"), tmp_path / "padded",
              data_dir=str(data_dir))
        train(run_config("model.vocab_size=4096", "train.max_steps=2", "train.sample_tokens=0"), tmp_path / "run",
              data_dir=str(data_dir), resume=True)
    assert not [w for w in caught if "serve no token" in str(w.message)]
