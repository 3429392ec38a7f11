"""ttl_core.documents: the documents of a .parquet input, and the one-line errors of one that is not a parquet
file of texts; an input that changes while prepare_data reads it."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

import ttl_core.data as data
import ttl_core.documents as documents
from ttl_core.data import prepare_data
from ttl_core.documents import read_documents
from ttl_core.errors import DataError
from ttl_core.tokenizer_train import train_tokenizer


def test_parquet_input(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = ["primeiro documento em parquet", "", "segundo, com acentuação: ação e coração"]
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3]}), tmp_path / "docs.parquet", row_group_size=2)
    assert list(read_documents(tmp_path / "docs.parquet")) == [texts[0], texts[2]]
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: no 'text' column"):
        list(read_documents(tmp_path / "bad.parquet"))
    # damaged compressed pages, found only as the rows are read, are an OSError from pyarrow, not an ArrowException
    pq.write_table(pa.table({"text": [f"documento {i} " * 20 for i in range(200)]}), tmp_path / "big.parquet",
                   row_group_size=50)
    damaged = bytearray((tmp_path / "big.parquet").read_bytes())
    damaged[len(damaged) // 3:len(damaged) // 3 + 200] = bytes(200)
    (tmp_path / "damaged.parquet").write_bytes(damaged)
    with pytest.raises(DataError, match=r"damaged\.parquet: not a readable parquet file \("):
        list(read_documents(tmp_path / "damaged.parquet"))


def test_only_the_file_start_loses_a_byte_order_mark(tmp_path):
    """A BOM opening the file is the editor's (as Python's utf-8-sig reads it); U+FEFF further on is the text's."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfprimeiro\n\n\xef\xbb\xbfsegundo\n")
    assert list(read_documents(tmp_path / "bom.txt")) == ["primeiro", "\ufeffsegundo"]


@pytest.mark.parametrize("chunk_lines", [1, 2, 3, 1024])
def test_txt_documents_are_the_blank_line_separated_blocks_as_written(tmp_path, monkeypatch, chunk_lines):
    """Each block's text is kept as written (trailing spaces, a lone "\r", Unicode line separators) but for the
    line end after its last line; a "\r\n" line end reads as "\n". Lines are joined in chunks as they are read
    (`_CHUNK_LINES`): a block that ends at a chunk's end loses its last line end too."""
    monkeypatch.setattr(documents, "_CHUNK_LINES", chunk_lines)
    blocks = [["um  ", "dois\t"], ["tres \r quatro"], ["cinco", "seis", "sete", "oito"], [" nove\u2028dez "]]
    for line_end in ("\n", "\r\n"):
        text = "\n \t\n" + (line_end * 2).join(line_end.join(block) for block in blocks) + line_end + " \n"
        (tmp_path / "docs.txt").write_bytes(text.encode("utf-8"))
        assert list(read_documents(tmp_path / "docs.txt")) == ["\n".join(block) for block in blocks], line_end


@pytest.mark.parametrize("chunk_lines", [1, 2, 1024])
def test_a_block_ending_in_a_lone_carriage_return_reads_alike_whatever_the_chunk_size(tmp_path, monkeypatch,
                                                                                      chunk_lines):
    """The "\r" a block's last line ends with goes with its line end, whether the block ends inside a chunk or at a
    chunk's end (`_document` strips the one or the other): how lines are chunked never shows in the documents."""
    monkeypatch.setattr(documents, "_CHUNK_LINES", chunk_lines)
    (tmp_path / "docs.txt").write_bytes(b"um\r\r\n\r\ndois\ntres\r\r\n\nquatro\r")
    assert list(read_documents(tmp_path / "docs.txt")) == ["um", "dois\ntres", "quatro"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("changed, text", [("a.txt", "um\n\ndois\n\nmais um\n"), ("a.txt", "um\n"),
                                           ("b.jsonl", '{"text": "tres"}\n{"text": "quatro"}\n')])
def test_an_input_that_changes_while_it_is_prepared_is_named_not_tokenized_in_part(tmp_path, monkeypatch, workers,
                                                                                 changed, text):
    """Documents are counted before they are tokenized, and the counts make meta.json and the val split: a file
    still being written (a download appending to it) that gains or loses documents in between would leave token
    files that do not fit meta.json, and a rerun would find them prepared already."""
    (tmp_path / "a.txt").write_text("um\n\ndois\n")
    (tmp_path / "b.jsonl").write_text('{"text": "tres"}\n')
    tok = train_tokenizer(["um dois tres quatro outro"] * 10, None, vocab_size=300)
    counted = data.count_documents

    def count_then_change(paths):
        counts = counted(paths)
        (tmp_path / changed).write_text(text)
        return counts

    monkeypatch.setattr(data, "count_documents", count_then_change)
    with pytest.raises(DataError, match=f"{changed}: changed while being prepared"):
        prepare_data([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", tokenizer=tok, val_fraction=0.5,
                     workers=workers, shard_docs=1)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_an_input_that_changes_lets_the_busy_workers_finish_rather_than_killing_them(tmp_path, monkeypatch):
    """A worker killed (SIGTERM) as it sends a result keeps the result queue's lock for good, and the pool's
    shutdown then waits on that lock forever: prepare_data hung, rarely, with two zombie workers, instead of
    naming the changed input. Stopping on the error must let a worker busy with a shard finish, not kill it."""
    (tmp_path / "a.txt").write_text("um\n\ndois\n")
    tok = train_tokenizer(["um dois tres quatro outro"] * 10, None, vocab_size=300)
    counted, encode = data.count_documents, data._encode_document

    def count_then_grow(paths):
        counts = counted(paths)
        (tmp_path / "a.txt").write_text("um\n\ndois\n\nmais um\n")
        return counts

    def slow_on_dois(text, out):  # the worker given "dois" is still busy when the third document is found
        time.sleep(1 if text == "dois" else 0)
        encode(text, out)

    killed = []
    terminate = multiprocessing.process.BaseProcess.terminate
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "terminate", lambda p: killed.append(p) or terminate(p))
    monkeypatch.setattr(data, "count_documents", count_then_grow)
    monkeypatch.setattr(data, "_encode_document", slow_on_dois)  # the forked workers inherit it
    with pytest.raises(DataError, match="a.txt: changed while being prepared"):
        prepare_data([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tok, val_fraction=0, workers=2, shard_docs=1)
    assert killed == []


CTRL_C_AS_A_SHARD_IS_SAVED = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job ignores Ctrl-C
import ttl_core.data as data
from ttl_core.tokenizer_train import train_tokenizer
save, encode = data.atomic_write, data._encode_document

def interrupted(path, write):  # while the parent saves the first shard, the workers tokenize the next ones
    if path.suffix == ".npz":
        os.killpg(0, signal.SIGINT)
        time.sleep(5)
    save(path, write)

data.atomic_write = interrupted
data._encode_document = lambda text, out: time.sleep(0.01) or encode(text, out)  # the forked workers inherit it
tok = train_tokenizer(["um dois tres quatro outro"] * 10, None, vocab_size=300)
data.prepare_data([sys.argv[1]], sys.argv[2], tokenizer=tok, val_fraction=0, workers=2, shard_docs=50)
"""


def test_ctrl_c_stops_prepare_data_at_once_while_its_workers_are_busy(tmp_path):
    """Ctrl-C reaches the whole process group. Workers it stopped mid-shard never returned their tasks, and the
    pool's shutdown waited for them forever (unless the parent was itself waiting on a result); the workers now
    leave Ctrl-C to the parent, which stops, lets them finish their shards, and alone prints the interrupt."""
    (tmp_path / "a.txt").write_text("\n\n".join(["um dois tres quatro outro"] * 500))
    (tmp_path / "interrupted.py").write_text(CTRL_C_AS_A_SHARD_IS_SAVED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, tmp_path / "interrupted.py", tmp_path / "a.txt", tmp_path / "out"],
                          env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode != 0 and done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr
    assert "ForkPoolWorker" not in done.stderr, done.stderr


def test_a_worker_killed_mid_shard_stops_prepare_data_in_one_line(tmp_path, monkeypatch):
    """A worker the kernel kills (out of memory: sentencepiece takes ~50 bytes a character of a document) never
    returns its shard: the pool waited for it forever, where the run must stop and say what happened."""
    (tmp_path / "a.txt").write_text("um\n\ndois\n\ntres\n\nquatro\n")
    tok = train_tokenizer(["um dois tres quatro outro"] * 10, None, vocab_size=300)
    encode = data._encode_document
    # the forked workers inherit it
    monkeypatch.setattr(data, "_encode_document", lambda text, out: text == "tres" and os.kill(os.getpid(), 9)
                        or encode(text, out))
    with pytest.raises(DataError, match=r"^a tokenizing worker died \(killed, out of memory\?\)"):
        prepare_data([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tok, val_fraction=0, workers=2, shard_docs=1)


def test_an_input_that_is_a_pipe_is_named_as_one_not_as_missing(tmp_path):
    """A named pipe (`mkfifo corpus.txt` fed by `zcat`) exists, but prepare_data reads every input more than once
    (counting, the tokenizer's sample, tokenizing): said to be no such file, it would send the user looking for
    a file that is there."""
    os.mkfifo(tmp_path / "corpus.txt")
    with pytest.raises(DataError, match=r"corpus\.txt: not a regular file \(a pipe or device"):
        list(read_documents(tmp_path / "corpus.txt"))
    with pytest.raises(DataError, match=r"missing\.txt: no such file$"):
        list(read_documents(tmp_path / "missing.txt"))


def test_an_input_named_twice_is_refused_not_tokenized_twice(tmp_path, monkeypatch):
    # overlapping globs (corpus/*.txt corpus/pt*.txt) named a file twice: its documents were tokenized twice, and
    # the evenly spread validation split then held copies of training documents
    (tmp_path / "corpus").mkdir()
    doc = tmp_path / "corpus" / "pt.txt"
    doc.write_text("primeiro documento\n\nsegundo documento\n")
    other = tmp_path / "en.jsonl"
    other.write_text('{"text": "first document"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^corpus/pt.txt is given twice \(also as corpus/../corpus/pt.txt\): give "
                                        r"each input once$"):
        prepare_data(["corpus/pt.txt", other, "corpus/../corpus/pt.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()  # refused before any work
    # ttl_core.train_tokenizer, public, takes files too: a file named twice would weigh twice in the vocabulary
    with pytest.raises(DataError, match=r"^corpus/pt.txt is given twice \(also as corpus/../corpus/pt.txt\)"):
        train_tokenizer(["corpus/pt.txt", "corpus/../corpus/pt.txt"], tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok.model").exists()
