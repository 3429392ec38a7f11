"""Reading a prepared data directory (see `ttl_core.data`): its meta.json, its token files checked against it, and
`PackedLoader`, which memory-maps a split, cuts it into blocks of `seq_len + 1` tokens at stride `seq_len` and serves
a seeded permutation of them split across ranks, from a position that can be saved and restored."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DataNotReady, is_integer
from .fileio import file_sha256, read_json

TOKEN_DTYPES = ("uint16", "uint32")
# A token file's SHA-256, which meta.json records since prepare_data wrote it, is checked at every open up to this
# size only: hashing reads the whole file (about a second a GB), on every rank at every open, where the size check
# is free. Larger files are checked in full on request (`verify_data`, `prepare_data.py --verify`) and whenever
# prepare_data runs again on the directory.
DIGEST_CHECK_BYTES = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool: sizes computed with numpy are fine here."""
    return is_integer(value) or isinstance(value, np.integer)


def read_meta(path: str | os.PathLike) -> dict:
    """A data directory's meta.json, checked for the keys the loader relies on (DataError naming the file)."""
    meta = read_json(path, DataError)
    shown = lambda key: repr(meta[key]) if key in meta else "missing"  # noqa: E731
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise DataError(f"{path}: 'dtype' is {shown('dtype')}; expected one of {', '.join(TOKEN_DTYPES)}")
    for key, low in (("eos_id", 0), ("vocab_size", 1)):
        if not (is_int(meta.get(key)) and meta[key] >= low):
            raise DataError(f"{path}: {key!r} is {shown(key)}; expected an integer >= {low}")
    if meta["eos_id"] >= meta["vocab_size"]:  # no token would end a document: masking would find none
        raise DataError(f"{path}: 'eos_id' {meta['eos_id']} is outside the vocabulary ({meta['vocab_size']} ids)")
    return meta


def check_token_file(path: Path, meta: dict, split: str, full: bool = False) -> int:
    """Refuse (DataError naming `path`) a token file that is not the one meta.json describes: a size other than its
    token count recorded (a copy cut short, bytes appended, another file), then, where meta.json records one (data
    prepared before did not), a SHA-256 of another content (bytes flipped or replaced in place), checked for files
    up to DIGEST_CHECK_BYTES only unless `full`. Without a recorded count, the size need only be whole tokens.
    Returns the file's token count."""
    size, dtype = path.stat().st_size, meta["dtype"]
    itemsize = np.dtype(dtype).itemsize
    recorded, digest = meta.get(f"{split}_tokens"), meta.get(f"{split}_sha256")
    if recorded is not None and not (is_int(recorded) and recorded >= 0):
        raise DataError(f"{path.parent / 'meta.json'}: '{split}_tokens' is {recorded!r}; expected an integer >= 0")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise DataError(f"{path.parent / 'meta.json'}: '{split}_sha256' is {digest!r}; expected 64 lowercase hex "
                        "digits (a SHA-256 as prepare_data writes it)")
    if recorded is not None and size != recorded * itemsize:
        change = "truncated" if size < recorded * itemsize else "extended"
        raise DataError(f"{path}: {size:,} bytes, but meta.json records {recorded:,} {dtype} tokens "
                        f"({recorded * itemsize:,} bytes): the file was {change} or replaced since it was prepared, "
                        f"or meta.json's dtype is wrong; prepare the data again")
    if size % itemsize:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of {dtype} tokens ({itemsize} bytes "
                        f"each); the file is truncated or meta.json's dtype is wrong")
    if digest is not None and (full or size <= DIGEST_CHECK_BYTES) and file_sha256(path) != digest:
        raise DataError(f"{path}: its content is not what was prepared (its SHA-256 differs from the one meta.json "
                        f"records): the file is corrupted or replaced; prepare the data again")
    return size // itemsize


def token_file(path: Path, meta: dict, split: str) -> np.ndarray:
    """`path` memory-mapped as meta's dtype, once `check_token_file` finds it is the file prepared."""
    count = check_token_file(path, meta, split)
    return np.memmap(path, dtype=meta["dtype"], mode="r") if count else np.zeros(0, meta["dtype"])


def verify_data(data_dir: str | os.PathLike) -> bool:
    """Check a prepared directory's token files against its meta.json in full, the SHA-256 of files of any size
    included (a DataError naming the file otherwise); False when meta.json records no digests (data prepared
    before they were), whose sizes alone could be checked."""
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise DataError(f"{data_dir}: no meta.json (not a prepared data directory; run scripts/prepare_data.py)")
    meta = read_meta(data_dir / "meta.json")
    for split in ("train", "val"):
        if not (data_dir / f"{split}.bin").is_file():
            raise DataError(f"{data_dir}: no {split}.bin; prepare the data again")
        check_token_file(data_dir / f"{split}.bin", meta, split, full=True)
    return all(f"{split}_sha256" in meta for split in ("train", "val"))


def _split_batch(global_batch: object, world_size: object) -> str:
    """' (micro_batch_size B x W processes)' for a loader's global batch, or '' for a state that lacks it."""
    if not (is_int(global_batch) and is_int(world_size) and world_size >= 1):
        return ""
    return f" (micro_batch_size {global_batch // world_size} x {world_size} process{'es' if world_size > 1 else ''})"


class PackedLoader:
    """Batches of fixed-length blocks from `DIR/{split}.bin`, deterministic, resumable and split across ranks.

    The token stream is cut into blocks of `seq_len + 1` tokens at stride `seq_len` (inputs = block[:-1],
    labels = block[1:], so no token is lost between blocks). Epoch e visits the blocks in a permutation seeded
    by (seed, e); global batch g is permutation[g*B*W : (g+1)*B*W] and rank r takes the r-th slice of B, so the
    W ranks' batches concatenated equal the batch of one process with batch size B*W, and no two ranks ever
    share a block. The last incomplete global batch of an epoch is dropped. With `shuffle=True` iteration never
    ends (epoch after epoch); with `shuffle=False` it is one pass in file order (evaluation), restarted by
    `iter()`. Each batch is a dict of `input_ids`, `labels` (int64, (B, S)) and `doc_starts` (bool, (B, S): True
    at position 0 and at each token that follows an `</s>`, i.e. each document's `<s>`)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        data_dir = Path(data_dir)
        meta_path, path = data_dir / "meta.json", data_dir / f"{split}.bin"
        if not meta_path.is_file() or not path.is_file():
            raise DataError(f"{data_dir}: no meta.json or {split}.bin (run scripts/prepare_data.py first)")
        if not (all(map(is_int, (seq_len, batch_size, rank, world_size)))
                and seq_len >= 1 and batch_size >= 1 and 0 <= rank < world_size):
            raise DataError(f"PackedLoader: bad seq_len={seq_len!r}, batch_size={batch_size!r}, rank={rank!r}, "
                            f"world_size={world_size!r} (integers, rank in [0, world_size))")
        meta = read_meta(meta_path)
        self.tokens = token_file(path, meta, split)
        self.path, self.eos_id, self.vocab_size = path, meta["eos_id"], meta["vocab_size"]
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size, self.split = rank, world_size, split
        self.n_blocks = max(len(self.tokens) - 1, 0) // seq_len
        global_batch = batch_size * world_size
        self.batches_per_epoch = self.n_blocks // global_batch
        if self.batches_per_epoch == 0:  # a global batch of several processes: which product it is, and a remedy
            several = world_size > 1
            raise DataNotReady(f"{path}: {len(self.tokens):,} tokens, fewer than one global batch"
                               f"{_split_batch(global_batch, world_size) if several else ''} needs "
                               f"({global_batch} x {seq_len} + 1 = {global_batch * seq_len + 1:,}); use more data"
                               f"{' (or a larger --val-fraction when preparing it)' if split == 'val' else ''}, "
                               f"a smaller batch{', fewer processes' if several else ''} or a shorter sequence")
        self.epoch, self.batch, self.order = 0, 0, self.permutation(0)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the blocks (file order without shuffling)."""
        if not self.shuffle:
            return np.arange(self.n_blocks)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)

    def __iter__(self) -> "PackedLoader":
        if not self.shuffle:
            self.epoch, self.batch = 0, 0
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            if not self.shuffle:
                raise StopIteration
            self.epoch, self.batch = self.epoch + 1, 0
            self.order = self.permutation(self.epoch)
        first = (self.batch * self.world_size + self.rank) * self.batch_size
        self.batch += 1
        return self.batch_of(self.order[first:first + self.batch_size])

    def batch_of(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of the blocks numbered `blocks`, every token id checked against the vocabulary."""
        S = self.seq_len
        x = torch.from_numpy(np.stack([self.tokens[b * S:b * S + S + 1] for b in blocks]).astype(np.int64))
        if int(x.max()) >= self.vocab_size:  # garbage would otherwise surface as an IndexError in the embedding
            row, col = divmod(int(x.argmax()), S + 1)
            raise DataError(f"{self.path}: token {int(blocks[row]) * S + col:,} has id {int(x.max())}, outside the "
                            f"vocabulary of {self.vocab_size} in meta.json (a corrupt file or another tokenizer's)")
        doc_starts = torch.cat([torch.ones(len(blocks), 1, dtype=torch.bool), x[:, :S - 1] == self.eos_id], dim=1)
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(), "doc_starts": doc_starts}

    def state_dict(self) -> dict:
        """The position (JSON-serializable): the next batch is epoch `epoch`, batch `batch`. Independent of rank
        and world size, so a run may resume on a different number of ranks with the same global batch."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.world_size, "world_size": self.world_size,
                "n_blocks": self.n_blocks, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the next batch is the one that followed when it was saved (on any
        number of ranks with the same global batch)."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "n_blocks", "split"):
            if state.get(key) != mine[key]:
                saved, here = f"{state.get(key)!r}", f"{mine[key]!r}"
                if key == "global_batch":  # a state saved before world_size was recorded goes without its split
                    saved += _split_batch(state.get(key), state.get("world_size"))
                    here += f"{_split_batch(mine[key], self.world_size)}: keep micro_batch_size x processes as it was"
                elif key == "n_blocks":
                    here += " (blocks in the token file: other data than the position was saved on)"
                raise DataError(f"loader state does not fit this loader: {key} is {saved}, here {here}")
        epoch, batch = state.get("epoch"), state.get("batch")
        if not (is_int(epoch) and is_int(batch) and epoch >= 0 and 0 <= batch <= self.batches_per_epoch):
            raise DataError(f"loader state: epoch {epoch!r} and batch {batch!r} are no position in epochs of "
                            f"{self.batches_per_epoch} batches (a damaged trainer_state.json?)")
        self.epoch, self.batch, self.order = epoch, batch, self.permutation(epoch)
