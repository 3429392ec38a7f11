"""Each option of the training, data and conversion scripts reaches the library call it names, with its
documented default, and usage errors are refused before any work starts. The library calls are replaced by
recorders (they are tested on their own), so each test runs in well under a second; convert.py runs for real on
a tiny model."""

import argparse
import json
import os
import signal
import types

import pytest
import torch
from helpers import ROOT, load_script
from tokenizer_helpers import make_ttl_style_dir

import ttl_core
from ttl_core.data import SAMPLE_CORPUS
from ttl_core.errors import ConfigError, DataError, TTLError
from ttl_core.finetune import AGNEWS_LABELS, SAMPLE_DATA, FinetuneConfig
from ttl_core.instruct import INSTRUCT_DEFAULTS
from ttl_core.preemption import TIME_LIMIT
from ttl_core.run_config import load_run_config
from ttl_core.task_files import TaskSpec
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer


def recorder(result):
    """A stand-in for a library call: records its arguments, returns `result`."""
    def record(*args, **kwargs):
        record.calls.append((args, kwargs))
        return result
    record.calls = []
    return record


def usage_error(script, argv, capsys, message):
    with pytest.raises(SystemExit) as excinfo:
        script.main(argv)
    assert excinfo.value.code == 2 and message in capsys.readouterr().err


# --- pretrain.py ----------------------------------------------------------------------------------------------

def test_pretrain_defaults_reach_train(tmp_path, monkeypatch, capsys):
    script = load_script("pretrain")
    train = recorder(types.SimpleNamespace(checkpoint=None, sample=None, stopped_by=None))
    monkeypatch.setattr(script, "train", train)
    assert script.main(["--out", str(tmp_path / "run")]) == 0
    [((run, out), kwargs)] = train.calls
    assert run == load_run_config(None, []) and out == str(tmp_path / "run")
    assert kwargs == dict(data_dir=None, device="cpu", resume=False, stop_after=None, init_from=None,
                          time_limit=None)
    assert capsys.readouterr().out == ""  # nothing trained, nothing to report


@pytest.mark.parametrize("stopped_by, status", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130),
                                                (TIME_LIMIT, 75)])
def test_pretrain_stopped_by_a_signal_exits_with_the_documented_status(monkeypatch, stopped_by, status):
    """75 (EX_TEMPFAIL) asks a requeue script to run again with --resume; a Ctrl-C keeps an interrupted
    program's 130."""
    script = load_script("pretrain")
    monkeypatch.setattr(script, "train", recorder(types.SimpleNamespace(
        checkpoint="RUN/checkpoints/step-000002", sample=None, last_step=2, last_loss=1.5, stopped_by=stopped_by)))
    assert script.main(["--out", "RUN"]) == status


def test_pretrain_options_reach_the_config_and_train(tmp_path, monkeypatch, capsys):
    """The named options win over a --set of the same key; other --set overrides and the --config file apply."""
    script = load_script("pretrain")
    train = recorder(types.SimpleNamespace(checkpoint="RUN/checkpoints/step-000005", sample="o menino",
                                           last_step=5, last_loss=1.234567, stopped_by=None))
    monkeypatch.setattr(script, "train", train)
    config = ROOT / "configs" / "tiny.toml"
    assert script.main(["--config", str(config), "--data", "DATA", "--out", "RUN", "--set", "train.max_steps=99",
                        "--max-steps", "7", "--save-every", "3", "--stop-after", "5", "--resume", "--init-from", "INIT",
                        "--document-masking", "--device", "cuda", "--set", "train.lr=0.002", "--time-limit", "3h30m",
                        "--set", "train.seed=3"]) == 0
    [((run, out), kwargs)] = train.calls
    assert out == "RUN" and kwargs == dict(data_dir="DATA", device="cuda", resume=True, stop_after=5,
                                           init_from="INIT", time_limit=12600)
    tiny = load_run_config(config, [])
    assert run.model == tiny.model and tiny.train.max_steps != 7 and tiny.train.lr != 0.002
    assert (run.train.max_steps, run.train.save_every, run.train.lr, run.train.seed) == (7, 3, 0.002, 3)
    assert run.data.document_masking is True and tiny.data.document_masking is False
    assert run.train.micro_batch_size == tiny.train.micro_batch_size  # untouched keys keep the file's value
    assert capsys.readouterr().out.splitlines() == [
        "step 5: loss 1.2346; checkpoint RUN/checkpoints/step-000005", "sample: o menino"]


# --- prepare_data.py ------------------------------------------------------------------------------------------

META = {"documents": 1234, "train_tokens": 56789, "val_tokens": 4321, "dtype": "uint16", "vocab_size": 4096}


def test_prepare_data_defaults_and_options_reach_prepare_data(monkeypatch, capsys):
    script = load_script("prepare_data")
    prepare = recorder(META)
    monkeypatch.setattr(script, "prepare_data", prepare)
    assert script.main(["--input", "a.txt", "b.jsonl", "--out", "OUT"]) == 0
    assert prepare.calls[-1] == ((["a.txt", "b.jsonl"], "OUT"),
                                 dict(vocab_size=4096, tokenizer=None, val_fraction=0.1, workers=None, replace=False))
    assert capsys.readouterr().out.startswith("wrote OUT: 1,234 documents, 56,789 train + 4,321 val tokens "
                                              "(uint16), vocab 4,096, ")
    assert script.main(["--input", "a.txt", "--sample", "--out", "OUT", "--tokenizer", "T",
                        "--val-fraction", "0.25", "--workers", "3"]) == 0
    assert prepare.calls[-1] == ((["a.txt", *SAMPLE_CORPUS], "OUT"),
                                 dict(vocab_size=4096, tokenizer="T", val_fraction=0.25, workers=3, replace=False))
    assert script.main(["--sample", "--out", "OUT", "--vocab-size", "512"]) == 0
    assert prepare.calls[-1][1]["vocab_size"] == 512
    assert script.main(["--sample", "--out", "OUT", "--overwrite"]) == 0
    assert prepare.calls[-1][1]["replace"] is True
    assert prepare.calls[-1][0][0] == list(SAMPLE_CORPUS)
    with pytest.raises(DataError, match=r"^no input: give --input FILES\.\.\. or --sample$"):
        script.main(["--out", "OUT"])
    assert len(prepare.calls) == 4


def test_prepare_data_vocab_size_0_is_passed_on_and_refused_with_a_tokenizer(monkeypatch):
    """--vocab-size 0 is a mistake to report (as -5 is), not the default 4096 trained in silence; and with
    --tokenizer it has no effect, as any other size."""
    script = load_script("prepare_data")
    prepare = recorder(META)
    monkeypatch.setattr(script, "prepare_data", prepare)
    script.main(["--sample", "--out", "OUT", "--vocab-size", "0"])
    assert prepare.calls[-1][1]["vocab_size"] == 0
    with pytest.raises(SystemExit):
        script.main(["--sample", "--out", "OUT", "--tokenizer", "T", "--vocab-size", "0"])
    assert len(prepare.calls) == 1


# --- finetune_classifier.py -----------------------------------------------------------------------------------

def classifier_script(monkeypatch):
    script = load_script("finetune_classifier")
    best = {"epoch": 2, "accuracy": 0.75, "f1": 0.5}
    run = recorder(types.SimpleNamespace(best=best, checkpoint="OUT/best"))
    monkeypatch.setattr(script, "finetune_classifier", run)
    return script, run


def test_classifier_defaults_are_the_agnews_recipe_on_the_bundled_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: a runs/ left in the checkout would be refused
    script, run = classifier_script(monkeypatch)
    assert script.main(["--model", "BASE"]) == 0
    [((model, train, eval_, out, spec, cfg), _)] = run.calls
    assert (model, out) == ("BASE", "runs/finetune-classifier")
    assert (train, eval_) == (SAMPLE_DATA / "agnews_pt_train.csv", SAMPLE_DATA / "agnews_pt_eval.csv")
    assert spec == TaskSpec(["title", "text"], "label", False, False, list(AGNEWS_LABELS))
    assert cfg == FinetuneConfig()
    # the recipe docs/finetuning.md and the module's docstring give
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.weight_decay, cfg.max_length) == (4e-5, 16, 3, 0.01, 256)
    assert capsys.readouterr().out == "best epoch 2: accuracy 0.7500, f1 0.5000; saved to OUT/best\n"


def test_classifier_options_reach_the_task_spec_and_the_config(monkeypatch):
    script, run = classifier_script(monkeypatch)
    assert script.main(["--model", "BASE", "--train", "T.csv", "--eval", "E.csv", "--out", "OUT",
                        "--text-fields", " premise, hypothesis,", "--label-field", "y", "--labels", "sim, não,,",
                        "--pair", "--lr", "1e-3", "--epochs", "2", "--batch-size", "4", "--max-length", "64",
                        "--seed", "7", "--grad-clip", "0.25", "--lora", "--lora-r", "4", "--lora-dora"]) == 0
    (model, train, eval_, out, spec, cfg), _ = run.calls[-1]
    assert (model, train, eval_, out) == ("BASE", "T.csv", "E.csv", "OUT")
    assert spec == TaskSpec(["premise", "hypothesis"], "y", True, False, ["sim", "não"])
    assert cfg == FinetuneConfig(lr=1e-3, epochs=2, batch_size=4, max_length=64, seed=7, grad_clip=0.25, lora=True,
                                 lora_r=4, lora_dora=True)
    assert script.main(["--model", "BASE", "--train", "T.csv", "--eval", "E.csv", "--regression",
                        "--label-field", "score"]) == 0
    assert run.calls[-1][0][4] == TaskSpec(["title", "text"], "score", False, True, None)  # labels: the train file's
    # --labels also applies to the bundled sample, instead of its AgNews order
    assert script.main(["--model", "BASE", "--labels", "ESPORTES,MUNDO,NEGÓCIOS,TECNOLOGIA"]) == 0
    assert run.calls[-1][0][4].labels == ["ESPORTES", "MUNDO", "NEGÓCIOS", "TECNOLOGIA"]
    # the AgNews names are class names: a regressor on the bundled sample gets none (TaskSpec refuses both)
    assert script.main(["--model", "BASE", "--regression"]) == 0
    assert run.calls[-1][0][4] == TaskSpec(["title", "text"], "label", False, True, None)

    # PEFT takes a fractional lora_alpha; a whole one stays an int, as PEFT writes it in adapter_config.json
    assert script.main(["--model", "BASE", "--lora", "--lora-alpha", "2.5"]) == 0
    assert run.calls[-1][0][5].lora_alpha == 2.5
    assert script.main(["--model", "BASE", "--lora", "--lora-alpha", "32"]) == 0
    assert repr(run.calls[-1][0][5].lora_alpha) == "32"
    # each training option reaches the config, not only those above; all-linear is PEFT's word, not a module name
    assert script.main(["--model", "BASE", "--weight-decay", "0.1", "--warmup-steps", "5", "--grad-accum-steps", "3",
                        "--dtype", "bfloat16", "--device", "cuda:1", "--lora", "--lora-dropout", "0",
                        "--lora-targets", "all-linear", "--merge-lora", "--label-smoothing", "0.1",
                        "--log-grad-norms"]) == 0
    assert run.calls[-1][0][5] == FinetuneConfig(weight_decay=0.1, warmup_steps=5, grad_accum_steps=3, dtype="bfloat16",
                                                 device="cuda:1", lora=True, lora_dropout=0.0,
                                                 lora_targets="all-linear", merge_lora=True, label_smoothing=0.1,
                                                 log_grad_norms=True)
    assert script.main(["--model", "BASE", "--lora", "--lora-targets", " q_proj, o_proj,"]) == 0
    assert run.calls[-1][0][5].lora_targets == ["q_proj", "o_proj"]

@pytest.mark.parametrize("files", [["--train", "T.csv"], ["--eval", "E.csv"]])
def test_classifier_needs_both_task_files_or_neither(files, monkeypatch, capsys):
    script, run = classifier_script(monkeypatch)
    usage_error(script, ["--model", "BASE", *files], capsys, "give both --train and --eval, or neither")
    assert run.calls == []


# --- finetune_instruct.py -------------------------------------------------------------------------------------

def test_instruct_defaults_and_options_reach_finetune_instruct(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = load_script("finetune_instruct")
    run = recorder({"train_examples": 12, "final_loss": 1.5, "added_tokens": ["<|startofinstruction|>"]})
    monkeypatch.setattr(script, "finetune_instruct", run)
    assert script.main(["--model", "BASE"]) == 0
    assert run.calls[-1] == (("BASE", str(SAMPLE_DATA / "instrucoes_pt.jsonl"), "runs/finetune-instruct", "aira",
                              INSTRUCT_DEFAULTS), dict(eval_file=None, train_on_inputs=False))
    assert capsys.readouterr().out == ("12 examples, final training loss 1.5000; added tokens <|startofinstruction|>; "
                                       "saved to runs/finetune-instruct/best\n")
    assert script.main(["--model", "BASE", "--data", "D.jsonl", "--eval", "E.jsonl", "--format", "alpaca",
                        "--train-on-inputs", "--out", "OUT", "--no-lora", "--lr", "1e-4"]) == 0
    cfg = FinetuneConfig(lr=1e-4, batch_size=8, epochs=3, max_length=512, lora=False)
    assert run.calls[-1] == (("BASE", "D.jsonl", "OUT", "alpaca", cfg), dict(eval_file="E.jsonl", train_on_inputs=True))
    capsys.readouterr()
    monkeypatch.setattr(script, "finetune_instruct", recorder({"train_examples": 3, "final_loss": 2.0,
                                                               "added_tokens": []}))  # the model had them all
    assert script.main(["--model", "BASE", "--out", "OUT2"]) == 0
    assert capsys.readouterr().out == "3 examples, final training loss 2.0000; saved to OUT2/best\n"


# --- finetune_benchmark.py ------------------------------------------------------------------------------------

def test_benchmark_runs_the_sample_tasks_or_the_given_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = load_script("finetune_benchmark")
    run = recorder([])
    monkeypatch.setattr(script, "run_benchmark", run)
    monkeypatch.setattr(script, "format_table", lambda rows: "TABLE")
    monkeypatch.setattr(script, "sample_tasks", lambda: [types.SimpleNamespace(name="sample")])
    monkeypatch.setattr(script, "read_task_list", lambda path: [types.SimpleNamespace(name=f"from {path}")])
    assert script.main(["--model", "BASE"]) == 0
    assert run.calls[-1] == (("BASE", script.sample_tasks(), "runs/finetune-benchmark", FinetuneConfig()), {})
    assert capsys.readouterr().out.splitlines() == [
        "TABLE", "results written to runs/finetune-benchmark/results.json and results.md"]
    assert script.main(["--model", "BASE", "--tasks", "T.json", "--out", "OUT", "--epochs", "1"]) == 0
    assert run.calls[-1] == (("BASE", script.read_task_list("T.json"), "OUT", FinetuneConfig(epochs=1)), {})


# --- convert.py -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny bfloat16 model in the HF layout, with a tokenizer."""
    config = ttl_core.LlamaConfig.from_preset("tiny", vocab_size=300, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = ttl_core.LlamaForCausalLM(config).to(torch.bfloat16)
    texts = [f"o menino {i} foi para a escola com seu cachorro número {i * 7}." for i in range(60)]
    path = tmp_path_factory.mktemp("bf16")
    ttl_core.save_pretrained(model, path, tokenizer=train_tokenizer(texts, None, vocab_size=300))
    return path, model


def test_convert_keeps_the_dtype_by_default_and_shards_at_max_shard_size(bf16_checkpoint, tmp_path, capsys):
    src, model = bf16_checkpoint
    script = load_script("convert")
    assert script.main(["--from-hf", str(src), str(tmp_path / "native")]) == 0
    assert capsys.readouterr().out == (f"wrote LlamaForCausalLM ({model.num_parameters():,} parameters, "
                                       f"torch.bfloat16) to {tmp_path / 'native'}\n")
    native = ttl_core.load_pretrained(tmp_path / "native")
    assert (tmp_path / "native" / "ttl_config.json").exists() and (tmp_path / "native" / "tokenizer.model").exists()
    tokenizer_config = json.loads((tmp_path / "native" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == model.config.max_position_embeddings  # transformers truncates there
    for (name, a), b in zip(model.state_dict().items(), native.state_dict().values()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    assert not list((tmp_path / "native").glob("*.index.json"))  # one file under the 2GB default
    assert script.main(["--to-hf", str(tmp_path / "native"), str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(ttl_core.load_pretrained(tmp_path / "hf").lm_head.weight, model.lm_head.weight)
    assert script.main(["--from-hf", str(src), str(tmp_path / "native2"), "--max-shard-size", "20KB"]) == 0
    assert list((tmp_path / "native2").glob("*.index.json"))


def test_convert_shards_at_2gb_by_default_either_way(bf16_checkpoint, tmp_path, monkeypatch):
    script = load_script("convert")
    for direction, writer in (("--to-hf", "save_pretrained"), ("--from-hf", "save_native")):
        save = recorder(None)
        monkeypatch.setattr(script, writer, save)
        assert script.main([direction, str(bf16_checkpoint[0]), str(tmp_path / direction)]) == 0
        assert save.calls[-1][1]["max_shard_size"] == "2GB", direction


@pytest.mark.parametrize("direction", [[], ["--from-hf", "--to-hf"]])
def test_convert_needs_exactly_one_direction(direction, bf16_checkpoint, tmp_path, capsys):
    usage_error(load_script("convert"), [*direction, str(bf16_checkpoint[0]), str(tmp_path / "out")], capsys,
                "--from-hf" if not direction else "not allowed with argument")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_write_over_its_source(bf16_checkpoint, capsys):
    src = bf16_checkpoint[0]
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    with pytest.raises(ConfigError, match="is the source checkpoint; write to another directory"):
        load_script("convert").main(["--from-hf", str(src), str(src / ".." / src.name)])
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before

# --- plot_metrics.py ------------------------------------------------------------------------------------------

def test_plot_metrics_prints_the_plot_it_wrote(monkeypatch, capsys):
    script = load_script("plot_metrics")
    plot = recorder("RUN/loss.png")
    monkeypatch.setattr(script, "plot_metrics", plot)
    assert script.main(["RUN"]) == 0 and plot.calls == [(("RUN",), {})]
    assert capsys.readouterr().out == "wrote RUN/loss.png\n"
    plot = recorder(None)  # no metrics yet: nothing written, nothing claimed
    monkeypatch.setattr(script, "plot_metrics", plot)
    assert script.main(["RUN"]) == 0 and capsys.readouterr().out == ""


# --- every script's --help ------------------------------------------------------------------------------------

SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_and_shows_its_default(name, monkeypatch):
    """--help is the reference a user reads: each option says what it does, and one with a default names it."""
    parsers = []

    def capture(parser, argv=None, namespace=None):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        load_script(name).main([])
    [parser] = parsers
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        shown = action.default in (None, False, [], "") or action.required or "default" in action.help
        assert shown, f"{name}: {action.option_strings} does not show its default {action.default!r}"


@pytest.mark.parametrize("name, argv, message", [
    ("bench_train", ["--batch", "4", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    ("bench_train", ["--steps", "-2"], "argument --steps: expected an integer >= 1, got '-2'"),
    ("bench_generate", ["--batches", "0"], "argument --batches: expected an integer >= 1"),
    ("bench_generate", ["--prompt", "0"], "argument --prompt: expected"),
    ("bench_generate", ["--new-tokens", "-1"], "argument --new-tokens: expected"),
    ("bench_generate", ["--hf-static-batches", "x"], "argument --hf-static-batches: expected"),
    ("bench_generate", ["--preset", "ttl-16m"], "argument --preset: invalid choice"),
])
def test_benchmark_sizes_are_refused_before_any_gpu_time(name, argv, message, capsys):
    """A count that cannot be measured is a usage error at once, not a crash after the device's peaks were measured
    (or a run that records every shape as failed)."""
    usage_error(load_script(name), argv, capsys, message)


@pytest.mark.parametrize("name, argv, ignored, by", [
    ("prepare_data", ["--sample", "--out", "O", "--tokenizer", "T", "--vocab-size", "8"], "--vocab-size",
     "with --tokenizer"),
    ("bench_train", ["--quick", "--batch", "4"], "--batch", "with --quick"),
    ("bench_train", ["--quick", "--steps", "3"], "--steps", "with --quick"),
    ("bench_train", ["--smoke", "--preset", "ttl-460m"], "--preset", "with --smoke"),
    ("bench_train", ["--smoke", "--batch", "4"], "--batch", "with --smoke"),
    ("bench_train", ["--smoke", "--quick"], "--quick", "with --smoke"),
    ("bench_generate", ["--smoke", "--batches", "4"], "--batches", "with --smoke"),
    ("bench_generate", ["--smoke", "--prompt", "4"], "--prompt", "with --smoke"),
    ("bench_generate", ["--smoke", "--new-tokens", "4"], "--new-tokens", "with --smoke"),
    ("bench_generate", ["--smoke", "--preset", "ttl-460m"], "--preset", "with --smoke"),
    ("bench_generate", ["--smoke", "--quick"], "--quick", "with --smoke"),
    ("bench_attention", ["--smoke", "--quick"], "--quick", "with --smoke"),
    ("bench_kernels", ["--smoke", "--quick"], "--quick", "with --smoke"),
    ("finetune_classifier", ["--model", "B", "--lora-r", "4"], "--lora-r", "without --lora"),  # LoRA is off by default
    ("finetune_classifier", ["--model", "B", "--merge-lora"], "--merge-lora", "without --lora"),
    ("finetune_instruct", ["--model", "B", "--no-lora", "--lora-dora"], "--lora-dora", "without --lora"),
    ("finetune_instruct", ["--model", "B", "--no-lora", "--lora-alpha", "8"], "--lora-alpha", "without --lora"),
    ("finetune_benchmark", ["--model", "B", "--lora-dropout", "0.1"], "--lora-dropout", "without --lora"),
    ("finetune_benchmark", ["--model", "B", "--lora-targets", "q_proj"], "--lora-targets", "without --lora"),
])
def test_an_option_another_makes_irrelevant_is_refused(name, argv, ignored, by, capsys):
    """An option given and then ignored (a size under --smoke, a vocabulary size with a given tokenizer) would
    let a user believe it took effect: a usage error naming both options."""
    usage_error(load_script(name), argv, capsys, f"error: {ignored} has no effect {by}\n")


@pytest.mark.parametrize("name, work", [("kernel_report", "capture_compilations"), ("check_goals", "load_rows")])
@pytest.mark.parametrize("destination, message", [("", "is a directory"), ("missing/out.json", "no such directory"),
                                                  ("a_file/out.json", "no such directory")])
def test_a_json_destination_that_cannot_be_written_is_refused_before_the_work(name, work, destination, message,
                                                                               tmp_path, monkeypatch, capsys):
    """kernel_report compiles every kernel for minutes before it writes --json: a directory given for the file, or
    a file in a folder that does not exist, is a usage error at once, not a failure that loses the report."""
    script = load_script(name)

    def must_not_start(*args, **kwargs):
        raise AssertionError("the work started before --json was checked")

    monkeypatch.setattr(script, work, must_not_start)
    (tmp_path / "a_file").write_text("")  # a file where the folder belongs
    folder = [] if name == "kernel_report" else [str(tmp_path)]
    usage_error(script, [*folder, "--json", str(tmp_path / destination)], capsys, message)


# --- output that would replace an earlier run's -----------------------------------------------------------------

@pytest.mark.parametrize("name, work, result, left", [
    ("finetune_classifier", "finetune_classifier", types.SimpleNamespace(best={"epoch": 1}, checkpoint="B"), "best"),
    ("finetune_classifier", "finetune_classifier", types.SimpleNamespace(best={"epoch": 1}, checkpoint="B"),
     "metrics.jsonl"),  # interrupted before its best epoch was saved
    ("finetune_instruct", "finetune_instruct", {"train_examples": 1, "final_loss": 1.0, "added_tokens": []},
     "metrics.jsonl"),
    ("finetune_benchmark", "run_benchmark", [], "results.json"),
    ("finetune_benchmark", "run_benchmark", [], "results.md"),  # which a run removes as it starts, as results.json
    ("finetune_benchmark", "run_benchmark", [], "inferencia/best"),  # interrupted before results.json
])
def test_fine_tuning_over_an_earlier_run_needs_overwrite(name, work, result, left, tmp_path, monkeypatch):
    """A second run into the same --out (the default one, say) would replace the first's best model and results
    without a word: it is refused unless --overwrite, as pretrain.py refuses an --out holding checkpoints."""
    script = load_script(name)
    run = recorder(result)
    monkeypatch.setattr(script, work, run)
    out = tmp_path / "out"
    (out / left).parent.mkdir(parents=True)
    if left.endswith("best"):
        (out / left).mkdir()
    else:
        (out / left).write_text("{}")
    folder, name = os.path.split(out / left)
    with pytest.raises(ConfigError, match=f"{folder} already holds .*{name}.*--overwrite"):
        script.main(["--model", "BASE", "--out", str(out)])
    assert run.calls == []
    assert script.main(["--model", "BASE", "--out", str(out), "--overwrite"]) == 0 and len(run.calls) == 1


def test_convert_into_a_directory_holding_a_checkpoint_needs_overwrite(bf16_checkpoint, tmp_path):
    src, _ = bf16_checkpoint
    script = load_script("convert")
    assert script.main(["--to-hf", str(src), str(tmp_path / "out")]) == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    with pytest.raises(ConfigError, match=f"{tmp_path / 'out'} already holds .*config.json.*--overwrite"):
        script.main(["--from-hf", str(src), str(tmp_path / "out"), "--dtype", "float32"])
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    assert script.main(["--from-hf", str(src), str(tmp_path / "out"), "--dtype", "float32", "--overwrite"]) == 0
    assert ttl_core.load_pretrained(tmp_path / "out").lm_head.weight.dtype == torch.float32
    assert script.main(["--from-hf", str(src), str(tmp_path / "native")]) == 0  # ttl's layout is a checkpoint too
    with pytest.raises(ConfigError, match=f"{tmp_path / 'native'} already holds .*--overwrite"):
        script.main(["--to-hf", str(src), str(tmp_path / "native")])


def test_convert_copies_a_tokenizer_json_and_leaves_out_one_it_cannot_read(bf16_checkpoint, tmp_path, capsys):
    """A source whose tokenizer is a tokenizer.json only (as TeenyTinyLlama's hub files may be) gets it copied
    (as tokenizer.model); one ttl cannot read is left out with a note, and the weights are still converted."""
    _, model = bf16_checkpoint
    texts = [f"o menino {i} foi para a escola com seu cachorro número {i * 7}." for i in range(60)]
    spec_dir = tmp_path / "spec"
    make_ttl_style_dir(spec_dir, texts, vocab_size=300)
    ttl_core.save_pretrained(model, tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "src" / name).write_bytes((spec_dir / name).read_bytes())
    script = load_script("convert")
    assert script.main(["--to-hf", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    copied = Tokenizer.from_pretrained(tmp_path / "out").encode(texts[3])
    assert copied == Tokenizer.from_pretrained(spec_dir).encode(texts[3])
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert script.main(["--from-hf", str(tmp_path / "src"), str(tmp_path / "native")]) == 0
    note, wrote = capsys.readouterr().out.splitlines()
    assert note.startswith("note: the tokenizer is not copied (") and wrote.startswith("wrote LlamaForCausalLM")
    assert not list((tmp_path / "native").glob("tokenizer*"))
    assert torch.equal(ttl_core.load_pretrained(tmp_path / "native").lm_head.weight, model.lm_head.weight)


def test_convert_over_a_checkpoint_from_a_source_without_a_tokenizer_leaves_no_stale_tokenizer(bf16_checkpoint,
                                                                                                 tmp_path):
    """--overwrite replaces the checkpoint OUT holds, tokenizer included: the old tokenizer stayed beside the new
    weights, which AutoTokenizer and ttl then read as theirs. A tokenizer alone in OUT (no checkpoint) is kept."""
    src, model = bf16_checkpoint
    ttl_core.save_pretrained(model, tmp_path / "bare")  # no tokenizer
    script = load_script("convert")
    assert script.main(["--to-hf", str(src), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.model").exists()
    (tmp_path / "out" / "chat_template.jinja").write_text("{{ messages }}")  # as transformers 5 saves a template
    assert script.main(["--to-hf", str(tmp_path / "bare"), str(tmp_path / "out"), "--overwrite"]) == 0
    assert not [f.name for f in (tmp_path / "out").iterdir() if "token" in f.name or "template" in f.name]
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "tokenizer_only").mkdir(exist_ok=True)
        (tmp_path / "tokenizer_only" / name).write_bytes((src / name).read_bytes())
    assert script.main(["--from-hf", str(tmp_path / "bare"), str(tmp_path / "tokenizer_only")]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer_only").vocab_size == 300


def test_kernel_report_without_cuobjdump_says_so_before_compiling(tmp_path, monkeypatch):
    """The tool that reads the compiled kernels was looked for only after every kernel had been compiled."""
    script = load_script("kernel_report")
    monkeypatch.setattr(script.triton, "__file__", str(tmp_path / "triton" / "__init__.py"))
    monkeypatch.setattr(script, "capture_compilations", lambda arch: pytest.fail("compiled before the check"))
    with pytest.raises(TTLError, match="cuobjdump, which this triton lacks"):
        script.main([])
