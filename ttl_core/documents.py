"""Corpus files -> documents, the texts `ttl_core.data.prepare_data` tokenizes and a tokenizer trains on: the
blank-line-separated blocks of a `.txt`, the `text` field of each `.jsonl` line, the `text` column of a `.parquet`.
Bad input raises DataError naming the file and line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import DataError
from .fileio import json_objects, refuse_lone_surrogate
from .tokenizer import INPUT_SUFFIXES

_CHUNK_LINES = 1024  # lines of a .txt document joined into one string as they are read (see _read_txt)


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of one input file: blank-line-separated blocks of a `.txt`, the `text` field of each
    `.jsonl` line, the `text` column of a `.parquet` (needs pyarrow). Bad input raises DataError naming the file
    and line; a file without any document is an error too."""
    found = False
    for doc in _documents_of(Path(path)):
        found = True
        yield doc
    if not found:
        raise _no_documents([Path(path)])


def refuse_repeated(paths: list[Path]) -> None:
    """Refuse a file named twice (overlapping globs): its documents would be trained on twice (and held out as
    copies by prepare_data)."""
    first_names = {}
    for path in paths:
        if path.resolve() in first_names:
            raise DataError(f"{first_names[path.resolve()]} is given twice (also as {path}): give each input once")
        first_names[path.resolve()] = path


def count_documents(paths: list[Path]) -> list[int]:
    """The number of documents in each file, as `read_documents` reads them, a file named twice refused
    (`refuse_repeated`). Files without any document are named together: a large corpus may hold many, and naming
    one at a time would take a full read per file."""
    refuse_repeated(paths)
    counts = [sum(1 for _ in _documents_of(p)) for p in paths]
    empty = [p for p, n in zip(paths, counts) if n == 0]
    if empty:
        raise _no_documents(empty)
    return counts


def _no_documents(paths: list[Path], shown: int = 5) -> DataError:
    others, more = ", ".join(map(str, paths[1:shown])), len(paths) - shown
    also = f"; also empty: {others}{f' and {more} more' if more > 0 else ''}" if others else ""
    return DataError(f"{paths[0]}: empty input (no documents){also}")


def _documents_of(path: Path) -> Iterator[str]:
    if path.is_dir():  # else refused as a file of type '' (or as no such file, when named like one)
        raise DataError(f"{path}: a directory; give the files in it (e.g. {path}/*.txt)")
    if path.suffix not in INPUT_SUFFIXES:
        raise DataError(f"{path}: unsupported input type {path.suffix!r}; expected {', '.join(INPUT_SUFFIXES)}")
    if not path.is_file():  # inputs are read more than once (counted, sampled, tokenized): no pipe will do
        raise DataError(f"{path}: not a regular file (a pipe or device)" if path.exists() else f"{path}: no such file")
    return {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix](path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:  # a byte order mark (editors on Windows write one) is no part of the text
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (bad byte at offset {e.start} of the line)") from None


def _read_txt(path: Path) -> Iterator[str]:
    # a .txt without blank lines is one document: its lines are joined in chunks as they come, since a line kept as a
    # string of its own costs ~50 bytes beside its text (a 60 MB document read as 600,000 lines took 1.5 times its
    # size, then as much again to join)
    chunks: list[str] = []
    lines: list[str] = []
    for _, line in _lines(path):
        if line.strip():  # a Windows line end is a line end (as in Python's text mode), not a "\r" token
            lines.append(line.removesuffix("\r\n") + "\n" if line.endswith("\r\n") else line)
            if len(lines) == _CHUNK_LINES:
                chunks.append("".join(lines))
                lines.clear()
        elif lines or chunks:
            yield _document(chunks, lines)
    if lines or chunks:
        yield _document(chunks, lines)


def _document(chunks: list[str], lines: list[str]) -> str:
    """The text of a block read as `chunks` then `lines`, which it empties, so that they do not stay alive beside it
    while it is tokenized. The last line's end goes before joining: the text is built once, not copied to strip it."""
    if lines:
        lines[-1] = lines[-1].rstrip("\r\n")  # any line of a block holds more than line ends
    else:
        chunks[-1] = chunks[-1].rstrip("\r\n")
    text = "".join(chunks + lines)
    chunks.clear()
    lines.clear()
    return text


def _read_jsonl(path: Path) -> Iterator[str]:
    for number, record in json_objects(path, _lines(path)):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: no string 'text' field")
        refuse_lone_surrogate(path, number, "text", record["text"])
        if record["text"].strip():  # whitespace only is no document, as a blank .txt block is none
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column")
        row = 0
        for batch in table.iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: row {row}: 'text' is {type(text).__name__}, expected a string")
                if text and text.strip():  # null and whitespace-only rows are no documents
                    yield text
    except (pa.ArrowException, OSError) as e:  # a corrupt or truncated file
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
