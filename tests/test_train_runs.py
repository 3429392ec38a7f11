"""Whole training runs from their edges: what is refused before a step is spent, continued pretraining from
given weights (--init-from), evaluation settings (the last step, none at all), and the figures a run logs against
a computation by hand (the end-of-run sample: test_run_sample.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import load_script, run_script
from train_helpers import FAST, MICRO_MODEL, corpus_file, losses, run_config
from ttl_core import load_pretrained
from ttl_core.errors import ConfigError, DataError
from ttl_core.loader import PackedLoader
from ttl_core.metrics import plot_metrics, read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.recorded_config import check_resumable
from ttl_core.run_config import load_run_config
import ttl_core.run_setup as run_setup
import ttl_core.train as ttl_train
from ttl_core.train import train


def test_refuses_to_overwrite_a_run_and_checks_vocab(tmp_path, data_dir):
    train(run_config("train.max_steps=1"), tmp_path, data_dir=str(data_dir))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(run_config("train.max_steps=1"), tmp_path, data_dir=str(data_dir))
    with pytest.raises(ConfigError, match="has 400 tokens but the model's vocab_size is 300"):
        train(load_run_config(None, [*MICRO_MODEL, "model.vocab_size=300", *FAST]), tmp_path / "b",
              data_dir=str(data_dir))
    with pytest.raises(ConfigError, match="not a prepared data directory"):
        train(run_config(), tmp_path / "c", data_dir=str(tmp_path))


def test_a_data_vocab_larger_than_the_model_s_is_refused_before_training(tmp_path, data_dir):
    """meta.json's vocab_size bounds the ids the loader lets through; one above the model's (a tokenizer swapped
    in the data directory) would put an id past the embedding table: an IndexError traceback mid-run."""
    shutil.copytree(data_dir, tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1000}))
    with pytest.raises(ConfigError, match="meta.json records a vocab_size of 1000, but the model's vocab_size is 400"):
        train(run_config("train.max_steps=1"), tmp_path / "run", data_dir=str(tmp_path / "data"))


def test_init_from_starts_from_the_given_weights(tmp_path, data_dir):
    train(run_config("train.max_steps=2"), tmp_path / "a", data_dir=str(data_dir))
    source = tmp_path / "a" / "checkpoints" / "step-000002"
    frozen = run_config("train.max_steps=1", "train.lr=0.0", "train.min_lr=0.0")
    train(frozen, tmp_path / "b", data_dir=str(data_dir), init_from=str(source))
    a, b = load_pretrained(source), load_pretrained(tmp_path / "b" / "checkpoints" / "step-000001")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # dropout after --init-from draws from train.seed, not from whatever state the global RNG is in
    dropout = run_config("train.max_steps=2", "model.attention_dropout=0.3")
    train(dropout, tmp_path / "d0", data_dir=str(data_dir))
    for name, seed in (("d1", 1), ("d2", 2)):
        torch.manual_seed(seed)
        train(dropout, tmp_path / name, data_dir=str(data_dir),
              init_from=str(tmp_path / "d0" / "checkpoints" / "step-000002"))
    assert losses(tmp_path / "d1") == losses(tmp_path / "d2")
    # the checkpoint fixes the architecture: an explicit override that contradicts it is refused, not ignored
    with pytest.raises(ConfigError, match="model.hidden_size=32 contradicts"):
        train(run_config("train.max_steps=1", "model.hidden_size=32"), tmp_path / "c", data_dir=str(data_dir),
              init_from=str(source))


def test_init_from_takes_a_dropout_setting_and_a_resumed_run_keeps_its_own(tmp_path, data_dir):
    """Dropout is how a model trains, not what it is: --set model.attention_dropout with --init-from applies to the
    loaded model (its checkpoints record it in config.json, as transformers does). A resumed run keeps the dropout
    it was trained with, so that it stays exact: another one is refused, not silently ignored."""
    import transformers
    train(run_config("train.max_steps=1"), tmp_path / "a", data_dir=str(data_dir))
    source = tmp_path / "a" / "checkpoints" / "step-000001"
    dropout = run_config("train.max_steps=2", "train.save_every=1", "model.attention_dropout=0.3")
    planned = run_setup.planned_model_config(dropout, None, str(source))
    model = ttl_train.build_or_load_model(planned, dropout.train.seed, None, str(source), torch.device("cpu"))
    assert model.config.attention_dropout == 0.3 and model.training
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # each forward draws its own mask
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    train(dropout, tmp_path / "straight", data_dir=str(data_dir), init_from=str(source))
    train(dropout, tmp_path / "sliced", data_dir=str(data_dir), init_from=str(source), stop_after=1)
    saved = tmp_path / "sliced" / "checkpoints" / "step-000001"
    assert json.loads((saved / "config.json").read_text())["attention_dropout"] == 0.3
    assert transformers.AutoConfig.from_pretrained(saved).attention_dropout == 0.3
    with pytest.raises(ConfigError, match=r"^--set model.attention_dropout=0.1: .*step-000001 was trained with "
                                          r"attention_dropout 0.3, and a resumed run continues as it was; to train on "
                                          r"with another attention_dropout, start a new run with --init-from .*"):
        train(run_config("train.max_steps=2", "model.attention_dropout=0.1"), tmp_path / "sliced",
              data_dir=str(data_dir), resume=True)
    train(run_config("train.max_steps=2", "train.save_every=1"), tmp_path / "sliced", data_dir=str(data_dir),
          resume=True)  # the config's default dropout 0 is no --set: the checkpoint's 0.3 goes on
    assert losses(tmp_path / "sliced") == losses(tmp_path / "straight")
    assert load_pretrained(tmp_path / "sliced" / "checkpoints" / "step-000002").config.attention_dropout == 0.3
    # the architecture stays the checkpoint's
    with pytest.raises(ConfigError, match="model.num_hidden_layers=3 contradicts"):
        train(run_config("model.num_hidden_layers=3", "model.attention_dropout=0.1"), tmp_path / "c",
              data_dir=str(data_dir), init_from=str(source))


def test_resume_refuses_a_config_file_whose_model_differs_from_the_run_s(tmp_path, data_dir):
    """A [model] key of the config file that contradicts the run's own was ignored on --resume (only --set was
    checked): the run trained on with the checkpoint's model and recorded the other config beside it. A run
    started with --init-from, whose source's architecture overrides the file's, resumes with that same file."""
    def file_config(layers: int, *overrides: str):
        path = tmp_path / f"layers{layers}.toml"
        model = [o.removeprefix("model.").replace("num_hidden_layers=2", f"num_hidden_layers={layers}")
                 for o in [*MICRO_MODEL, "model.vocab_size=400"]]
        path.write_text("[model]\n" + "\n".join(model) + "\n")
        return load_run_config(path, [*FAST, "train.max_steps=3", *overrides])

    train(file_config(2), tmp_path / "run", data_dir=str(data_dir), stop_after=2)
    with pytest.raises(ConfigError, match=r"^model.num_hidden_layers is 3 here, but .*step-000002 was trained in a run "
                                          r"with 2; a resumed run keeps its model: .* or start a new run with "
                                          r"--init-from .*step-000002$"):
        train(file_config(3), tmp_path / "run", data_dir=str(data_dir), resume=True)
    assert train(file_config(2, "train.lr=1e-3"), tmp_path / "run", data_dir=str(data_dir), resume=True).last_step == 3
    run = file_config(2)  # a preset stands for its fields: a run recorded without one resumes with it named
    check_resumable(run, {"model": dataclasses.asdict(run.model_config())}, tmp_path / "run")
    source = str(tmp_path / "run" / "checkpoints" / "step-000003")
    train(file_config(3), tmp_path / "init", data_dir=str(data_dir), init_from=source, stop_after=2)
    assert train(file_config(3), tmp_path / "init", data_dir=str(data_dir), resume=True).last_step == 3
    assert load_pretrained(tmp_path / "init" / "checkpoints" / "step-000003").config.num_hidden_layers == 2


def test_a_resume_is_refused_or_found_complete_before_any_weights_are_read(tmp_path, data_dir, monkeypatch):
    """What a resume checks against the checkpoint's JSON files (a [model] key of the config file or of --set that
    contradicts the run's, a step past the end, another global batch) is checked before the model is built and
    optimizer.pt read (seconds for ttl-160m): a refused resume, or a finished run requeued, costs milliseconds."""
    train(run_config("train.max_steps=2"), tmp_path, data_dir=str(data_dir), stop_after=1)

    def weights_read(*args, **kwargs):
        raise AssertionError("weights or optimizer state read before the resume was checked")

    for module, name in ((ttl_train, "load_pretrained"), (ttl_train, "LlamaForCausalLM"), (torch, "load")):
        monkeypatch.setattr(module, name, weights_read)
    layers3 = run_config("train.max_steps=2", "model.num_hidden_layers=3")
    with pytest.raises(ConfigError, match=r"^model.num_hidden_layers is 3 here, but .*step-000001 was trained in a "
                                          r"run with 2"):
        train(dataclasses.replace(layers3, model_overrides=[]), tmp_path, data_dir=str(data_dir), resume=True)
    with pytest.raises(ConfigError, match=r"^--set model.num_hidden_layers=3 contradicts .*step-000001"):
        train(layers3, tmp_path, data_dir=str(data_dir), resume=True)
    with pytest.raises(ConfigError, match="is at step 1, and --stop-after is 1: nothing to train"):
        train(run_config("train.max_steps=2"), tmp_path, data_dir=str(data_dir), resume=True, stop_after=1)
    with pytest.raises(DataError, match=r"global_batch is 4 \(micro_batch_size 4 x 1 process\), here 8"):
        train(run_config("train.max_steps=2", "train.micro_batch_size=8"), tmp_path, data_dir=str(data_dir),
              resume=True)
    assert train(run_config("train.max_steps=1"), tmp_path, data_dir=str(data_dir), resume=True).last_step == 1


def test_a_resume_without_model_settings_records_the_run_s_own(tmp_path, data_dir):
    """A resume that gives no [model] key keeps the checkpoint's model and records the run's own [model], so that
    the next resume with the run's config is not refused as another model."""
    train(run_config("train.max_steps=3"), tmp_path, data_dir=str(data_dir), stop_after=1)
    bare = load_run_config(None, [*FAST, "train.max_steps=3"])
    train(bare, tmp_path, data_dir=str(data_dir), resume=True, stop_after=2)
    assert train(run_config("train.max_steps=3"), tmp_path, data_dir=str(data_dir), resume=True).last_step == 3


def test_the_checkpoint_records_the_data_directory_the_run_trained_on(tmp_path, data_dir, monkeypatch):
    """--data is no [data] key: the run config saved in trainer_state.json recorded the path "" for it. A relative
    --data is recorded absolute, for a resume from another working directory to find it; so is a data.eval set."""
    monkeypatch.chdir(data_dir.parent)
    train(run_config("train.max_steps=1", f"data.eval={{held = {data_dir.name!r}}}"), tmp_path, data_dir=data_dir.name)
    state = json.loads((tmp_path / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["config"]["data"]["path"] == str(data_dir.resolve())
    assert state["config"]["data"]["eval"] == {"held": str(data_dir.resolve())}


def test_step_arguments_that_would_train_nothing_are_refused_and_a_finished_run_resumed_exits_0(tmp_path, data_dir,
                                                                                                 capsys):
    """A requeue loop (README) resubmits with --resume until the status is not 75: the run that reached max_steps
    is done, and says so with status 0, where a refusal (2) would read as a failed job."""
    with pytest.raises(ConfigError, match="--stop-after must be"):
        train(run_config("train.max_steps=2"), tmp_path / "a", data_dir=str(data_dir), stop_after=0)
    train(run_config("train.max_steps=2"), tmp_path / "b", data_dir=str(data_dir))
    capsys.readouterr()
    pretrain = load_script("pretrain")
    settings = [*MICRO_MODEL, "model.vocab_size=400", *FAST, "train.max_steps=2"]
    args = ["--out", str(tmp_path / "b"), "--data", str(data_dir), "--resume",
            *[x for o in settings for x in ("--set", o)]]
    assert pretrain.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"{tmp_path / 'b' / 'checkpoints' / 'step-000002'} is at "
                                                        "train.max_steps (step 2): the run is complete")
    # a requeue script that slices the run with --stop-after finds it complete too, whichever slice it asks for
    assert pretrain.main([*args, "--stop-after", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("train.max_steps (step 2): the run is complete")
    with pytest.raises(ConfigError, match="is at step 2, and train.max_steps is 1: nothing to train"):
        train(run_config("train.max_steps=1"), tmp_path / "b", data_dir=str(data_dir), resume=True)
    with pytest.raises(ConfigError, match="is at step 2, and --stop-after is 2: nothing to train"):
        train(run_config("train.max_steps=3"), tmp_path / "b", data_dir=str(data_dir), resume=True, stop_after=2)


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(tmp_path, data_dir, monkeypatch):
    """torch.compile's CPU backend builds C++ kernels with the compiler $CXX names (else g++): without it a
    compiled CPU run failed at its first step in a long inductor traceback; now it is refused in one line first."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    assert run_setup.cpp_compiler() is None
    with pytest.raises(ConfigError, match=r"train.compile on the CPU needs a C\+\+ compiler, and \S*no-such-compiler"):
        train(run_config("train.compile=true"), tmp_path / "run", data_dir=str(data_dir))
    assert not (tmp_path / "run").exists()
    compiled, eager = run_config("train.compile=true").train, run_config().train
    run_setup.check_compiler(torch.device("cuda"), compiled)  # a CUDA run compiles Triton kernels, not C++
    run_setup.check_compiler(torch.device("cpu"), eager)
    monkeypatch.setenv("TORCH_INDUCTOR_INSTALL_GXX", "1")  # inductor fetches g++ itself
    run_setup.check_compiler(torch.device("cpu"), compiled)
    monkeypatch.setenv("CXX", sys.executable)  # any installed program passes the lookup, as in inductor's
    assert run_setup.cpp_compiler() == sys.executable


@pytest.mark.parametrize("refused, kwargs, message", [
    (["train.max_steps=2"], {"stop_after": 0}, "--stop-after must be"),
    (["train.seq_len=100"], {}, "exceeds the model's max_position_embeddings"),
    (["train.seq_len=128"], {}, "train.seq_len 128 exceeds the model's max_position_embeddings 64"),
    (["model.vocab_size=8"], {"data_dir": None}, "that is the bundled sample corpus"),
    (["model.attention=\"triton\"", "model.attention_dropout=0.1"], {}, "has no attention dropout"),  # at step 1
])
def test_a_refused_run_leaves_no_run_directory_behind(tmp_path, data_dir, refused, kwargs, message):
    """The run directory (and its parents) made for a run that is then refused, before any step, goes again;
    one that existed stays, and so does whatever an interrupted run trained into one."""
    out = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match=message):
        train(run_config(*refused), out, **{"data_dir": str(data_dir), **kwargs})
    assert list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    with pytest.raises(ConfigError, match=message):
        train(run_config(*refused), out, **{"data_dir": str(data_dir), **kwargs})
    assert out.is_dir()


def test_the_last_step_is_evaluated_and_stop_after_past_max_steps_ends_at_max_steps(tmp_path, data_dir):
    result = train(run_config("train.max_steps=4", "train.eval_every=3"), tmp_path, data_dir=str(data_dir),
                   stop_after=10)
    assert result.last_step == 4 and result.checkpoint.name == "step-000004"
    assert len(losses(tmp_path)) == 4
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r] == [3, 4]
    # a run stopped early (here at step 2) is not at its last step: resumed, it logs the uninterrupted run's evals;
    # and only the finished run samples
    sliced = run_config("train.max_steps=4", "train.eval_every=3", "train.sample_tokens=4")
    assert train(sliced, tmp_path / "sliced", data_dir=str(data_dir), stop_after=2).sample is None
    assert train(sliced, tmp_path / "sliced", data_dir=str(data_dir), resume=True).sample is not None
    assert [r["step"] for r in read_metrics(tmp_path / "sliced" / "metrics.jsonl") if "eval_loss" in r] == [3, 4]


def test_eval_every_0_trains_and_resumes_without_a_validation_split(tmp_path, data_dir):
    """Throughput runs, and corpora without a held-out split: train.eval_every = 0 never evaluates (nor after the
    last step), and the data then needs no val.bin. With evaluation on, a missing, empty or too small split is
    refused before any step, in one line that names both ways out."""
    prepared = run_script("prepare_data", "--input", corpus_file(tmp_path), "--out", tmp_path / "data",
                          "--vocab-size", "400", "--val-fraction", "0", "--workers", "1")
    assert prepared.returncode == 0 and " + 0 val tokens" in prepared.stdout, prepared.stderr[-2000:]
    data = tmp_path / "data"
    for what in ("val.bin is empty", "no val.bin"):
        with pytest.raises(ConfigError, match=rf"^{data} has no validation split \({what}\); set train.eval_every=0 to "
                                              r"train without evaluation, or prepare the data with a "
                                              r"--val-fraction that holds out documents$"):
            train(run_config("train.max_steps=2"), tmp_path / "refused", data_dir=str(data))
        (data / "val.bin").unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"val.bin: .* fewer than one global batch needs .*; or set "
                                        r"train.eval_every=0 to train without evaluation$"):
        train(run_config("train.micro_batch_size=32", "train.max_steps=1"), tmp_path / "refused",
              data_dir=str(data_dir))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # no step was spent
    run = run_config("train.eval_every=0", "train.max_steps=4", "train.save_every=2")
    assert train(run, tmp_path / "run", data_dir=str(data), stop_after=2).last_step == 2
    result = train(run, tmp_path / "run", data_dir=str(data), resume=True)
    assert result.last_step == 4 and result.checkpoint.name == "step-000004" and math.isfinite(result.last_loss)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and not any("eval_loss" in r for r in records)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_init_from_a_classifier_is_refused(tmp_path, data_dir):
    from ttl_core.hf import save_pretrained
    from ttl_core.model import LlamaForSequenceClassification
    run = run_config("train.max_steps=1")
    save_pretrained(LlamaForSequenceClassification(run.model_config().replace(num_labels=2)), tmp_path / "clf")
    with pytest.raises(ConfigError, match="holds a LlamaForSequenceClassification; pretraining needs a Llama"):
        train(run, tmp_path / "run", data_dir=str(data_dir), init_from=str(tmp_path / "clf"))


def test_pretrain_without_a_config_or_data_says_how_to_fit_the_bundled_corpus(tmp_path):
    """`--config` may be left out, and without --data the bundled corpus is prepared; but the default model's
    32,000-token vocabulary is more than that corpus can train: the error says which settings to change."""
    result = run_script("pretrain", "--out", tmp_path / "run", "--max-steps", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: cannot train a 32000-token vocabulary") and "largest this text allows" in message
    assert "bundled sample corpus" in message and "configs/tiny.toml" in message and "--data" in message


def test_the_logged_figures_are_those_of_the_whole_batch_computed_by_hand(tmp_path, data_dir, monkeypatch):
    """metrics.jsonl against an independent computation: with two accumulated micro-batches the loss is the mean
    over both micro-batches' tokens, grad_norm the pre-clip norm of their mean gradient, and tokens_per_s counts
    the tokens of both (no MFU without a GPU's bf16/fp16 peak); the weights saved are torch's AdamW step on the
    documented groups (no decay for norms) after clipping, at the warmup's first lr; the eval loss is the saved
    model's mean token loss over the first eval_batches batches of val.bin."""
    # AdamW's first update is lr * g / (|g| + eps): with the default eps 1e-8, a gradient near 1e-8 makes it hinge on
    # the gradient's last bits, which accumulated micro-batches and one batch round differently (on some CPUs by
    # 4e-7 in a weight); eps 1e-4 bounds that sensitivity to lr / eps per unit of gradient
    run = run_config("train.max_steps=1", "train.grad_accum_steps=2", "train.grad_clip=0.5", "train.eval_every=1",
                     "train.weight_decay=0.1", "train.eval_batches=3", "train.eps=1e-4")
    t = run.train
    clock = iter(range(0, 100, 2))  # every step takes 2 s
    monkeypatch.setattr(ttl_train, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    train(run, tmp_path, data_dir=str(data_dir))
    step, evaluation = read_metrics(tmp_path / "metrics.jsonl")

    torch.manual_seed(t.seed)  # the run's fresh weights
    model = LlamaForCausalLM(run.model_config()).train()
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=t.seed)
    batches = [next(loader) for _ in range(t.grad_accum_steps)]
    ids, targets = torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])
    logits = model(ids, return_logits=True).logits
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert step["loss"] == pytest.approx(loss.item(), abs=1e-5) and step["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert step["lr"] == t.lr / t.warmup_steps and norm > t.grad_clip
    assert step["tokens_per_s"] == t.micro_batch_size * t.seq_len * 2 / 2 and step["mfu"] is None

    for p in model.parameters():
        p.grad.mul_(t.grad_clip / (norm + 1e-6))  # clip_grad_norm_'s factor
    named = dict(model.named_parameters())
    norms = [p for n, p in named.items() if "norm" in n]
    others = [p for n, p in named.items() if "norm" not in n]
    torch.optim.AdamW([{"params": others, "weight_decay": t.weight_decay}, {"params": norms, "weight_decay": 0.0}],
                      lr=t.lr / t.warmup_steps, betas=tuple(t.betas), eps=t.eps).step()
    saved = load_pretrained(tmp_path / "checkpoints" / "step-000001", dtype=torch.float32).eval()
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(weight, model.state_dict()[name], rtol=0, atol=1e-7)

    val = PackedLoader(data_dir, "val", t.seq_len, t.micro_batch_size, shuffle=False)
    with torch.no_grad():
        sums = [(F.cross_entropy(saved(b["input_ids"], return_logits=True).logits.flatten(0, 1),
                                 b["labels"].flatten(), reduction="sum").item(), b["labels"].numel())
                for _, b in zip(range(t.eval_batches), val)]
    assert len(sums) == t.eval_batches < len(list(PackedLoader(data_dir, "val", t.seq_len, t.micro_batch_size,
                                                                    shuffle=False)))  # a subset
    eval_loss = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert evaluation["eval_loss"] == pytest.approx(eval_loss, abs=1e-5)
    assert evaluation["eval_ppl"] == pytest.approx(math.exp(eval_loss), rel=1e-5)


def test_an_fp16_step_the_grad_scaler_skips_is_logged_as_skipped_with_its_loss_scale(tmp_path, data_dir, monkeypatch):
    """With float16, each step's line names the loss scale its gradients were scaled by and whether the grad
    scaler skipped it; a skipped step showed only as a non-finite grad_norm. Step 2's gradient overflows here: it is
    skipped at scale 2**16 and step 3 runs at half that. A float32 run logs neither key."""
    real_wrap, backwards = ttl_train.wrap_model, []

    def overflow_at_step_2(model, *args):
        def hook(grad):
            backwards.append(grad)
            return grad * math.inf if len(backwards) == 2 else grad
        model.backbone.layers[0].mlp.down.weight.register_hook(hook)
        return real_wrap(model, *args)

    monkeypatch.setattr(ttl_train, "wrap_model", overflow_at_step_2)
    train(run_config("train.max_steps=3", "train.dtype=\"float16\"", "train.eval_every=0"), tmp_path / "fp16",
          data_dir=str(data_dir))
    steps = [r for r in read_metrics(tmp_path / "fp16" / "metrics.jsonl") if "loss" in r]
    assert [(r["skipped"], r["loss_scale"]) for r in steps] == [(False, 2.0**16), (True, 2.0**16), (False, 2.0**15)]
    assert math.isfinite(steps[0]["grad_norm"]) and not math.isfinite(steps[1]["grad_norm"])
    monkeypatch.setattr(ttl_train, "wrap_model", real_wrap)
    train(run_config("train.max_steps=1", "train.eval_every=0"), tmp_path / "fp32", data_dir=str(data_dir))
    assert {"skipped", "loss_scale"}.isdisjoint(read_metrics(tmp_path / "fp32" / "metrics.jsonl")[0])


def test_tf32_switch_sets_the_cuda_flags_only_on_cuda(tmp_path, data_dir, monkeypatch):
    """train.tf32 (TeenyTinyLlama's recipe trained with TF32 matmuls) sets torch's CUDA matmul and cuDNN TF32 flags
    for a CUDA run, both ways; a CPU run, which has no TF32, leaves them as they were. train() hands it its device."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [flag.allow_tf32 for flag in flags]
    try:
        for enabled in (True, False):
            ttl_train.set_tf32(torch.device("cuda", 0), enabled)
            assert [flag.allow_tf32 for flag in flags] == [enabled, enabled]
            ttl_train.set_tf32(torch.device("cpu"), not enabled)
            assert [flag.allow_tf32 for flag in flags] == [enabled, enabled]
    finally:
        for flag, value in zip(flags, saved):
            flag.allow_tf32 = value
    calls = []
    monkeypatch.setattr(ttl_train, "set_tf32", lambda device, enabled: calls.append((device, enabled)))
    train(run_config("train.max_steps=1", "train.eval_every=0", "train.tf32=true"), tmp_path, data_dir=str(data_dir))
    assert calls == [(torch.device("cpu"), True)]


def test_a_moved_run_on_the_bundled_corpus_resumes_on_its_own_data(tmp_path, data_dir):
    """Without --data a run trains on the corpus prepared into RUN/data: the directory moves with the run, so a
    checkpoint does not record it by path, which would name the old place."""
    shutil.copytree(data_dir, tmp_path / "run" / "data")  # as if the bundled corpus had been prepared there
    run = run_config("train.max_steps=3", "train.save_every=100")
    train(run, tmp_path / "run", stop_after=2)
    (tmp_path / "run").rename(tmp_path / "moved")
    assert train(run, tmp_path / "moved", resume=True).last_step == 3


def test_resume_without_data_continues_on_the_data_the_run_recorded(tmp_path, data_dir, capsys):
    """A run trained on --data and resumed without it continues on the data directory its checkpoint records (saying
    so), not on the bundled corpus prepared into RUN/data (another tokenizer). A recorded directory that is gone is
    one line naming it."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    run = run_config("train.max_steps=4", "train.save_every=100")
    train(run, tmp_path / "straight", data_dir=str(data))
    train(run, tmp_path / "sliced", data_dir=str(data), stop_after=2)
    capsys.readouterr()
    assert train(run, tmp_path / "sliced", resume=True).last_step == 4
    said = capsys.readouterr().out
    assert f"resuming on the data the run was trained on, {data} (give --data for other data)" in said
    assert losses(tmp_path / "sliced") == losses(tmp_path / "straight") and not (tmp_path / "sliced" / "data").exists()
    data.rename(tmp_path / "moved")
    checkpoint = tmp_path / "sliced" / "checkpoints" / "step-000004"
    with pytest.raises(ConfigError) as e:
        train(run_config("train.max_steps=5"), tmp_path / "sliced", resume=True)
    assert str(e.value) == (f"{checkpoint} was trained on {data}, which no longer exists; give the run's data "
                            "with --data")


@pytest.mark.parametrize("evaluation, unit", [({"eval_loss": 2.0}, "cross-entropy (nats/token)"),
                                              ({"eval_accuracy": 0.5, "eval_f1": 0.4}, "cross-entropy (nats/example)"),
                                              ({"eval_pearson": 0.3, "eval_mse": 1.5}, "squared error (per example)")])
def test_the_loss_plot_labels_the_loss_of_the_run_it_plots(tmp_path, monkeypatch, evaluation, unit):
    """A classifier's loss is a mean over examples (its eval records say which kind of run it is), a language
    model's over tokens."""
    import matplotlib.axes
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, label, **kwargs: labels.append(label))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n" +
                                            json.dumps({"step": 1, **evaluation}) + "\n")
    plot_metrics(tmp_path)
    assert labels == [unit]
