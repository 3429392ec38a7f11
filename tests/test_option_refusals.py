"""Option values a sweep of every script option, config field and API keyword found mishandled (a traceback, a hang,
nonsense taken without a word), each now refused in one line naming the option, or run as documented. Every case
is refused, or planned, before any work: the file runs in seconds."""

import contextlib
import signal

import pytest
import torch
from helpers import load_script
from train_helpers import corpus_file, set_arguments

from ttl_core import LlamaConfig, apply_lora, generate, load_pretrained, save_pretrained, train_tokenizer
from ttl_core.data import prepare_data
from ttl_core.errors import AdapterError, CheckpointError, ConfigError, DataError, GenerationError, TokenizerError
from ttl_core.finetune import FinetuneConfig, train_epochs
from ttl_core.metrics import MetricsLog
from ttl_core.model import LlamaForCausalLM
from ttl_core.model_io import ModelOutput

HUGE = 2**63  # past torch's int64 shapes and islice's sys.maxsize


@contextlib.contextmanager
def fails_after(seconds: int):
    """A hang (a loop over every one of billions of steps) fails the test instead of stalling the suite."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "max_position_embeddings", "num_labels"])
def test_a_model_size_past_int32_is_refused_by_name(field):
    # it was a TypeError from torch.empty (or a model built without end, for num_hidden_layers)
    with pytest.raises(ConfigError, match=rf"^{field} must be below 2\*\*31, got {HUGE}$"):
        LlamaConfig(**{field: HUGE})


@pytest.mark.parametrize("problem_type", ["regresion", "", 1, ["regression"]])
def test_an_unknown_problem_type_is_refused_by_name(problem_type):
    with pytest.raises(ConfigError, match=r"^problem_type must be one of regression, single_label_classification, "
                                          r"multi_label_classification or null, got "):
        LlamaConfig(problem_type=problem_type)


@pytest.mark.parametrize("size", [HUGE, 3])  # 3 was a message naming a line of sentencepiece's C++
def test_a_vocabulary_outside_sentencepiece_s_range_is_refused_before_the_corpus_is_read(size, tmp_path):
    allowed = r"must be an integer in \[4, 2\*\*31\)"
    with pytest.raises(TokenizerError, match=rf"^vocab_size {allowed}, got {size}$"):
        train_tokenizer(["casa azul"], None, vocab_size=size)
    with pytest.raises(DataError, match=rf"^vocab_size \(to train a tokenizer\) {allowed}, got {size}$"):
        prepare_data([corpus_file(tmp_path)], tmp_path / "out", vocab_size=size)


def tiny_model() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def test_a_lora_rank_past_int32_is_refused_by_name():
    with pytest.raises(ConfigError, match=rf"^lora_r \(--lora-r\) must be an integer in \[1, 2\*\*31\), got {HUGE}$"):
        FinetuneConfig(lora=True, lora_r=HUGE)
    with pytest.raises(AdapterError, match=rf"^LoRA rank r must be an integer in \[1, 2\*\*31\), got {HUGE}$"):
        apply_lora(tiny_model(), r=HUGE)


# each was a TypeError or ValueError from sentencepiece, islice, torch or a dict lookup, or (alpha) NaN logits
@pytest.mark.parametrize("call, error, message", [
    (lambda: train_tokenizer(["casa"], None, 300, max_sentence_length=2), TokenizerError,
     r"max_sentence_length must be an integer >= 4 and below 2\*\*31, got 2"),
    (lambda: train_tokenizer(["casa"], None, 300, num_threads="2"), TokenizerError,
     r"num_threads must be an integer >= 1 and below 2\*\*31, got '2'"),
    (lambda: train_tokenizer(["casa"], None, 300, input_sentence_size=-1), TokenizerError,
     r"input_sentence_size must be an integer >= 1 and below 2\*\*63, got -1"),
    (lambda: train_tokenizer(["casa"], None, 300, input_bytes=None), TokenizerError,
     r"input_bytes must be an integer >= 1, got None"),
    (lambda: save_pretrained(tiny_model(), "unwritten", dtype=["bfloat16"]), CheckpointError,
     r"unknown dtype \['bfloat16'\]; choose one of auto, "),
    (lambda: load_pretrained("unread", device=HUGE), CheckpointError, rf"unknown device {HUGE} \("),
    (lambda: apply_lora(tiny_model(), alpha=float("inf")), AdapterError,
     r"LoRA alpha must be a positive finite number"),
    (lambda: apply_lora(tiny_model(), modules_to_save=[1]), AdapterError,
     r"LoRA modules_to_save must list strings, got \[1\]"),
    (lambda: apply_lora(tiny_model(), layers_to_transform=["0"]), AdapterError,
     r"LoRA layers_to_transform must list integers, got \['0'\]"),
    (lambda: generate(tiny_model(), torch.tensor([[1, 2]]), max_new_tokens=2, num_beams=HUGE), GenerationError,
     rf"num_beams must be an integer in \[1, 2\*\*31\), got {HUGE}"),
])
def test_api_keywords_of_the_wrong_type_or_past_their_range_are_refused_by_name(call, error, message, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=f"^{message}"):
        call()


@pytest.mark.parametrize("flag", ["lora", "merge_lora"])
def test_a_lora_flag_that_is_not_a_bool_is_refused_by_name(flag):
    # "false" is a true string: it switched the run to LoRA (or merged it) without a word
    option = flag.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{flag} \(--{option}\) must be true or false, got 'false'$"):
        FinetuneConfig(**{flag: "false"})


def test_accumulating_more_batches_than_an_epoch_holds_makes_one_update_an_epoch(tmp_path):
    """--grad-accum-steps past sys.maxsize was a ValueError from islice; any count past the epoch's batches means
    one update over all of them."""
    seen: list[list[int]] = []
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.tensor([0.5]))
    model.forward = lambda ids, label_smoothing: (seen.append(ids.tolist()),
                                                  ModelOutput(loss=(model.weight * ids).mean()))[1]
    steps = []
    log = MetricsLog(tmp_path)
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=2, grad_accum_steps=HUGE)
    train_epochs(model, list(range(10)), cfg, lambda ids: {"ids": torch.tensor(ids)}, lambda batch: len(batch["ids"]),
                 log, lambda epoch, step: steps.append(step))
    log.close()
    assert steps == [1, 2] and len(seen) == 6 and sorted(sum(seen[:3], [])) == list(range(10))


def test_a_plan_of_billions_of_steps_is_counted_not_stepped_through(data_dir, capsys):
    # the plan (and a run's epoch announcement) summed each step's micro-batches and listed each evaluation
    with fails_after(30):
        load_script("pretrain").main(["--plan", "--data", str(data_dir), *set_arguments(f"train.max_steps={2**62}")])
    out = capsys.readouterr().out
    # every third step (train_helpers' train.eval_every) and after the last
    assert f"({2**62:,} optimizer steps)" in out and f"eval: {2**62 // 3 + 1:,} evaluations" in out


@pytest.mark.parametrize("script, argv", [
    ("pretrain", ["--data", "", "--out", "run"]),  # trained on the bundled sample corpus
    ("pretrain", ["--out", ""]),  # wrote the run into the current directory
    ("prepare_data", ["--sample", "--out", ""]),
    ("prepare_data", ["--sample", "--out", "data", "--tokenizer", ""]),  # trained a tokenizer
    ("finetune_instruct", ["--model", "base", "--eval", ""]),  # kept the last epoch, unevaluated
    ("finetune_benchmark", ["--model", "base", "--tasks", ""]),  # ran the bundled tasks
    ("generate", ["--model", "base", "--prompt", "a", "--tokenizer", ""]),  # the model's tokenizer
    ("compare_runs", ["run", "--out", ""]),  # a ValueError from Path("").with_suffix, after the runs were read
])
def test_an_empty_path_is_refused_where_it_stood_for_the_default_or_the_current_directory(script, argv, capsys,
                                                                                         tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a path taken as given would write
    option = argv[argv.index("") - 1]
    with pytest.raises(SystemExit) as exit:
        load_script(script).main(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {option}: an empty path (an unset shell variable?); "
                                            "give a file or directory\n")
