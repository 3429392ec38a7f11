"""prepare_data on a .txt without blank lines, which is one document however large: the text it reads, and the
memory it takes to read and tokenize it."""

import array
import random
import sys
import tracemalloc

import numpy as np
import pytest

import ttl_core.data as data
import ttl_core.documents as documents
from ttl_core.data import prepare_data, read_documents
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

WORDS = "o rio a serra café manhã ponte escola árvore chuva João às 12h30 — ótimo! ação".split()


def one_paragraph(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines))


@pytest.mark.parametrize("chunk_lines", [1, 2, 3, 1024])
def test_a_document_is_its_lines_joined_wherever_the_chunks_of_lines_end(tmp_path, monkeypatch, chunk_lines):
    """_read_txt joins a long block's lines in chunks as it reads them: blocks of one line up to several chunks,
    ending on a chunk's last line or not, with Windows line ends and a "\\r" inside a line, read as they are."""
    monkeypatch.setattr(documents, "_CHUNK_LINES", chunk_lines)
    rng = random.Random(1)
    blocks = [[f"{rng.choice(WORDS)} {n}.{k}" + ("\rx" if k == 1 else "") for k in range(n)] for n in range(1, 8)]
    ends = ["\n", "\r\n"]
    text = "".join("".join(line + ends[k % 2] for k, line in enumerate(block)) + "\n" * (1 + n % 2)
                   for n, block in enumerate(blocks))
    (tmp_path / "t.txt").write_bytes(text.encode())
    (tmp_path / "no_blank_line_at_the_end.txt").write_bytes(text.removesuffix("\n").encode())
    for name in ("t.txt", "no_blank_line_at_the_end.txt"):
        assert list(read_documents(tmp_path / name)) == ["\n".join(block) for block in blocks], name


def test_a_long_document_is_read_and_tokenized_in_about_three_times_its_size(tmp_path):
    """Its lines were kept as strings of their own (~50 bytes each beside the text), joined, copied again to strip
    the end, and its ids made Python lists of ints per piece of a million characters, then copied twice to be
    joined: Python's allocations peaked near 23 times the text (a 60 MB file took 591 MiB of RSS, now 421; the same
    text in paragraphs 304, 298 of them the imports). Now about 3 times, plus a constant."""
    text = one_paragraph(10_000)
    (tmp_path / "long.txt").write_text(text + "\n", encoding="utf-8")
    tok = train_tokenizer([text[:20_000]], None, vocab_size=300)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]  # none, unless something traced already
        tracemalloc.reset_peak()
        meta = prepare_data([tmp_path / "long.txt"], tmp_path / "out", tokenizer=tok, val_fraction=0, workers=1)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    assert ids.tolist() == tok.encode(text, add_bos=True, add_eos=True, split_special_tokens=True)
    assert peak < 3 * sys.getsizeof(text) + (4 << 20), f"{peak / sys.getsizeof(text):.1f} times the text"


def test_a_long_document_is_encoded_in_pieces_with_the_ids_of_the_whole(tmp_path, monkeypatch):
    """sentencepiece needs ~50 bytes of memory per character of a text it encodes at once, so a long document
    (a .txt without blank lines is one) goes in pieces cut between words, which give the ids of the whole text."""
    tok = train_tokenizer([one_paragraph(300)], None, vocab_size=300)
    rng = random.Random(1)
    seps = [" ", " ", " ", "  ", "\n", " \n ", "\t", " \u2581", "\u2581 ", "   ", "😀 "]
    long_doc = "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(3000)).strip()
    (tmp_path / "long.txt").write_text(long_doc + "\n")
    monkeypatch.setattr(data, "_PIECE_CHARS", 50)
    lengths, real = [], Tokenizer.encode

    def encode(self, text, **kwargs):
        lengths.append(len(text))
        return real(self, text, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", encode)
    meta = prepare_data([tmp_path / "long.txt"], tmp_path / "out", tokenizer=tok, val_fraction=0, workers=1)
    assert max(lengths) < 200  # pieces, not the whole 20,000-character document
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    whole = real(tok, long_doc, add_bos=True, add_eos=True, split_special_tokens=True)
    assert train.tolist() == whole
    tok.save_pretrained(tmp_path / "worker")
    data._init_worker(tmp_path / "worker")
    for size in (1, 7, 333):  # cuts everywhere the text allows one, and a few
        monkeypatch.setattr(data, "_PIECE_CHARS", size)
        data._encode_document(long_doc, ids := array.array("H"))
        assert ids.tolist() == whole
    tok.proto.normalizer_spec.remove_extra_whitespaces = True  # a cut piece's leading space would be dropped
    assert not data._cuttable(tok)


@pytest.mark.parametrize("flag", ["lstrip", "rstrip"])
def test_a_long_document_with_tokens_that_take_whitespace_has_the_ids_of_the_whole(tmp_path, monkeypatch, flag):
    """An added token that takes the whitespace beside it (lstrip / rstrip) takes it across a place where a long
    document could be cut ("zz|   o", "o\\t| zz"): its pieces would keep that whitespace as text, so such a
    tokenizer encodes a document whole."""
    from transformers import AddedToken, AutoTokenizer

    rng = random.Random(2)
    seps = [" ", "  ", "\t ", " zz ", "zz   ", "\u00a0 zz", "\t zz\t "]
    text = "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(400)).strip()
    train_tokenizer([one_paragraph(300)], None, vocab_size=300).save_pretrained(tmp_path / "base")
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    hf.add_tokens([AddedToken("zz", normalized=False, special=False, **{flag: True})])
    hf.save_pretrained(tmp_path / "tok")
    data._init_worker(tmp_path / "tok")
    whole = data._worker_tokenizer.encode(text, add_bos=True, add_eos=True, split_special_tokens=True)
    assert whole[1:-1] == hf(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "_PIECE_CHARS", 1)  # a cut wherever the text allows one
    data._encode_document(text, ids := array.array("H"))
    assert ids.tolist() == whole
