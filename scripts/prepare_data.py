"""Tokenize text into a prepared data directory for scripts/pretrain.py.

  python scripts/prepare_data.py --input corpus/*.txt more.jsonl --out data/pt --vocab-size 32000

Inputs: .txt (documents separated by blank lines), .jsonl (a `text` field per line), .parquet (a `text`
column; needs pyarrow). Trains a TeenyTinyLlama-style BPE tokenizer unless --tokenizer is given. Writes
train.bin / val.bin (documents as BOS ... EOS), the tokenizer files and meta.json. An interrupted run
continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json

from ttl_core.cli import run_cli
from ttl_core.data import prepare_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text files (.txt, .jsonl, .parquet)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=32000, help="tokenizer size when training one (default 32000)")
    parser.add_argument("--tokenizer", help="use this tokenizer (.model file or HF tokenizer directory) instead of training")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    parser.add_argument("--workers", type=int, help="tokenizing processes (default: the CPU count, at most 8)")
    args = parser.parse_args(argv)
    meta = prepare_data(args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                        val_fraction=args.val_fraction, workers=args.workers)
    print(json.dumps({k: meta[k] for k in ("vocab_size", "documents", "train_tokens", "val_tokens", "dtype")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
