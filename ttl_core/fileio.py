"""Crash-safe file writing: write `name.tmp`, flush and fsync, then rename over `name`.

A reader (or a run resumed after SIGKILL) therefore sees either the previous complete file or the new
complete file, never a torn one. Also: JSON reading with errors that name the file (and line)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from safetensors import SafetensorError

from .errors import DataError

_JSON_BLANK = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values


def fsync_dir(directory: Path) -> None:
    """Persist a rename by syncing the directory entry (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """This process's umask. Linux shows it in /proc; elsewhere it can only be swapped out and back
    (`os.umask`), and a file another thread creates meanwhile gets the stricter 0o077, never a looser mask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it into place atomically, readable as any file
    the process creates (safetensors writes its files owner-only, so colleagues on a shared machine could not
    load a checkpoint's weights though they could read the rest). A write that fails in torch or safetensors is
    an `OSError` naming `path`, as one in Python's own file calls is."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            write(tmp)
        except (RuntimeError, SafetensorError) as e:
            # torch.save and safetensors report a write that failed (a full disk, a file-size limit) as errors
            # of their own, torch's without the cause ("unexpected pos 704 vs 598"): the free space tells
            free = shutil.disk_usage(path.parent).free / 2**20
            raise OSError(errno.EIO, f"write failed ({(str(e) or type(e).__name__).splitlines()[0]}; "
                                     f"{free:,.0f} MiB free on its file system)", str(path)) from e
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks (a checkpoint's files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, error: type[Exception], expect: type = dict) -> Any:
    """The JSON document at `path`, which must be an `expect` (an object unless told): an unreadable or
    malformed file, or a document of another kind, raises `error` with a one-line message naming the file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read JSON ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, expect):
        kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise error(f"{path}: expected a JSON {kind}, got {type(document).__name__}")
    return document


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON, in UTF-8 whatever the locale (transformers and `read_json` read
    UTF-8). A lone surrogate (a path holding a byte that is not UTF-8) is written as its JSON escape, which
    reads back as the same string."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(partial_dir)` to fill a hidden `.name.partial` directory, then swap it in for `path`, so
    a crash leaves either the previous complete directory or the new one (a rename of the old one to
    `.name.old` precedes the swap; only the instant between the two renames has neither in place)."""
    path = Path(path)
    partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    for stale in (partial, old):
        remove_path(stale)
    partial.mkdir(parents=True)
    try:
        write(partial)
    except BaseException:
        remove_path(partial)  # the space a failed write took (a full disk) is given back
        raise
    fsync_dir(partial)
    if path.exists() or path.is_symlink():  # a link to a missing target does not exist, yet is in the way
        os.replace(path, old)
    os.replace(partial, path)
    fsync_dir(path.parent)
    remove_path(old)
    return path


def remove_dir_atomically(path: str | os.PathLike) -> None:
    """Delete the directory `path` so that a crash midway leaves none of it under its own name: it is renamed
    to the hidden `.name.old` first, then deleted (`write_dir_atomically` clears a `.name.old` left behind)."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    remove_path(old)
    os.replace(path, old)
    fsync_dir(path.parent)
    remove_path(old)


def remove_path(path: Path) -> None:
    """Delete `path` if it is there, a directory tree or a file: a file at `path` (say a stray file named
    `best`) becomes the `.old` of the swap, and a `.old` file left would make every later swap fail."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def json_objects(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; malformed JSON or a line that is
    not an object raises DataError naming the file and line."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: malformed JSON ({e.msg})") from None
        yield number, _json_object(path, number, record, "per line")


def json_array_objects(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each element of a JSON text that is one top-level array of objects (as
    Alpaca-PTBR ships), the number being the line where the element starts. The array is read element by
    element, so malformed JSON or an element that is not an object raises DataError naming the file and the
    line where that element starts (and, for malformed JSON, the line where reading stopped)."""
    decoder, blank = json.JSONDecoder(), _JSON_BLANK
    number, counted = 1, 0  # the line number at offset `counted`: lines are counted once, as reading advances

    def line_at(offset: int) -> int:
        nonlocal number, counted
        number += text.count("\n", counted, offset)
        counted = offset
        return number

    pos = blank.match(text).end()
    if text[pos:pos + 1] != "[":
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON array of objects")
    pos = blank.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    if closed:  # an empty array
        pos = blank.match(text, pos + 1).end()
    while not closed:
        start = line_at(pos)
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{start}: malformed JSON in the array element starting on this line ({e.msg} "
                            f"on line {e.lineno})") from None
        yield start, _json_object(path, start, record, "per array element")
        pos = blank.match(text, end).end()
        if text[pos:pos + 1] not in (",", "]"):
            raise DataError(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' after an array element)")
        closed = text[pos] == "]"
        pos = blank.match(text, pos + 1).end()
    if pos < len(text):
        raise DataError(f"{path}:{line_at(pos)}: malformed JSON (text after the top-level array)")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a valid pair decodes to one character outside this range


def refuse_lone_surrogate(path: Path, number: int, field: str, text: str) -> str:
    """`text`, the string `field` of a JSON record on line `number` of `path`. JSON escapes allow half a UTF-16
    pair ("\\ud83d" alone), which no text holds and which a tokenizer would refuse without naming the file: a
    DataError names file, line, field and character."""
    if lone := LONE_SURROGATE.search(text):
        raise DataError(f"{path}:{number}: {field!r} holds a lone surrogate {lone.group()!r} at character "
                        f"{lone.start()} (half an escaped UTF-16 pair)")
    return text


def _json_object(path: Path, number: int, record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object {where}, got {type(record).__name__}")
    return record
