"""Zero-shot multiple-choice accuracy of a causal LM (a ttl or Hugging Face checkpoint, or a PEFT adapter) on task
files, scored as lm-evaluation-harness scores its multiple-choice tasks (see ttl_core/choices.py).

  python scripts/evaluate_choices.py --model DIR                        # the bundled sample task
  python scripts/evaluate_choices.py --model DIR --tasks arc_pt.jsonl hellaswag_pt.jsonl --json acc.json

A task file holds one question per line: {"context": "...", "choices": ["...", "..."], "label": 0}; each choice
follows the context after a space (or the line's "target_delimiter"). Prints, per task, the questions scored and
acc (highest log-likelihood), acc_norm (per character of the choice) and acc_bytes (per UTF-8 byte), each with its
standard error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ttl_core.choices import BATCH_SIZE, METRICS, evaluate_questions, read_questions
from ttl_core.cli import add_model_options, given_path, load_causal_lm, model_tokenizer_dir, output_file, run_cli
from ttl_core.finetune import SAMPLE_DATA, check_tokenizer_fits
from ttl_core.fileio import write_json
from ttl_core.tokenizer import Tokenizer

SAMPLE_TASK = SAMPLE_DATA / "escolhas_pt.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--tasks", type=given_path, nargs="+", default=[str(SAMPLE_TASK)],
                        help="JSON-lines task files (default: the bundled sample, "
                             f"ttl_core/sample_data/{SAMPLE_TASK.name})")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="choices per forward pass (default %(default)s)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only each task's first N questions")
    parser.add_argument("--json", type=output_file, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = {path: read_questions(path)[:args.limit] for path in args.tasks}  # every file checked before the model
    tokenizer = Tokenizer.from_pretrained(model_tokenizer_dir(args.model, args.base))
    model = load_causal_lm(args, "choice scoring")
    check_tokenizer_fits(tokenizer, model.config, args.model)
    results = {}
    for path, questions in tasks.items():
        figures = evaluate_questions(model, tokenizer, questions, args.batch_size, progress=True)
        results[path] = figures
        print(f"{Path(path).name}: {figures['questions']:,} questions")
        for metric in METRICS:
            stderr = figures[f"{metric}_stderr"]
            print(f"{metric:>10}: {figures[metric]:.4f} ± {'n/a' if stderr is None else f'{stderr:.4f}'}")
    if args.json:
        write_json(args.json, {"model": args.model, "tasks": results})
    return 0


if __name__ == "__main__":
    run_cli(main)
