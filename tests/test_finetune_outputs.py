"""What a fine-tuning run does to its output folder: an earlier run's results there go when it starts, a LoRA run
never replaces the model it starts from, and the epoch kept (best/, results.json) is the best by the task's metric."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import ttl_core.finetune as finetune
from tests.finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
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
