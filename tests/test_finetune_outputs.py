"""What a fine-tuning run does to its output folder: an earlier run's results there go when it starts, a LoRA run
never replaces the model it starts from, and the epoch kept (best/, results.json) is the best by the task's metric.
What label smoothing and gradient norms by part leave in metrics.jsonl (left off, nothing changes), and their bad
values refused in one line (test_finetune_reference.py checks the figures against transformers)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ttl_core.finetune as finetune
from tests.finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
from tests.helpers import run_script
from ttl_core import LlamaConfig, LlamaForSequenceClassification
from ttl_core.errors import ConfigError
from ttl_core.finetune import SAMPLE_DATA, FinetuneConfig
from ttl_core.instruct import finetune_instruct
from ttl_core.metrics import read_metrics
from ttl_core.task_files import TaskSpec
from ttl_core.task_benchmark import RESULT_FILES, run_benchmark, sample_tasks


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved_base_model(tmp_path_factory.mktemp("base"))


def run(recipe: str, base: Path, out: Path, cfg: FinetuneConfig) -> None:
    """A short run of one recipe: instruction tuning (Alpaca, which adds no tokens), the classifier, or a one-task
    benchmark."""
    if recipe == "instruct":
        data = out.parent / "few.jsonl"
        data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:4]))
        finetune_instruct(base, data, out, "alpaca", replace(cfg, max_length=512), verbose=False)
    elif recipe == "classifier":
        finetune.finetune_classifier(base, NEWS_TRAIN, NEWS_EVAL, out, NEWS, cfg, verbose=False)
    else:
        run_benchmark(base, sample_tasks()[:1], out, cfg, verbose=False)


def diverge(*args):
    raise ConfigError("epoch 1, step 1: the loss became nan; lower the lr")


@pytest.mark.parametrize("recipe", ["instruct", "classifier", "benchmark"])
def test_a_run_that_fails_leaves_none_of_the_earlier_results_it_replaces(recipe, base_dir, tmp_path, monkeypatch):
    """A run into a folder holding an earlier run's results (--overwrite) that diverges at its first step must not
    leave that run's best model and results.json beside its own metrics.jsonl, as if they were its outcome."""
    out = tmp_path / "out"
    run_dir, tables = (out / "noticias", RESULT_FILES) if recipe == "benchmark" else (out, ())
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "best" / "config.json").write_text("{}")
    (run_dir / "results.json").write_text("{}")
    for name in tables:  # a benchmark's, beside its tasks' folders
        (out / name).write_text("{}")
    monkeypatch.setattr(finetune, "optimizer_update", diverge)
    with pytest.raises(ConfigError, match="the loss became nan"):
        run(recipe, base_dir, out, FinetuneConfig(batch_size=8, epochs=1, max_length=64, lora=True))
    earlier = (run_dir / "best", run_dir / "results.json", *(out / name for name in tables))
    assert [path.name for path in earlier if path.exists()] == []
    assert read_metrics(run_dir / "metrics.jsonl") == []


@pytest.mark.parametrize("recipe", ["instruct", "classifier", "benchmark"])
def test_a_run_from_the_best_model_it_replaces_keeps_it_until_it_saves_its_own(recipe, base_dir, tmp_path,
                                                                                monkeypatch):
    """Going on from one's own best with --overwrite (--model OUT/best --out OUT): a LoRA run replaced OUT/best, the
    base, by an adapter whose base_model_name_or_path was that folder itself (the base lost, the adapter unloadable);
    it is refused before the folder changes. A merged (or full) run, a whole model, replaces it at its first save,
    and one that fails before then leaves it as it was."""
    out = tmp_path / "out"
    best = (out / "noticias" if recipe == "benchmark" else out) / "best"
    shutil.copytree(base_dir, best)
    weights = (best / "model.safetensors").read_bytes()
    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=1, max_length=64, lora=True)
    with pytest.raises(ConfigError, match=rf"^{best}: the model to fine-tune is the best/ this run replaces"):
        run(recipe, best, out, cfg)
    (best.parent / "results.json").write_text("{}")  # the earlier run's, which is not the base
    (best.parent / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    with monkeypatch.context() as patched:
        patched.setattr(finetune, "optimizer_update", diverge)
        with pytest.raises(ConfigError, match="the loss became nan"):
            run(recipe, best, out, replace(cfg, merge_lora=True))
    assert (best / "model.safetensors").read_bytes() == weights and not (best / "adapter_config.json").exists()
    assert not (best.parent / "results.json").exists() and read_metrics(best.parent / "metrics.jsonl") == []
    run(recipe, best, out, replace(cfg, merge_lora=True))
    assert json.loads((best / "config.json").read_text())["architectures"]
    assert (best / "model.safetensors").read_bytes() != weights


def test_a_regression_run_keeps_the_epoch_of_the_highest_pearson_and_records_it(base_dir, tmp_path, monkeypatch):
    """An STS run is ranked by Pearson, higher better, not by MSE: with scripted evaluations whose best Pearson
    (epoch 2) has neither the lowest nor the highest MSE, epoch 2 is the one saved, returned and in results.json."""
    evaluations = iter([{"pearson": 0.2, "mse": 1.5}, {"pearson": 0.7, "mse": 1.0}, {"pearson": 0.4, "mse": 0.5}])
    saved = []
    monkeypatch.setattr(finetune, "evaluate_classifier", lambda *args, **kwargs: next(evaluations))
    monkeypatch.setattr(finetune, "save_finetuned", lambda *args: saved.append(len(saved)))
    rows = (SAMPLE_DATA / "sts_pt_train.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:9]
    (tmp_path / "train.csv").write_text("".join(rows), encoding="utf-8")
    spec = TaskSpec(["sentence1", "sentence2"], "score", pair=True, regression=True)
    result = finetune.finetune_classifier(base_dir, tmp_path / "train.csv", tmp_path / "train.csv", tmp_path / "out",
                                          spec, FinetuneConfig(batch_size=8, epochs=3, max_length=64), verbose=False)
    assert len(saved) == 2 and result.best == {"epoch": 2, "pearson": 0.7, "mse": 1.0}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["best"] == result.best


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_smoothing_zero_and_logging_the_grad_norms_change_no_figure_and_no_weight(base_dir, tmp_path, lora):
    """A run with label_smoothing 0 and log_grad_norms logs what a run with neither logs (no smoothed_loss), bit for
    bit, and saves the same bytes; the parts (the score head's own, only the adapters' blocks under LoRA) add up to
    grad_norm. A run with smoothing logs as "loss" another figure than the smoothed loss it trains on."""
    rows = NEWS_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:13]
    (tmp_path / "few.csv").write_text("".join(rows), encoding="utf-8")
    common = FinetuneConfig(batch_size=4, grad_accum_steps=2, epochs=1, max_length=32, lr=1e-3, lora=lora,
                            merge_lora=lora)
    for name, cfg in (("plain", common), ("logged", replace(common, label_smoothing=0.0, log_grad_norms=True)),
                      ("smoothed", replace(common, label_smoothing=0.3))):
        finetune.finetune_classifier(base_dir, tmp_path / "few.csv", tmp_path / "few.csv", tmp_path / name, NEWS, cfg,
                                     verbose=False)
    plain, logged, smoothed = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("plain", "logged", "smoothed"))
    parts = [{k: v for k, v in r.items() if k.startswith("grad_norm/")} for r in logged]
    assert [{k: v for k, v in r.items() if k not in p} for r, p in zip(logged, parts)] == plain
    assert (tmp_path / "logged" / "best" / "model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "best" / "model.safetensors").read_bytes()
    steps = [(r, p) for r, p in zip(logged, parts) if "loss" in r]
    assert len(steps) == 2 and not any("smoothed_loss" in r for r in plain + logged)
    for record, part in steps:
        blocks = [f"grad_norm/layers.{i}" for i in range(2)]
        assert list(part) == (blocks if lora else ["grad_norm/embed", *blocks, "grad_norm/norm"]) + ["grad_norm/score"]
        assert sum(n ** 2 for n in part.values()) == pytest.approx(record["grad_norm"] ** 2, rel=1e-6)
    first = next(r for r in smoothed if "loss" in r)
    assert first["loss"] == next(r for r in plain if "loss" in r)["loss"] != first["smoothed_loss"]


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), "0.1"])
def test_a_label_smoothing_outside_0_to_1_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^label_smoothing \(--label-smoothing\) must be in \[0, 1\), got [^\n]*$"):
        FinetuneConfig(label_smoothing=value)
    with pytest.raises(ConfigError, match=r"^log_grad_norms \(--log-grad-norms\) must be true or false, got 'yes'$"):
        FinetuneConfig(log_grad_norms="yes")


def test_label_smoothing_is_refused_for_a_regressor_before_anything_runs(base_dir, tmp_path):
    """By the classifier recipe (before the data or the model load), by a benchmark holding a regression task
    (before its first task runs), by the script (one error line), and by the model itself for a regression or
    multi-label loss, which have no classes to smooth over."""
    cfg = FinetuneConfig(epochs=1, label_smoothing=0.1)
    sts = next(task for task in sample_tasks() if task.spec.regression)
    expected = "label_smoothing (--label-smoothing) smooths class labels; a regressor (--regression) has none"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        finetune.finetune_classifier(base_dir, tmp_path / "missing.csv", tmp_path / "missing.csv", tmp_path / "out",
                                     sts.spec, cfg, verbose=False)
    in_benchmark = ("label_smoothing (--label-smoothing) smooths class labels; task 'similaridade' is a regression "
                    "task, with none (leave it out of --tasks)")
    with pytest.raises(ConfigError, match=f"^{re.escape(in_benchmark)}$"):
        run_benchmark(base_dir, sample_tasks(), tmp_path / "bench", cfg, verbose=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "bench" / "noticias").exists()
    result = run_script("finetune_classifier", "--model", base_dir, "--out", tmp_path / "out", "--regression",
                        "--label-field", "score", "--text-fields", "sentence1,sentence2", "--train", sts.train,
                        "--eval", sts.eval, "--label-smoothing", "0.1")
    assert result.returncode == 2 and result.stderr.strip() == f"error: {expected}"
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0)
    ids = torch.randint(1, 50, (2, 5))
    for labels, problem in ((torch.randn(2), "regression"), (torch.rand(2, 3), "multi_label_classification")):
        model = LlamaForSequenceClassification(config.replace(num_labels=labels.shape[-1] if labels.dim() > 1 else 1))
        with pytest.raises(ConfigError, match=f"^label_smoothing smooths the targets of single-label classification; "
                                              f"{problem} has no class to smooth over$"):
            model(ids, labels=labels, label_smoothing=0.1)
