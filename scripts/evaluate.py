"""Held-out loss and perplexity of a causal LM (a ttl or Hugging Face checkpoint, or a PEFT adapter) on a prepared
data split or on text files.

  python scripts/evaluate.py --model DIR --data DATA_DIR [--split val]
  python scripts/evaluate.py --model DIR --text held_out.txt [more.jsonl ...]
  python scripts/evaluate.py --model DIR --data DATA_DIR --seq-len 2048 --stride 512 --json results.json
  python scripts/evaluate.py --model DIR --data DATA_DIR --seq-len 8192 --by-position --plot by_position.png

The split's documents are read as the model trained on them, `<s>` ids `</s>` end to end; text files (.txt with
blank-line-separated documents, .jsonl, .parquet, as scripts/prepare_data.py reads them) are first tokenized that
way with the model's tokenizer. Windows of --seq-len tokens (default: the model's context) start every --stride
tokens (default: --seq-len, the training loop's evaluation, every token scored once in disjoint blocks; a smaller
stride gives each token at least seq_len - stride tokens of context); each token after the first is scored once.
--document-masking keeps each document's attention within itself (positions from 0, its `<s>` not scored), as a run
with data.document_masking trained. Prints the tokens scored, the mean loss (nats per token) and the perplexity,
exp(loss); for text files scored whole (no --max-tokens) also bits per byte: every scored token's nats (`</s>`
included) over ln 2 and the documents' UTF-8 bytes, a figure comparable across tokenizers.
--by-position also reports them by the context each token was predicted from (the window's tokens before it, 1 to
--seq-len; with --document-masking its own document's only), in buckets 1, 2, 3-4, 5-8, ... (log2, the default) or
N of equal width; with a stride below --seq-len, contexts up to seq_len - stride come only from the stream's first
window (and, with --document-masking, documents' starts). --plot draws them (needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from ttl_core.cli import add_model_options, given_path, load_causal_lm, model_tokenizer_dir, output_file, run_cli
from ttl_core.data import prepare_data
from ttl_core.documents import read_documents
from ttl_core.errors import ConfigError
from ttl_core.fileio import write_json
from ttl_core.evaluate import StreamLoss, plot_by_position, split_tokens, stream_loss
from ttl_core.metrics import pyplot
from ttl_core.tokenizer import Tokenizer, check_same_tokenizer


def bucket_count(text: str) -> str | int:
    """--by-position's argparse type: "log2" or a number of buckets (its range is checked against the window)."""
    if text == "log2":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected log2 or a number of buckets, got {text!r}") from None


def print_by_position(result: StreamLoss) -> None:
    """The loss and perplexity of each bucket of context positions, one line a bucket ("-" where it is empty)."""
    print(f"{'context':>13} {'tokens':>12} {'loss':>8} {'perplexity':>12}")
    for first, last, bucket in result.by_position:
        figures = f"{bucket.loss:8.4f} {bucket.perplexity:12.4f}" if bucket.tokens else f"{'-':>8} {'-':>12}"
        print(f"{first if first == last else f'{first}-{last}':>13} {bucket.tokens:>12,} {figures}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=given_path, help="prepared data directory (scripts/prepare_data.py)")
    source.add_argument("--text", type=given_path, nargs="+", help="text files to tokenize with the model's tokenizer")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="split of --data (default val)")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: --seq-len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="score only the stream's first N tokens")
    parser.add_argument("--document-masking", action="store_true",
                        help="attend within each document only, as a run with data.document_masking trained")
    parser.add_argument("--by-position", nargs="?", const="log2", type=bucket_count, metavar="log2|N",
                        help="also report the loss by context length, in doubling buckets (log2, the default) or N "
                             "equal-width ones")
    parser.add_argument("--plot", type=output_file, metavar="FILE.png",
                        help="draw the loss by context length (--by-position's buckets, log2 by default) to FILE.png")
    parser.add_argument("--json", type=output_file, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.plot and args.by_position is None:
        args.by_position = "log2"
    if args.text is not None and args.split != "val":
        parser.error("--split chooses a split of --data; --text is evaluated whole")
    for name in ("seq_len", "stride", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "max_tokens" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'max_tokens' else 1}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plt = args.plot and pyplot(f"plot {args.plot}")  # a missing matplotlib is noted before the evaluation, not after it
    tokenizer_dir = model_tokenizer_dir(args.model, args.base)
    with tempfile.TemporaryDirectory() as scratch:
        if args.text:
            data_dir, split = Path(scratch), "train"
            prepare_data(args.text, data_dir, tokenizer=tokenizer_dir, val_fraction=0.0)
            text_bytes = sum(len(doc.encode("utf-8")) for path in args.text for doc in read_documents(path))
        else:
            data_dir, split, text_bytes = Path(args.data), args.split, None
            if (data_dir / "tokenizer.model").is_file():
                check_same_tokenizer(Path(tokenizer_dir), Tokenizer.from_pretrained(data_dir), data_dir, False)
        tokens, meta = split_tokens(data_dir, split)
        model = load_causal_lm(args, "evaluation")
        seq_len = args.seq_len or model.config.max_position_embeddings
        if args.stride is not None and args.stride > seq_len:
            raise ConfigError(f"--stride {args.stride} is longer than the window (--seq-len {seq_len}): tokens "
                              f"between windows would never be scored")
        documents = (meta.get("bos_id"), meta["eos_id"]) if args.document_masking else None  # bos_id is optional
        result = stream_loss(model, tokens[:args.max_tokens], seq_len, args.stride, args.batch_size, documents,
                             progress=True, by_position=args.by_position)
    figures = {"model": args.model, "data": args.data or args.text, "split": split if args.data else None,
               "seq_len": seq_len, "stride": args.stride or seq_len, "document_masking": args.document_masking,
               "tokens": result.tokens,
               "loss": result.loss, "perplexity": result.perplexity}
    if text_bytes and args.max_tokens is None:  # the bytes are the whole text's
        figures["bits_per_byte"] = result.nll / math.log(2) / text_bytes
    for key in ("tokens", "loss", "perplexity", "bits_per_byte"):
        if key in figures:
            value = figures[key]
            print(f"{key:>13}: {value:,}" if key == "tokens" else f"{key:>13}: {value:.4f}")
    if result.by_position:
        print_by_position(result)
        figures["by_position"] = [{"context_from": first, "context_to": last, "tokens": bucket.tokens,
                                   **{key: getattr(bucket, key) if bucket.tokens else None
                                      for key in ("loss", "perplexity")}}
                                  for first, last, bucket in result.by_position]
    if plt:
        original = (model.config.rope_scaling or {}).get("original_max_position_embeddings")
        plot_by_position(plt, result, args.plot, f"{Path(args.model).name}: seq_len {seq_len}, stride "
                         f"{figures['stride']}", original)
    if args.json:
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    run_cli(main)
