"""Fine-tune one base model on several local tasks in turn and print one results table.

  python scripts/finetune_benchmark.py --model BASE_DIR [--tasks TASKS.json] [--out DIR]

Without --tasks, runs the bundled Portuguese sample tasks: news topics (4 classes), entailment pairs (<s>
premise <s> hypothesis </s>) and sentence similarity (regression, 1-5). TASKS.json is a list of {"name",
"train", "eval", "text_fields", "label_field", "pair", "regression", "labels"} objects ("train" and "eval"
relative to the list's folder; the others optional, defaulting as finetune_classifier.py's options do,
text_fields and labels as JSON lists). Each task runs the classifier recipe (lr 4e-5, batch 16, 3 epochs
unless overridden); the table reports the best epoch's accuracy and macro F1 (classification) or Pearson and
MSE (regression).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ttl_core.cli import given_path, refuse_to_replace, run_cli
from ttl_core.finetune import RUN_OUTPUTS, FinetuneConfig
from ttl_core.finetune_args import add_finetune_args, config_from_args
from ttl_core.task_benchmark import RESULT_FILES, format_table, read_task_list, run_benchmark, sample_tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=given_path,
                        help="base checkpoint directory (weights + tokenizer)")
    parser.add_argument("--tasks", type=given_path, help="JSON task list (default: the bundled sample tasks)")
    parser.add_argument("--out", type=given_path, default="runs/finetune-benchmark",
                        help="output directory (default %(default)s)")
    add_finetune_args(parser, FinetuneConfig())
    args = parser.parse_args(argv)
    tasks = read_task_list(args.tasks) if args.tasks else sample_tasks()
    # OUT's results.md too goes as a run starts; a benchmark interrupted before its results left the tasks' runs
    refuse_to_replace(args.out, RUN_OUTPUTS + RESULT_FILES, "a fine-tuning run's results", args.overwrite)
    for task in tasks:
        refuse_to_replace(Path(args.out) / task.name, RUN_OUTPUTS, "a fine-tuning run's results", args.overwrite)
    rows = run_benchmark(args.model, tasks, args.out, config_from_args(parser, args))
    print(format_table(rows))
    print(f"results written to {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
