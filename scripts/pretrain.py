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
--resume on a run already at train.max_steps says the run is complete and exits 0. --time-limit 3h30m (also 90m, 1.5h,
45s, or seconds) stops the same way, with status 75, where a scheduler or notebook kills at a limit without warning:
after the step at which one more step and a checkpoint would pass that wall clock, counted from train()'s start
(preparing the data and the model included); each --resume gets the whole limit again.

--plan prints the run's plan and exits without training or writing anything: parameters, tokens, FLOPs, ideal time
per GPU, memory per process, the epochs over each data source and the evaluations' cost (train.eval_tasks' questions
included; of the steps left, with --resume), for torchrun's WORLD_SIZE or --plan-processes processes; it needs no
--out but for --resume. What the run would refuse before its first step, the plan refuses alike.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from ttl_core.benchmark import positive_int
from ttl_core.cli import given_path, refuse_ignored, run_cli
from ttl_core.distributed import World
from ttl_core.mixture import recorded_mix
from ttl_core.plan import ASSUMED_MFU, describe_plan, make_plan
from ttl_core.preemption import EXIT_STATUS, duration_seconds
from ttl_core.run_config import RunConfig, load_run_config
from ttl_core.run_setup import set_up_run
from ttl_core.train import train


def mfu_fraction(text: str) -> float:
    """An argparse type for --plan-mfu: a fraction in (0, 1] (40% is 0.4)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.4 for 40%, got {text!r}")
    return value


def plan_lines(run: RunConfig, args: argparse.Namespace, processes: int) -> list[str]:
    """The plan of the run `args` would start (what is left of it with --resume), set up as the run sets itself up
    (`set_up_run`) but without writing anything: what the run would refuse is refused alike; data not prepared yet,
    or too small for the processes' global batch, is named, and the rest planned from the config."""
    setup = set_up_run(run, Path(args.out) if args.out else None, args.data, args.resume, args.stop_after,
                       args.init_from, World(0, processes, torch.device(args.device)), planning=True)
    if setup.last_step is None:
        return [f"{setup.complete_message}, nothing is left to plan"]
    # the directories each evaluation scores (`evaluated_dirs`); with the data not prepared yet, those the config or
    # the resumed checkpoint names
    scored = len(setup.evaluated) or len(run.data.eval) + (len(run.data.mix or recorded_mix(setup.saved_run)) or 1)
    plan = make_plan(setup.config, run.train, processes, setup.first_step, setup.last_step, setup.loader, scored,
                     setup.tasks)
    return describe_plan(plan, run.train, args.plan_mfu, setup.missing.get("data", ""), setup.missing.get("eval", ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=given_path,
                        help="TOML run config (configs/*.toml); defaults apply when omitted")
    parser.add_argument("--data", type=given_path,
                        help="prepared data directory (scripts/prepare_data.py); overrides [data] path "
                             "(refused beside a [data.mix])")
    parser.add_argument("--out", type=given_path,
                        help="run directory for checkpoints, metrics and plots (optional with --plan, "
                             "but for --resume)")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--save-every", type=int, help="override train.save_every")
    parser.add_argument("--stop-after", type=int, help="exit cleanly (with a checkpoint) after this step")
    parser.add_argument("--time-limit", type=duration_seconds, metavar="DURATION",
                        help="stop cleanly (a checkpoint, exit status 75) before this much wall clock has passed, "
                        "e.g. 3h30m, 90m, 45s or 5400 (seconds)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out (without --data: on the data it records)")
    parser.add_argument("--init-from", type=given_path,
                        help="start from this HF Llama checkpoint instead of random weights")
    parser.add_argument("--document-masking", action="store_true",
                        help="attend within each packed document only, positions restarting per document")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default %(default)s, even with a GPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.grad_accum_steps=2 (repeatable)")
    parser.add_argument("--plan", action="store_true",
                        help="print the run's plan (cost, memory, epochs over the data) and exit, writing nothing")
    parser.add_argument("--plan-processes", type=positive_int, metavar="N",
                        help="plan for N processes (default: torchrun's WORLD_SIZE, else 1)")
    parser.add_argument("--plan-mfu", type=mfu_fraction, metavar="F",
                        help=f"the MFU the plan's ideal times assume (default {ASSUMED_MFU})")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "without --plan", "--plan-processes", "--plan-mfu", active=not args.plan)
    refuse_ignored(parser, args, "--plan", "--time-limit")
    if args.out is None and (args.resume or not args.plan):
        parser.error(f"{'--resume' if args.plan else 'training'} needs --out, the run directory")
    launched = os.environ.get("WORLD_SIZE")
    if launched and args.plan_processes is not None:
        parser.error(f"--plan-processes plans without torchrun; this one set WORLD_SIZE={launched}")
    if args.plan and launched and not (launched.isdecimal() and int(launched) >= 1):
        parser.error(f"WORLD_SIZE={launched!r} must be an integer >= 1 (torchrun sets it)")
    return args


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, followed by those of the shorthands --max-steps, --document-masking and --save-every."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.document_masking:
        overrides.append("data.document_masking=true")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = load_run_config(args.config, config_overrides(args))
    if args.plan:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process prints it
            processes = args.plan_processes or int(os.environ.get("WORLD_SIZE") or 1)
            print("\n".join(plan_lines(run, args, processes)))
        return 0
    result = train(run, args.out, data_dir=args.data, device=args.device, resume=args.resume,
                   stop_after=args.stop_after, init_from=args.init_from, time_limit=args.time_limit)
    if result.checkpoint is not None:
        print(f"step {result.last_step}: loss {result.last_loss:.4f}; checkpoint {result.checkpoint}")
    if result.sample is not None:
        print(f"sample: {result.sample}")
    return EXIT_STATUS[result.stopped_by] if result.stopped_by else 0


if __name__ == "__main__":
    run_cli(main)
