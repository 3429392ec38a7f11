"""Pretraining data: text files -> token files (`prepare_data`), and token files -> packed batches (`PackedLoader`).

A prepared directory holds `train.bin` and `val.bin` (uint16 token ids, uint32 above 65,535 tokens; each
document stored as BOS tokens EOS), the tokenizer (`tokenizer.model` plus the HF tokenizer files) and
`meta.json` with the counts. Preparation works in parts of documents written atomically, so an interrupted
run picks up where it stopped and produces the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .errors import DataError
from .fileio import atomic_write, write_json
from .tokenizer import Tokenizer, train_tokenizer

SAMPLE_DIR = Path(__file__).parent / "sample_data"
SAMPLE_CORPUS: list[Path] = sorted(SAMPLE_DIR.glob("corpus_*.txt"))
DOCS_PER_PART = 2000
META = "meta.json"


# --- reading documents --------------------------------------------------------------------------------------

def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); convert the file to UTF-8") from None


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of one input file: blank-line-separated blocks of a .txt, the `text` field of each
    .jsonl line, the `text` column of a .parquet (needs pyarrow). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}:{number}: the JSON object has no 'text' field")
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{number}: 'text' must be a string, got {type(record['text']).__name__}")
            if record["text"].strip():
                yield record["text"]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        yield from (t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip())
    elif suffix in (".txt", ".text", ".md"):
        for block in re.split(r"\n[ \t\r]*\n", _read_utf8(path)):
            if block.strip():
                yield block.strip()
    else:
        raise DataError(f"{path}: unsupported input type {suffix!r} (use .txt, .jsonl or .parquet)")


def _documents(inputs: list[Path]) -> Iterator[str]:
    for path in inputs:
        count = 0
        for doc in iter_documents(path):
            count += 1
            yield doc
        if count == 0:
            raise DataError(f"{path}: no documents (the file is empty or blank)")


def _parts(inputs: list[Path]) -> Iterator[list[str]]:
    part: list[str] = []
    for doc in _documents(inputs):
        part.append(doc)
        if len(part) == DOCS_PER_PART:
            yield part
            part = []
    if part:
        yield part


# --- tokenizing ---------------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_proto=model_bytes)


def _tokenize_part(job: tuple[int, list[str], float, str]) -> tuple[int, np.ndarray, np.ndarray, int, int]:
    """(part index, train tokens, val tokens, train docs, val docs); the split is a seeded draw per part
    (the very first document always goes to validation so a non-zero fraction never leaves it empty)."""
    index, docs, val_fraction, dtype = job
    is_val = np.random.default_rng([1234, index]).random(len(docs)) < val_fraction
    if index == 0 and val_fraction > 0:
        is_val[0] = True
    out: dict[bool, list[int]] = {False: [], True: []}
    for doc, val in zip(docs, is_val):
        out[bool(val)].extend(_worker_tokenizer.encode(doc, add_bos=True, add_eos=True))
    return (index, np.asarray(out[False], dtype=dtype), np.asarray(out[True], dtype=dtype),
            int((~is_val).sum()), int(is_val.sum()))


def _write_parts(results: Iterator[tuple], parts_dir: Path, bar: tqdm) -> None:
    for index, train_ids, val_ids, n_train, n_val in results:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, train=train_ids, val=val_ids, docs=np.array([n_train, n_val]))
        atomic_write(parts_dir / f"part-{index:06d}.npz", write)
        bar.update(1)


def _fingerprint(inputs: list[Path], vocab_size: int, tokenizer: str | None, val_fraction: float) -> str:
    """Identifies the work of a run, so parts left by a different one are never reused."""
    items = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    return hashlib.sha256(json.dumps([items, vocab_size, tokenizer, val_fraction, DOCS_PER_PART]).encode()).hexdigest()


def _load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    return Tokenizer.from_pretrained(path) if path.is_dir() else Tokenizer(path)


def prepare_data(inputs: Iterable[str | Path], out_dir: str | Path, vocab_size: int = 4096,
                 tokenizer: str | Path | None = None, val_fraction: float = 0.05, workers: int | None = None) -> dict:
    """Tokenize text files into a prepared directory (see the module docstring); returns meta.json's content.

    Trains a tokenizer of `vocab_size` on the inputs unless `tokenizer` (a .model file or an HF tokenizer
    directory) is given. Rerunning after an interruption reuses the finished parts."""
    inputs = [Path(p) for p in inputs]
    out = Path(out_dir)
    if not inputs:
        raise DataError("prepare_data needs at least one input file")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for path in inputs:
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    parts_dir = out / ".parts"
    fingerprint = _fingerprint(inputs, vocab_size, str(tokenizer) if tokenizer else None, val_fraction)
    plan = parts_dir / "plan.json"
    if not plan.exists() or json.loads(plan.read_text()).get("fingerprint") != fingerprint:
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir()
        write_json(plan, {"fingerprint": fingerprint})

    model_path = parts_dir / "tokenizer.model"
    if not model_path.exists():
        if tokenizer is not None:
            _load_tokenizer(tokenizer).save_model(model_path)
        else:
            with tempfile.TemporaryDirectory() as tmp:  # sentencepiece trains from plain text files
                corpus = Path(tmp) / "corpus.txt"
                with open(corpus, "w", encoding="utf-8") as f:
                    for doc in _documents(inputs):
                        f.write(doc + "\n")
                train_tokenizer([corpus], Path(tmp) / "tokenizer.model", vocab_size)
                shutil.copyfile(Path(tmp) / "tokenizer.model", model_path)
    tok = Tokenizer(model_path)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"

    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.npz")}
    jobs = ((i, docs, val_fraction, dtype) for i, docs in enumerate(_parts(inputs)) if i not in done)
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(desc="tokenizing", unit=" parts", disable=None) as bar:
        if workers == 1:
            _init_worker(model_path.read_bytes())
            _write_parts(map(_tokenize_part, jobs), parts_dir, bar)
        else:
            with get_context("fork").Pool(workers, _init_worker, (model_path.read_bytes(),)) as pool:
                _write_parts(pool.imap_unordered(_tokenize_part, jobs), parts_dir, bar)

    counts = {"train": 0, "val": 0}
    documents = {"train": 0, "val": 0}
    parts = sorted(parts_dir.glob("part-*.npz"))
    for split in ("train", "val"):
        def concatenate(tmp: Path, split=split) -> None:
            with open(tmp, "wb") as f:
                for part in parts:
                    with np.load(part) as arrays:
                        arrays[split].tofile(f)
                        counts[split] += len(arrays[split])
                        documents[split] += int(arrays["docs"][0 if split == "train" else 1])
        atomic_write(out / f"{split}.bin", concatenate)
    if counts["train"] == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no training tokens (all documents went to validation)")
    tok.save_pretrained(out)
    meta = {"vocab_size": tok.vocab_size, "dtype": dtype, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "train_documents": documents["train"], "val_documents": documents["val"],
            "documents": documents["train"] + documents["val"], "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "inputs": [str(p) for p in inputs]}
    write_json(out / META, meta)
    shutil.rmtree(parts_dir)
    return meta


# --- loading batches ----------------------------------------------------------------------------------------

def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir} is not a prepared data directory (no {META}); run scripts/prepare_data.py") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt ({e})") from None


class PackedLoader:
    """Fixed-length blocks from a memory-mapped token file, in a seeded order, sharded over ranks.

    The token stream is cut into blocks of `seq_len + 1` tokens at stride `seq_len` (inputs = block[:-1],
    labels = block[1:]). Each epoch shuffles the blocks with (seed, epoch); global batch g takes blocks
    [g·B·W, (g+1)·B·W) of that order and rank r its r-th B of them, so the ranks' batches together equal
    the batch one process of batch size B·W would see. The last incomplete global batch is dropped.
    `shuffle=False` reads the blocks in order, once (evaluation). `doc_starts` marks position 0 and each
    position where a new document begins (its BOS, or the token after an EOS)."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        meta = read_meta(data_dir)
        path = Path(data_dir) / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        self.bos_id, self.eos_id = meta["bos_id"], meta["eos_id"]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.num_blocks = max(0, (len(self.tokens) - 1) // seq_len)
        self.batches_per_epoch = self.num_blocks // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{path}: {len(self.tokens)} tokens make {self.num_blocks} blocks of {seq_len + 1}, fewer "
                            f"than one global batch of {batch_size * world_size}; use more data or smaller batches")
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_blocks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_blocks)

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index == self.batches_per_epoch:
            if not self.shuffle:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        first = (self.index * self.world_size + self.rank) * self.batch_size
        blocks = self._order[first:first + self.batch_size]
        self.index += 1
        S = self.seq_len
        rows = torch.from_numpy(np.stack([self.tokens[b * S:b * S + S + 1].astype(np.int64) for b in blocks]))
        inputs = rows[:, :-1]
        doc_starts = inputs == self.bos_id
        doc_starts[:, 1:] |= inputs[:, :-1] == self.eos_id
        doc_starts[:, 0] = True
        return {"input_ids": inputs, "labels": rows[:, 1:], "doc_starts": doc_starts}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` was taken; the batch geometry must be the same."""
        for key in ("seed", "batch_size", "world_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(f"the saved data position was taken with {key}={state[key]}, not {getattr(self, key)}; "
                                "resume with the same batch layout")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
