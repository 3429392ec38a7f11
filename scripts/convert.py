"""Convert checkpoints between the Hugging Face layout and ttl's native one, optionally changing dtype.

  python scripts/convert.py --from-hf HF_DIR OUT_DIR [--dtype bfloat16]
  python scripts/convert.py --to-hf SRC_DIR OUT_DIR [--dtype float32] [--max-shard-size 2GB]

Either direction reads both layouts; only safetensors are ever read. The source's tokenizer (tokenizer.model
or tokenizer.json) is written beside the weights in transformers' files, so the output is a whole checkpoint;
one ttl cannot read is left out with a note. OUT_DIR must not be the source (it is written file by file), and
one that already holds a checkpoint is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ttl_core.cli import given_path, refuse_to_replace, run_cli
from ttl_core.errors import ConfigError, TokenizerError
from ttl_core.hf import DTYPES, NATIVE_CONFIG, load_pretrained, save_native, save_pretrained
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_config import replace_chat_template_files

# what marks a directory as a checkpoint already (either layout)
CHECKPOINT_FILES = ("config.json", NATIVE_CONFIG, "model.safetensors", "model.safetensors.index.json")
# a tokenizer's files as ttl and transformers write them (chat templates apart): those of a checkpoint replaced
# by one without a tokenizer would pass for the new weights' tokenizer
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def source_tokenizer(src: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None (with a note) when it has none or one ttl does not read."""
    if not any((Path(src) / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        return None
    try:
        return Tokenizer.from_pretrained(src)
    except TokenizerError as e:
        print(f"note: the tokenizer is not copied ({e})")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", action="store_true", help="write ttl's native layout")
    direction.add_argument("--to-hf", action="store_true", help="write a transformers-loadable directory")
    parser.add_argument("src", type=given_path, help="checkpoint directory to read")
    parser.add_argument("out", type=given_path, help="directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="convert weights (default: keep)")
    parser.add_argument("--max-shard-size", default="2GB", help="shard above this size (default 2GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a checkpoint OUT already holds (default: refuse)")
    args = parser.parse_args(argv)
    # files are replaced one by one, not the directory; samefile also sees a case-insensitive or bind-mounted alias
    if Path(args.out).exists() and Path(args.src).exists() and os.path.samefile(args.out, args.src):
        raise ConfigError(f"{args.out} is the source checkpoint; write to another directory (a conversion in place "
                          "that is interrupted leaves neither layout loadable)")
    replacing = refuse_to_replace(args.out, CHECKPOINT_FILES, "a checkpoint", args.overwrite)
    model = load_pretrained(args.src, dtype=args.dtype)
    tokenizer = source_tokenizer(args.src)
    if args.to_hf:
        save_pretrained(model, args.out, max_shard_size=args.max_shard_size, tokenizer=tokenizer)
    else:
        save_native(model, args.out, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out, model.config.max_position_embeddings)
    if tokenizer is None and replacing:
        for name in TOKENIZER_FILES:
            (Path(args.out) / name).unlink(missing_ok=True)
        replace_chat_template_files(Path(args.out), None)
    params = model.num_parameters()
    print(f"wrote {model.architecture} ({params:,} parameters, {model.backbone.embed.weight.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
