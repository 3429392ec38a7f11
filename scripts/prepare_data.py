"""Tokenize text files into a training data directory (train.bin, val.bin, tokenizer, meta.json).

  python scripts/prepare_data.py --input corpus/*.txt more.jsonl --out data/my_corpus [--vocab-size 4096]
  python scripts/prepare_data.py --sample --out data/sample        # the bundled Portuguese sample corpus
  python scripts/prepare_data.py --out data/my_corpus --verify    # check its token files in full (after a copy)

Inputs: .txt (documents separated by blank lines), .jsonl (a "text" field per line), .parquet (a "text"
column; needs pyarrow). A tokenizer is trained on the inputs (on 1 GiB and 2 million of their documents at most,
taken evenly from every file) unless --tokenizer gives one (a sentencepiece .model or a Hugging Face tokenizer
directory; --vocab-size then has no use and is refused). An interrupted run resumes when started again with the
same arguments; an --out already prepared from other inputs or settings is replaced only with --overwrite.
A training run checks the token files' sizes against meta.json, and their SHA-256 up to 256 MiB; --verify checks
the digests of files of any size.
"""

from __future__ import annotations

import argparse
import time

from ttl_core.cli import given_path, refuse_ignored, run_cli
from ttl_core.data import SAMPLE_CORPUS, prepare_data
from ttl_core.errors import DataError
from ttl_core.loader import verify_data

VOCAB_SIZE = 4096  # the trained tokenizer's, without --vocab-size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=given_path, nargs="+", help="text files (.txt, .jsonl, .parquet)")
    parser.add_argument("--sample", action="store_true", help="use the bundled sample corpus as input")
    parser.add_argument("--out", type=given_path, required=True,
                        help="data directory to write (with --verify: to check)")
    parser.add_argument("--vocab-size", type=int,
                        help=f"vocabulary of the trained tokenizer (default {VOCAB_SIZE}; not with --tokenizer)")
    parser.add_argument("--tokenizer", type=given_path,
                        help="use this tokenizer (.model file or HF directory) instead of training")
    parser.add_argument("--val-fraction", type=float,
                        help="share of documents held out for evaluation (default 0.1); 0 holds out none, for runs "
                             "with train.eval_every=0; 1 all, for a directory only evaluated (a [data.eval] set)")
    parser.add_argument("--workers", type=int, help="tokenizing processes (default: every core this process may use)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace data --out holds from other inputs or settings (default: refuse)")
    parser.add_argument("--verify", action="store_true",
                        help="prepare nothing: check --out's token files against the sizes and SHA-256 digests its "
                             "meta.json records, whatever their size")
    args = parser.parse_args(argv)
    refuse_ignored(parser, args, "--tokenizer", "--vocab-size")
    refuse_ignored(parser, args, "--verify", "--input", "--sample", "--tokenizer", "--vocab-size", "--val-fraction",
                   "--workers", "--overwrite")
    if args.verify:
        digests = verify_data(args.out)
        print(f"{args.out}: train.bin and val.bin match meta.json "
              f"({'size and SHA-256' if digests else 'size only: an older meta.json records no digests'})")
        return 0
    inputs = (args.input or []) + (SAMPLE_CORPUS if args.sample else [])
    if not inputs:
        raise DataError("no input: give --input FILES... or --sample")
    start = time.perf_counter()
    vocab_size = VOCAB_SIZE if args.vocab_size is None else args.vocab_size  # 0 is refused there, not defaulted
    val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    meta = prepare_data(inputs, args.out, vocab_size=vocab_size, tokenizer=args.tokenizer, val_fraction=val_fraction,
                        workers=args.workers, replace=args.overwrite)
    print(f"wrote {args.out}: {meta['documents']:,} documents, {meta['train_tokens']:,} train + "
          f"{meta['val_tokens']:,} val tokens ({meta['dtype']}), vocab {meta['vocab_size']:,}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
