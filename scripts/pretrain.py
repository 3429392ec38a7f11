"""Pretrain a Llama from scratch (or continue pretraining one) on prepared token data.

  python scripts/pretrain.py --config configs/tiny.toml --out runs/tiny
  torchrun --nproc_per_node 8 scripts/pretrain.py --config configs/ttl-160m.toml --data DATA --out RUN --device cuda

Without --data (and no [data] path or [data.mix] in the config) the bundled Portuguese sample corpus is prepared
into RUN/data first; with --resume, the run continues on the data directory (or mixture) its checkpoint records
instead.
Writes RUN/metrics.jsonl, RUN/checkpoints/step-NNNNNN (HF format, loadable by transformers and
`ttl_core.load_pretrained`; with train.ema_decay the average of the weights in step-NNNNNN/ema as well),
RUN/loss.png (RUN/profile with train.profile_steps), and prints a sample generation from the final model.

SIGTERM or SIGUSR1 (a scheduler's warning before its time limit: `#SBATCH --signal=USR1@120` in SLURM) ends the
run after the optimizer step in progress, with a checkpoint of that step, and exit status 75 (EX_TEMPFAIL: requeue
and run again with --resume); Ctrl-C does the same with status 130, and a second Ctrl-C stops at once. Under
torchrun, add --signals-to-handle SIGTERM,SIGINT,SIGUSR1 to have it forward SIGUSR1 (see docs/training.md).
--resume on a run already at train.max_steps says the run is complete and exits 0.
"""

from __future__ import annotations

import argparse

from ttl_core.cli import run_cli
from ttl_core.preemption import EXIT_STATUS
from ttl_core.run_config import load_run_config
from ttl_core.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML run config (configs/*.toml); defaults apply when omitted")
    parser.add_argument("--data", help="prepared data directory (scripts/prepare_data.py); overrides [data] path "
                        "(refused beside a [data.mix])")
    parser.add_argument("--out", required=True, help="run directory for checkpoints, metrics and plots")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--save-every", type=int, help="override train.save_every")
    parser.add_argument("--stop-after", type=int, help="exit cleanly (with a checkpoint) after this step")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out (without --data: on the data it records)")
    parser.add_argument("--init-from", help="start from this HF Llama checkpoint instead of random weights")
    parser.add_argument("--document-masking", action="store_true",
                        help="attend within each packed document only, positions restarting per document")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default %(default)s, even with a GPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.grad_accum_steps=2 (repeatable)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.document_masking:
        overrides.append("data.document_masking=true")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    run = load_run_config(args.config, overrides)
    result = train(run, args.out, data_dir=args.data, device=args.device, resume=args.resume,
                   stop_after=args.stop_after, init_from=args.init_from)
    if result.checkpoint is not None:
        print(f"step {result.last_step}: loss {result.last_loss:.4f}; checkpoint {result.checkpoint}")
    if result.sample is not None:
        print(f"sample: {result.sample}")
    return EXIT_STATUS[result.stopped_by] if result.stopped_by else 0


if __name__ == "__main__":
    run_cli(main)
