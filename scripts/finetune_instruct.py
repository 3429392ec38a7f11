"""Instruction-tune a causal LM on instruction/response pairs in the Aira or Alpaca-PTBR chat format.

  python scripts/finetune_instruct.py --model BASE_DIR [--data FILE.jsonl] [--format aira|alpaca]
      [--eval FILE.jsonl] [--train-on-inputs] [--no-lora | --merge-lora] [--out DIR]

Instruction files are JSON lines, a .json array of objects (as Alpaca-PTBR ships) or CSV/TSV. Records hold
`instruction` (or `prompt`), an optional `input`, and `output` (or `response`/`completion`); the default data
is the bundled set of Portuguese pairs. The loss covers the response only unless --train-on-inputs. Aira's
special tokens are added (and the embeddings resized) when the model lacks them. LoRA is on by default (r 8,
alpha 16, dropout 0.05 on q_proj/v_proj); OUT/best then holds a PEFT adapter plus the tokenizer, or the
merged model with --merge-lora, or the full model with --no-lora. Where the attention backend runs packed
sequences (flash-attn, or TTL_ATTENTION=triton), each batch is its examples end to end in one row, without padding.
"""

from __future__ import annotations

import argparse

from ttl_core.cli import given_path, refuse_to_replace, run_cli
from ttl_core.finetune import RUN_OUTPUTS, SAMPLE_DATA
from ttl_core.finetune_args import add_finetune_args, config_from_args
from ttl_core.instruct import INSTRUCT_DEFAULTS, finetune_instruct
from ttl_core.chat_format import CHAT_FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=given_path,
                        help="base causal-LM checkpoint directory (weights + tokenizer)")
    parser.add_argument("--data", type=given_path, default=str(SAMPLE_DATA / "instrucoes_pt.jsonl"),
                        help="instruction file (default: the bundled Portuguese pairs)")
    parser.add_argument("--eval", type=given_path,
                        help="held-out instruction file; keeps the epoch with the lowest eval loss (default: "
                             "none, the last epoch is kept)")
    parser.add_argument("--format", default="aira", choices=list(CHAT_FORMATS), help="default %(default)s")
    parser.add_argument("--train-on-inputs", action="store_true", help="also compute the loss on the prompt")
    parser.add_argument("--out", type=given_path, default="runs/finetune-instruct",
                        help="output directory (default %(default)s)")
    add_finetune_args(parser, INSTRUCT_DEFAULTS)
    args = parser.parse_args(argv)
    refuse_to_replace(args.out, RUN_OUTPUTS, "a fine-tuning run's results", args.overwrite)
    summary = finetune_instruct(args.model, args.data, args.out, args.format, config_from_args(parser, args),
                                eval_file=args.eval, train_on_inputs=args.train_on_inputs)
    added = f"; added tokens {', '.join(summary['added_tokens'])}" if summary["added_tokens"] else ""
    print(f"{summary['train_examples']} examples, final training loss {summary['final_loss']:.4f}{added}; "
          f"saved to {args.out}/best")
    return 0


if __name__ == "__main__":
    run_cli(main)
