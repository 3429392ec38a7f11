"""Corrupt-input fuzzing of the files ttl reads: a seed picks a valid artefact (an HF checkpoint, a sharded one, a
tokenizer directory, a LoRA adapter, a data directory, a TOML run config, a training checkpoint, metrics.jsonl, a
task file) and damages it (truncated, bytes flipped, a JSON value deleted or of another type, a safetensors
header lying about dtype, shape or offsets, a tensor missing or extra, a shard missing, files swapped with another
run's). Reading it through the Python API must then either work (the damage was harmless: a JSON key nothing
reads, whitespace) or raise one of ttl's errors in one line; a traceback from deep inside (KeyError, struct, json,
torch) or data that loads wrong fails. The seeds below were picked from a longer run of these cases to cover each
kind and each check that run found missing."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tokenizer_helpers import corpus, make_ttl_style_dir
from train_helpers import corpus_file, run_config

from ttl_core import load_pretrained
from ttl_core.checkpoint import SHA256, STATE_SHA256, TRAINER_STATE, state_digest
from ttl_core.config import LlamaConfig
from ttl_core.data import prepare_data
from ttl_core.errors import AdapterError, CheckpointError, DataError, TokenizerError, TTLError
from ttl_core.fileio import file_sha256
from ttl_core.hf import save_pretrained
from ttl_core.loader import PackedLoader
from ttl_core.lora import apply_lora
from ttl_core.lora_files import load_adapter, load_with_adapter, save_adapter
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.run_config import load_run_config
from ttl_core.task_files import TaskSpec, load_task, read_task_file, task_labels
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import train

ROOT = Path(__file__).resolve().parents[1]
ODD_VALUES = [None, "", "x", -1, 0, 2.5, 10**30, 1e308, float("nan"), float("inf"), True, [], {}, [1, 2], "1",
              "\ud800", 2**31]
TOML_VALUES = ['"x"', "-1", "0", "1e400", "nan", "inf", "true", "[]", "{}", "99999999999999999999999", "1.5", '""']
SAMPLE = "O Brasil é um país <s> grande </s> e diverso, com café e pão. 🙂"
RESUMED = ["train.max_steps=3", "train.save_every=3", "train.eval_every=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One valid artefact of each kind: data/, model/ (with its tokenizer), sharded/, adapter/, and two training
    runs of different models on the same data (run/, other_run/), each with one checkpoint."""
    root = tmp_path_factory.mktemp("valid")
    prepare_data([corpus_file(root)], root / "data", vocab_size=400, val_fraction=0.1, workers=1)
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_pretrained(model, root / "model", tokenizer=Tokenizer.from_pretrained(root / "data"))
    save_pretrained(model, root / "sharded", max_shard_size=20000)
    apply_lora(model, r=2, alpha=4)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.1)
    save_adapter(model, root / "adapter", base_model_name_or_path=root / "model")
    for run, layers in (("run", 2), ("other_run", 1)):
        train(run_config("train.max_steps=2", "train.save_every=2", "train.eval_every=2",
                         f"model.num_hidden_layers={layers}"), root / run, str(root / "data"))
    return root


# --- damage ---------------------------------------------------------------------------------------------------

def damage_bytes(rng: random.Random, path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    op = rng.choice(["truncate", "flip", "zero", "append", "empty"])
    if op == "truncate":
        data = data[:at]
    elif op == "flip":
        for i in [at] + [rng.randrange(len(data)) for _ in range(rng.randint(0, 3))]:
            data[i] ^= 1 << rng.randrange(8)
    elif op == "zero":
        end = min(len(data), at + rng.randint(1, 64))
        data[at:end] = bytes(end - at)
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    else:
        data = b""
    path.write_bytes(bytes(data))


def damage_value(rng: random.Random, document: object) -> object:
    """`document` with one value (at any depth) deleted, replaced by an odd one, or joined by an unknown key."""
    paths, todo = [], [((), document)]
    while todo:
        path, node = todo.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            paths.append(path + (key,))
            todo.append((path + (key,), child))
    if not paths:
        return rng.choice(ODD_VALUES)
    *parents, key = rng.choice(paths)
    parent = document
    for step in parents:
        parent = parent[step]
    op = rng.choice(["odd", "odd", "delete", "add", "as_text"])
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[f"{key}_extra"] = rng.choice(ODD_VALUES)
    elif op == "as_text":
        parent[key] = json.dumps(parent[key])
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return document


def damage_json(rng: random.Random, path: Path) -> None:
    if rng.random() < 0.25:
        damage_bytes(rng, path)
    else:
        path.write_text(json.dumps(damage_value(rng, json.loads(path.read_text()))))


def damage_safetensors(rng: random.Random, path: Path) -> str:
    """A header that lies (dtype, shape, offsets, header length, a tensor missing, renamed or added), or bytes;
    returns which."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    name = rng.choice([key for key in header if key != "__metadata__"])
    tensor = header[name]
    op = rng.choice(["bytes", "dtype", "dtype", "shape", "offsets", "missing", "extra", "rename", "header_size"])
    if op == "bytes":
        damage_bytes(rng, path)
        return op
    if op == "dtype":  # one of the same width keeps the offsets valid
        tensor["dtype"] = rng.choice(["I32", "U32", "F16", "I64", "XX"])
    elif op == "shape":
        count = math.prod(tensor["shape"])
        tensor["shape"] = rng.choice([tensor["shape"][::-1], [count], [x + 1 for x in tensor["shape"]], [-1]])
    elif op == "offsets":
        start, end = tensor["data_offsets"]
        tensor["data_offsets"] = rng.choice([[start + 4, end + 4], [end, start], [start, 10**12], [start, start]])
    elif op == "missing":
        del header[name]
    elif op == "extra":
        header[name.replace("0", "7", 1) + "_extra"] = dict(tensor)
    elif op == "rename":
        header[name + "x"] = header.pop(name)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    size = len(text) + rng.choice([-8, -1, 1, 2**40]) if op == "header_size" else len(text)
    path.write_bytes(struct.pack("<Q", size) + text + body)
    return op


def copied(base: Path, name: str, tmp: Path) -> Path:
    shutil.copytree(base / name, tmp / name)
    return tmp / name


def checked_model(model: LlamaForCausalLM, reference: LlamaForCausalLM | None = None) -> None:
    """The model runs; with a `reference` (the damage was to a safetensors header, not its data), as it does."""
    ids = torch.tensor([[1, 5, 9, 20]])
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    if reference is not None:
        gap = (logits - reference(ids).logits).abs().max().item()
        assert gap <= 1e-4, f"a damaged header loaded other weights (logits {gap:.3g} off)"


# --- each kind: damage a copy, return what reads it -----------------------------------------------------------

def hf_checkpoint(rng, base, tmp):
    model = copied(base, "model", tmp)
    file = rng.choice(["model.safetensors", "model.safetensors", "config.json", "generation_config.json"])
    header = file.endswith("safetensors") and damage_safetensors(rng, model / file) != "bytes"
    if not file.endswith("safetensors"):
        damage_json(rng, model / file)
    reference = load_pretrained(base / "model") if header else None
    return lambda: checked_model(load_pretrained(model), reference)


def sharded_checkpoint(rng, base, tmp):
    model = copied(base, "sharded", tmp)
    shard = rng.choice(sorted(model.glob("model-*.safetensors")))
    op = rng.random()
    if op < 0.4:
        damage_json(rng, model / "model.safetensors.index.json")
    elif op < 0.55:
        shard.unlink()
    else:
        damage_safetensors(rng, shard)
    return lambda: checked_model(load_pretrained(model))


def tokenizer_files(rng, base, tmp):
    tokenizer = tmp / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / "model" / name, tokenizer / name)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["400"] = {"content": "<extra>", "special": True}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    file = rng.choice(["tokenizer.model", "tokenizer_config.json", "tokenizer_config.json", "special_tokens_map.json"])
    (damage_bytes if file == "tokenizer.model" else damage_json)(rng, tokenizer / file)

    def read():
        tok = Tokenizer.from_pretrained(tokenizer)
        tok.decode(tok.encode(SAMPLE))
        tok.decode(list(range(tok.vocab_size)))
    return read


def lora_adapter(rng, base, tmp):
    adapter = copied(base, "adapter", tmp)
    weights = rng.random() < 0.5
    header = weights and damage_safetensors(rng, adapter / "adapter_model.safetensors") != "bytes"
    if not weights:
        damage_json(rng, adapter / "adapter_config.json")
    reference = load_adapter(load_pretrained(base / "model"), base / "adapter") if header else None
    merged = rng.random() < 0.5
    return lambda: checked_model(load_with_adapter(adapter) if merged else
                                 load_adapter(load_pretrained(base / "model"), adapter), reference)


def data_directory(rng, base, tmp):
    data = copied(base, "data", tmp)
    meta = json.loads((data / "meta.json").read_text())
    op = rng.random()
    if op < 0.35:
        damage_json(rng, data / "meta.json")
    elif op < 0.8:
        damage_bytes(rng, data / rng.choice(["train.bin", "val.bin"]))
    else:  # meta.json lies about one thing
        key = rng.choice(["train_tokens", "val_tokens", "vocab_size", "dtype", "eos_id"])
        (data / "meta.json").write_text(json.dumps({**meta, key: rng.choice(
            {"dtype": ["uint32", "int32", "uint8"], "vocab_size": [10, 100, 2**16 + 1]}.get(key, [0, 1, 10**9]))}))
    split = rng.choice(["train", "val"])

    def read():
        loader = PackedLoader(data, split, 16, 2, shuffle=split == "train")
        assert loader.eos_id < loader.vocab_size  # else no document would end
        for _, batch in zip(range(3), loader):
            assert batch["input_ids"].max() < meta["vocab_size"] and batch["labels"].max() < meta["vocab_size"]
    return read


def toml_config(rng, base, tmp):
    lines = (ROOT / "configs" / "tiny.toml").read_text().splitlines()
    at = rng.choice([i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")])
    op = rng.choice(["value", "value", "delete", "unknown", "bytes", "section"])
    if op == "value":
        lines[at] = f"{lines[at].split('=')[0]}= {rng.choice(TOML_VALUES)}"
    elif op == "delete":
        del lines[at]
    elif op == "unknown":
        lines.insert(at, f"{rng.choice(['lrr', 'model', 'max-steps'])} = {rng.choice(TOML_VALUES)}")
    elif op == "section":
        lines.insert(rng.randrange(len(lines)), rng.choice(["[bogus]", "[train.x]", "[model]", "[[train]]"]))
    path = tmp / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    if op == "bytes":
        damage_bytes(rng, path)
    return lambda: load_run_config(path).model_config()


def with_new_digests(checkpoint: Path) -> None:
    """Record the digests of the checkpoint's files as they are now: a checkpoint whose files are each intact but
    do not belong together (swapped from another run, or saved before digests were recorded)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except ValueError:  # damaged past reading: nothing to record
        return
    if isinstance(state, dict):
        state[SHA256] = {f.relative_to(checkpoint).as_posix(): file_sha256(f) for f in sorted(checkpoint.rglob("*"))
                         if f.is_file() and f.name != TRAINER_STATE}
        state.pop(STATE_SHA256, None)
        (checkpoint / TRAINER_STATE).write_text(json.dumps({**state, STATE_SHA256: state_digest(state)}))


def training_checkpoint(rng, base, tmp):
    run = copied(base, "run", tmp)
    checkpoint = run / "checkpoints" / "step-000002"
    file = rng.choice(["trainer_state.json", "optimizer.pt", "model.safetensors", "config.json", "other run's"])
    if file == "other run's":
        file = rng.choice(["optimizer.pt", "model.safetensors", "config.json", "trainer_state.json"])
        shutil.copy(base / "other_run" / "checkpoints" / "step-000002" / file, checkpoint / file)
    elif file == "model.safetensors":
        damage_safetensors(rng, checkpoint / file)
    else:
        (damage_json if file.endswith(".json") else damage_bytes)(rng, checkpoint / file)
    if rng.random() < 0.5:
        with_new_digests(checkpoint)
    return lambda: train(run_config(*RESUMED), run, str(base / "data"), resume=True)


def metrics_file(rng, base, tmp):
    path = tmp / "metrics.jsonl"
    lines = (base / "run" / "metrics.jsonl").read_text().splitlines()
    at = rng.randrange(len(lines))
    lines[at] = json.dumps(damage_value(rng, json.loads(lines[at])))
    path.write_text("\n".join(lines) + "\n")
    if rng.random() < 0.5:
        damage_bytes(rng, path)
    return lambda: read_metrics(path)


def task_file(rng, base, tmp):
    rows = [{"text": f"frase número {i} sobre o rio", "label": ["sim", "não"][i % 2]} for i in range(6)]
    path = tmp / f"task.{rng.choice(['jsonl', 'tsv', 'csv', 'json'])}"
    if path.suffix in (".jsonl", ".json") and rng.random() < 0.5:
        rows[2] = damage_value(rng, rows[2])
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"], delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
        damage_bytes(rng, path)
    spec = TaskSpec(text_fields=["text"])
    return lambda: load_task(path, Tokenizer.from_pretrained(base / "model"), spec,
                             task_labels(read_task_file(path), spec, path), 32)


KINDS = {"hf": hf_checkpoint, "sharded": sharded_checkpoint, "tokenizer": tokenizer_files, "adapter": lora_adapter,
         "data": data_directory, "toml": toml_config, "resume": training_checkpoint, "metrics": metrics_file,
         "task": task_file}
# the first seeds of each kind, and those of a 150-seed scan that reached a check the fuzzing added: adapter 1 and 7
# (tensors stored as I32 / U32), data 7 (meta.json's eos_id outside the vocabulary), resume 52 (another model's
# optimizer.pt) and 99 (a recorded [train] that is not a table), tokenizer 30 (a lone surrogate in the config)
SEEDS = {"hf": range(6), "sharded": range(4), "tokenizer": [0, 1, 2, 3, 30], "adapter": range(8), "data": range(8),
         "toml": range(5), "resume": [0, 1, 2, 52, 99], "metrics": range(3), "task": range(4)}


@pytest.mark.parametrize("kind, seed", [(kind, seed) for kind, seeds in SEEDS.items() for seed in seeds])
def test_damaged_files_load_or_fail_in_one_line(base, tmp_path, kind, seed):
    read = KINDS[kind](random.Random(f"{kind}-{seed}"), base, tmp_path)
    try:
        read()
    except TTLError as e:
        assert "\n" not in str(e), str(e)


# --- the defects the fuzzing found, each alone ----------------------------------------------------------------

def test_adapter_tensors_stored_as_integers_are_refused(base, tmp_path):
    adapter = copied(base, "adapter", tmp_path)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = next(key for key in header if key.endswith("lora_B.weight"))
    header[name]["dtype"] = "I32"  # as wide as F32: the offsets stay valid, and the values would be converted
    text = json.dumps(header).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    with pytest.raises(AdapterError, match=rf"adapter_model\.safetensors: tensor {name} has dtype I32"):
        load_adapter(load_pretrained(base / "model"), adapter)


def test_an_eos_id_outside_the_vocabulary_is_refused(base, tmp_path):
    data = copied(base, "data", tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "eos_id": meta["vocab_size"]}))
    with pytest.raises(DataError, match=r"meta\.json: 'eos_id' 400 is outside the vocabulary \(400 ids\)"):
        PackedLoader(data, "train", 16, 2)


def resumed(base: Path, tmp: Path, edit_checkpoint) -> None:
    """Resume a copy of the run after `edit_checkpoint(checkpoint)`, with its digests recorded afresh."""
    run = copied(base, "run", tmp)
    checkpoint = run / "checkpoints" / "step-000002"
    edit_checkpoint(checkpoint)
    with_new_digests(checkpoint)
    train(run_config(*RESUMED), run, str(base / "data"), resume=True)


def test_a_recorded_train_section_that_is_not_a_table_is_named(base, tmp_path):
    def edit(checkpoint):
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        state["config"]["train"] = 3
        (checkpoint / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json records \[train\] as 3, not a table"):
        resumed(base, tmp_path, edit)


def edit_optimizer_file(edit):
    def edit_checkpoint(checkpoint):
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        edit(saved, saved["optimizer"]["state"])
        torch.save(saved, checkpoint / "optimizer.pt")
    return edit_checkpoint


@pytest.mark.parametrize("edit, message", [
    (lambda saved, state: state.pop("lm_head.weight"), r"other parameters than the model's \(not both hold "
                                                       r"\['lm_head.weight'\]\)"),
    (lambda saved, state: state["lm_head.weight"].update(exp_avg=torch.ones(3)),
     r"lm_head\.weight\.exp_avg is not a floating-point tensor of the parameter's shape \(400, 64\)"),
    (lambda saved, state: state["lm_head.weight"].update(step=torch.tensor(-2.0)),
     r"lm_head\.weight\.step is not a step count >= 0"),
    (lambda saved, state: saved["optimizer"]["param_groups"][0]["params"].append("lm_head.weight"),
     r"other parameters than the model's \(its groups list a parameter twice\)"),
    (lambda saved, state: saved["rng"][0].pop("python"), r"unusable random-number generator state \(KeyError"),
    (lambda saved, state: saved["rng"][0].update(numpy=("MT19937", [1, 2], 0, 0, 0.0)),
     r"unusable random-number generator state \(AttributeError"),
], ids=["a parameter missing", "a moment of another shape", "a negative step", "a parameter twice",
        "no python state", "numpy keys not a tensor"])
def test_an_optimizer_file_that_does_not_fit_the_model_is_named(base, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=r"step-000002/optimizer\.pt: .*" + message):
        resumed(base, tmp_path, edit_optimizer_file(edit))


def test_another_model_s_optimizer_file_is_named(base, tmp_path):
    other = base / "other_run" / "checkpoints" / "step-000002" / "optimizer.pt"
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: an optimizer state for other parameters"):
        resumed(base, tmp_path, lambda checkpoint: shutil.copy(other, checkpoint / "optimizer.pt"))


def test_tokenizer_files_with_text_that_is_not_unicode_are_named(base, tmp_path):
    tokenizer = copied(base, "model", tmp_path)
    model = (tokenizer / "tokenizer.model").read_bytes()
    prefix = "\u2581".encode()  # a piece's word-boundary mark, its last byte made one no UTF-8 text holds
    (tokenizer / "tokenizer.model").write_bytes(model.replace(prefix, prefix[:2] + b"\xff", 1))
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a sentencepiece model \(piece \d+ is not UTF-8"):
        Tokenizer.from_pretrained(tokenizer)
    (tokenizer / "tokenizer.model").write_bytes(model)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s\ud800>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: the string '<s\\ud800>' holds a lone surrogate"):
        Tokenizer.from_pretrained(tokenizer)


def test_merges_holding_a_line_break_are_named_in_one_line(tmp_path):
    spec = make_ttl_style_dir(tmp_path / "tokenizer", corpus(40), vocab_size=300)
    unknown = {**spec, "model": {**spec["model"], "merges": [["a\nb", "c"], *spec["model"]["merges"]]}}
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(unknown))
    with pytest.raises(TokenizerError, match=r"merge 'a\\nb c' uses or makes a token that is not in model\.vocab"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer")
    vocab = spec["model"]["vocab"]
    for piece in ("\n", "a\n"):  # a piece no listed merge makes
        vocab.setdefault(piece, len(vocab))
    (tmp_path / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"never merges 'a' \+ '\\n' \(no merge 'a \\n'\)"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer")
