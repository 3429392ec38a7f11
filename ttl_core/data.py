"""Training data: text files -> token files (`prepare_data`); `ttl_core.loader` reads them.

A data directory holds `train.bin` / `val.bin` (each document stored as `<s>` tokens `</s>`, uint16, or uint32
when the vocabulary exceeds 65535), the tokenizer (`tokenizer.model` plus transformers' files) and `meta.json`
(with each token file's token count and SHA-256, which `ttl_core.loader` checks the file against).
`prepare_data` tokenizes in shards with every core it may use; each finished shard is saved under
`DIR/.prepare/`, so an interrupted run resumes where it stopped and writes exactly what an uninterrupted run
would."""

from __future__ import annotations

import array
import copy
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .documents import count_documents, read_documents
from .errors import DataError
from .fileio import atomic_write, write_json
from .loader import check_token_file, is_int
from .tokenizer import Tokenizer
from .tokenizer_train import TRAIN_INPUT_BYTES, TRAIN_INPUT_SENTENCES, train_tokenizer, valid_vocab_size

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_CORPUS = sorted(SAMPLE_DIR.glob("*.txt"))
_TYPECODES = {np.uint16: "H", np.uint32: "I"}  # array.array's: C's unsigned short and int, 2 and 4 bytes

_worker_tokenizer: Tokenizer | None = None
_worker_cuts = False  # whether _worker_tokenizer may encode a long document in pieces (see _cuttable)
# a longer document is encoded in pieces of about this many characters: each piece's ids come back as a Python
# list (~36 bytes a token), and sentencepiece is slower on long texts (a 60 MB document took 38 s in pieces of
# 2**20 characters, 13 s in pieces of 2**16)
_PIECE_CHARS = 1 << 16
_WORD_END = re.compile(r"[^ \u2581](?= )")  # a character a space follows: a cut after it splits no word


def _init_worker(tokenizer_dir: str | os.PathLike) -> None:
    global _worker_tokenizer, _worker_cuts
    # the whole directory, not the model file alone: its config may name another </s> or no word prefix
    _worker_tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    _worker_cuts = _cuttable(_worker_tokenizer)


def _init_pool_worker(tokenizer_dir: str | os.PathLike, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent alone stops (and says so), and lets the workers finish
    # their shards rather than each dropping its task with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _init_worker(tokenizer_dir)


def _exit_with_parent(parent: int) -> None:
    """End this worker once `parent` is gone: a parent killed outright (SIGKILL, the out-of-memory killer) never
    shuts its pool down, and the workers would wait for their next shard forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _cuttable(tok: Tokenizer) -> bool:
    """Whether a text cut before the space of a word start encodes as the whole: the normalizer keeps the text
    as it is, no piece has "▁" after another character, so no token spans the cut, and no added token that
    matches in a corpus (one not special) takes the whitespace beside it (lstrip / rstrip), which a cut divides, or
    is a whole word starting with a space, whose word before a cut hides (`Tokenizer.plain_tokens_take_whitespace`)."""
    spec = tok.proto.normalizer_spec
    return (spec.escape_whitespaces and not spec.remove_extra_whitespaces and not spec.precompiled_charsmap
            and not tok.plain_tokens_take_whitespace
            and not any(_WORD_END.search(p.piece.replace("\u2581", " ")) for p in tok.proto.pieces))


def _encode_document(text: str, out: array.array) -> None:
    """Append `<s>` ids `</s>` of one document to `out`, which grows in place: a shard's ids are never copied to be
    joined. sentencepiece needs ~50 bytes of memory per character of a text it encodes at once (4.7 GB for a 100 MB
    document, as a .txt without blank lines is one), so where the tokenizer allows, a long text goes in pieces of
    about _PIECE_CHARS characters, which give the ids of the whole."""
    tok, start = _worker_tokenizer, 0
    out.append(tok.bos_id)
    while start < len(text):
        cut = _WORD_END.search(text, start + _PIECE_CHARS) if _worker_cuts else None
        end = cut.end() if cut else len(text)
        # a corpus that writes "</s>" means the characters: only the ids added here end documents for the loader
        out.extend(tok.encode(text[start:end], add_bos=False, add_eos=False, split_special_tokens=True))
        start = end
    out.append(tok.eos_id)


def _tokenize_shard(job: tuple[int, int, list[str], float]) -> tuple[int, np.ndarray, np.ndarray, int]:
    """Tokenize one shard: (shard id, first global document index, texts, val fraction) -> token arrays."""
    shard, first, texts, val_fraction = job
    # shards wait on disk until assembly: in the token files' dtype they take no more room than those
    dtype = _token_dtype(_worker_tokenizer.vocab_size)
    train, val = array.array(_TYPECODES[dtype]), array.array(_TYPECODES[dtype])
    for k, text in enumerate(texts, first):
        _encode_document(text, val if _evenly(k, val_fraction) else train)
    return shard, np.frombuffer(train, dtype), np.frombuffer(val, dtype), len(texts)


def usable_cpus() -> int:
    """The CPUs this process may run on: under a scheduler (SLURM, a container's cpuset) fewer than the machine
    has, which os.cpu_count() reports and which would oversubscribe the allowed ones."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 65535 else np.uint32


def _bookkeeping(path: Path) -> object:
    """One of prepare_data's own JSON files, or None when missing or unreadable: the work it describes is
    then redone rather than trusted (or reported, since only prepare_data writes these)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _evenly(k: int, fraction: float) -> bool:
    """Whether document k is among an evenly spread `fraction` of the documents (held out for validation, or
    in the tokenizer's sample): when the running count floor((k+1) * fraction) steps up, so every file contributes."""
    return int((k + 1) * fraction) > int(k * fraction)


def _least_fraction(total: int) -> float:
    """1/total rounded up to three significant digits: the val_fraction to suggest for holding out one of `total`
    documents (rounded to nearest, 1/3 would be 0.333, which holds out floor(0.999) = none)."""
    units = 10 ** (len(str(total)) + 2)  # 1/total is k/units, k in [100, 1000]
    return -(-units // total) / units


def _fingerprint(paths: list[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": (st := p.stat()).st_size, "mtime_ns": st.st_mtime_ns} for p in paths]


def prepare_data(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int = 4096,
                 tokenizer: str | os.PathLike | Tokenizer | None = None, val_fraction: float = 0.1,
                 workers: int | None = None, shard_docs: int = 1024, replace: bool = True) -> dict:
    """Tokenize text files into a data directory (see the module docstring) and return its meta.json contents.

    Trains a `vocab_size` tokenizer on the inputs (TRAIN_INPUT_BYTES and TRAIN_INPUT_SENTENCES documents of them
    at most, see `_tokenizer_sample`) unless `tokenizer` (a `.model` file, an HF tokenizer directory or a
    `Tokenizer`) is given. Every document becomes `<s>` tokens `</s>`; about `val_fraction` of them, spread
    evenly, go to `val.bin` (none with 0: `train.eval_every = 0`; all with 1: a `data.eval` set). `workers`
    processes (default: every core this process may use) tokenize shards of `shard_docs` documents; rerunning
    after an interruption reuses the finished shards and gives identical files. A directory already prepared from
    other inputs or settings is replaced, or with `replace=False` refused."""
    if isinstance(inputs, (str, os.PathLike)):  # one file, not the characters of its name
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("prepare_data: no input files")
    if not 0 <= val_fraction <= 1:
        raise DataError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if workers is not None and not (is_int(workers) and workers >= 1):
        raise DataError(f"workers must be an integer >= 1 (left unset: every usable core), got {workers!r}")
    if not (is_int(shard_docs) and shard_docs >= 1):
        raise DataError(f"shard_docs must be an integer >= 1, got {shard_docs!r}")
    if tokenizer is None and not valid_vocab_size(vocab_size):  # said before the corpus is read
        raise DataError(f"vocab_size (to train a tokenizer) must be an integer in [4, 2**31), got {vocab_size!r}")
    out_dir = Path(out_dir)
    work = out_dir / ".prepare"
    counts = count_documents(paths)  # validates every file before any work
    total = sum(counts)
    if total and val_fraction and int(total * val_fraction) == 0:  # `_evenly` holds out floor(n * f)
        fix = f"use at least {_least_fraction(total):g}, or" if total > 1 else "one document cannot be split:"
        warnings.warn(f"val_fraction {val_fraction} of {total} documents holds none out: val.bin will be empty "
                      f"({fix} train with train.eval_every=0)", stacklevel=2)
    source = _load_tokenizer(tokenizer)
    # "encoding" names how text becomes ids; a change to it makes directories prepared before it stale
    plan = {"inputs": _fingerprint(paths), "documents": counts, "val_fraction": val_fraction,
            "shard_docs": shard_docs, "tokenizer": fingerprint_tokenizer(source) if source else f"train:{vocab_size}",
            "encoding": "special tokens as text; CRLF as LF"}
    # the shard layout matters to resuming only: it goes in the work directory's plan (an older layout numbered
    # shards otherwise), not in meta.json, so directories prepared before stay valid
    work_plan = {**plan, "shards": "shard_docs documents of all inputs in order"}
    meta_path = out_dir / "meta.json"
    previous = _bookkeeping(meta_path)
    if isinstance(previous, dict) and previous.get("plan") == plan and _outputs_fit(out_dir, previous):
        # this run's own leftovers go (stopped before removing them, or midway: plan.json gone, shards not);
        # another run's stay, to resume from
        if work.is_dir() and _bookkeeping(work / "plan.json") in (work_plan, None):
            shutil.rmtree(work)
        return previous  # already prepared from these exact inputs
    if isinstance(previous, dict) and previous.get("plan") not in (None, plan) and not replace:
        raise DataError(f"{out_dir} already holds data prepared from other inputs or settings; pass --overwrite to "
                        "replace it (runs trained on it would no longer resume), or choose another --out")
    if work.is_dir() and _bookkeeping(work / "plan.json") != work_plan:
        shutil.rmtree(work)  # leftovers of a different run (or of one whose plan is unreadable)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "plan.json", work_plan)

    model_path = work / "tokenizer.model"  # a trained tokenizer, kept for a resumed run
    if source is not None:
        tok = source
    elif model_path.is_file():
        tok = Tokenizer(model_path)
    else:
        tok = train_tokenizer(_tokenizer_sample(paths, total), None, vocab_size, input_bytes=TRAIN_INPUT_BYTES,
                              input_sentence_size=TRAIN_INPUT_SENTENCES)
        tok.save(model_path)
    tok.save_pretrained(work / "tokenizer")  # what every shard is encoded with, in this process or a worker
    # shards run across files: a shard per file would give a corpus of many small files as many shards to write
    sizes = [min(shard_docs, total - i) for i in range(0, total, shard_docs)]  # documents per shard
    done = {int(p.name.split(".")[0]) for p in work.glob("*.npz")}

    def jobs() -> Iterator[tuple[int, int, list[str], float]]:
        docs = _documents(paths, counts)
        for shard, size in enumerate(sizes):
            batch = list(itertools.islice(docs, size))
            if shard not in done:
                yield shard, shard * shard_docs, batch, val_fraction
        next(docs, None)  # the last file's count is checked at its end

    bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=None, initial=sum(sizes[i] for i in done))
    with bar:
        # a process per shard left at most: more would start only to find nothing to do
        processes = min(workers or usable_cpus(), max(1, len(sizes) - len(done)))
        for shard, train, val, n in _run(_tokenize_shard, jobs(), processes, work / "tokenizer"):
            atomic_write(work / f"{shard:07d}.npz", lambda tmp: _save_npz(tmp, train=train, val=val))
            bar.update(n)

    dtype = _token_dtype(tok.vocab_size)
    shards = sorted(work.glob("*.npz"))
    assert len(shards) == len(sizes), "every shard is tokenized before assembly"
    # The files below replace whatever meta.json describes: without it, an interruption from here on cannot
    # leave an old meta.json vouching for new token files.
    meta_path.unlink(missing_ok=True)
    written = {split: _concat(shards, split, dtype, out_dir / f"{split}.bin") for split in ("train", "val")}
    tok.save_pretrained(out_dir)
    val_docs = sum(_evenly(k, val_fraction) for k in range(total))
    # the digests let a loader tell a file corrupted in place from the one prepared (see loader.DIGEST_CHECK_BYTES)
    meta = {"vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "train_tokens": written["train"][0],
            "val_tokens": written["val"][0], "train_sha256": written["train"][1],
            "val_sha256": written["val"][1], "documents": total, "train_documents": total - val_docs,
            "val_documents": val_docs, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "unk_id": tok.unk_id, "tokenizer": "tokenizer.model", "plan": plan}
    write_json(meta_path, meta)
    shutil.rmtree(work)
    return meta


def _tokenizer_sample(paths: list[Path], documents: int) -> Iterator[str]:
    """The documents the tokenizer trains on: all, or when the files hold more than TRAIN_INPUT_BYTES or
    TRAIN_INPUT_SENTENCES documents (all that sentencepiece is given stays in its memory), that share of every
    file's, not the first files' alone. A file size can understate its text (parquet), and a long document counts
    once per piece train_tokenizer cuts it into: train_tokenizer's own limits then cut the sample's end."""
    share = min(1.0, TRAIN_INPUT_BYTES / max(sum(p.stat().st_size for p in paths), 1),
                TRAIN_INPUT_SENTENCES / documents)
    return (d for k, d in enumerate(_documents(paths)) if _evenly(k, share))


def _documents(paths: list[Path], counts: list[int] | None = None) -> Iterator[str]:
    """The documents of `paths` in order. With `counts` (as counted before), a file that now holds more or fewer
    is a DataError: meta.json and the val split rest on the counts, and a file still being written would leave
    token files that do not fit them."""
    for path, counted in zip(paths, counts or itertools.repeat(None)):
        n = 0
        for n, doc in enumerate(read_documents(path), 1):
            if counted is not None and n > counted:
                break
            yield doc
        if counted is not None and n != counted:
            now = "more" if n > counted else f"{n:,}"
            raise DataError(f"{path}: changed while being prepared ({counted:,} documents when counted, {now} now); "
                            f"run again once it is complete")


def _outputs_fit(out_dir: Path, meta: dict) -> bool:
    """Whether the token files and the tokenizer file still fit `meta` (a finished run's meta.json), their sizes
    and digests (in full: preparing costs far more); a file deleted, replaced or corrupted since (e.g. by an
    interrupted run with other inputs) means preparing again."""
    try:
        for split in ("train", "val"):
            if not is_int(meta[f"{split}_tokens"]):  # a count the loader could not check the file against
                return False
            check_token_file(out_dir / f"{split}.bin", meta, split, full=True)
        return (out_dir / meta["tokenizer"]).is_file()
    except (KeyError, TypeError, ValueError, OSError):  # missing files, or a meta.json without those keys
        return False


def _run(fn, jobs: Iterator, workers: int, tokenizer_dir: Path) -> Iterator:
    """`fn` over `jobs`, in order, in this process (workers == 1) or in a pool whose workers hold the tokenizer."""
    if workers == 1:
        _init_worker(tokenizer_dir)
        yield from map(fn, jobs)
        return
    # fork: workers start at once (spawn would re-import torch in each); they never touch torch. An executor, not
    # a multiprocessing.Pool: a worker killed (out of memory) breaks it, where a Pool waits for its task forever.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool, pending = ProcessPoolExecutor(workers, context, _init_pool_worker, (tokenizer_dir, os.getpid())), deque()
    try:  # jobs are read here (an input's DataError raises here), two a worker ahead: each busy, few in memory
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) == 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError("a tokenizing worker died (killed, out of memory?): prepare the data again with fewer "
                        "--workers, or split the longest documents") from None
    finally:  # on an error or Ctrl-C too, workers finish their shards, never killed midway: one killed as it sends
        pool.shutdown(cancel_futures=True)  # a result would keep the result queue's lock, and shutdown wait forever


def _load_tokenizer(tokenizer: str | os.PathLike | Tokenizer | None) -> Tokenizer | None:
    """The tokenizer given, which must have <s> and </s>: they mark where every document starts and ends."""
    if tokenizer is None:
        return None
    if not isinstance(tokenizer, (str, os.PathLike, Tokenizer)):
        raise DataError(f"tokenizer must be a .model file, an HF tokenizer directory or a Tokenizer, "
                        f"got {type(tokenizer).__name__}")
    # a copy of a Tokenizer given: prepare_data sets the data directory's add_bos/add_eos on it, not the caller's
    tok = copy.copy(tokenizer) if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)
    # every document starts with <s> (and ends with </s>), so a prompt to a model trained on them starts with <s>
    tok.add_bos_token, tok.add_eos_token = True, False
    missing = [name for name, i in (("<s>", tok.bos_id), ("</s>", tok.eos_id)) if i < 0]
    where = "" if isinstance(tokenizer, Tokenizer) else f" {tokenizer}"
    if missing:
        raise DataError(f"the tokenizer{where} has no {' or '.join(missing)} token (null in its config?), which "
                        f"prepared data puts around every document")
    if tok.bos_id == tok.eos_id:  # the loader finds documents by their </s>: each would end at its own <s>
        raise DataError(f"the tokenizer{where} plays <s> and </s> with one token (id {tok.bos_id}); prepared data "
                        f"needs two, to tell where each document starts and ends")
    return tok


def fingerprint_tokenizer(tok: Tokenizer) -> str:
    """SHA-256 of the files `tok` saves: its model and the config that says how it encodes (which tokens play
    <s> and </s>, the word prefix, the added tokens), all of which the token files depend on. Its model_max_length,
    which changes no token, is saved as the fixed 2048 that directories prepared before recorded."""
    with tempfile.TemporaryDirectory() as directory:
        tok.save_pretrained(directory, model_max_length=2048)
        files = sorted(Path(directory).iterdir())
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _concat(shards: list[Path], split: str, dtype, out: Path) -> tuple[int, str]:
    """Write the shards' `split` tokens one after the other into `out`; return the token count and the SHA-256 of
    the bytes written (hashed as they are written: the file need not be read back)."""
    count, digest = 0, hashlib.sha256()

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as f:
            for shard in shards:
                with np.load(shard, allow_pickle=False) as z:
                    ids = z[split]
                count += len(ids)
                data = ids.astype(dtype, copy=False).tobytes()  # uint32 only in shards an older version left
                digest.update(data)
                f.write(data)

    atomic_write(out, write)
    return count, digest.hexdigest()
