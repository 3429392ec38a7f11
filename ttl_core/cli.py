"""What every script shares: user errors become one `error: ...` line and exit status 2, and ttl's own warnings
(UserWarning) one `warning: ...` line; outputs are checked before the work (a report file that cannot be
written, a directory holding an earlier run's results)."""

from __future__ import annotations

import argparse
import codecs
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from ttl_kernels.dispatch import BackendError

from .errors import ConfigError, TTLError
from .hf import DTYPES, checked_device, load_pretrained
from .lora_files import adapter_base, is_adapter_dir, load_with_adapter
from .model import LlamaForCausalLM

_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A UserWarning (what ttl warns with) as one line: the source line that raised it says nothing to a
    script's user. Other categories (deprecations in a library, say) keep Python's form, for their authors."""
    if category is UserWarning:
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def given_path(text: str) -> str:
    """An argparse type for a path: an empty one (an unset shell variable, as in --data "$DATA") is a usage error,
    where it would stand for the current directory, or for the option left out (the bundled sample data)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?); give a file or directory")
    return text


def output_file(text: str) -> str:
    """An argparse type for a file a script writes when its work is done (a report's --json): a directory, or a
    file in a folder that does not exist, is a usage error at once rather than after the work it was to record."""
    path = Path(given_path(text))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {path.parent}")
    return text


def refuse_ignored(parser: argparse.ArgumentParser, args: argparse.Namespace, option: str, *ignored: str,
                   active: bool | None = None) -> None:
    """A usage error when `option` is on and one of the `ignored` options, which it makes irrelevant, was given:
    ignored in silence, it would seem to have taken effect. With `active` given, `option` instead names the
    condition it tells ("without --lora"). Each of `ignored` defaults to None (or False), so that an option given
    is told from one left at its default."""
    condition = f"with {option}" if active is None else option
    if getattr(args, option.lstrip("-").replace("-", "_")) if active is None else active:
        for name in ignored:
            value = getattr(args, name.lstrip("-").replace("-", "_"))
            if value is not None and value is not False:  # not `in (None, False)`: 0 == False, and 0 was given
                parser.error(f"{name} has no effect {condition}")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --base, --device and --dtype: the causal LM a script runs, as `load_causal_lm` loads it."""
    parser.add_argument("--model", required=True, type=given_path,
                        help="checkpoint directory (ttl or Hugging Face layout) or PEFT adapter directory")
    parser.add_argument("--base", type=given_path,
                        help="base model directory of an adapter --model (default: the one it names)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")


def load_causal_lm(args: argparse.Namespace, purpose: str, error: type[TTLError] = ConfigError) -> LlamaForCausalLM:
    """The model `add_model_options`' arguments name: a checkpoint, or a PEFT adapter merged into its base; anything
    but a causal LM is an `error` naming the `purpose` it cannot serve."""
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = checked_device(auto_device if args.device == "auto" else args.device)
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    if is_adapter_dir(args.model):
        model = load_with_adapter(args.model, base=args.base, dtype=dtype, device=device)
    elif args.base is not None:
        raise error(f"--base is for an adapter --model; {args.model} holds no adapter_config.json")
    else:
        model = load_pretrained(args.model, dtype=dtype, device=device)
    if not isinstance(model, LlamaForCausalLM):
        raise error(f"{args.model} holds a {model.architecture}; {purpose} needs a LlamaForCausalLM")
    return model


def model_tokenizer_dir(model: str | Path, base: str | Path | None = None) -> str | Path:
    """The tokenizer a --model comes with: its own, else, for an adapter saved without one (as PEFT saves them),
    its base's (`base`, or the one the adapter names)."""
    has_own = any((Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    return model if has_own or not is_adapter_dir(model) else adapter_base(model, base)


def refuse_to_replace(out: str | Path, contents: tuple[str, ...], what: str, overwrite: bool) -> bool:
    """A ConfigError when `out` already holds one of `contents` (an earlier run's, a checkpoint's) and the user
    did not pass --overwrite: a rerun into the same directory would otherwise replace it without a word. Returns
    whether `out` holds any (which --overwrite then replaces)."""
    found = [name for name in contents if (Path(out) / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{out} already holds {what} ({found[0]}); pass --overwrite to replace it, or choose "
                          "another output directory")
    return bool(found)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)` and exit with its status. A `TTLError` (or a kernel backend that cannot
    run) prints one line, no traceback; so does a file-system error (an output path that is a file, a
    directory given for a file, a full disk), which names the path; and so does a UserWarning. Text stdout's
    locale cannot encode (an answer, a sample, under an ASCII locale) is written with Python's escapes, as
    stderr's is, rather than raise after the work is done."""
    if hasattr(sys.stdout, "reconfigure") and codecs.lookup(sys.stdout.encoding).name != "utf-8":
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            status = main(argv)
    except (TTLError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # a failed rename names its destination second: the path the user gave, not the temporary written first
        path = e.filename2 or e.filename
        reason = e.strerror or e
        # mkdir's "File exists" reads as if the output were there already, and "Not a directory" names a path
        # made inside a file given for a directory (prepare_data's OUT/.prepare) rather than that file
        file = path and next((p for p in (Path(path), *Path(path).parents) if p.is_file()), None)
        if isinstance(e, (FileExistsError, NotADirectoryError)) and file:
            path, reason = file, "a file, not a directory"
        print(f"error: {path or ''}{': ' if path else ''}{reason}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)
