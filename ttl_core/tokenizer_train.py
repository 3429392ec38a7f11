"""Training a TeenyTinyLlama-style sentencepiece BPE tokenizer on documents or corpus files (`train_tokenizer`);
`ttl_core.tokenizer.Tokenizer` reads and uses the result."""

from __future__ import annotations

import io
import itertools
import math
import os
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .config import SIZE_LIMIT
from .documents import read_documents, refuse_repeated
from .errors import DataError, TokenizerError, is_integer, noting_failure
from .tokenizer import INPUT_SUFFIXES, Tokenizer, checked_utf8

TRAIN_INPUT_BYTES = 1 << 30  # text train_tokenizer reads at most: sentencepiece needs ~3x its size in memory
TRAIN_INPUT_SENTENCES = 2_000_000  # and documents (or pieces of long ones)


def train_tokenizer(inputs: Iterable[str] | str | os.PathLike | list, out: str | os.PathLike | None, vocab_size: int,
                    max_sentence_length: int = 1 << 16, num_threads: int | None = None,
                    input_sentence_size: int = TRAIN_INPUT_SENTENCES,
                    input_bytes: int = TRAIN_INPUT_BYTES) -> Tokenizer:
    """Train a TeenyTinyLlama-style sentencepiece BPE tokenizer; write `out` (`.model` added if missing).

    `inputs` is an input file of `ttl_core.data.read_documents` (.txt, .jsonl, .parquet), a list of them, or an iterable
    of strings (documents); the first item decides which (see `_is_path`), and every path must then exist, each named
    once. Only the first `input_sentence_size` documents (a long one counts once per piece it is cut into, see
    `_sentences`), `input_bytes` of text at most, are read. Settings follow TeenyTinyLlama's: `<unk>` `<s>` `</s>`
    `<pad>` = 0..3, byte fallback (no text is ever unknown), identity normalization with whitespace kept as is, digits
    split, whitespace-only pieces allowed. A vocabulary too large or too small for the text raises TokenizerError with
    the size that fits."""
    from .data import usable_cpus  # deferred: data imports this module
    if not valid_vocab_size(vocab_size):
        raise TokenizerError(f"vocab_size must be an integer in [4, 2**31), got {vocab_size!r}")
    # sentencepiece reads max_sentence_length and num_threads as int32s, input_sentence_size as islice's stop; a line
    # is cut every max_sentence_length // 4 characters (of 4 UTF-8 bytes at most)
    for name, value, low, high in (("max_sentence_length", max_sentence_length, 4, SIZE_LIMIT),
                                   ("num_threads", 1 if num_threads is None else num_threads, 1, SIZE_LIMIT),
                                   ("input_sentence_size", input_sentence_size, 1, 2**63),
                                   ("input_bytes", input_bytes, 1, math.inf)):
        if not (is_integer(value) and low <= value < high):
            shown = "" if high == math.inf else f" and below 2**{high.bit_length() - 1}"
            raise TokenizerError(f"{name} must be an integer >= {low}{shown}, got {value!r}")
    if out is not None and not Path(out).parent.is_dir():  # said before the training, not after it
        raise TokenizerError(f"out {str(out)!r}: {str(Path(out).parent)!r} is not an existing folder")
    if isinstance(inputs, (str, os.PathLike)):  # one input file, never a text
        inputs = [Path(inputs)]
    items, nothing = iter(inputs), object()  # not None: a None document is reported, not dropped
    first = next(items, nothing)  # peeked to tell paths from texts without reading the rest
    items = itertools.chain([first], items) if first is not nothing else items
    if _is_path(first):
        paths = list(items)  # a few file names, never the documents
        missing = [str(p) for p in paths if not (isinstance(p, (str, os.PathLike)) and os.path.isfile(p))]
        if missing:
            raise DataError(f"train_tokenizer: no such input file {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        refuse_repeated(list(map(Path, paths)))
        texts = (t for f in paths for t in read_documents(f))
    else:
        texts = items
    # sentencepiece holds all it reads (shuffle off): input_sentence_size and input_bytes keep a corpus out of memory
    failures: list[Exception] = []  # what reading the inputs raised (a file's DataError, a document not a str)
    sentences = itertools.islice(noting_failure(_sentences(texts, max_sentence_length, input_bytes), failures),
                                 input_sentence_size)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=buffer, model_type="bpe",
            vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
            character_coverage=0.9999, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
            num_threads=num_threads or usable_cpus(), minloglevel=2)
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        detail = str(e).splitlines()[-1]
        if match := re.search(r"<= (\d+)", detail):  # sentencepiece's says its source line and assertion
            detail = f"more than the text has pieces for; the largest this text allows is {match.group(1)}"
        elif match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", detail):
            # sentencepiece's advice names its own --character_coverage, which ttl does not take
            detail = f"too few for its characters, byte pieces and special tokens; the smallest this text allows is " \
                     f"{match.group(1)}"
        elif "sentences_.empty()" in detail:
            detail = "no text to train on (no document has any but whitespace)"
        raise TokenizerError(f"cannot train a {vocab_size}-token vocabulary: {detail}") from None
    tokenizer = Tokenizer(buffer.getvalue())
    if out is not None:
        out = Path(out)
        tokenizer.save(out if out.suffix == ".model" else out.with_name(out.name + ".model"))
    return tokenizer


def valid_vocab_size(value: object) -> bool:
    """A vocabulary size sentencepiece takes (an int32, as a model's config allows) that holds the special tokens
    <unk> <s> </s> <pad> (sentencepiece's own refusal of fewer names a line of its code); a size too small for the
    byte pieces and the text's characters is sentencepiece's to refuse, with the smallest that fits."""
    return is_integer(value) and 4 <= value < SIZE_LIMIT


def _is_path(item: object) -> bool:
    """Whether a `train_tokenizer` input names a file rather than being a document's text: a path object, an
    existing file, or a word ending in an input file suffix (a mistyped path, reported rather than trained on)."""
    if isinstance(item, os.PathLike):
        return True
    return isinstance(item, str) and (os.path.isfile(item) or (item.endswith(INPUT_SUFFIXES) and not any(
        c.isspace() for c in item)))


def _sentences(texts: Iterable[str], max_bytes: int, budget: int = TRAIN_INPUT_BYTES) -> Iterable[str]:
    """Training sentences, `budget` UTF-8 bytes at most: whole documents, but sentencepiece would skip one over
    `max_bytes`, so those are cut at line breaks (and lines still too long at `max_bytes // 4` characters)."""
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"train_tokenizer: document {number} is a {type(text).__name__}, not a str")
        pieces = [text] if len(checked_utf8(text, f"document {number}")) <= max_bytes else (
            line[i:i + max_bytes // 4] for line in text.split("\n") for i in range(0, len(line), max_bytes // 4))
        for piece in filter(str.strip, pieces):
            budget -= len(piece.encode("utf-8"))
            if budget < 0:
                return
            yield piece
