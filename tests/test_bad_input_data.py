"""Bad input to data preparation, the loader, tokenizer files, fine-tuning and metrics: each is one clear
TTLError naming the file or argument, never a traceback from deep inside numpy, sentencepiece or torch."""

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import run_script

from ttl_core.config import LlamaConfig
from ttl_core.data import SAMPLE_CORPUS, prepare_data, read_documents
from ttl_core.errors import CheckpointError, ConfigError, DataError, TokenizerError
from ttl_core.finetune import FinetuneConfig, finetune_classifier, start_lora
from ttl_core.finetune_args import add_finetune_args, config_from_args
from ttl_core.hf import save_pretrained
from ttl_core.instruct import finetune_instruct
from ttl_core.loader import PackedLoader
from ttl_core.metrics import MetricsLog, perplexity, plot_metrics, read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.task_files import TaskSpec, load_task, read_task_file, task_labels
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(SAMPLE_CORPUS[:2], None, vocab_size=400)


@pytest.fixture(scope="module")
def tok_file(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tok.save(path)
    return path


def tiny_model_dir(path, tok, vocab_size: int, context: int = 64):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context)
    torch.manual_seed(0)
    save_pretrained(LlamaForCausalLM(config), path, tokenizer=tok)
    return path


# --- prepare_data inputs -------------------------------------------------------------------------------------

def test_whitespace_only_documents_are_empty_in_every_format(tmp_path, tok_file):
    (tmp_path / "mixed.jsonl").write_text('{"text": "   "}\n{"text": "um texto"}\n{"text": "\\n\\t"}\n')
    assert list(read_documents(tmp_path / "mixed.jsonl")) == ["um texto"]
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": "\\n"}\n')
    with pytest.raises(DataError, match=r"blank\.jsonl: empty input"):  # not a dataset of blanks
        prepare_data([tmp_path / "blank.jsonl"], tmp_path / "out", tokenizer=tok_file)
    with pytest.raises(DataError, match=r"blank\.jsonl: empty input"):  # nor a sentencepiece INTERNAL error
        prepare_data([tmp_path / "blank.jsonl"], tmp_path / "out2", vocab_size=300)


def test_bad_parquet_inputs(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["   ", "documento", None]}), tmp_path / "ws.parquet")
    assert list(read_documents(tmp_path / "ws.parquet")) == ["documento"]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: row 1: 'text' is int, expected a string"):
        list(read_documents(tmp_path / "ints.parquet"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable parquet file") as e:
        list(read_documents(tmp_path / "corrupt.parquet"))
    one_line(e)


def test_prepare_data_arguments(tmp_path, tok_file):
    doc = tmp_path / "a.txt"
    doc.write_text("primeiro documento\n\nsegundo documento\n")
    assert prepare_data(str(doc), tmp_path / "one", tokenizer=tok_file, val_fraction=0)["documents"] == 2
    for kwargs, message in [(dict(workers=-2), "workers must be an integer >= 1"),
                            (dict(workers=0), "workers must be an integer >= 1"),
                            (dict(shard_docs=0), "shard_docs must be an integer >= 1"),
                            (dict(val_fraction=1.5), r"^val_fraction must be in \[0, 1\], got 1.5$"),
                            # sentencepiece's own words for these were a line of its C++ source, after reading it all
                            (dict(tokenizer=None, vocab_size=0),
                             r"^vocab_size \(to train a tokenizer\) must be an int"),
                            (dict(tokenizer=None, vocab_size=2.5), r"^vocab_size \(to train a tokenizer\) must be an"),
                            (dict(tokenizer=5), "tokenizer must be a .model file, an HF tokenizer directory")]:
        with pytest.raises(DataError, match=message):
            prepare_data([doc], tmp_path / "bad", **{"tokenizer": tok_file, **kwargs})
    # of 2 documents 0.4 holds none out: said at once, not only when a run finds no validation split
    with pytest.warns(UserWarning, match=r"^val_fraction 0.4 of 2 documents holds none out: val.bin will be empty "
                                         r"\(use at least 0.5, or train with train.eval_every=0\)$"):
        assert prepare_data([doc], tmp_path / "small", tokenizer=tok_file, val_fraction=0.4)["val_tokens"] == 0
    run = run_script("prepare_data", "--input", doc, "--out", tmp_path / "w", "--tokenizer", tok_file, timeout=120)
    assert run.returncode == 0 and run.stderr.strip().splitlines() == [  # the scripts' one-line form
        "warning: val_fraction 0.1 of 2 documents holds none out: val.bin will be empty (use at least 0.5, or train "
        "with train.eval_every=0)"], run.stderr[-2000:]
    run = run_script("prepare_data", "--input", doc, "--out", tmp_path / "s", "--workers", "-2", timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == ("error: workers must be an integer >= 1 (left unset: every "
                                                          "usable core), got -2")


def test_unreadable_bookkeeping_is_redone_not_a_traceback(tmp_path, tok_file):
    doc = tmp_path / "a.txt"
    doc.write_text("primeiro documento\n\nsegundo documento\n")
    out = tmp_path / "out"
    meta = prepare_data([doc], out, tokenizer=tok_file, val_fraction=0)
    (out / "meta.json").write_text("{garbage")
    assert prepare_data([doc], out, tokenizer=tok_file, val_fraction=0) == meta
    (out / ".prepare").mkdir()
    (out / ".prepare" / "plan.json").write_bytes(b"\xff\xfe garbage")
    (out / "meta.json").unlink()
    assert prepare_data([doc], out, tokenizer=tok_file, val_fraction=0) == meta
    assert not (out / ".prepare").exists()


# --- PackedLoader ---------------------------------------------------------------------------------------------

def data_dir(path, tokens: np.ndarray, **meta):
    path.mkdir()
    tokens.tofile(path / "train.bin")
    meta = {"dtype": tokens.dtype.name, "eos_id": 2, "vocab_size": 100, "train_tokens": len(tokens), **meta}
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not ...}))
    return path


TOKENS = np.arange(4, 4 + 90, dtype=np.uint16) % 100


@pytest.mark.parametrize("meta_text, message", [
    ("garb", r"meta\.json: not valid JSON"),
    ("[]", r"meta\.json: expected a JSON object, got list"),
    ('{"eos_id": 2, "vocab_size": 100}', r"meta\.json: 'dtype' is missing; expected one of uint16, uint32"),
    ('{"dtype": "bogus", "eos_id": 2, "vocab_size": 100}', r"'dtype' is 'bogus'"),
    ('{"dtype": "float32", "eos_id": 2, "vocab_size": 100}', r"'dtype' is 'float32'"),
    ('{"dtype": "uint16", "vocab_size": 100}', r"meta\.json: 'eos_id' is missing"),
    ('{"dtype": "uint16", "eos_id": 2}', r"meta\.json: 'vocab_size' is missing"),
])
def test_bad_meta_json(tmp_path, meta_text, message):
    path = data_dir(tmp_path / "d", TOKENS)
    (path / "meta.json").write_text(meta_text)
    with pytest.raises(DataError, match=message) as e:
        PackedLoader(path, "train", 8, 2)
    one_line(e)


def test_out_of_vocabulary_ids_are_named_with_file_and_offset(tmp_path):
    tokens = TOKENS.copy()
    tokens[37] = 100  # == vocab_size
    path = data_dir(tmp_path / "d", tokens)
    loader = PackedLoader(path, "train", 8, 2, shuffle=False)
    with pytest.raises(DataError, match=rf"{path / 'train.bin'}: token 37 has id 100, outside the vocabulary "
                                        r"of 100"):
        list(loader)


# --- tokenizer files ------------------------------------------------------------------------------------------

METASPACE = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}


@pytest.mark.parametrize("spec, message", [
    ([], 'expected a JSON object with a "model" object'),
    (None, 'expected a JSON object with a "model" object'),
    ({"model": [1]}, 'expected a JSON object with a "model" object'),
    ({"model": {"type": "BPE"}, **METASPACE}, "model.vocab must be a non-empty object"),
    ({"model": {"type": "BPE", "vocab": [["a", 0]]}, **METASPACE}, "model.vocab must be a non-empty object"),
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0}}, "added_tokens": [{"id": 1}], **METASPACE},
     "added_tokens must be a list of objects with a string 'content'"),
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1}, "merges": [5]}, **METASPACE},
     "model.merges must be a list"),
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0}}, "added_tokens": [{"id": "1", "content": "<x>"}], **METASPACE},
     "added_tokens must be a list of objects with a string 'content' and an integer 'id'"),
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1, "ab": 2}, "merges": ["a b"]}, **METASPACE},
     "merge 'a b' uses or makes a token that is not in model.vocab"),  # "b" is not a token
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0}}, "pre_tokenizer": {"type": "Whitespace"}},
     "unsupported tokenizer type: BPE without sentencepiece-style"),  # no "▁", though not byte-level either
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, **METASPACE}, "no unknown token '<unk>'"),
    ({"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 2}}, **METASPACE}, "vocabulary ids are not contiguous"),
])
def test_bad_tokenizer_json(tmp_path, spec, message):
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=message) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert one_line(e).startswith(f"{tmp_path / 'tokenizer.json'}: ")


def test_tokenizer_ids_and_files(tok, tok_file, tmp_path):
    for bad in (400, 5000, -1):  # 400: the first id past the vocabulary
        with pytest.raises(TokenizerError, match=rf"token id {bad} is outside the vocabulary \(ids 0\.\.399\)"):
            tok.id_to_token(bad)
    with pytest.raises(TokenizerError, match=r"token id -1 is outside the vocabulary \(ids 0\.\.399\)"):
        tok.decode([5, -1])
    assert tok.decode([5, 400, 5000]) == tok.decode([5])  # as transformers decodes a padded model's ids
    with pytest.raises(TokenizerError, match="encode expects a str, got NoneType"):
        tok.encode(None)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=rf"{tmp_path / 'bad.model'}: not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
    assert Tokenizer.from_pretrained(tok_file).encode("casa") == tok.encode("casa")  # a file, not a directory
    with pytest.raises(TokenizerError, match=r"nope: does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("role, token, problem", [("bos_token", None, "has no <s> token"),
                                                  ("eos_token", None, "has no </s> token"),
                                                  ("bos_token", "</s>", r"plays <s> and </s> with one token \(id 2\)")])
def test_a_tokenizer_without_bos_or_eos_cannot_prepare_data(tok, tmp_path, role, token, problem):
    """Prepared data puts <s> and </s> around every document: a tokenizer whose config makes either null is
    refused before any file is written (it used to prepare data the loader then refused), and so is one whose <s>
    is its </s> (the loader would end each document at its own <s>, and training would never target its end)."""
    tok.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, role: token}))
    (tmp_path / "docs.txt").write_text("um documento\n\noutro documento\n")
    with pytest.raises(DataError, match=rf"the tokenizer {re.escape(str(tmp_path / 'tok'))} {problem}") as e:
        prepare_data([tmp_path / "docs.txt"], tmp_path / "out", tokenizer=tmp_path / "tok")
    assert one_line(e) and not (tmp_path / "out").exists()


def test_bad_added_tokens_decoder_in_tokenizer_config(tok, tmp_path):
    """tokenizer_config.json's added_tokens_decoder maps decimal ids to {"content": ...}; any other key is refused
    by name (it used to escape as int()'s ValueError)."""
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["<|x|>"] = {"content": "<|x|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="added_tokens_decoder must map token ids to objects") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert one_line(e).startswith(f"{tmp_path / 'tokenizer_config.json'}: ")

# --- fine-tuning ----------------------------------------------------------------------------------------------

def parse(*argv: str) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    add_finetune_args(parser, FinetuneConfig())
    return config_from_args(parser, parser.parse_args(list(argv)))


def test_lora_targets_all_linear(tok):
    from ttl_core.lora import lora_layers
    from ttl_core.lora_targets import LINEAR_NAMES

    cfg = parse("--lora", "--lora-targets", "all-linear")
    assert cfg.lora_targets == "all-linear"
    assert parse("--lora", "--lora-targets", "q_proj, k_proj").lora_targets == ["q_proj", "k_proj"]
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    start_lora(model, cfg)
    adapted = {name for layer in lora_layers(model).values() for name in layer.slices}
    assert adapted == set(LINEAR_NAMES)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be an integer >= 1, got 0"),
    (["--lr", "nan"], r"lr \(--lr\) must be a finite number > 0, got nan"),
    (["--lr", "0"], r"lr \(--lr\) must be"),
    (["--epochs", "0"], r"epochs \(--epochs\)"),
    (["--weight-decay", "-1"], r"weight_decay \(--weight-decay\) must be a finite number >= 0"),
    (["--weight-decay", "nan"], r"weight_decay \(--weight-decay\)"),
    (["--grad-clip", "-0.5"], r"grad_clip \(--grad-clip\) must be a finite number >= 0 \(0: no clipping\), got -0.5"),
    (["--warmup-steps", "-5"], r"warmup_steps \(--warmup-steps\) must be an integer >= 0"),
    (["--lora", "--lora-dropout", "2"], r"lora_dropout \(--lora-dropout\) must be a number in \[0, 1\)"),
    (["--lora", "--lora-dropout", "-1"], r"lora_dropout \(--lora-dropout\)"),
    (["--lora", "--lora-alpha", "0"], r"lora_alpha \(--lora-alpha\) must be a finite number > 0"),
    (["--lora", "--lora-targets", ","], r"lora_targets \(--lora-targets\)"),
    (["--max-length", "1"], r"max_length \(--max-length\) must be an integer >= 2, got 1"),
    (["--seed", "-1"], r"seed \(--seed\) must be an integer in \[0, 2\*\*32\), got -1"),
    (["--seed", str(2**70)], r"seed \(--seed\) must be an integer in \[0, 2\*\*32\)"),  # torch.manual_seed overflowed
])
def test_bad_finetune_arguments(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_bad_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--device 'bogus': unknown device 'bogus'"):
        parse("--device", "bogus").torch_device()
    assert parse("--device", "cpu").torch_device() == torch.device("cpu")


@pytest.fixture
def task_files(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("title,text,label\n" + "".join(f"titulo {i},texto {i},{'AB'[i % 2]}\n" for i in range(8)))
    instructions = tmp_path / "i.jsonl"
    instructions.write_text(json.dumps({"instruction": "Diga oi.", "output": "Oi."}) + "\n")
    return path, instructions


def test_model_checks_before_training(tmp_path, tok, task_files):
    tasks, instructions = task_files
    cfg = FinetuneConfig(epochs=1, batch_size=4, max_length=32)
    small = tiny_model_dir(tmp_path / "small", tok, vocab_size=380)
    mismatch = "the tokenizer has 400 tokens but the model's vocab_size is 380"
    with pytest.raises(ConfigError, match="small: " + mismatch):
        finetune_classifier(small, tasks, tasks, tmp_path / "out", TaskSpec(), cfg, verbose=False)
    with pytest.raises(ConfigError, match="small: " + mismatch):
        finetune_instruct(small, instructions, tmp_path / "out2", "aira", cfg, verbose=False)
    fits = tiny_model_dir(tmp_path / "fits", tok, vocab_size=tok.vocab_size, context=64)
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 96 exceeds the 64-token context of"):
        finetune_classifier(fits, tasks, tasks, tmp_path / "out3", TaskSpec(),
                            FinetuneConfig(epochs=1, max_length=96), verbose=False)
    with pytest.raises(CheckpointError, match=r"nope: no such model directory"):
        finetune_instruct(tmp_path / "nope", instructions, tmp_path / "out4", "aira", cfg, verbose=False)
    config = json.loads((fits / "config.json").read_text())
    for pad in (None, -1):  # -1: old Llama configs' "none", which padding would use as a token id
        (fits / "config.json").write_text(json.dumps({**config, "pad_token_id": pad}))
        with pytest.raises(ConfigError, match=rf"fits: the config's pad_token_id {pad} is not a token id"):
            finetune_classifier(fits, tasks, tasks, tmp_path / "out5", TaskSpec(), cfg, verbose=False)


def test_empty_text_fields_option_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="text_fields must be a non-empty list of field names, got"):
        TaskSpec([])
    run = run_script("finetune_classifier", "--model", tmp_path, "--text-fields", ",", timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == ("error: text_fields must be a non-empty list of field "
                                                          "names, got []")


def test_json_lines_keep_line_separators_inside_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "um\u2028dois", "label": "A"}\r\n{"text": "três", "label": "B"}\n', encoding="utf-8")
    assert [(n, r["text"]) for n, r in read_task_file(path)] == [(1, "um\u2028dois"), (2, "três")]


def test_tsv_fields_may_start_with_a_quote(tmp_path):
    """Unquoted TSV (most TSV files) reads a field that starts with '"' as text; quoted TSV (as pandas writes
    it) keeps its quoted newlines; a file that is neither stays an error naming the line."""
    path = tmp_path / "t.tsv"
    path.write_text('title\ttext\tlabel\n"Lula" visita Paris\tO presidente "viajou".\tMUNDO\nx\ty\tESPORTES\n')
    assert [r["title"] for _, r in read_task_file(path)] == ['"Lula" visita Paris', "x"]
    path.write_text('title\ttext\tlabel\n"duas\nlinhas"\ty\tMUNDO\n')
    assert [r["title"] for _, r in read_task_file(path)] == ["duas\nlinhas"]
    path.write_text('title\ttext\tlabel\n"aberta\ty\tMUNDO\nx\ty\n')
    with pytest.raises(DataError, match=r"t\.tsv:2: malformed TSV"):
        read_task_file(path)


def test_csv_quotes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b,label\nx,"duas\nlinhas",A\nc,d,B\n')
    assert [r["b"] for _, r in read_task_file(path)] == ["duas\nlinhas", "d"]  # the newline is kept
    path.write_text('a,b,label\nu,v,A\na,b,"X\nc,d,Y\n')
    with pytest.raises(DataError, match=r"t\.csv:3: malformed CSV: .*\(a quote opened here is never closed\)"):
        read_task_file(path)


@pytest.mark.parametrize("record, message", [
    ({"text": "b", "label": [1]}, "field 'label' is a JSON list"),
    ({"text": {"x": 1}, "label": "B"}, "field 'text' is a JSON object"),
    ({"text": "b", "label": None}, "field 'label' is null"),  # it was "no field 'label'", listing 'label'
])
def test_task_fields_that_are_not_text_or_numbers_are_named(tmp_path, tok, record, message):
    """A JSON task file's text and label fields hold text or numbers; a list or object is refused rather than
    trained on as its Python text, in the train file (label discovery) as in the eval file (encoding)."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "A"}) + "\n" + json.dumps(record) + "\n")
    spec = TaskSpec(["text"], "label")
    if "'label'" in message:
        with pytest.raises(DataError, match=rf"t\.jsonl:2: {message}; expected text or a number"):
            task_labels(read_task_file(path), spec, path)
    with pytest.raises(DataError, match=rf"t\.jsonl:2: {message}; expected text or a number"):
        load_task(path, tok, spec, ["A", "B"], 32)


@pytest.mark.parametrize("text, line, message", [
    ('[\n  {"text": "a", "label": "A"},\n  ["b", "B"]\n]', 3, "expected a JSON object per array element, got list"),
    ('[\n  {"text": "a", "label": "A"},\n  "b"\n]', 3, "expected a JSON object per array element, got str"),
    ('[\n  {"text": "a", "label": "A"},\n  {"text": "b",\n   "label" "B"}\n]', 3,
     r"malformed JSON in the array element starting on this line \(Expecting ':' delimiter on line 4\)"),
    ('[{"text": "a", "label": "A"},\n{"text": "b", "label": "B"},\n]', 3, r"malformed JSON .*\(Expecting value"),
    ('[{"text": "a", "label": "A"}\n {"text": "b", "label": "B"}]', 2, "expected ',' or ']' after an array element"),
    ('[{"text": "a", "label": "A"}', 1, "expected ',' or ']' after an array element"),
    ('[{"text": "a", "label": "A"}]\n\n[]', 3, r"text after the top-level array"),
])
def test_bad_json_array_task_files_name_file_and_line(tmp_path, text, line, message):
    """A `.json` file holding one array of objects is read element by element: a bad element is named by the
    line it starts on, in one line."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_task_file(path)
    assert re.match(rf"{re.escape(str(path))}:{line}: .*{message}", one_line(e)), one_line(e)


# --- metrics --------------------------------------------------------------------------------------------------

def test_bad_metrics_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\x00garbage\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl: not a metrics file \(not UTF-8 text"):
        read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": "b"}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl: a record has loss='b' at step 2; expected numbers"):
        plot_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: expected a JSON object per line, got list"):
        read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]  # a torn last line is dropped
    assert math.isnan(read_metrics(run / "metrics.jsonl")[0]["loss"])
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity, "eval_loss": NaN}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl: all 3 loss values are NaN or infinite; nothing to plot"):
        plot_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl holds no loss records yet"):
        plot_metrics(run)
    # a blank line (a hand edit) is skipped; a broken line before the end is an error, not the end of the log
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.5}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: a record without a numeric 'step'"):
        read_metrics(run / "metrics.jsonl")
    with pytest.raises(DataError):  # resuming needs the history it continues ...
        MetricsLog(run, resume_step=1)
    log = MetricsLog(run)  # ... a fresh run replaces it, broken or not
    log.log({"step": 1, "loss": 3.0})
    log.close()
    assert read_metrics(run / "metrics.jsonl") == [{"step": 1, "loss": 3.0}]


def test_the_perplexity_of_a_huge_eval_loss_is_inf_not_a_capped_figure():
    # logged for each evaluation: once exp(min(loss, 50)), which put e^50 beside a loss of 60 (or of inf)
    assert perplexity(60.0) == pytest.approx(math.exp(60.0)) and perplexity(709.0) == math.exp(709.0)
    assert perplexity(710.0) == perplexity(math.inf) == math.inf and math.isnan(perplexity(math.nan))


def test_byte_order_mark_is_no_part_of_the_first_document(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfprimeiro\n\nsegundo\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "primeiro"}\n{"text": "segundo"}\n')
    for name in ("bom.txt", "bom.jsonl"):
        assert list(read_documents(tmp_path / name)) == ["primeiro", "segundo"]


def test_windows_line_ends_are_line_ends(tmp_path):
    """A .txt saved with CRLF line ends holds the documents (so the tokens) of the same text saved with LF, not a
    carriage-return byte token before every line break."""
    text = "primeira linha\nsegunda linha\n\n  terceiro\n \nquarto\n"
    (tmp_path / "lf.txt").write_bytes(text.encode())
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    assert list(read_documents(tmp_path / "crlf.txt")) == list(read_documents(tmp_path / "lf.txt")) == [
        "primeira linha\nsegunda linha", "  terceiro", "quarto"]


def test_train_tokenizer_on_a_missing_file_is_an_error_not_its_name_as_text(tmp_path):
    good = str(SAMPLE_CORPUS[0])
    for inputs in ("corpus/typo.txt", tmp_path / "missing", [good, "corpus/typo.txt"], ["typo.jsonl", good]):
        with pytest.raises(DataError, match="train_tokenizer: no such input file") as excinfo:
            train_tokenizer(inputs, None, vocab_size=300)
        assert "typo" in one_line(excinfo) or "missing" in one_line(excinfo)
    # documents that merely mention a file are texts
    assert train_tokenizer(["veja o arquivo notas.txt"] * 20, None, vocab_size=280).vocab_size == 280


def test_a_broken_line_before_a_torn_last_line_is_an_error(tmp_path):
    """Only the last line may be torn (a crash mid-write); a broken one before it is reported even when the
    file does not end with a newline."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_only_a_last_line_without_its_newline_counts_as_torn(tmp_path):
    """A line ended by its newline was written whole: a broken one is damage, reported even when it is last."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_a_run_resumed_without_its_metrics_file_starts_a_new_one(tmp_path):
    """Checkpoints copied to a new run directory, or a deleted metrics.jsonl: the resumed log starts empty."""
    log = MetricsLog(tmp_path, resume_step=3)
    log.log({"step": 4, "loss": 1.25})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 4, "loss": 1.25}]
