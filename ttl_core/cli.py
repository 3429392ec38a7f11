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

from ttl_kernels.dispatch import BackendError

from .errors import ConfigError, TTLError

_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A UserWarning (what ttl warns with) as one line: the source line that raised it says nothing to a
    script's user. Other categories (deprecations in a library, say) keep Python's form, for their authors."""
    if category is UserWarning:
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def output_file(text: str) -> str:
    """An argparse type for a file a script writes when its work is done (a report's --json): a directory, or a
    file in a folder that does not exist, is a usage error at once rather than after the work it was to record."""
    path = Path(text)
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
