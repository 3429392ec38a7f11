"""Task files for fine-tuning: CSV, TSV, JSON lines and JSON arrays read into rows, labels mapped, and
examples (sentence pairs as transformers encodes their text) built and cut to max_length."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import pytest
from finetune_helpers import saved_base_model

from ttl_core.errors import ConfigError, DataError
from ttl_core.instruct import instruction_rows
from ttl_core.finetune import AGNEWS_LABELS
from ttl_core.task_benchmark import read_task_list, sample_tasks
from ttl_core.task_files import (TaskSpec, encode_example, label_value, load_task, read_task_file, task_examples,
                                 task_labels)
from ttl_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved_base_model(tmp_path_factory.mktemp("base"))


def test_task_file_formats_and_text_building(base_dir, tmp_path):
    rows = [{"title": "Título, com vírgula", "text": "Texto \"citado\"", "label": "B"},
            {"title": "Outro", "text": "Mais texto", "label": "A"}]
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["title", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "t.tsv").write_text("title\ttext\tlabel\n" + "".join(f"{r['title']}\t{r['text']}\t{r['label']}\n"
                                                                     for r in rows), encoding="utf-8")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows))
    for suffix in ("csv", "tsv", "jsonl"):
        assert [r for _, r in read_task_file(tmp_path / f"t.{suffix}")] == rows
    tok = Tokenizer.from_pretrained(base_dir)
    assert encode_example(tok, ["a b", "c"], False, 256) == tok.encode("a b\n\nc", add_bos=True)
    assert encode_example(tok, ["O gato.", "O cão."], True, 256) == tok.encode("O gato.<s>O cão.</s>", add_bos=True)
    assert len(encode_example(tok, ["palavra " * 100], False, 16)) == 16
    # labels given as names or as class ids; sorted when not given
    spec = TaskSpec(["title", "text"], "label", labels=["A", "B"])
    assert [label for _, label in load_task(tmp_path / "t.csv", tok, spec, ["A", "B"], 64)] == [1, 0]


def test_sentence_pairs_are_the_ids_transformers_gives_their_text(base_dir, tmp_path):
    """A pair is what AutoTokenizer makes of `first + "<s>" + second + "</s>"`, the text a transformers user
    passes to the saved classifier: the second sentence, after a special token, has no "▁" word prefix. Too
    long a pair loses tokens from its longer sentence first, as transformers' longest_first truncation cuts a
    pair, and keeps both `<s>` and the final `</s>`."""
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_python import PythonBackend

    tok = Tokenizer.from_pretrained(base_dir)
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    pairs = [("O gato dorme.", "O cão late."), ("Ação, emoção e coração", "Não há previsão é"),
             (" Espaço antes", "  dois espaços"), ("Em 2023 choveu 145 mm.", "3,5 graus às 7h"), ("a", "b"),
             ("sem ponto", "▁com o prefixo"), ("", "só a segunda"), ("só a primeira", "")]
    for first, second in pairs:
        assert encode_example(tok, [first, second], True, 256) == hf(first + "<s>" + second + "</s>")["input_ids"]
    longest_first = PythonBackend.truncate_sequences  # transformers' own rule, on token lists
    for first, second in [("Era uma vez " * 6, "O fim."), ("Curta.", "Uma frase longa com 12 palavras " * 3),
                          ("Primeira frase longa " * 5, "Segunda frase longa " * 5)]:
        full = hf(first + "<s>" + second + "</s>")["input_ids"]
        sep = full.index(tok.bos_id, 1)
        head, tail = full[1:sep], full[sep + 1:-1]
        for max_length in (3, 4, 9, 12, 13, len(full) - 1, len(full)):
            ids = encode_example(tok, [first, second], True, max_length)
            cut_head, cut_tail, _ = longest_first(types.SimpleNamespace(truncation_side="right"), head, tail,
                                                  len(full) - max_length, "longest_first")
            assert ids == [tok.bos_id, *cut_head, tok.bos_id, *cut_tail, tok.eos_id], (first, max_length)
            assert len(ids) == max_length
    with pytest.raises(ConfigError, match="max_length .* 2 leaves no room for a sentence pair.s 3 special tokens"):
        encode_example(tok, ["a", "b"], True, 2)


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": False, "add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_examples_keep_the_special_tokens_the_tokenizer_adds_as_transformers_truncation(base_dir, tmp_path, flags):
    """A tokenizer without <s>, or with </s>, frames examples as transformers' tokenizer frames their text; a text
    cut to max_length keeps them, as transformers' truncation does."""
    transformers = pytest.importorskip("transformers")

    tok = Tokenizer.from_pretrained(base_dir)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    tok, hf = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Título\n\nUm texto um pouco mais longo que o corte."
    for max_length in (2, 5, 9, 256):
        expected = hf(text, truncation=True, max_length=max_length)["input_ids"]
        assert encode_example(tok, ["Título", "Um texto um pouco mais longo que o corte."], False,
                              max_length) == expected
    assert encode_example(tok, ["O gato.", "O cão."], True, 256) == hf("O gato.<s>O cão.</s>")["input_ids"]
    specials = 2 + flags.get("add_bos_token", False) + flags.get("add_eos_token", False)
    assert len(encode_example(tok, ["Primeira frase longa " * 5, "Segunda"], True, specials + 3)) == specials + 3
    with pytest.raises(ConfigError, match=f"leaves no room for a sentence pair's {specials} special tokens"):
        encode_example(tok, ["a", "b"], True, specials - 1)
    if specials > 2:  # transformers gives the whole text, longer than max_length, where they leave no room
        with pytest.raises(ConfigError, match=f"max_length .* {specials - 3} leaves no room for an example's "
                                              f"{specials - 2} special tokens"):
            encode_example(tok, ["Título", "texto"], False, specials - 3)


def test_a_json_array_file_gives_the_rows_of_its_json_lines(tmp_path):
    """A `.json` task or instruction file may be one array of objects (Alpaca-PTBR's layout): its rows are
    those of the same records as JSON lines, numbered by the line each element starts on; a `.json` file
    that is not an array is still JSON lines."""
    records = [{"instruction": "Traduza \"gato\".", "input": "", "output": "cat"},
               {"instruction": "Some 2 e 3.", "input": "números\nnaturais", "output": "5"},
               {"instruction": "Diga oi.", "input": "", "output": "Oi!"}]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (tmp_path / "i.json").write_text("\n" + json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "compact.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "lines.json").write_text((tmp_path / "i.jsonl").read_text(), encoding="utf-8")
    (tmp_path / "empty.json").write_text(" [ ]\n")
    expected = [r for _, r in read_task_file(tmp_path / "i.jsonl")]
    for name in ("i.json", "compact.json", "lines.json"):
        assert [r for _, r in read_task_file(tmp_path / name)] == expected == records, name
    assert [n for n, _ in read_task_file(tmp_path / "i.json")] == [3, 8, 13]  # where each element starts
    assert [n for n, _ in read_task_file(tmp_path / "compact.json")] == [1, 1, 1]
    assert [row[1:] for row in instruction_rows(tmp_path / "i.json")] == [
        (r["instruction"], r["input"], r["output"]) for r in records]
    with pytest.raises(DataError, match=r"empty\.json: no examples"):
        read_task_file(tmp_path / "empty.json")


def test_a_number_is_a_class_id_only_when_no_label_name_is_a_number(tmp_path):
    path = tmp_path / "t.csv"
    assert label_value("1", ["neg", "pos"], path, 2) == 1  # ids stand for names
    assert label_value("2", ["0", "2"], path, 2) == 1  # the name "2", not class id 2
    for raw, labels in (("1", ["0", "2"]), ("0", ["1", "2", "3"]), ("²", ["neg", "pos"])):  # unseen, not a class
        with pytest.raises(DataError, match=rf"t\.csv:2: unknown label '{raw}'"):
            label_value(raw, labels, path, 2)
    path.write_text("title,text,label\na,b,pos\nc,d, \n")
    with pytest.raises(DataError, match=r"t\.csv:3: empty label in field 'label'"):
        task_labels(read_task_file(path), TaskSpec(), path)


@pytest.mark.parametrize("suffix, sep", [("csv", ","), ("tsv", "\t")])
def test_a_field_longer_than_the_csv_modules_default_limit_is_read(tmp_path, suffix, sep):
    """Python's csv module refuses fields over 131,072 characters by default, and such a file (one long document,
    which encoding cuts to max_length anyway) was called malformed; pandas and datasets read it."""
    document = "palavra longa, " * 10_000  # 150,000 characters
    path = tmp_path / f"t.{suffix}"
    path.write_text(f"text{sep}label\n\"{document}\"{sep}A\ncurto{sep}B\n", encoding="utf-8")
    assert [r["text"] for _, r in read_task_file(path)] == [document, "curto"]
    assert csv.field_size_limit() == 131_072  # the module's setting is left as it was


def test_a_json_object_spanning_lines_is_named_not_called_malformed(tmp_path):
    """A pretty-printed JSON object (a record, or {"data": [...]} as some exports wrap their rows) is valid JSON
    but neither an array of objects nor JSON lines: it was reported as malformed JSON on line 1."""
    path = tmp_path / "t.json"
    for document in ({"data": [{"text": "a", "label": "A"}]}, {"text": "a", "label": "A"}):
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        with pytest.raises(DataError, match=r"t\.json: one JSON object over several lines; a \.json task file holds "
                                            r"an array of objects \(\[\{\.\.\.\}, \.\.\.\]\) or one object per line"):
            read_task_file(path)
    path.write_text('{"text": "a", "label": "A"}\n{"text": "b",\n', encoding="utf-8")  # truly malformed: as before
    with pytest.raises(DataError, match=r"t\.json:2: malformed JSON"):
        read_task_file(path)
    # a .jsonl file holds JSON lines only (no array): the hint would name a layout it cannot have
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "A"}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:1: malformed JSON"):
        read_task_file(path)


def test_a_number_is_a_class_id_only_where_the_label_order_was_given(base_dir, tmp_path):
    """Class ids index the label list. Given with --labels, that list is the dataset's order; discovered, it is
    the train file's names sorted, which says nothing about what an eval file's ids meant: AgNews' id 0 (MUNDO)
    was read as ESPORTES, the first name alphabetically, and the evaluation scored against the wrong labels."""
    tok = Tokenizer.from_pretrained(base_dir)
    train, evals = tmp_path / "train.csv", tmp_path / "eval.csv"
    names = ["MUNDO", "ESPORTES", "NEGÓCIOS", "TECNOLOGIA"]  # AgNews' order: ids 0..3
    train.write_text("text,label\n" + "".join(f"t{i},{name}\n" for i, name in enumerate(names)), encoding="utf-8")
    evals.write_text("text,label\numa notícia,0\n", encoding="utf-8")
    given = TaskSpec(["text"], "label", labels=names)
    assert [label for _, label in load_task(evals, tok, given, names, 32)] == [0]
    discovered = TaskSpec(["text"], "label")
    labels = task_labels(read_task_file(train), discovered, train)
    assert labels == sorted(names)
    with pytest.raises(DataError, match=r"eval\.csv:2: unknown label '0' \(labels: ESPORTES, .*\); a class id "
                                        r"needs the label order \(TaskSpec\.labels, --labels in the scripts\)"):
        load_task(evals, tok, discovered, labels, 32)


@pytest.mark.parametrize("content, suffix, message", [
    ("", "csv", "no examples"),
    ("title,text,label\n", "csv", "no examples"),
    ("title,text,label\na,b,A\nc,d,ZZZ\n", "csv", r"t\.csv:3: unknown label 'ZZZ'"),
    ("title,text,label\na,b,A\nc,d\n", "csv", r"t\.csv:3: .*columns"),
    ('{"title": "a", "text": "b", "label": "A"}\n{"title": "a", "label": "A"}\n', "jsonl",
     r"t\.jsonl:2: no field 'text'"),
    ('{"title": "a", "text": "b", "label": "A"}\n{oops\n', "jsonl", r"t\.jsonl:2: malformed JSON"),
    ("x", "xlsx", "unsupported task file type"),
    # a space after a comma is part of the column's name (as in pandas): the message quotes the names to show it
    ("title, text,label\na,b,A\n", "csv", r"t\.csv:2: no field 'text' \(fields: 'title', ' text', 'label'\)"),
    ("title,text,label\na,b,A\nc,d,B,sobra\n", "csv", r"t\.csv:3: .*columns"),  # more fields than the header
    ('{"title": "a", "text": "b", "label": "A"}\n{"title": "a", "text": null, "label": "A"}\n', "jsonl",
     r"t\.jsonl:2: field 'text' is null"),  # a null is no text (not the text "None")
    # JSON may escape half a UTF-16 pair, which no text has: the tokenizer found it, in no named file
    ('{"title": "a", "text": "meio \\ud83d par", "label": "A"}\n', "jsonl",
     r"t\.jsonl:1: 'text' holds a lone surrogate '\\ud83d' at character 5 \(half an escaped UTF-16 pair\)$"),
    ('[{"title": "a", "text": "b", "label": "A"},\n {"title": "a", "text": "b", "label": "\\udc00"}]', "json",
     r"t\.json:2: 'label' holds a lone surrogate '\\udc00' at character 0 \(half an escaped UTF-16 pair\)$"),
])
def test_bad_task_files_name_file_and_line(base_dir, tmp_path, content, suffix, message):
    path = tmp_path / f"t.{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_task(path, Tokenizer.from_pretrained(base_dir), TaskSpec(labels=["A", "B"]), ["A", "B"], 64)


def test_a_byte_order_mark_is_no_part_of_the_header_and_other_encodings_are_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefftitle,text,label\na,b,A\n".encode("utf-8"))
    assert [(n, r) for n, r in read_task_file(path)] == [(2, {"title": "a", "text": "b", "label": "A"})]
    path.write_bytes("title,text,label\nação,b,A\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"t\.csv: not UTF-8 text \(invalid continuation byte at byte 18\)"):
        read_task_file(path)


def test_a_task_spec_that_cannot_make_examples_is_refused():
    for labels in (["A"], ["A", "B", "A"]):  # one class, or one name for two class ids
        with pytest.raises(ConfigError, match="labels must be a list of at least two distinct label names"):
            TaskSpec(labels=labels)
    with pytest.raises(ConfigError, match=r"a sentence-pair task needs exactly two text fields, got \['a', 'b', 'c'\]"):
        TaskSpec(["a", "b", "c"], pair=True)
    # the label among the text would be read by the model it is to be predicted by: a silent 100% accuracy
    with pytest.raises(ConfigError, match=r"label_field 'label' is also a text field: the model would read the"):
        TaskSpec(["text", "label"], "label")
    # a regressor has one output and no class names: the list would be ignored without a word
    with pytest.raises(ConfigError, match=r"labels name classes; a regression task has none, got \['A', 'B'\]"):
        TaskSpec(regression=True, labels=["A", "B"])


@pytest.mark.parametrize("suffix, sep", [("csv", ","), ("tsv", "\t")])
def test_a_column_named_twice_in_the_header_is_refused(tmp_path, suffix, sep):
    """csv.DictReader keeps the last of two same-named columns, so the first column's text was dropped without a
    word (pandas and datasets keep the first as "text" and call the second "text.1"); a name read twice is refused.
    Unnamed columns (the trailing separators of a spreadsheet export) are never read and stay allowed."""
    path = tmp_path / f"t.{suffix}"
    path.write_text(sep.join(["title", "text", "text", "label"]) + "\n" + sep.join(["a", "b", "c", "A"]) + "\n")
    with pytest.raises(DataError, match=rf"t\.{suffix}:1: the header names two columns 'text'; rename one"):
        read_task_file(path)
    path.write_text(sep.join(["title", "text", "label", "", ""]) + "\n" + sep.join(["a", "b", "A", "", ""]) + "\n")
    assert [r["text"] for _, r in read_task_file(path)] == ["b"]


def test_discovered_labels_are_stripped_and_sorted_as_numbers(tmp_path):
    """Without a label list the class ids are the training file's distinct values, surrounding spaces removed,
    in numeric order when they are numbers ("9" before "10"), so a numbered label set keeps its order."""
    path = tmp_path / "t.csv"
    path.write_text("title,text,label\n" + "".join(f"t,x,{v}\n" for v in ("10", " 9", "0.5", "9 ", "10", "2")))
    labels = task_labels(read_task_file(path), TaskSpec(), path)
    assert labels == ["0.5", "2", "9", "10"]
    assert label_value(" 10 ", labels, path, 2) == 3 and label_value("0.5", labels, path, 2) == 0
    path.write_text("title,text,label\na,b,pos\nc,d, pos\n")
    with pytest.raises(DataError, match=r"t\.csv: only one label value \('pos'\) in field 'label'"):
        task_labels(read_task_file(path), TaskSpec(), path)
    # JSON's 1 and 1.0 are one number (Python's int and float spell them apart): two classes for one value
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in (0, 1, 1.0, 2)))
    with pytest.raises(DataError, match=r"t\.jsonl: the labels '1' and '1\.0' are one number; write each class"):
        task_labels(read_task_file(path), TaskSpec(["text"]), path)


def test_nan_and_infinity_labels_sort_and_are_one_number_however_spelled(tmp_path):
    """float("nan") equals nothing, not even itself: "nan" and "NaN" made two classes (where "inf" and "Infinity", or
    "1" and "1.0", are refused as one number), and NaN keys left the sort order to the set's iteration order."""
    path = tmp_path / "t.csv"
    for a, b in (("nan", "NaN"), ("-nan", "NAN"), ("inf", "Infinity"), ("-inf", "-Infinity")):
        path.write_text(f"title,text,label\nt,x,{a}\nt,x,{b}\nt,x,2\n")
        with pytest.raises(DataError, match=r"t\.csv: the labels '.*' and '.*' are one number; write each class"):
            task_labels(read_task_file(path), TaskSpec(), path)
    values = ["10", "nan", "b", "2", "inf", "a", "-inf", "-3.5"]
    for order in (values, values[::-1], values[3:] + values[:3]):
        path.write_text("title,text,label\n" + "".join(f"t,x,{v}\n" for v in order))
        assert task_labels(read_task_file(path), TaskSpec(), path) == ["-inf", "-3.5", "2", "10", "inf", "nan", "a",
                                                                       "b"]
    assert label_value("nan", ["nan", "pos"], path, 2) == 0
    with pytest.raises(DataError, match=r"unknown label '1'"):  # "nan" is a number: "1" is no class id beside it
        label_value("1", ["nan", "pos"], path, 2)


def test_class_ids_must_be_in_range_and_regression_targets_finite(tmp_path):
    path = tmp_path / "t.csv"
    assert label_value(" pos\t", ["neg", "pos"], path, 2) == 1 and label_value("1", ["neg", "pos"], path, 2) == 1
    with pytest.raises(DataError, match=r"t\.csv:2: unknown label '2' \(labels: neg, pos\)"):
        label_value("2", ["neg", "pos"], path, 2)  # one past the last class id
    assert label_value(" 3.25 ", None, path, 4) == 3.25
    for raw in ("nan", "inf", "-Infinity"):
        with pytest.raises(DataError, match=rf"t\.csv:4: regression label '{raw}' is not finite"):
            label_value(raw, None, path, 4)
    with pytest.raises(DataError, match=r"t\.csv:4: regression label 'alto' is not a number"):
        label_value("alto", None, path, 4)


@pytest.mark.parametrize("key, value, message", [
    ("text_fields", "title", r"task 0 \(t\): text_fields must be a non-empty list of field names, got 'title'"),
    ("text_fields", [], r"task 0 \(t\): text_fields must be a non-empty list"),
    ("regression", "no", r"task 0 \(t\): regression must be true or false, got 'no'"),
    ("pair", 1, r"task 0 \(t\): pair must be true or false"),
    ("labels", "XY", r"task 0 \(t\): labels must be a list of at least two distinct label names"),
    ("label_field", 3, r"task 0 \(t\): label_field must be a field name"),
    ("train", 5, r"task 0: 'train' must be a non-empty string, got 5"),
    ("name", " ", r"task 0: 'name' must be a non-empty string, got ' '"),  # a blank folder name under --out
])
def test_bad_task_lists_name_task_and_key(tmp_path, key, value, message):
    entry = {"name": "t", "train": "a.csv", "eval": "a.csv", key: value}
    (tmp_path / "tasks.json").write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=message):
        read_task_list(tmp_path / "tasks.json")


@pytest.mark.parametrize("document, message", [
    ([], r"tasks\.json: expected a non-empty JSON list of tasks"),
    ({"name": "t"}, r"tasks\.json: expected a JSON list, got dict"),
    ([["t", "a.csv", "a.csv"]], r"tasks\.json: task 0 is not an object"),
    ([{"name": "t", "train": "a.csv"}], r"tasks\.json: task 0: missing eval$"),
    ([{"name": "t", "train": "a.csv", "eval": "a.csv", "lable_field": "y", "labes": []}],
     r"tasks\.json: task 0: unknown labes, lable_field$"),  # a misspelt key is not silently ignored
    # names are folders under --out: one task's run would overwrite another's, the benchmark's own results or
    # files outside --out
    ([{"name": "t", "train": "a.csv", "eval": "a.csv"}] * 2, r"task 1: the name 't' is already another task's"),
    ([{"name": n, "train": "a.csv", "eval": "a.csv"} for n in ("SST2", "sst2")], r"task 1: the name 'sst2' is already"),
    *[([{"name": name, "train": "a.csv", "eval": "a.csv"}], rf"task 0: 'name' must be a plain folder name .*{name!r}")
      for name in (".", "..", "../t", "/tmp/t", "a/b", "results.json", "results.md")],
])
def test_task_lists_of_the_wrong_shape_are_named(tmp_path, document, message):
    (tmp_path / "tasks.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=message):
        read_task_list(tmp_path / "tasks.json")


def test_the_bundled_benchmark_tasks_read_as_they_are_described():
    """finetune_benchmark.py's default tasks, read without a model: news topics in the AgNews order, entailment
    pairs (ASSIN2's NONE / ENTAILMENT order) and sentence-pair similarity scored 1-5, each with its own eval file
    and every class in its training file."""
    tasks = {task.name: task for task in sample_tasks()}
    assert list(tasks) == ["noticias", "inferencia", "similaridade"]
    described = {"noticias": (False, False, list(AGNEWS_LABELS)), "inferencia": (True, False, ["NONE", "ENTAILMENT"]),
                 "similaridade": (True, True, None)}
    for name, task in tasks.items():
        pair, regression, labels = described[name]
        assert (task.spec.pair, task.spec.regression, task.spec.labels) == (pair, regression, labels), name
        assert task.train != task.eval and len(task.spec.text_fields) == 2, name
        for path in (task.train, task.eval):
            examples = task_examples(path, task.spec, labels)
            assert all(text.strip() for texts, _ in examples for text in texts), path
            targets = [label for _, label in examples]
            if regression:
                assert 1.0 <= min(targets) < max(targets) <= 5.0, path
            elif path == task.train:
                assert set(targets) == set(range(len(labels))), path


def test_task_list_paths_are_relative_to_the_list_and_unreadable_lists_are_named(tmp_path):
    (tmp_path / "lists").mkdir()
    entry = {"name": "t", "train": "data/train.csv", "eval": "/abs/eval.tsv", "labels": ["A", "B"]}
    (tmp_path / "lists" / "tasks.json").write_text(json.dumps([entry]))
    [task] = read_task_list(tmp_path / "lists" / "tasks.json")
    assert (task.name, task.train, task.eval) == ("t", tmp_path / "lists" / "data" / "train.csv",
                                                 Path("/abs/eval.tsv"))
    assert task.spec == TaskSpec(labels=["A", "B"])
    with pytest.raises(DataError, match=r"missing\.json: cannot read JSON \(No such file or directory\)"):
        read_task_list(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes('[{"name": "ação"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.json: not valid JSON \('utf-8' codec can't decode"):
        read_task_list(tmp_path / "latin1.json")


@pytest.mark.parametrize("which", ["train", "eval"])
def test_bad_data_is_refused_before_the_model_loads(tmp_path, monkeypatch, which):
    """A data file's errors that need no tokenizer (malformed file, missing field, unknown label) come before the
    checkpoint is read: a ttl-160m load takes seconds, a bad file should not. The loader is replaced by one that
    fails, so reaching it is the defect."""
    from ttl_core import finetune, instruct

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    for module in (finetune, instruct):
        monkeypatch.setattr(module, "load_pretrained", no_loading)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"instruction": "Diga oi.", "output": "Oi."}) + "\n")
    for record, message in [('{"instruction": "x", "output": ', r"bad\.jsonl:2: malformed JSON"),
                            (json.dumps({"instruction": "x", "reply": "y"}),
                             r"bad\.jsonl:2: no text field among output"),
                            (json.dumps({"instruction": "x", "input": 3, "output": "y"}),
                             r"bad\.jsonl:2: field 'input'")]:
        bad.write_text(good.read_text() + record + "\n")
        train, evals = (bad, good) if which == "train" else (good, bad)
        with pytest.raises(DataError, match=message):
            instruct.finetune_instruct(tmp_path / "model", train, tmp_path / "out", eval_file=evals, verbose=False)
    good.write_text("".join(json.dumps({"text": f"texto {i}", "label": "AB"[i % 2]}) + "\n" for i in range(4)))
    spec = TaskSpec(["text"], "label")
    for record, message in [('{"text": ', r"bad\.jsonl:5: malformed JSON"),
                            (json.dumps({"txt": "x", "label": "A"}), r"bad\.jsonl:5: no field 'text'"),
                            (json.dumps({"text": "x", "label": "C"}), r"bad\.jsonl:5: unknown label 'C'")]:
        if which == "train" and "unknown label" in message:
            continue  # a train file's labels are the label set
        bad.write_text(good.read_text() + record + "\n")
        train, evals = (bad, good) if which == "train" else (good, bad)
        with pytest.raises(DataError, match=message):
            finetune.finetune_classifier(tmp_path / "model", train, evals, tmp_path / "out", spec, verbose=False)
