"""Labelled task files for fine-tuning: CSV, TSV, JSON lines or a JSON array in (no pandas), token ids and
labels out.

The text of an example is built from one or more fields (AgNews: `title + "\\n\\n" + text`) or, for sentence
pairs as in ASSIN2, `<s>` premise `<s>` hypothesis `</s>`: the ids transformers' tokenizer gives the text
`premise + "<s>" + hypothesis + "</s>"`, which is the string to pass to the saved classifier in transformers.
Labels are names from a fixed or discovered set, integer class ids into a fixed set, or (regression) finite
numbers. Every problem is a DataError or ConfigError naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, DataError
from .fileio import json_array_objects, json_objects, refuse_lone_surrogate
from .tokenizer import Tokenizer

TASK_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class TaskSpec:
    """How to read one task file: which fields make the text, which holds the label, and the label set
    (`labels=None`: the distinct values of the training file, sorted or in a classifier base's order; see
    `finetune.label_order`)."""

    text_fields: list[str] = field(default_factory=lambda: ["title", "text"])
    label_field: str = "label"
    pair: bool = False  # two text fields as `<s>` first `<s>` second `</s>` (see encode_example)
    regression: bool = False
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        """Task lists are hand-written JSON: a string where a list belongs would be read character by character
        and "no" would count as true, so the types are checked here (ConfigError naming the key)."""
        names = lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) and x.strip() for x in v)  # noqa
        if not (names(self.text_fields) and self.text_fields):
            raise ConfigError(f"text_fields must be a non-empty list of field names, got {self.text_fields!r}")
        if not (isinstance(self.label_field, str) and self.label_field.strip()):
            raise ConfigError(f"label_field must be a field name, got {self.label_field!r}")
        for key in ("pair", "regression"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.labels is not None and not (names(self.labels) and len(set(self.labels)) == len(self.labels) >= 2):
            raise ConfigError(f"labels must be a list of at least two distinct label names (or null), "
                              f"got {self.labels!r}")
        if self.pair and len(self.text_fields) != 2:
            raise ConfigError(f"a sentence-pair task needs exactly two text fields, got {self.text_fields}")
        if self.label_field in self.text_fields:
            raise ConfigError(f"label_field {self.label_field!r} is also a text field: the model would read the label "
                              "it is to predict")
        if self.regression and self.labels is not None:
            raise ConfigError(f"labels name classes; a regression task has none, got {self.labels!r}")


Row = tuple[int, dict[str, Any]]  # (line number in the file, fields)


def read_task_file(path: str | Path) -> list[Row]:
    """The rows of a CSV (header line first), TSV or JSON-lines file, each with the line it ends on, or of a
    `.json` file holding one array of objects (its first non-blank character is `[`), each with the line it
    starts on; any other `.json` file is read as JSON lines."""
    path = Path(path)
    if path.suffix.lower() not in TASK_SUFFIXES:
        raise DataError(f"{path}: unsupported task file type; use one of {', '.join(TASK_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[Row] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows.extend(json_array_objects(path, text))
    elif path.suffix.lower() in (".jsonl", ".json"):
        # JSON lines end at "\n" only: splitlines() would also cut at U+2028 inside a string, which JSON
        # writers with ensure_ascii=False leave raw
        try:
            rows.extend(json_objects(path, enumerate(text.split("\n"), 1)))
        except DataError:
            # a pretty-printed object fails as JSON lines on its first line, but is no malformed JSON
            if path.suffix.lower() == ".json" and _is_json_object(text):
                raise DataError(f"{path}: one JSON object over several lines; a .json task file holds an array of "
                                "objects ([{...}, ...]) or one object per line") from None
            raise
    elif path.suffix.lower() == ".tsv":
        try:
            rows.extend(_csv_rows(path, text, csv.QUOTE_MINIMAL))
        except DataError as quoted:
            # many TSV files never quote: a field that merely starts with '"' ("Lula" visita Paris) is text
            try:
                rows = list(_csv_rows(path, text, csv.QUOTE_NONE))
            except DataError:
                raise quoted from None
    else:
        rows.extend(_csv_rows(path, text, csv.QUOTE_MINIMAL))
    if not rows:
        raise DataError(f"{path}: no examples (an empty file, or a header without rows)")
    return rows


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _csv_rows(path: Path, text: str, quoting: int) -> Iterator[Row]:
    """The rows of a CSV/TSV text. With quoting, newlines inside quoted fields are kept, and parsing is
    strict, so an unterminated quote is an error instead of one field swallowing the rest of the file."""
    kind = "TSV" if path.suffix.lower() == ".tsv" else "CSV"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "TSV" else ",", strict=True,
                            quoting=quoting)
    done = 0  # the line the last complete row (or the header) ended on
    # csv refuses a field over 131,072 characters unless told otherwise (a long document is no malformed file); no
    # field is longer than the text. The module-wide setting is restored once the rows are read.
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        named = [name for name in reader.fieldnames or [] if name.strip()]  # reads the header
        done = reader.line_num
        # DictReader keeps the last of two same-named columns: the other's text would be dropped without a word
        twice = next((name for name in named if named.count(name) > 1), None)
        if twice is not None:
            raise DataError(f"{path}:{done}: the header names two columns {twice!r}; rename one")
        for record in reader:
            if None in record or None in record.values():
                raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames or [])} columns in the header, "
                                f"a different number in this row")
            yield reader.line_num, record
            done = reader.line_num
    except csv.Error as e:
        hint = " (a quote opened here is never closed)" if "end of data" in str(e) else ""
        raise DataError(f"{path}:{done + 1}: malformed {kind}: {e}{hint}") from None
    finally:
        csv.field_size_limit(limit)


def field_value(path: Path, number: int, record: dict[str, Any], name: str) -> Any:
    """`record[name]`: text, or a number or bool from a JSON file. A missing field is a DataError naming the
    fields that do exist; a JSON null, list or object one naming the value (its Python text would otherwise
    become a label name like "[1]" or a text like "{'x': 1}")."""
    if name not in record:
        raise DataError(f"{path}:{number}: no field {name!r} (fields: {', '.join(map(repr, record))})")
    value = record[name]
    if value is None or isinstance(value, (list, dict)):
        kind = "null" if value is None else f"a JSON {'list' if isinstance(value, list) else 'object'}"
        raise DataError(f"{path}:{number}: field {name!r} is {kind}; expected text or a number")
    return refuse_lone_surrogate(path, number, name, value) if isinstance(value, str) else value


def encode_example(tokenizer: Tokenizer, texts: list[str], pair: bool, max_length: int) -> list[int]:
    """Token ids of one example, at most `max_length`: the text between the special tokens the tokenizer adds
    (`<s>` first, for Llama's), which stay when the text is cut, as in transformers' truncation. Several fields
    are joined by a blank line (AgNews: title, blank line, text). A sentence pair is the ids transformers'
    tokenizer gives the text `first + "<s>" + second + "</s>"` (the second sentence, following a special token,
    gets no "▁" word prefix unless the tokenizer is `legacy`), which is what a transformers user passes to the
    saved classifier to reproduce ttl's predictions. Too long a pair is cut as transformers' `longest_first` cuts
    a pair (the longer sentence loses its last token until both fit); the special tokens always stay."""
    start, end = [tokenizer.bos_id] * tokenizer.add_bos_token, [tokenizer.eos_id] * tokenizer.add_eos_token
    room = max_length - len(start) - len(end)
    specials = len(start) + len(end) + (2 if pair else 0)  # a pair's own `<s>` and `</s>` between and after
    if max_length < specials:  # transformers would return the whole text, longer than max_length
        raise ConfigError(f"max_length (--max-length) {max_length} leaves no room for "
                          f"{'a sentence pair' if pair else 'an example'}'s {specials} special tokens")
    if not pair:
        return start + tokenizer.encode("\n\n".join(texts), add_bos=False, add_eos=False)[:room] + end
    first, second = texts
    head = tokenizer.encode(first, add_bos=False, add_eos=False)
    # the second sentence is encoded after its `<s>`, as in the whole text, so it gets the "▁" prefix only where the
    # whole text would (transformers prepends one only at the start of the text, unless `legacy`); that `<s>` id is
    # then dropped
    tail = tokenizer.encode(tokenizer.id_to_token(tokenizer.bos_id) + second, add_bos=False, add_eos=False)[1:]
    while len(head) + len(tail) > room - 2:  # the longer loses a token, the second on a tie
        (head if len(head) > len(tail) else tail).pop()
    return [*start, *head, tokenizer.bos_id, *tail, tokenizer.eos_id, *end]


def _number_key(value: str) -> tuple[int, float] | None:
    """How a label that reads as a number sorts (None for a name): by value, and NaN, however spelled, as one value
    after the others. As a float, NaN equals nothing, not even itself: "nan" and "NaN" would neither sort nor show to
    be one number written two ways, as "1" and "1.0" do."""
    try:
        number = float(value)
    except ValueError:
        return None
    return (1, 0.0) if math.isnan(number) else (0, number)


def _sort_key(value: str) -> tuple[int, tuple[int, float] | str]:
    """Numbers first, in `_number_key`'s order, then names by their text."""
    number = _number_key(value)
    return (0, number) if number is not None else (1, value)


def task_labels(rows: list[Row], spec: TaskSpec, path: Path) -> list[str]:
    """The label names, index = class id: `spec.labels`, else the distinct values in `rows`, sorted
    (numerically when they are numbers)."""
    if spec.labels is not None:  # checked by TaskSpec
        return list(spec.labels)
    for number, record in rows:
        if not str(field_value(path, number, record, spec.label_field)).strip():
            raise DataError(f"{path}:{number}: empty label in field {spec.label_field!r}")
    found = sorted({str(r[spec.label_field]).strip() for _, r in rows}, key=lambda name: (_sort_key(name), name))
    # JSON's 1 and 1.0 (or a CSV's 1 and 01) are one value that would make two classes
    same = next(((a, b) for a, b in zip(found, found[1:]) if _sort_key(a) == _sort_key(b)), None)
    if same is not None:
        raise DataError(f"{path}: the labels {same[0]!r} and {same[1]!r} are one number; write each class one way")
    if len(found) < 2:
        raise DataError(f"{path}: only one label value ({found[0]!r}) in field {spec.label_field!r}")
    return found


def label_value(raw: Any, labels: list[str] | None, path: Path, number: int, class_ids: bool = True) -> int | float:
    """A class id from a label name (or, with `class_ids`, from an integer id in range), or a float for regression.
    `class_ids` only where `labels` is the order the ids were given in, not one discovered by sorting names."""
    text = str(raw).strip()
    if labels is None:
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{path}:{number}: regression label {text!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{path}:{number}: regression label {text!r} is not finite")
        return value
    if text in labels:
        return labels.index(text)
    # an integer class id stands for a label only when no label name reads as a number: with labels {"0", "2"}
    # discovered from the training file, an eval row's "1" is an unknown label, not class "2"
    numeric_names = any(_number_key(name) is not None for name in labels)
    is_class_id = text.isascii() and text.isdigit() and int(text) < len(labels) and not numeric_names
    if is_class_id and class_ids:
        return int(text)
    hint = "; a class id needs the label order (TaskSpec.labels, --labels in the scripts)" if is_class_id else ""
    raise DataError(f"{path}:{number}: unknown label {text!r} (labels: {', '.join(labels)}){hint}")


def task_examples(path: str | Path, spec: TaskSpec, labels: list[str] | None,
                  rows: list[Row] | None = None) -> list[tuple[list[str], int | float]]:
    """(text fields, label) for every row of a task file (`rows`, when already read), checked without a tokenizer;
    `labels=None` reads regression targets. Integer class ids are read only where `spec.labels` gave the order they
    index."""
    path = Path(path)
    examples = []
    for number, record in rows if rows is not None else read_task_file(path):
        texts = [str(field_value(path, number, record, name)) for name in spec.text_fields]
        label = label_value(field_value(path, number, record, spec.label_field), labels, path, number,
                            class_ids=spec.labels is not None)
        examples.append((texts, label))
    return examples


def encode_task(tokenizer: Tokenizer, examples: list[tuple[list[str], int | float]], pair: bool,
                max_length: int) -> list[tuple[list[int], int | float]]:
    """(token ids, label) for each of `task_examples`' (text fields, label)."""
    return [(encode_example(tokenizer, texts, pair, max_length), label) for texts, label in examples]


def load_task(path: str | Path, tokenizer: Tokenizer, spec: TaskSpec, labels: list[str] | None,
              max_length: int) -> list[tuple[list[int], int | float]]:
    """(token ids, label) for every row of a task file: `task_examples`, encoded."""
    return encode_task(tokenizer, task_examples(path, spec, labels), spec.pair, max_length)
