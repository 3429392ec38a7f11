"""Convert checkpoints between the Hugging Face layout and ttl's native one, optionally changing dtype.

  python scripts/convert.py --from-hf HF_DIR OUT_DIR [--dtype bfloat16]
  python scripts/convert.py --to-hf SRC_DIR OUT_DIR [--dtype float32] [--max-shard-size 2GB]

Either direction reads both layouts; only safetensors are ever read. The source's tokenizer (tokenizer.model
or tokenizer.json) is written beside the weights in transformers' files, so the output is a whole checkpoint;
one ttl cannot read is left out with a note. OUT_DIR must not be the source, and one that already holds a checkpoint
is replaced only with --overwrite: its config goes first and the new one is written last, so a conversion killed
midway leaves a directory every loader refuses, never new weights under the old config.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ttl_core.cli import given_path, refuse_to_replace, run_cli
from ttl_core.errors import ConfigError, TokenizerError
from ttl_core.hf import DTYPES, NATIVE_CONFIG, load_pretrained, save_native, save_pretrained, withdraw_configs
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
    out = Path(args.out)
    # samefile also sees a case-insensitive or bind-mounted alias
    if out.exists() and Path(args.src).exists() and os.path.samefile(out, args.src):
        raise ConfigError(f"{out} is the source checkpoint; write to another directory (then move it over the source "
                          "if you want it there)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a directory to write the checkpoint to")
    replacing = refuse_to_replace(out, CHECKPOINT_FILES, "a checkpoint", args.overwrite)
    model = load_pretrained(args.src, dtype=args.dtype)
    tokenizer = source_tokenizer(args.src)
    withdraw_configs(out)  # before the old tokenizer goes: until the new config, no loader takes the directory
    if tokenizer is None and replacing:
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        replace_chat_template_files(out, None)
    if args.to_hf:
        save_pretrained(model, out, max_shard_size=args.max_shard_size, tokenizer=tokenizer)
    else:
        if tokenizer is not None:  # before the weights, whose config comes last
            tokenizer.save_pretrained(out, model.config.max_position_embeddings)
        save_native(model, out, max_shard_size=args.max_shard_size)
    params = model.num_parameters()
    print(f"wrote {model.architecture} ({params:,} parameters, {model.backbone.embed.weight.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
