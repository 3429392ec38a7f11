"""Compare training runs: one figure with each run's curves (works while the runs are still going), and a table.

  python scripts/compare_runs.py runs/lr3e-4 runs/lr1e-3 --out compare.png
  python scripts/compare_runs.py runs/a runs/b --out acc.png --metric acc_norm/escolhas_pt --labels small big
  python scripts/compare_runs.py runs/a runs/b --out gn.png --metric grad_norm --x step --smooth 0 --json table.json

The x axis is the tokens seen (default: runs with other batch sizes or numbers of processes line up) or the step.
Training metrics are smoothed as TensorBoard does (debiased exponential moving average, NaN and inf skipped);
evaluation metrics (eval_*, acc/*, acc_norm/*, train.log_activation_stats' act_rms/*, attn_out_rms/*, mlp_out_rms/*,
attn_logit_max/*) are drawn as logged. The table gives, per run: training steps logged, tokens seen, the last and the
best eval_loss with their steps, the last smoothed training loss, the median tokens/s and each accuracy's last value.
Runs logged before ttl logged batch_tokens take their tokens per step from their newest checkpoint, taken to hold for
the whole run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ttl_core.cli import given_path, run_cli
from ttl_core.compare import (DEFAULT_METRICS, check_metrics, comparison_curves, format_table, load_run,
                              plot_comparison, summarize)
from ttl_core.errors import ConfigError
from ttl_core.fileio import write_json


def smoothing_weight(text: str) -> float:
    """An argparse type for --smooth: an exponential moving average's weight in [0, 1)."""
    try:
        weight = float(text)
    except ValueError:
        weight = None
    if weight is None or not 0 <= weight < 1:
        raise argparse.ArgumentTypeError(f"expected a weight in [0, 1) (0: no smoothing), got {text!r}")
    return weight


def check_output(option: str, path: str | None) -> None:
    """Refuse an output in a directory that does not exist before any run is read."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"{option} {path}: the directory {Path(path).parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=given_path, nargs="+", metavar="RUN", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", type=given_path, required=True, help="PNG file to write the figure to")
    parser.add_argument("--metric", nargs="+",
                        help="logged keys to draw, e.g. grad_norm or acc_norm/NAME (default: loss eval_loss)")
    parser.add_argument("--x", choices=("tokens", "step"), default="tokens", help="x axis (default: tokens)")
    parser.add_argument("--smooth", type=smoothing_weight, default=0.9,
                        help="smoothing weight of training curves in [0, 1) (default: 0.9)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the run directories as given)")
    parser.add_argument("--json", type=given_path,
                        help="also write the table to this JSON file (a list with one object per run)")
    args = parser.parse_args(argv)
    resolved = [Path(run).resolve() for run in args.runs]
    if twice := next((run for i, run in enumerate(args.runs) if resolved[i] in resolved[:i]), None):
        raise ConfigError(f"{twice} is given twice; give each run once")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or args.runs
    if repeated := next((label for i, label in enumerate(labels) if label in labels[:i]), None):
        raise ConfigError(f"{repeated!r} names two runs; give each run its own label (--labels)")
    check_output("--out", args.out)
    check_output("--json", args.json)
    runs = [load_run(path, label) for path, label in zip(args.runs, labels)]
    if args.metric:
        check_metrics(runs, args.metric)
    curves = comparison_curves(runs, args.metric or list(DEFAULT_METRICS), args.x, args.smooth)
    rows = [summarize(run, args.smooth) for run in runs]
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    out = plot_comparison(curves, args.x, args.smooth, Path(args.out))
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
