"""A Portuguese fine-tuning benchmark: one base model fine-tuned on several local task files in turn, with
one results table (accuracy and macro F1 for classification, Pearson and MSE for regression).

A task list is JSON: `[{"name": ..., "train": FILE, "eval": FILE, "text_fields": [...], "label_field": ...,
"pair": false, "regression": false, "labels": null}, ...]`, relative paths resolved against the list's
folder. The default list is the bundled sample tasks (news topics, entailment pairs, sentence similarity).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .fileio import atomic_write, read_json, remove_path, write_json
from .finetune import AGNEWS_LABELS, SAMPLE_DATA, FinetuneConfig, finetune_classifier, refuse_smoothed_regression
from .task_files import TaskSpec

RESULT_FILES = ("results.json", "results.md")  # written beside the tasks' run folders in OUT
METRIC_COLUMNS = ("accuracy", "f1", "pearson", "mse")


@dataclasses.dataclass
class Task:
    """One benchmark task: its name (OUT/NAME holds its run), train and eval files, and how to read them."""

    name: str
    train: Path
    eval: Path
    spec: TaskSpec


def sample_tasks() -> list[Task]:
    """The bundled tasks: 4-class news topics, ASSIN2-style entailment pairs, STS-style similarity (1-5)."""
    return [
        Task("noticias", SAMPLE_DATA / "agnews_pt_train.csv", SAMPLE_DATA / "agnews_pt_eval.csv",
             TaskSpec(["title", "text"], "label", labels=list(AGNEWS_LABELS))),
        Task("inferencia", SAMPLE_DATA / "nli_pt_train.csv", SAMPLE_DATA / "nli_pt_eval.csv",
             TaskSpec(["premise", "hypothesis"], "label", pair=True, labels=["NONE", "ENTAILMENT"])),
        Task("similaridade", SAMPLE_DATA / "sts_pt_train.csv", SAMPLE_DATA / "sts_pt_eval.csv",
             TaskSpec(["sentence1", "sentence2"], "score", pair=True, regression=True)),
    ]


def read_task_list(path: str | Path) -> list[Task]:
    """Tasks from a JSON list (see the module docstring); a missing or unknown key is a DataError."""
    path = Path(path)
    entries = read_json(path, DataError, expect=list)
    if not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of tasks")
    tasks: list[Task] = []
    for i, entry in enumerate(entries):
        tasks.append(_read_task(entry, f"{path}: task {i}", path.parent, [task.name for task in tasks]))
    return tasks


def _read_task(entry: Any, where: str, folder: Path, earlier_names: list[str]) -> Task:
    """One entry of a task list (`where` names it in errors), its files resolved against `folder`; a name that is
    one of `earlier_names` is refused."""
    if not isinstance(entry, dict):
        raise DataError(f"{where} is not an object")
    spec_fields = {f.name for f in dataclasses.fields(TaskSpec)}
    missing = [k for k in ("name", "train", "eval") if k not in entry]
    unknown = set(entry) - spec_fields - {"name", "train", "eval"}
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(sorted(unknown))}"] if unknown else [])
        raise DataError(f"{where}: " + "; ".join(problems))
    for key in ("name", "train", "eval"):
        if not (isinstance(entry[key], str) and entry[key].strip()):
            raise DataError(f"{where}: {key!r} must be a non-empty string, got {entry[key]!r}")
    # each task's run goes to OUT/NAME: another task's, OUT itself or a folder outside it would be overwritten
    name = entry["name"]
    if name != Path(name).name or name == ".." or name in RESULT_FILES:
        raise DataError(f"{where}: 'name' must be a plain folder name other than "
                        f"{' and '.join(RESULT_FILES)} (the task's run goes to OUT/NAME), got {name!r}")
    # case-insensitive file systems (macOS, Windows) make SST2 and sst2 one folder
    if name.casefold() in [earlier.casefold() for earlier in earlier_names]:
        raise DataError(f"{where}: the name {name!r} is already another task's (each writes OUT/NAME)")
    try:
        spec = TaskSpec(**{k: v for k, v in entry.items() if k in spec_fields})
    except ConfigError as e:
        raise DataError(f"{where} ({name}): {e}") from None
    return Task(name, folder / entry["train"], folder / entry["eval"], spec)


def run_benchmark(model_dir: str | Path, tasks: list[Task], out_dir: str | Path, cfg: FinetuneConfig,
                  verbose: bool = True) -> list[dict[str, Any]]:
    """Fine-tune `model_dir` on each task (OUT/NAME holds its run and best checkpoint); returns one row per
    task with the best epoch's metrics, also written to OUT/results.json and OUT/results.md."""
    out_dir = Path(out_dir)
    for task in tasks:  # before any task has run
        refuse_smoothed_regression(cfg, task.spec, task.name)
    for name in RESULT_FILES:  # an earlier benchmark's table, which a run that fails midway must not leave as its own
        remove_path(out_dir / name)
    rows = []
    for task in tasks:
        if verbose:
            print(f"== {task.name}: {task.train.name} -> {task.eval.name}")
        result = finetune_classifier(model_dir, task.train, task.eval, out_dir / task.name, task.spec, cfg, verbose)
        rows.append({"task": task.name, "kind": "regression" if task.spec.regression else "classification",
                     "epoch": result.best["epoch"], **{k: result.best.get(k) for k in METRIC_COLUMNS}})
    write_json(out_dir / RESULT_FILES[0], {"model": str(model_dir), "config": dataclasses.asdict(cfg), "rows": rows})
    table = format_table(rows)
    atomic_write(out_dir / RESULT_FILES[1], lambda tmp: tmp.write_text(table + "\n", encoding="utf-8"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of benchmark rows; metrics a task does not have are shown as '-'."""
    def cell(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    lines = ["| task | kind | best epoch | " + " | ".join(METRIC_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(METRIC_COLUMNS)]
    for row in rows:
        lines.append(f"| {row['task']} | {row['kind']} | {row['epoch']} | "
                     + " | ".join(cell(row[k]) for k in METRIC_COLUMNS) + " |")
    return "\n".join(lines)
