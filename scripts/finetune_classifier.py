"""Fine-tune a causal LM checkpoint into a sequence classifier (or regressor) on local task files.

  python scripts/finetune_classifier.py --model BASE_DIR [--train FILE --eval FILE] [--out DIR]
      [--text-fields title,text] [--label-field label] [--labels MUNDO,ESPORTES,NEGÓCIOS,TECNOLOGIA]
      [--pair] [--regression] [--lora]

Defaults reproduce the TeenyTinyLlama-160m-AgNews recipe (lr 4e-5, batch 16, 3 epochs, weight decay 0.01,
max_length 256) on the bundled Portuguese news sample. Task files are CSV, TSV, JSON lines or a .json array
of objects. The best epoch's model goes to OUT/best: a transformers checkpoint with id2label/label2id and the
tokenizer, which `pipeline("text-classification", model="OUT/best")` loads (with --pair, give it the text
`first + "<s>" + second + "</s>"`: ttl encodes a pair as transformers encodes that string). With --lora it is
a PEFT adapter over BASE_DIR (its score head included), for `ttl_core.load_adapter` or PEFT on BASE_DIR
loaded as a classifier with the same number of labels; --merge-lora saves a full checkpoint instead. Where the
attention backend runs packed sequences (flash-attn, or TTL_ATTENTION=triton), each batch is its examples end to
end in one row, without padding.
"""

from __future__ import annotations

import argparse

from ttl_core.cli import given_path, refuse_to_replace, run_cli
from ttl_core.finetune import AGNEWS_LABELS, RUN_OUTPUTS, SAMPLE_DATA, FinetuneConfig, finetune_classifier
from ttl_core.finetune_args import add_finetune_args, comma_list, config_from_args
from ttl_core.task_files import TaskSpec


def _split(value: str | None) -> list[str] | None:
    """`comma_list` of an option's value, None where it was not given (or empty)."""
    return comma_list(value) if value else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=given_path,
                        help="base checkpoint directory (weights + tokenizer)")
    parser.add_argument("--train", type=given_path, help="training task file (default: the bundled news sample)")
    parser.add_argument("--eval", type=given_path, help="evaluation task file (default: the bundled news sample)")
    parser.add_argument("--out", type=given_path, default="runs/finetune-classifier",
                        help="output directory (default %(default)s)")
    parser.add_argument("--text-fields", default="title,text",
                        help="fields joined by a blank line into the text, or with --pair the pair's two sentences "
                             "(default %(default)s)")
    parser.add_argument("--label-field", default="label",
                        help="field holding each label: a class name (or its id, given --labels), or with "
                             "--regression a number (default %(default)s)")
    parser.add_argument("--labels", help="label names in class-id order (default: the values of the train file, "
                                         "in a classifier base's order when it names the same set, else sorted; "
                                         "the AgNews order for the bundled sample)")
    parser.add_argument("--pair", action="store_true", help="two text fields as <s> first <s> second </s>")
    parser.add_argument("--regression", action="store_true", help="one numeric label: Pearson and MSE")
    add_finetune_args(parser, FinetuneConfig())
    args = parser.parse_args(argv)
    if (args.train is None) != (args.eval is None):
        parser.error("give both --train and --eval, or neither (for the bundled sample)")
    labels = _split(args.labels)
    if args.train is None:
        args.train, args.eval = SAMPLE_DATA / "agnews_pt_train.csv", SAMPLE_DATA / "agnews_pt_eval.csv"
        labels = labels or (None if args.regression else list(AGNEWS_LABELS))
    spec = TaskSpec(_split(args.text_fields), args.label_field, args.pair, args.regression, labels)
    refuse_to_replace(args.out, RUN_OUTPUTS, "a fine-tuning run's results", args.overwrite)
    result = finetune_classifier(args.model, args.train, args.eval, args.out, spec, config_from_args(parser, args))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.best.items() if k != "epoch")
    print(f"best epoch {result.best['epoch']}: {shown}; saved to {result.checkpoint}")
    return 0


if __name__ == "__main__":
    run_cli(main)
