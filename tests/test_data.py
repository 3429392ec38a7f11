"""prepare_data: token files that decode back to the input documents, counts that match, resumption after an
interruption, clear errors naming file and line."""

import contextlib
import itertools
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script

import ttl_core.data as data
from ttl_core.data import SAMPLE_CORPUS, prepare_data, read_documents
from ttl_core.errors import DataError, TTLError
from ttl_core.loader import PackedLoader
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

WORDS = "o rio a serra café manhã ponte escola árvore chuva João às 12h30 — ótimo! ação".split()


def split_documents(ids: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """The documents of a token file: each must be `<s>` ... `</s>`."""
    docs, ends = [], np.flatnonzero(ids == eos)
    assert len(ids) == 0 or ends[-1] == len(ids) - 1
    start = 0
    for end in ends:
        doc = ids[start:end + 1].tolist()
        assert doc[0] == bos and bos not in doc[1:]
        docs.append(doc[1:-1])
        start = end + 1
    return docs


def check_data_dir(out, expected_docs: list[str], dtype: str = "uint16"):
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer(out / "tokenizer.model")
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"])
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["vocab_size"] == tok.vocab_size and meta["dtype"] == dtype
    train_docs, val_docs = (split_documents(x, tok.bos_id, tok.eos_id) for x in (train, val))
    assert (meta["train_documents"], meta["val_documents"]) == (len(train_docs), len(val_docs))
    assert meta["documents"] == len(expected_docs) == len(train_docs) + len(val_docs)
    assert len(val_docs) >= 1
    assert sorted(tok.decode(d) for d in train_docs + val_docs) == sorted(expected_docs)
    return meta


def test_sample_corpus(tmp_path):
    docs = [d for p in SAMPLE_CORPUS for d in read_documents(p)]
    assert len(SAMPLE_CORPUS) >= 5 and len(docs) >= 50
    assert 35_000 < sum(p.stat().st_size for p in SAMPLE_CORPUS) < 120_000  # a few tens of KB
    meta = prepare_data(SAMPLE_CORPUS, tmp_path / "d", vocab_size=4096, workers=2)
    check_data_dir(tmp_path / "d", docs)
    assert meta["vocab_size"] == 4096 and (tmp_path / "d" / "tokenizer_config.json").is_file()
    loader = PackedLoader(tmp_path / "d", "train", seq_len=128, batch_size=8)
    batch = next(loader)
    assert batch["input_ids"].max() < 4096 and batch["doc_starts"][:, 1:].any()


def write_inputs(tmp_path, seed=0):
    rng = random.Random(seed)
    doc = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))  # noqa: E731
    docs = []
    for k in range(3):
        block = [doc() + ("\n" + doc() if rng.random() < 0.3 else "") for _ in range(rng.randint(15, 25))]
        (tmp_path / f"part{k}.txt").write_text("\n\n\n".join(block) + "\n")
        docs += block
    lines = [doc() for _ in range(20)]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    docs += lines
    return sorted(tmp_path.glob("part*.txt")) + [tmp_path / "more.jsonl"], docs


def read_outputs(out):
    return {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json", "tokenizer.model")}


def test_multi_file_input_parallel_and_resumed_runs_are_identical(tmp_path, monkeypatch):
    inputs, docs = write_inputs(tmp_path)
    meta = prepare_data(inputs, tmp_path / "one", vocab_size=300, workers=1, shard_docs=7)
    check_data_dir(tmp_path / "one", docs)
    # a source tokenizer that adds no <s> itself: the documents still start with one, and so does a prompt to a
    # model trained on them (the saved tokenizer says so)
    config = json.loads((tmp_path / "one" / "tokenizer_config.json").read_text())
    (tmp_path / "one" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert Tokenizer.from_pretrained(tmp_path / "one").encode("a")[0] != 1
    prepare_data(inputs, tmp_path / "two", tokenizer=tmp_path / "one" / "tokenizer.model", workers=2, shard_docs=7)
    assert read_outputs(tmp_path / "two")["train.bin"] == read_outputs(tmp_path / "one")["train.bin"]
    assert Tokenizer.from_pretrained(tmp_path / "two").encode("a")[0] == 1

    # Interrupt a run after three shards, then resume: only the missing shards are tokenized again.
    calls = []
    real = data._tokenize_shard

    def failing(job):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(data, "_tokenize_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(inputs, tmp_path / "resumed", vocab_size=300, workers=1, shard_docs=7)
    assert len(list((tmp_path / "resumed" / ".prepare").glob("*.npz"))) == 3
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(data, "_tokenize_shard", lambda job: (calls.append(job[0]), real(job))[1])
    assert prepare_data(inputs, tmp_path / "resumed", vocab_size=300, workers=1, shard_docs=7) == meta
    n_shards = (sum(meta["plan"]["documents"]) + 6) // 7  # shards of 7 documents run across files
    assert sorted(calls) == list(range(n_shards))  # each shard tokenized exactly once across both runs
    assert read_outputs(tmp_path / "resumed") == read_outputs(tmp_path / "one")
    assert not (tmp_path / "resumed" / ".prepare").exists()


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"\n\n  \n", r"empty.txt: empty input \(no documents\)"),
    ("latin1.txt", "primeira linha\nsegunda é ruim\n".encode("latin-1"), r"latin1.txt:2: not UTF-8"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext.jsonl:2: no string 'text' field"),
    ("broken.jsonl", b'{"text": "ok"}\n\n{"text": "x"\n', r"broken.jsonl:3: malformed JSON"),
    # JSON may escape half a UTF-16 pair, which no text has: it was found by the tokenizer, in no named file
    ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "meio \\ud83d par"}\n',
     r"surrogate.jsonl:2: 'text' holds a lone surrogate '\\ud83d' at character 5 \(half an escaped UTF-16 pair\)$"),
    ("table.csv", b"a,b\n", r"table.csv: unsupported input type '.csv'"),
])
def test_bad_inputs_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_data([tmp_path / name], tmp_path / "out", vocab_size=300)
    # train_tokenizer reads its files inside sentencepiece, which made the error "cannot train a 300-token
    # vocabulary: .../documents.py(27): read_documents"
    with pytest.raises(DataError, match=message):
        train_tokenizer([tmp_path / name], None, vocab_size=300)
    if name == "latin1.txt":  # the script turns it into one line
        run = run_script("prepare_data", "--input", tmp_path / name, "--out", tmp_path / "out2", timeout=120)
        assert run.returncode == 2 and run.stderr.strip().splitlines() == [f"error: {tmp_path / name}:2: not UTF-8 "
                                                                           "text (bad byte at offset 8 of the line)"]


def test_every_input_without_a_document_is_named_at_once(tmp_path):
    """A corpus of many files may hold several empty ones: one error names them all (the first few, and how many
    more), where it named only the first and each rerun read the whole corpus again to find the next."""
    inputs, _ = write_inputs(tmp_path)
    empty = [tmp_path / f"empty{k}.txt" for k in range(7)] + [tmp_path / "blank.jsonl"]
    rng = random.Random(7)
    for path in empty[:-1]:
        path.write_text(rng.choice(["", "\n\n", " \t\n", "\r\n"]))
    empty[-1].write_text('{"text": " "}\n{"text": ""}\n')
    with pytest.raises(DataError, match=rf"^{empty[0]}: empty input \(no documents\); also empty: {empty[1]}, "
                                        rf"{empty[2]}, {empty[3]}, {empty[4]} and 3 more$"):
        prepare_data(inputs[:1] + empty + inputs[1:], tmp_path / "out", vocab_size=300, workers=1)
    with pytest.raises(DataError, match=rf"^{empty[-1]}: empty input \(no documents\)$"):
        prepare_data(inputs + empty[-1:], tmp_path / "out", vocab_size=300, workers=1)


def test_a_directory_given_as_input_is_named_as_one(tmp_path):
    """It was refused as an input of type '' (its empty suffix), or as no such file when named like one."""
    for name in ("corpus", "corpus.txt"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text("um documento\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name}: a directory; give the files in it \(e.g. .*{name}/\*.txt\)"):
            prepare_data([tmp_path / name], tmp_path / "out", vocab_size=300)


def test_long_documents_still_train_the_tokenizer():
    words = ["palavra", "comprida", "documento", "enorme", "linha"]
    long_doc = "\n".join(" ".join(words[(i + j) % 5] for j in range(12)) for i in range(3000))  # ~250 KB
    tok = train_tokenizer([long_doc], None, vocab_size=340, max_sentence_length=4096)
    assert tok.token_to_id("▁documento") is not None  # learned from the cut-up pieces, not skipped


def test_vocab_too_large_for_the_input_says_what_fits(tmp_path):
    (tmp_path / "small.txt").write_text("uma frase curta.\n\noutra frase curta.\n")
    with pytest.raises(TTLError, match=r"cannot train a 4096-token vocabulary.*largest this text allows is \d+"):
        prepare_data([tmp_path / "small.txt"], tmp_path / "out", vocab_size=4096)


@pytest.mark.parametrize("workers, shards, started", [(None, 5, [2]), (64, 1, []), (64, 3, [3])])
def test_tokenizing_processes_are_the_usable_cores_and_no_more_than_the_shards(tmp_path, monkeypatch, workers,
                                                                               shards, started):
    """By default the cores this process may use (os.cpu_count() counts the machine's, more than SLURM or a container
    cpuset allows), never more than the shards: --workers 64 on one shard forked 64 processes with nothing to do."""
    monkeypatch.setattr(data.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    assert data.usable_cpus() == 2
    inputs, docs = write_inputs(tmp_path, seed=int(torch.randint(0, 1000, ())))
    pools = []

    def executor(processes, *args):
        pools.append(processes)
        raise KeyboardInterrupt("a pool was started")

    monkeypatch.setattr(data, "ProcessPoolExecutor", executor)
    with pytest.raises(KeyboardInterrupt) if started else contextlib.nullcontext():
        prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=workers, shard_docs=-(-len(docs) // shards))
    assert pools == started


def test_script_on_sample(tmp_path):
    run = run_script("prepare_data", "--sample", "--out", tmp_path / "s", "--vocab-size", "2048", timeout=120)
    assert run.returncode == 0, run.stderr
    assert "documents" in run.stdout and json.loads((tmp_path / "s" / "meta.json").read_text())["vocab_size"] == 2048


@pytest.mark.parametrize("fraction, held_out", [(0.1, [9]), (0.3, [3, 6, 9]), (0.5, [1, 3, 5, 7, 9]),
                                              (1.0, list(range(10)))])
def test_val_split_holds_out_the_fraction_spread_evenly(tmp_path, fraction, held_out):
    """floor(n * val_fraction) of n documents go to val.bin, document k when floor((k+1) * fraction) steps up: with
    10 documents and 0.1, exactly one (the last), never none; with 1, all (a data.eval set), train.bin empty."""
    inputs, docs = write_inputs(tmp_path)
    prepare_data(inputs, tmp_path / "tok", vocab_size=300, workers=1)
    (tmp_path / "ten.txt").write_text("\n\n".join(ten := docs[:10]) + "\n")
    meta = prepare_data([tmp_path / "ten.txt"], tmp_path / "out", tokenizer=tmp_path / "tok" / "tokenizer.model",
                        val_fraction=fraction, workers=1, shard_docs=4)
    check_data_dir(tmp_path / "out", ten)
    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=meta["dtype"])
    assert meta["val_documents"] == len(held_out) == int(10 * fraction)
    assert [tok.decode(d) for d in split_documents(val, tok.bos_id, tok.eos_id)] == [ten[k] for k in held_out]


def test_an_interrupted_run_with_other_inputs_never_leaves_a_stale_meta(tmp_path, monkeypatch):
    """Run A finishes; run B with other inputs is killed while writing the outputs; rerunning A must redo the
    work rather than return A's meta.json over B's token files. Leftovers of a B killed while tokenizing go."""
    inputs, _ = write_inputs(tmp_path)
    prepare_data(inputs, tmp_path / "tok", vocab_size=300, workers=1)
    tokenizer = tmp_path / "tok" / "tokenizer.model"
    out = tmp_path / "out"
    prepare_data(inputs, out, tokenizer=tokenizer, workers=1)
    a = read_outputs(out)
    real = data.write_json

    def killed_before_meta(path, obj):
        if path.name == "meta.json":
            raise KeyboardInterrupt("simulated kill")
        real(path, obj)

    monkeypatch.setattr(data, "write_json", killed_before_meta)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(inputs[:1], out, tokenizer=tokenizer, workers=1)
    monkeypatch.setattr(data, "write_json", real)
    assert (out / "train.bin").read_bytes() != a["train.bin"] and not (out / "meta.json").exists()
    prepare_data(inputs, out, tokenizer=tokenizer, workers=1)
    assert read_outputs(out) == a

    # token files replaced behind a meta.json whose plan still matches (as an older version could leave them)
    (out / "train.bin").write_bytes(a["train.bin"][:-2])
    prepare_data(inputs, out, tokenizer=tokenizer, workers=1)
    assert read_outputs(out) == a
    PackedLoader(out, "train", seq_len=16, batch_size=2)

    # run B killed while tokenizing: A's finished outputs stand, and B's work directory stays for B to resume
    def killed(job):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(data, "_tokenize_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(inputs[:1], out, tokenizer=tokenizer, workers=1)
    assert (out / ".prepare").is_dir() and (out / "meta.json").is_file()
    assert prepare_data(inputs, out, tokenizer=tokenizer, workers=1) == json.loads(a["meta.json"])
    assert (out / ".prepare").is_dir() and read_outputs(out) == a


def test_a_run_killed_while_removing_its_work_directory_leaves_none_after_the_rerun(tmp_path, monkeypatch):
    """Killed while deleting `.prepare` after meta.json was written (plan.json already gone, shards not yet):
    the rerun, finding the outputs complete, deletes the rest rather than keeping the shards forever."""
    inputs, docs = write_inputs(tmp_path)
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "plan.json").unlink()
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, shard_docs=7)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert list((tmp_path / "out" / ".prepare").glob("*.npz"))
    meta = prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, shard_docs=7)
    assert not (tmp_path / "out" / ".prepare").exists()
    assert check_data_dir(tmp_path / "out", docs) == meta


def test_special_token_text_in_documents_stays_text(tmp_path):
    """A document that writes "</s>" or an Aira chat token means the characters: only the `</s>` that ends each
    document is an EOS, so the loader's document boundaries stay the documents'."""
    from ttl_core.chat_format import AIRA_SPECIAL_TOKENS

    inputs, _ = write_inputs(tmp_path)
    prepare_data(inputs, tmp_path / "tok", vocab_size=300, workers=1)
    tok = Tokenizer(tmp_path / "tok" / "tokenizer.model")
    tok.add_special_tokens(AIRA_SPECIAL_TOKENS)
    texts = ["fim </s> e <s> recomeço", "<|startofinstruction|>oi<|endofinstruction|>", "<pad><unk>", "ótimo"]
    (tmp_path / "special.txt").write_text("\n\n".join(texts) + "\n")
    meta = prepare_data([tmp_path / "special.txt"], tmp_path / "out", tokenizer=tok, val_fraction=0, workers=1)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    assert (train == tok.eos_id).sum() == (train == tok.bos_id).sum() == len(texts)
    assert not np.isin(train, [tok.pad_id, tok.unk_id, *range(300, tok.vocab_size)]).any()
    docs = split_documents(train, tok.bos_id, tok.eos_id)
    assert [tok.decode(d) for d in docs] == texts


def test_a_tokenizer_object_given_is_left_as_it_was(tmp_path):
    """The data directory's tokenizer adds <s> and not </s>; the caller's Tokenizer keeps its own settings."""
    inputs, _ = write_inputs(tmp_path)
    prepare_data(inputs[:1], tmp_path / "tok", vocab_size=300, workers=1)
    tok = Tokenizer(tmp_path / "tok" / "tokenizer.model")
    tok.add_bos_token, tok.add_eos_token = False, True
    prepare_data(inputs[:1], tmp_path / "out", tokenizer=tok, workers=1)
    assert (tok.add_bos_token, tok.add_eos_token) == (False, True)
    saved = Tokenizer.from_pretrained(tmp_path / "out")
    assert (saved.add_bos_token, saved.add_eos_token) == (True, False)


def test_a_tokenizers_fingerprint_ignores_its_length_limit(tmp_path):
    """model_max_length (1e30 when a config names none, a checkpoint's context, ...) does not change how texts encode:
    data prepared with one tokenizer under two limits mixes, and a directory prepared before stays prepared."""
    inputs, _ = write_inputs(tmp_path)
    prepare_data(inputs[:1], tmp_path / "tok", vocab_size=300, workers=1)
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    fingerprint = data.fingerprint_tokenizer(tok)
    tok.model_max_length = 256
    assert data.fingerprint_tokenizer(tok) == fingerprint
    tok.add_eos_token = True  # what does change the tokens
    assert data.fingerprint_tokenizer(tok) != fingerprint


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tokenizer_directory_encodes_as_its_config_says(tmp_path, workers):
    """A tokenizer directory whose config names another end-of-text token (a chat model's) and adds no word
    prefix: the token files hold what that tokenizer gives each document, and end each with the </s> meta.json
    records, where the loader's document boundaries are found; not the bare model file's ids."""
    inputs, docs = write_inputs(tmp_path)
    prepare_data(inputs[:1], tmp_path / "base", vocab_size=300, workers=1)
    base = Tokenizer(tmp_path / "base" / "tokenizer.model")
    base.add_special_tokens(["<|end|>"])
    base.save_pretrained(tmp_path / "chat")
    config = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
    config |= {"eos_token": "<|end|>", "add_prefix_space": False}
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(config))
    source = Tokenizer.from_pretrained(tmp_path / "chat")
    assert source.eos_id == 300 and source.prefix_scheme == "never"
    meta = prepare_data(inputs, tmp_path / "out", tokenizer=tmp_path / "chat", val_fraction=0, workers=workers)
    assert (meta["bos_id"], meta["eos_id"]) == (source.bos_id, source.eos_id)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    expected = [i for doc in docs for i in source.encode(doc, add_bos=True, add_eos=True, split_special_tokens=True)]
    assert train.tolist() == expected
    batch = next(PackedLoader(tmp_path / "out", "train", seq_len=len(train) - 1, batch_size=1, shuffle=False))
    assert batch["doc_starts"][0].sum() == len(docs)
    # the same model file with another config encodes otherwise: the rerun prepares again, not "already prepared"
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps({**config, "add_prefix_space": None}))
    source = Tokenizer.from_pretrained(tmp_path / "chat")
    meta = prepare_data(inputs, tmp_path / "out", tokenizer=tmp_path / "chat", val_fraction=0, workers=workers)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    assert train.tolist() == [i for doc in docs for i in source.encode(doc, add_eos=True, split_special_tokens=True)]


def test_a_vocabulary_over_65535_tokens_is_stored_as_uint32(tmp_path):
    """Ids above 65535 do not fit uint16: such a vocabulary gets uint32 token files, whose documents decode back
    and whose batches carry the large ids unchanged (a uint16 file would wrap them around)."""
    from ttl_core.tokenizer import _Piece

    inputs, docs = write_inputs(tmp_path)
    prepare_data(inputs[:1], tmp_path / "small", vocab_size=300, workers=1)
    tok = Tokenizer(tmp_path / "small" / "tokenizer.model")
    first_new = tok.vocab_size
    for i in range(65_536 + 64 - first_new):  # CJK Extension B characters, each a whole piece
        tok.proto.pieces.add(piece=chr(0x20000 + i), score=-1e6, type=_Piece.NORMAL)
    tok = Tokenizer(tok.proto.SerializeToString())
    wide = [f"{doc} {chr(0x20000 + 65_535 - first_new + i)}" for i, doc in enumerate(docs[:40])]
    (tmp_path / "wide.txt").write_text("\n\n".join(wide) + "\n")
    meta = prepare_data([tmp_path / "wide.txt"], tmp_path / "out", tokenizer=tok, workers=1)
    check_data_dir(tmp_path / "out", wide, dtype="uint32")
    assert meta["vocab_size"] == 65_600
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint32)
    assert train.max() > 65_535
    batches = PackedLoader(tmp_path / "out", "train", seq_len=len(train) - 1, batch_size=1, shuffle=False)
    assert torch.equal(next(iter(batches))["input_ids"][0], torch.from_numpy(train[:-1].astype(np.int64)))


# --- corpora at scale: the tokenizer's sample, long documents, shards -------------------------------------


@pytest.mark.parametrize("budget", ["bytes", "documents"])
def test_the_tokenizer_trains_on_a_sample_spread_over_all_inputs_within_its_budget(tmp_path, monkeypatch, budget):
    """sentencepiece holds all the text it is given: a corpus over the budget (bytes, or documents, which it reads
    up to a count) gives it a sample of whole documents taken evenly from every input file, not the whole corpus
    nor only the first files (which a corpus of many short documents got, cut at the count)."""
    inputs, docs = write_inputs(tmp_path)
    total_bytes, count = sum(p.stat().st_size for p in inputs), len(docs)
    monkeypatch.setattr(data, "TRAIN_INPUT_BYTES", total_bytes // 2 if budget == "bytes" else total_bytes)
    monkeypatch.setattr(data, "TRAIN_INPUT_SENTENCES", count // 2 if budget == "documents" else count)
    real, seen = data.train_tokenizer, []

    def spy(texts, out, vocab_size, input_sentence_size, **kwargs):  # cut as train_tokenizer cuts (sentencepiece
        texts = itertools.islice(texts, input_sentence_size)  # itself refuses a count of 100 or less)
        return real((seen.append(t) or t for t in texts), out, vocab_size, **kwargs)

    monkeypatch.setattr(data, "train_tokenizer", spy)
    prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1)
    assert len(seen) < 0.6 * count and sum(len(t.encode()) for t in seen) <= total_bytes // 2 + max(map(len, docs)) * 4
    for path in inputs:  # every file contributes
        assert set(seen) & set(read_documents(path)), path.name


def test_shards_hold_tokens_in_the_final_dtype(tmp_path, monkeypatch):
    """The shards kept for resuming use the token files' dtype: uint32 shards of a uint16 vocabulary would
    double the temporary disk space (3x the final files at the end instead of 2x)."""
    inputs, _ = write_inputs(tmp_path)
    dtypes, real = [], data._save_npz
    monkeypatch.setattr(data, "_save_npz", lambda path, **arrays: (dtypes.extend(a.dtype for a in arrays.values()),
                                                                  real(path, **arrays))[1])
    prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, shard_docs=7)
    assert dtypes and set(dtypes) == {np.dtype(np.uint16)}


def test_shards_run_across_input_files(tmp_path, monkeypatch):
    """A shard holds `shard_docs` documents whichever files they come from: one shard a file would cost a
    corpus of many small files a shard file, two fsyncs and a pool round trip per input file."""
    inputs, docs = [], []
    for k in range(6):
        block = [f"documento {k} {j} " + " ".join(random.Random(k * 3 + j).choices(WORDS, k=9)) for j in range(2)]
        (tmp_path / f"f{k}.txt").write_text("\n\n".join(block) + "\n")
        inputs, docs = inputs + [tmp_path / f"f{k}.txt"], docs + block
    saved, real = [], data._save_npz
    monkeypatch.setattr(data, "_save_npz", lambda path, **arrays: (saved.append(path), real(path, **arrays))[1])
    prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, shard_docs=5)
    assert len(saved) == 3  # 12 documents: 5 + 5 + 2
    check_data_dir(tmp_path / "out", docs)

    # the work directory of a run killed under the older layout (a shard per file, no "shards" in its plan)
    # is not resumed: its shard numbers mean other documents
    work = tmp_path / "old" / ".prepare"
    work.mkdir(parents=True)
    plan = json.loads((tmp_path / "out" / "meta.json").read_text())["plan"]
    (work / "plan.json").write_text(json.dumps(plan))
    shutil.copy(tmp_path / "out" / "tokenizer.model", work / "tokenizer.model")
    data._save_npz(work / "0000001.npz", train=np.array([1, 5, 2], np.uint32), val=np.zeros(0, np.uint32))
    prepare_data(inputs, tmp_path / "old", vocab_size=300, workers=1, shard_docs=5)
    assert read_outputs(tmp_path / "old") == read_outputs(tmp_path / "out")


def test_data_prepared_from_other_inputs_is_replaced_only_when_asked(tmp_path):
    """A second prepare_data into a finished directory with other inputs or settings would replace the data (and the
    tokenizer) a run trained on: with replace=False (prepare_data.py without --overwrite) it is refused; the same
    inputs, and damaged token files from them, are not."""
    inputs, _ = write_inputs(tmp_path, seed=int(torch.randint(0, 1000, ())))
    prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1)
    before = read_outputs(tmp_path / "out")
    assert prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, replace=False)  # the same: nothing to do
    with pytest.raises(DataError, match=f"^{tmp_path / 'out'} already holds data prepared from other inputs or "
                                        "settings; pass --overwrite"):
        prepare_data(inputs[:2], tmp_path / "out", vocab_size=300, workers=1, replace=False)
    assert read_outputs(tmp_path / "out") == before
    (tmp_path / "out" / "train.bin").write_bytes(before["train.bin"][:-2])  # damaged, same inputs: prepared again
    prepare_data(inputs, tmp_path / "out", vocab_size=300, workers=1, replace=False)
    assert read_outputs(tmp_path / "out") == before
    assert prepare_data(inputs[:2], tmp_path / "out", vocab_size=300, workers=1, replace=True)["documents"] < \
        json.loads(before["meta.json"])["documents"]


@pytest.mark.parametrize("total", [1, 3, 9, 30, 300])
def test_the_val_fraction_a_warning_suggests_holds_a_document_out(tmp_path, total):
    """The smallest val_fraction that holds one of n documents out is 1/n: said rounded to nearest (0.333 of 3
    is 0.999 documents) it held none out still, and for one document (which nothing can split) it was 1."""
    (tmp_path / "c.txt").write_text("".join(f"doc {k}\n\n" for k in range(total)))
    tok = train_tokenizer([" ".join(WORDS)] * 50, None, vocab_size=300)
    with pytest.warns(UserWarning, match="holds none out") as warned:
        prepare_data([tmp_path / "c.txt"], tmp_path / "out", tokenizer=tok, val_fraction=1e-9)
    suggested = re.search(r"use at least ([^,]+),", str(warned[0].message))
    if total == 1:
        assert not suggested and "one document" in str(warned[0].message)
    else:
        meta = prepare_data([tmp_path / "c.txt"], tmp_path / "out", tokenizer=tok, val_fraction=float(suggested[1]))
        assert meta["val_documents"] == 1
