"""The command-line options the fine-tuning scripts share (classifier, benchmark, instruction tuning), and the
`FinetuneConfig` they describe."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .cli import refuse_ignored
from .finetune import FinetuneConfig
from .run_config import DTYPE_CHOICES

LORA_OPTIONS = ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", "--lora-dora", "--merge-lora")


def add_finetune_args(parser: argparse.ArgumentParser, defaults: FinetuneConfig) -> None:
    """The command-line options shared by the fine-tuning scripts, with `defaults` shown in --help."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results an earlier run left in --out (default: refuse)")
    group = parser.add_argument_group("training")
    group.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="examples per forward pass (default %(default)s)")
    group.add_argument("--grad-accum-steps", type=int, default=defaults.grad_accum_steps, help="batches per "
                       "optimizer step: the effective batch is batch size x this (default %(default)s)")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="default %(default)s")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default %(default)s")
    group.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                       help="optimizer steps of linear warmup, then cosine decay to 0 (default %(default)s)")
    group.add_argument("--grad-clip", type=float, default=defaults.grad_clip,
                       help="clip the gradient norm to this (0: no clipping; default %(default)s)")
    group.add_argument("--max-length", type=int, default=defaults.max_length,
                       help="truncate examples to this many tokens (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    group.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                       help="smooth the targets over the classes (instruction tuning: the vocabulary) as torch's "
                            "cross_entropy does; the logged loss stays unsmoothed (default %(default)s)")
    group.add_argument("--log-grad-norms", action=argparse.BooleanOptionalAction, default=defaults.log_grad_norms,
                       help="also log each block's gradient norm, grad_norm/PART (default %(default)s)")
    group.add_argument("--device", default=defaults.device, help="cpu or cuda (default %(default)s)")
    group.add_argument("--dtype", default=defaults.dtype, choices=list(DTYPE_CHOICES),
                       help="autocast dtype (default %(default)s)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action=argparse.BooleanOptionalAction, default=defaults.lora,
                      help="train LoRA adapters instead of all weights (default %(default)s)")
    # no argparse defaults for these: given without --lora, they are refused (config_from_args fills them in)
    lora.add_argument("--lora-r", type=int, help=f"default {defaults.lora_r}")
    lora.add_argument("--lora-alpha", type=number, help=f"default {defaults.lora_alpha}")
    lora.add_argument("--lora-dropout", type=float, help=f"default {defaults.lora_dropout}")
    targets = defaults.lora_targets
    lora.add_argument("--lora-targets", help="comma-separated HF module names, or all-linear (default "
                                             f"{targets if isinstance(targets, str) else ','.join(targets)})")
    lora.add_argument("--lora-dora", action="store_true", help="train DoRA adapters (PEFT's use_dora)")
    lora.add_argument("--merge-lora", action="store_true", help="save the merged model instead of the PEFT adapter")
    parser.set_defaults(finetune_defaults=defaults)


def comma_list(text: str) -> list[str]:
    """The comma-separated names of an option's `text`, stripped, the empty ones dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def number(text: str) -> float:
    """A number as PEFT's adapter_config.json holds lora_alpha: an int when whole, else a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FinetuneConfig:
    """The `FinetuneConfig` that `add_finetune_args` options describe; a LoRA option given without --lora is a
    usage error."""
    refuse_ignored(parser, args, "without --lora", *LORA_OPTIONS, active=not args.lora)
    lora = {name: getattr(args, name) for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_dora")
            if getattr(args, name) is not None}
    if args.lora_targets is not None:
        targets = comma_list(args.lora_targets)
        # apply_lora takes "all-linear" as the bare string, not as a module name in a list
        lora["lora_targets"] = "all-linear" if targets == ["all-linear"] else targets
    return replace(args.finetune_defaults, lr=args.lr, batch_size=args.batch_size,
                   grad_accum_steps=args.grad_accum_steps, epochs=args.epochs, weight_decay=args.weight_decay,
                   warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, max_length=args.max_length,
                   seed=args.seed, device=args.device, dtype=args.dtype, lora=args.lora, merge_lora=args.merge_lora,
                   label_smoothing=args.label_smoothing, log_grad_norms=args.log_grad_norms, **lora)
