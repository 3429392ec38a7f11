"""Average the weights of several checkpoints of one model (LAWA, checkpoint averaging after a
warmup-stable-decay schedule) into a checkpoint that transformers, ttl and scripts/evaluate.py load.

  python scripts/average_checkpoints.py runs/160m --last 3 --out runs/160m/averaged
  python scripts/average_checkpoints.py CKPT_A CKPT_B CKPT_C --out OUT [--weights 1 1 2] [--dtype bfloat16]

A run directory with --last K takes the run's newest K complete checkpoints; otherwise each path is a checkpoint
directory, the last one given counting as the newest. Every tensor is the weighted mean (default: equal weights)
accumulated in float64 and rounded once to the checkpoints' dtype (or --dtype). OUT gets the newest checkpoint's
tokenizer and generation_config.json, and averaging.json naming the checkpoints and weights; it is written
atomically, and one that exists is replaced, whole, only with --overwrite.
"""

from __future__ import annotations

import argparse

from ttl_core.averaging import average_checkpoints, run_checkpoints
from ttl_core.checkpoint import checkpoint_root
from ttl_core.cli import given_path, run_cli
from ttl_core.hf import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=given_path, nargs="+", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (with --last) or two or more checkpoint directories, oldest first")
    parser.add_argument("--out", type=given_path, required=True, help="directory to write the averaged checkpoint to")
    parser.add_argument("--last", type=int, metavar="K",
                        help="average the run directory's newest K complete checkpoints")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint (default: equal)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the checkpoints')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    args = parser.parse_args(argv)
    if args.last is not None:
        if args.last < 2:
            parser.error(f"--last must be >= 2 (an average of one checkpoint is that checkpoint), got {args.last}")
        if len(args.paths) != 1:
            parser.error(f"--last takes one run directory, got {len(args.paths)} paths")
        checkpoints = run_checkpoints(args.paths[0], args.last)
    else:
        runs = [p for p in args.paths if checkpoint_root(p).is_dir()]
        if runs:
            parser.error(f"{runs[0]} is a run directory: pass --last K to average its newest K checkpoints")
        checkpoints = args.paths
    out = average_checkpoints(checkpoints, args.out, args.weights, args.dtype, overwrite=args.overwrite)
    weights = args.weights or [1] * len(checkpoints)
    print(f"averaged {len(checkpoints)} checkpoints into {out}:")
    for path, weight in zip(checkpoints, weights):
        print(f"  {weight / sum(weights):.4f}  {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
