"""Plot a training run's loss and eval curves to RUN/loss.png (works while the run is still going), with panels
of their own for zero-shot accuracies (train.eval_tasks), per-block gradient norms (train.log_grad_norms) and
per-block residual RMS and largest attention logit (train.log_activation_stats).

  python scripts/plot_metrics.py runs/tiny
"""

from __future__ import annotations

import argparse

from ttl_core.cli import given_path, run_cli
from ttl_core.metrics import plot_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=given_path, help="run directory holding metrics.jsonl")
    path = plot_metrics(parser.parse_args(argv).run)
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
