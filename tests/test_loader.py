"""PackedLoader: deterministic seeded order, exact resumption, disjoint ranks whose concatenation is the
single-process batch, and document starts on documents of known lengths."""

import json

import numpy as np
import pytest
import torch

from ttl_core.errors import DataError
from ttl_core.loader import PackedLoader

BOS, EOS = 1, 2


def make_dir(path, lengths):
    """A data dir whose train split holds documents of the given lengths (tokens all distinct, > 3)."""
    stream, starts, value = [], [], 10
    for n in lengths:
        starts.append(len(stream))
        stream += [BOS, *range(value, value + n), EOS]
        value += n
    tokens = np.asarray(stream, dtype=np.uint16)
    path.mkdir()
    tokens.tofile(path / "train.bin")
    tokens[: len(tokens) // 4].tofile(path / "val.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eos_id": EOS, "bos_id": BOS, "vocab_size": 60000}))
    return tokens, set(starts)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    tokens, starts = make_dir(tmp_path / "d", rng.integers(0, 40, size=120).tolist())
    return tmp_path / "d", tokens, starts


def take(loader, n):
    return [next(loader) for _ in range(n)]


def block_ids(batch, seq_len, tokens):
    """Recover which block each row is from the position of its first non-special token (those are unique)."""
    out = []
    for row in batch["input_ids"].tolist():
        j = next(j for j, t in enumerate(row) if t > EOS)
        out.append(int(np.flatnonzero(tokens == row[j])[0] - j) // seq_len)
    return out


def test_blocks_are_the_token_stream(data):
    path, tokens, _ = data
    S = 16
    loader = PackedLoader(path, "train", seq_len=S, batch_size=4, seed=3)
    assert loader.n_blocks == (len(tokens) - 1) // S and loader.batches_per_epoch == loader.n_blocks // 4
    seen = []
    for batch in take(loader, loader.batches_per_epoch):
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, S)
        for x, y, b in zip(batch["input_ids"], batch["labels"], loader.order[len(seen):len(seen) + 4]):
            block = torch.from_numpy(tokens[b * S:b * S + S + 1].astype(np.int64))
            assert torch.equal(x, block[:-1]) and torch.equal(y, block[1:])
            seen.append(int(b))
    assert len(set(seen)) == len(seen) == loader.batches_per_epoch * 4  # an epoch never repeats a block
    assert seen != sorted(seen)  # shuffled


def test_same_seed_same_blocks_other_seed_other_order(data):
    path, _, _ = data
    a, b, c = (PackedLoader(path, "train", 16, 4, seed=s) for s in (7, 7, 8))
    for x, y, z in zip(take(a, 30), take(b, 30), take(c, 30)):  # 30 batches cross epoch boundaries
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(take(a, 5), take(c, 5)))
    a = PackedLoader(path, "train", 16, 4, seed=7)
    first, second = take(a, a.batches_per_epoch), take(a, a.batches_per_epoch)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))  # new permutation


@pytest.mark.parametrize("skip", [0, 5, 39, 45, 85])  # 45, 85: saved in epochs 1 and 2
def test_state_dict_restores_the_exact_next_batch(data, skip):
    path, _, _ = data
    loader = PackedLoader(path, "train", 16, 4, seed=1)
    assert loader.batches_per_epoch == 40  # so skip=39 crosses into the next epoch
    take(loader, skip)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 4)
    fresh = PackedLoader(path, "train", 16, 4, seed=1)
    fresh.load_state_dict(state)
    for x, y in zip(expected, take(fresh, 4)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(DataError, match="seed is 1, here 2"):
        PackedLoader(path, "train", 16, 4, seed=2).load_state_dict(state)


def test_ranks_are_disjoint_and_concatenate_to_the_single_process_batch(data):
    path, tokens, _ = data
    W, B, S = 3, 2, 16
    single = PackedLoader(path, "train", S, W * B, seed=5)
    ranks = [PackedLoader(path, "train", S, B, seed=5, rank=r, world_size=W) for r in range(W)]
    assert all(r.batches_per_epoch == single.batches_per_epoch == single.n_blocks // (W * B) for r in ranks)
    for _ in range(single.batches_per_epoch + 3):
        parts = [next(r) for r in ranks]
        whole = next(single)
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        ids = [block_ids(p, S, tokens) for p in parts]
        assert len({b for i in ids for b in i}) == W * B  # no block on two ranks
    # a state saved on 3 ranks resumes on one process with the same global batch
    single.load_state_dict(ranks[0].state_dict())
    whole, parts = next(single), [next(r) for r in ranks]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
    with pytest.raises(DataError, match=r"global_batch is 6 \(micro_batch_size 2 x 3 processes\), here 2 "
                                        r"\(micro_batch_size 2 x 1 process\): keep micro_batch_size x processes"):
        PackedLoader(path, "train", S, B, seed=5).load_state_dict(ranks[0].state_dict())
    # a state without the field (hand-edited) is the same one line, not a KeyError
    with pytest.raises(DataError, match=r"global_batch is None, here 2 \(micro_batch_size 2 x 1 process\)"):
        PackedLoader(path, "train", S, B, seed=5).load_state_dict(
            {k: v for k, v in ranks[0].state_dict().items() if k != "global_batch"})


def test_doc_starts_on_documents_of_known_lengths(tmp_path):
    tokens, starts = make_dir(tmp_path / "d", [3, 0, 9, 1, 20, 2, 2, 30, 5, 0, 0, 7, 11, 4])
    S = 8
    loader = PackedLoader(tmp_path / "d", "train", S, 2, shuffle=False)
    rows = 0
    for batch in loader:
        assert block_ids(batch, S, tokens) == [rows, rows + 1]  # one pass in file order
        for row, mask in zip(batch["input_ids"], batch["doc_starts"]):
            b = rows
            rows += 1
            expected = [j == 0 or (b * S + j) in starts for j in range(S)]
            assert mask.tolist() == expected
            assert all(row[j] == BOS for j in range(S) if expected[j] and j > 0)
    assert rows == loader.batches_per_epoch * 2
    assert len(list(loader)) == loader.batches_per_epoch  # iter() restarts an evaluation pass


def test_too_little_data_is_a_clear_error(data):
    path, tokens, _ = data
    n_val = len(tokens) // 4
    # the global batch of several processes is named as the product it is, with the processes as a remedy
    with pytest.raises(DataError, match=rf"val.bin: {n_val:,} tokens, fewer than one global batch \(micro_batch_size "
                                        r"4 x 2 processes\) needs \(8 x 512 \+ 1 = 4,097\); .*--val-fraction.*, "
                                        r"a smaller batch, fewer processes or a shorter sequence$"):
        PackedLoader(path, "val", seq_len=512, batch_size=4, world_size=2)
    with pytest.raises(DataError, match="no meta.json or test.bin"):
        PackedLoader(path, "test", 16, 2)


@pytest.mark.parametrize("extra", [0, 1])
def test_a_stream_of_exactly_whole_blocks_loses_no_block(tmp_path, extra):
    """B*S + 1 tokens make exactly B blocks (the +1 is the last label): all are served; one token fewer is
    too little for a batch."""
    B, S = 3, 8
    tokens = (np.random.default_rng(4).permutation(50_000)[: B * S + 1] + 10).astype(np.uint16)
    path = tmp_path / "d"
    path.mkdir()
    tokens.tofile(path / "train.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eos_id": EOS, "vocab_size": 60_000}))
    loader = PackedLoader(path, "train", S, B, shuffle=False)
    assert (loader.n_blocks, loader.batches_per_epoch) == (B, 1)
    (batch,) = list(loader)
    assert torch.equal(batch["input_ids"].flatten(), torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert torch.equal(batch["labels"].flatten(), torch.from_numpy(tokens[1:].astype(np.int64)))
    tokens[: B * S - extra].tofile(path / "train.bin")
    with pytest.raises(DataError, match="fewer than one global batch needs"):
        PackedLoader(path, "train", S, B, shuffle=False)


def test_a_state_from_another_sequence_length_split_or_data_is_refused(data, tmp_path):
    """A position only means something in the same block layout: a state saved with another seq_len, split or
    token file (another block count) is refused rather than resumed at a meaningless place."""
    path, tokens, _ = data
    state = PackedLoader(path, "train", 16, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seq_len is 16, here 8"):
        PackedLoader(path, "train", 8, 8, seed=1).load_state_dict({**state, "global_batch": 8})
    with pytest.raises(DataError, match="split is 'train', here 'val'"):
        val = PackedLoader(path, "val", 16, 4, seed=1)
        val.load_state_dict({**state, "n_blocks": val.n_blocks})
    make_dir(tmp_path / "other", np.random.default_rng(1).integers(0, 40, size=100).tolist())
    other = PackedLoader(tmp_path / "other", "train", 16, 4, seed=1)
    assert other.n_blocks != state["n_blocks"]
    with pytest.raises(DataError, match=rf"n_blocks is {state['n_blocks']}, here {other.n_blocks} \(blocks in the "
                                        r"token file: other data than the position was saved on\)$"):
        other.load_state_dict(state)


def test_a_fractional_sequence_length_is_refused(data):
    path, _, _ = data
    with pytest.raises(DataError, match=r"bad seq_len=64\.5"):
        PackedLoader(path, "train", 64.5, 2)


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(data, rank, world_size):
    path, _, _ = data
    with pytest.raises(DataError, match=rf"rank={rank}, world_size={world_size} \(integers, rank in"):
        PackedLoader(path, "train", 16, 2, rank=rank, world_size=world_size)


@pytest.mark.parametrize("position", [{"epoch": 0, "batch": 41}, {"epoch": 0, "batch": -1}, {"epoch": -1, "batch": 0},
                                      {"epoch": "1", "batch": 3}, {"epoch": 1, "batch": 2.5}, {"batch": 3}])
def test_a_position_outside_the_epoch_is_refused(data, position):
    """A damaged or hand-edited position (trainer_state.json is plain JSON) is one error line when loaded, not a
    batch of no blocks or an index error at the next step."""
    path, _, _ = data
    loader = PackedLoader(path, "train", 16, 4, seed=1)
    assert loader.batches_per_epoch == 40  # batch 40 is a finished epoch, resumed as the next one's start
    state = {k: v for k, v in loader.state_dict().items() if k not in ("epoch", "batch")}
    with pytest.raises(DataError, match=r"loader state: epoch .* and batch .* are no position in epochs of 40 "
                                        r"batches \(a damaged trainer_state.json\?\)$"):
        loader.load_state_dict({**state, **position})
    loader.load_state_dict({**state, "epoch": 3, "batch": 40})
    assert (loader.epoch, loader.batch) == (3, 40) and next(loader) and (loader.epoch, loader.batch) == (4, 1)
