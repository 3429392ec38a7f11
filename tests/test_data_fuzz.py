"""Differential fuzzing of the data pipeline against plain references written from the docstrings and docs: random
corpora (many small files, blank lines, CR-LF, accents, emoji, control characters, `</s>` as text, one document long
enough to be encoded in pieces) and random settings, checked for the token files' exact contents and split, a resumed
prepare's bytes, PackedLoader's blocks per epoch and rank and its restored position, document masking's layout and
forward, a mixture's draws and blocks, and fine-tuning examples' ids and labels."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ttl_core.data as data
from ttl_core.attention import packed_mask
from ttl_core.chat_format import AIRA_SPECIAL_TOKENS
from ttl_core.config import LlamaConfig
from ttl_core.data import prepare_data
from ttl_core.errors import DataError, DataNotReady
from ttl_core.instruct import collate_lm, encode_chat, pack_lm
from ttl_core.loader import PackedLoader
from ttl_core.mixture import Mixture, MixtureLoader
from ttl_core.model import LlamaForCausalLM
from ttl_core.step import model_inputs
from ttl_core.task_files import encode_example
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

WORDS = ("o rio a serra café manhã ação coração João às 12h30 — ótimo! não é 🙂 👍🏽 ñ 中文 </s> <s> <pad> x\ty "
         "\x01 \x1f \x0b \x0c \x85 \u2028 \xa0 a\rb").split(" ")
LONG_DOCUMENT_CHARS = data._PIECE_CHARS + 5000  # encoded by prepare_data in two pieces


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return train_tokenizer([" ".join(rng.choices(WORDS, k=40)) for _ in range(200)], None, vocab_size=360)


# -- references --------------------------------------------------------------------------------------------------------
def reference_txt_documents(raw: bytes) -> list[str]:
    """docs/training.md: documents are blocks separated by blank lines; lines end at \\n or \\r\\n (a lone \\r is
    text, but for those ending a document); a leading byte order mark is no text."""
    text = raw.decode("utf-8").removeprefix("\ufeff")
    lines = [line.removesuffix("\r") for line in text.split("\n")[:-1]] + [text.split("\n")[-1]]
    docs, block = [], []
    for line in lines + [""]:
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block).rstrip("\r"))
            block = []
    return docs


def reference_token_files(docs: list[str], tok: Tokenizer, val_fraction: float) -> tuple[list[int], list[int]]:
    """Each document as <s> ids </s> (special tokens' text as text), in order; document k held out when the running
    count floor((k + 1) * val_fraction) steps up."""
    splits: tuple[list[int], list[int]] = ([], [])
    for k, doc in enumerate(docs):
        held_out = int((k + 1) * val_fraction) > int(k * val_fraction)
        splits[held_out].extend([tok.bos_id, *tok.encode(doc, add_bos=False, add_eos=False,
                                                           split_special_tokens=True), tok.eos_id])
    return splits


def reference_blocks(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Blocks of seq_len + 1 tokens at stride seq_len."""
    return [tokens[b * seq_len:b * seq_len + seq_len + 1] for b in range((len(tokens) - 1) // seq_len)]


def reference_doc_starts(block: np.ndarray, eos_id: int) -> list[bool]:
    """True at position 0 and at each input token that follows an </s>."""
    return [True] + [bool(block[i - 1] == eos_id) for i in range(1, len(block) - 1)]


def reference_positions(starts: list[bool]) -> list[int]:
    positions, position = [], 0
    for start in starts:
        position = 0 if start else position + 1
        positions.append(position)
    return positions


def longest_first(head: list[int], tail: list[int], room: int) -> tuple[list[int], list[int]]:
    """transformers' longest_first truncation of a pair: the longer loses its last token, the second on a tie."""
    head, tail = list(head), list(tail)
    while len(head) + len(tail) > room:
        (head if len(head) > len(tail) else tail).pop()
    return head, tail


def aira_text(instruction: str, extra: str, response: str) -> tuple[str, str]:
    """(prompt, response) texts of an Aira-2 example, written out apart from ttl_core.chat_format."""
    prompt = "<|startofinstruction|>" + instruction + (f"\n{extra}" if extra else "") + "<|endofinstruction|>"
    return prompt, response + "<|endofcompletion|>"


def alpaca_text(instruction: str, extra: str, response: str) -> tuple[str, str]:
    """(prompt, response) texts of an Alpaca-PTBR example (its </s> is an id the caller adds)."""
    tail = "Escreva uma resposta que conclua adequadamente a solicitação."
    header = "Abaixo está uma instrução que descreve uma tarefa"
    if extra:
        prompt = (f"{header}, emparelhada com uma entrada que fornece mais contexto. {tail}\n\n### Instruções:\n"
                  f"{instruction}\n\n### Entrada:\n{extra}\n\n### Resposta:\n")
    else:
        prompt = f"{header}. {tail}\n\n### Instruções:\n{instruction}\n\n### Resposta:\n"
    return prompt, response


# -- random inputs -----------------------------------------------------------------------------------------------------
def random_line(rng: random.Random, words: int) -> str:
    line = " ".join(rng.choices(WORDS, k=words))
    return rng.choice(["", " ", "  "]) + line + rng.choice(["", " ", "\t", "\r"])


def random_document(rng: random.Random) -> list[str]:
    lines = [random_line(rng, rng.choice([1, 2, 5, 12])) for _ in range(rng.choice([1, 1, 2, 4]))]
    return [line for line in lines if line.strip()] or ["x"]


def write_txt(rng: random.Random, path: Path, docs: list[list[str]]) -> None:
    newline = rng.choice(["\n", "\r\n", "mixed"])
    ends = lambda: rng.choice(["\n", "\r\n"]) if newline == "mixed" else newline  # noqa: E731
    text = "\ufeff" if rng.random() < 0.2 else ""
    text += "".join(rng.choice(["", " ", "\t"]) + ends() for _ in range(rng.choice([0, 0, 2])))
    for k, doc in enumerate(docs):
        text += ends().join(doc)
        if k < len(docs) - 1:
            text += ends() + "".join(rng.choice(["", " ", "\xa0"]) + ends() for _ in range(rng.choice([1, 1, 3])))
    text += rng.choice(["", ends(), ends() + ends(), "\r"])
    path.write_bytes(text.encode("utf-8"))


def random_corpus(rng: random.Random, directory: Path) -> list[Path]:
    paths = []
    for k in range(rng.choice([1, 2, 4, 9])):
        docs = [random_document(rng) for _ in range(rng.choice([1, 1, 2, 5, 11]))]
        if k == 0 and rng.random() < 0.2:
            words = rng.choices(WORDS, k=LONG_DOCUMENT_CHARS // 4)
            docs.append(["".join(word + rng.choice([" "] * 9 + ["  "]) for word in words).strip()])
        if rng.random() < 0.3:
            path = directory / f"f{k}.jsonl"
            lines = [json.dumps({"text": "\n".join(doc)}, ensure_ascii=rng.random() < 0.5) for doc in docs]
            lines.insert(rng.randrange(len(lines) + 1), json.dumps({"text": rng.choice([" ", "\n\t", ""])}))
            path.write_text(rng.choice(["", "\ufeff"]) + "\n".join(lines) + rng.choice(["", "\n", "\r\n"]),
                            encoding="utf-8")
        else:
            path = directory / f"f{k}.txt"
            write_txt(rng, path, docs)
        paths.append(path)
    return paths


def reference_documents(paths: list[Path]) -> list[str]:
    docs = []
    for path in paths:
        if path.suffix == ".txt":
            docs += reference_txt_documents(path.read_bytes())
        else:
            lines = path.read_text(encoding="utf-8").removeprefix("\ufeff").split("\n")
            texts = [json.loads(line)["text"] for line in lines if line.strip()]
            docs += [text for text in texts if text.strip()]
    return docs


# -- checks ------------------------------------------------------------------------------------------------------------
def read_outputs(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


def check_prepare(rng: random.Random, tmp: Path, tok: Tokenizer, monkeypatch) -> Path:
    """prepare_data's token files against the reference; an interrupted run resumed (with other workers) writes
    the same bytes."""
    paths = random_corpus(rng, tmp)
    docs = reference_documents(paths)
    val_fraction = rng.choice([0.0, 0.1, 0.25, 0.5, 1.0, round(rng.random(), 3)])
    shard_docs = rng.choice([1, 2, 3, 7, 1024])
    settings = dict(tokenizer=tok, val_fraction=val_fraction, shard_docs=shard_docs)
    if rng.random() < 0.2:  # a tokenizer trained on the corpus: the 4 special tokens, 256 bytes, its characters
        settings = dict(settings, tokenizer=None, vocab_size=260 + len(set("".join(docs))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a val_fraction that holds none out says so
        meta = prepare_data(paths, tmp / "out", workers=rng.choice([1, 1, 2]), **settings)
        train, val = reference_token_files(docs, Tokenizer.from_pretrained(tmp / "out"), val_fraction)
        dtype = meta["dtype"]
        assert np.fromfile(tmp / "out" / "train.bin", dtype).tolist() == train
        assert np.fromfile(tmp / "out" / "val.bin", dtype).tolist() == val
        held_out = sum(int((k + 1) * val_fraction) > int(k * val_fraction) for k in range(len(docs)))
        assert (meta["documents"], meta["val_documents"]) == (len(docs), held_out)

        shards = -(-len(docs) // shard_docs)
        stop_after = rng.randrange(shards + 1)  # all shards: stopped while the token files are written
        shards_saved = []
        real_save, real_concat = data._save_npz, data._concat

        def save_then_stop(path, **arrays):
            if len(shards_saved) == stop_after:
                raise KeyboardInterrupt("simulated kill")
            shards_saved.append(path)
            real_save(path, **arrays)

        def concat_then_stop(shard_paths, split, dtype, out):
            if split == "val":
                raise KeyboardInterrupt("simulated kill")
            return real_concat(shard_paths, split, dtype, out)

        monkeypatch.setattr(data, "_save_npz", save_then_stop)
        monkeypatch.setattr(data, "_concat", concat_then_stop if stop_after == shards else real_concat)
        with pytest.raises(KeyboardInterrupt):
            prepare_data(paths, tmp / "resumed", workers=rng.choice([1, 2]), **settings)
        monkeypatch.setattr(data, "_save_npz", real_save)
        monkeypatch.setattr(data, "_concat", real_concat)
        prepare_data(paths, tmp / "resumed", workers=rng.choice([1, 2]), **settings)
    assert read_outputs(tmp / "resumed") == read_outputs(tmp / "out")
    return tmp / "out"


def global_batches(loaders: list[PackedLoader], count: int) -> list[dict[str, torch.Tensor]]:
    """The next `count` global batches: every rank's batch, concatenated in rank order."""
    out = []
    for _ in range(count):
        parts = [next(loader) for loader in loaders]
        out.append({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
    return out


def rank_loaders(kind, source, world_size: int, batch_size: int, **settings) -> list:
    return [kind(source, "train", batch_size=batch_size, rank=r, world_size=world_size, **settings)
            for r in range(world_size)]


def check_batch(batch: dict[str, torch.Tensor], blocks: list[np.ndarray], eos_id: int) -> None:
    expected = torch.from_numpy(np.stack(blocks).astype(np.int64))
    assert torch.equal(batch["input_ids"], expected[:, :-1]) and torch.equal(batch["labels"], expected[:, 1:])
    assert batch["doc_starts"].tolist() == [reference_doc_starts(block, eos_id) for block in blocks]


def check_loader(rng: random.Random, data_dir: Path, eos_id: int) -> None:
    """Each epoch serves the permutation's first batches_per_epoch global batches of blocks, each once, rank r the
    r-th slice of each; a restored position (on another number of ranks) continues with the same batches; the
    evaluation loader is one pass in file order."""
    tokens = np.fromfile(data_dir / "train.bin", json.loads((data_dir / "meta.json").read_text())["dtype"])
    # a stride that keeps an epoch to a few hundred blocks (with a document of LONG_DOCUMENT_CHARS)
    seq_len = rng.choice([1, 2, 5, 8]) * max(1, len(tokens) // 400)
    world_size, batch_size, seed = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.randrange(1000)
    blocks = reference_blocks(tokens, seq_len)
    global_batch = world_size * batch_size
    settings = dict(seq_len=seq_len, seed=seed)
    if len(blocks) < global_batch:
        with pytest.raises(DataNotReady, match="fewer than one global batch"):
            PackedLoader(data_dir, "train", seq_len, batch_size, seed, 0, world_size)
        return
    loaders = rank_loaders(PackedLoader, data_dir, world_size, batch_size, **settings)
    per_epoch = len(blocks) // global_batch
    served = global_batches(loaders, 2 * per_epoch)
    for epoch in range(2):
        order = loaders[0].permutation(epoch).tolist()
        assert sorted(order) == list(range(len(blocks)))
        for g in range(per_epoch):
            visited = order[g * global_batch:(g + 1) * global_batch]
            check_batch(served[epoch * per_epoch + g], [blocks[b] for b in visited], eos_id)

    stop = rng.randrange(2 * per_epoch + 1)
    loaders = rank_loaders(PackedLoader, data_dir, world_size, batch_size, **settings)
    global_batches(loaders, stop)
    state = json.loads(json.dumps(loaders[0].state_dict()))
    other_world = rng.choice([w for w in (1, 2, 3, 6) if global_batch % w == 0])
    resumed = rank_loaders(PackedLoader, data_dir, other_world, global_batch // other_world, **settings)
    for loader in resumed:
        loader.load_state_dict(state)
    for got, expected in zip(global_batches(resumed, per_epoch + 1), global_batches(loaders, per_epoch + 1)):
        assert all(torch.equal(got[key], expected[key]) for key in expected)

    evaluation = [PackedLoader(data_dir, "train", seq_len, batch_size, rank=r, world_size=world_size,
                               shuffle=False) for r in range(world_size)]
    for _ in range(2):  # iter() restarts the pass
        passes = [list(iter(loader)) for loader in evaluation]
        assert {len(p) for p in passes} == {per_epoch}
        for g in range(per_epoch):
            batch = {key: torch.cat([p[g][key] for p in passes]) for key in passes[0][g]}
            check_batch(batch, blocks[g * global_batch:(g + 1) * global_batch], eos_id)


def check_document_masking(rng: random.Random, data_dir: Path, tok: Tokenizer) -> None:
    """document_layout, the packed mask and model_inputs' targets against the reference, and a packed forward
    equal to each document run alone."""
    seq_len = rng.choice([3, 8, 16])
    try:
        loader = PackedLoader(data_dir, "train", seq_len, rng.choice([1, 2]), seed=rng.randrange(100))
    except DataNotReady:
        return
    batch = next(loader)
    starts = batch["doc_starts"].tolist()
    inputs = model_inputs(batch, torch.device("cpu"), document_masking=True, bos_id=tok.bos_id)
    assert inputs["position_ids"].tolist() == [reference_positions(row) for row in starts]
    flat = [i for i, start in enumerate(sum(starts, [])) if start]
    assert inputs["cu_seqlens"].tolist() == flat + [len(starts) * seq_len]
    assert inputs["max_seqlen"] == max(b - a for a, b in zip(flat, flat[1:] + [len(starts) * seq_len]))
    expected_targets = batch["labels"].masked_fill(batch["labels"] == tok.bos_id, -100)
    assert torch.equal(inputs["targets"], expected_targets)
    document = torch.tensor(starts).cumsum(1)  # each token's document within its row
    allowed = (document[:, :, None] == document[:, None, :]) & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert torch.equal(packed_mask(inputs["cu_seqlens"], len(starts), seq_len, inputs["max_seqlen"])[:, 0], allowed)

    torch.manual_seed(rng.randrange(1000))
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]  # a tokenizer trained on the corpus
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=inputs["position_ids"], cu_seqlens=inputs["cu_seqlens"],
                       max_seqlen=inputs["max_seqlen"]).logits
        for b, row in enumerate(starts):
            bounds = [i for i, start in enumerate(row) if start] + [seq_len]
            for a, z in zip(bounds, bounds[1:]):
                alone = model(batch["input_ids"][b:b + 1, a:z]).logits[0]
                assert (packed[b, a:z] - alone).abs().max() <= 1e-5


def check_mixture(rng: random.Random, tmp: Path, data_dir: Path) -> None:
    """Sources drawn in the weights' proportions, each serving its blocks in its own PackedLoader order, ranks
    taking their rows of the global batch, and a restored position continuing alike."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.fromfile(data_dir / "train.bin", meta["dtype"])
    seq_len, world_size, batch_size = rng.choice([1, 2, 4]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    global_batch, sources = world_size * batch_size, {}
    for k in range(rng.choice([1, 2, 3])):  # each source a stretch of the prepared tokens
        size = rng.randrange(global_batch * seq_len + 1, max(len(tokens), global_batch * seq_len + 2) + 1)
        start = rng.randrange(max(len(tokens) - size, 0) + 1)
        stretch = np.resize(tokens[start:start + size], size)
        (tmp / f"src{k}").mkdir()
        stretch.tofile(tmp / f"src{k}" / "train.bin")
        recorded = {"train_tokens": size, "train_sha256": hashlib.sha256(stretch.tobytes()).hexdigest()}
        (tmp / f"src{k}" / "meta.json").write_text(json.dumps({**meta, **recorded}))
        sources[f"s{k}"] = {"path": str(tmp / f"src{k}"), "weight": rng.choice([0.1, 1.0, 3.0, rng.random() + 0.01])}
    mixture, seed = Mixture(sources), rng.randrange(1000)
    weights = np.array(list(mixture.weights.values()))
    loaders = rank_loaders(MixtureLoader, mixture, world_size, batch_size, seq_len=seq_len, seed=seed)
    draws = np.concatenate([loaders[0].draws(g) for g in range(2000 // global_batch)])
    counts = np.bincount(draws, minlength=len(weights))
    spread = np.sqrt(len(draws) * weights * (1 - weights))
    assert (np.abs(counts - len(draws) * weights) <= 5 * spread + 1).all(), (counts, weights)

    singles = [PackedLoader(path, "train", seq_len, global_batch, seed) for path in mixture.paths.values()]
    streams, count = [], rng.choice([3, 12])
    served = [0] * len(singles)
    for single in singles:  # each source's blocks in the order it serves them: its epochs one after the other
        blocks = reference_blocks(np.fromfile(single.path, meta["dtype"]), seq_len)
        used = single.batches_per_epoch * global_batch
        epochs = count * global_batch // used + 1
        streams.append([blocks[b] for e in range(epochs) for b in single.permutation(e)[:used]])
    for g, batch in enumerate(global_batches(loaders, count)):
        rows = []
        for source in loaders[0].draws(g):
            rows.append(streams[source][served[source]])
            served[source] += 1
        check_batch(batch, rows, meta["eos_id"])

    stop = rng.randrange(count + 1)
    loaders = rank_loaders(MixtureLoader, mixture, world_size, batch_size, seq_len=seq_len, seed=seed)
    global_batches(loaders, stop)
    state = json.loads(json.dumps(loaders[0].state_dict()))
    other_world = rng.choice([w for w in (1, 2, 3, 6) if global_batch % w == 0])
    resumed = rank_loaders(MixtureLoader, mixture, other_world, global_batch // other_world, seq_len=seq_len,
                           seed=seed)
    for loader in resumed:
        loader.load_state_dict(state)
    for got, expected in zip(global_batches(resumed, 4), global_batches(loaders, 4)):
        assert all(torch.equal(got[key], expected[key]) for key in expected)


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS + ["\n", "<|endofcompletion|>"], k=words)).strip() or "x"


def check_examples(rng: random.Random, tok: Tokenizer, directory: Path) -> None:
    """encode_chat, collate_lm and pack_lm against the format's documented text encoded with the tokenizer;
    encode_example's pairs against the text transformers' tokenizer encodes, truncated longest_first."""
    tok.save_pretrained(directory)  # a copy to add Aira's tokens to
    tok = Tokenizer.from_pretrained(directory)
    tok.add_special_tokens(AIRA_SPECIAL_TOKENS)
    tok.add_bos_token, tok.add_eos_token = rng.choice([(True, False), (True, True), (False, True)])
    examples, expected = [], []
    for _ in range(rng.choice([1, 2, 4])):
        fmt, train_on_inputs = rng.choice(["aira", "alpaca"]), rng.random() < 0.3
        instruction, response = random_text(rng, rng.randrange(1, 8)), random_text(rng, rng.randrange(1, 8))
        extra = random_text(rng, 3) if rng.random() < 0.5 else ""
        prompt, answer = (aira_text if fmt == "aira" else alpaca_text)(instruction, extra, response)
        start = [tok.bos_id] if tok.add_bos_token else []
        ids = start + tok.encode(prompt + answer, add_bos=False, add_eos=False) + [tok.eos_id] * (fmt == "alpaca")
        prompt_ids = start + tok.encode(prompt, add_bos=False, add_eos=False)
        # the prompt's tokens: those the prompt's own encoding shares with the example's start
        masked = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
        labels = ids if train_on_inputs else [-100] * masked + ids[masked:]
        max_length = rng.choice([1, 5, 30, 1000])
        expected.append((ids[:max_length], labels[:max_length]))
        examples.append(encode_chat(tok, fmt, instruction, extra, response, max_length, train_on_inputs))
    assert examples == expected
    longest = max(len(ids) for ids, _ in expected)
    padded = collate_lm(examples, tok.pad_id)
    assert padded["input_ids"].tolist() == [ids + [tok.pad_id] * (longest - len(ids)) for ids, _ in expected]
    assert padded["labels"].tolist() == [labels + [-100] * (longest - len(labels)) for _, labels in expected]
    assert padded["attention_mask"].tolist() == [[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in expected]
    packed = pack_lm(examples)
    assert packed["input_ids"].tolist() == [sum((ids for ids, _ in expected), [])]
    assert packed["labels"].tolist() == [sum(([-100] + labels[1:] for _, labels in expected), [])]
    assert packed["position_ids"].tolist() == [sum((list(range(len(ids))) for ids, _ in expected), [])]

    first, second = random_text(rng, rng.randrange(1, 9)), random_text(rng, rng.randrange(1, 9))
    whole = tok.encode(first + "<s>" + second + "</s>")  # the text a transformers user passes for a pair
    start, end = len(tok.special_ends()[0]), len(tok.special_ends()[1])
    bos_at = start + len(tok.encode(first, add_bos=False, add_eos=False))  # a sentence may write "<s>" itself
    assert whole[bos_at] == tok.bos_id
    head, tail = whole[start:bos_at], whole[bos_at + 1:len(whole) - end - 1]
    max_length = rng.choice([start + end + 2, 8, 12, 100])
    head, tail = longest_first(head, tail, max_length - start - end - 2)
    cut = whole[:start] + head + [tok.bos_id] + tail + whole[len(whole) - end - 1:]
    assert encode_example(tok, [first, second], True, max_length) == cut
    text = tok.encode(first + "\n\n" + second, add_bos=False, add_eos=False)  # fields joined by a blank line
    assert encode_example(tok, [first, second], False, max_length) == whole[:start] + text[:max_length - start - end] \
        + whole[len(whole) - end:]


def run_case(seed: int, tmp: Path, tok: Tokenizer, monkeypatch) -> None:
    rng = random.Random(seed)
    data_dir = check_prepare(rng, tmp, tok, monkeypatch)
    check_loader(rng, data_dir, tok.eos_id)
    check_document_masking(rng, data_dir, tok)
    check_mixture(rng, tmp, data_dir)
    check_examples(rng, tok, tmp / "chat_tokenizer")


@pytest.mark.parametrize("seed", range(20))
def test_data_pipeline_matches_the_reference(seed, tmp_path, tokenizer, monkeypatch):
    run_case(seed, tmp_path, tokenizer, monkeypatch)


def test_an_empty_input_among_many_is_refused_with_every_empty_file_named(tmp_path, tokenizer):
    paths = random_corpus(random.Random(1), tmp_path)
    for name in ("empty.txt", "blank.txt"):
        (tmp_path / name).write_text("" if name == "empty.txt" else "\n \r\n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: empty input .*also empty: .*blank.txt"):
        prepare_data([*paths, tmp_path / "empty.txt", tmp_path / "blank.txt"], tmp_path / "out", tokenizer=tokenizer)
