"""What the training-loop tests share: a micro model config and a small prepared Portuguese corpus."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_reference import randomize_
from ttl_core import load_pretrained
from ttl_core.data import prepare_data
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.run_config import load_run_config

MICRO_MODEL = ["model.preset=\"tiny\"", "model.hidden_size=64", "model.intermediate_size=128",
               "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.max_position_embeddings=64"]
FAST = ["train.seq_len=32", "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=3",
        "train.eval_batches=2", "train.sample_tokens=0", "train.lr=3e-3"]

PORTUGUESE = ("O rio corre devagar entre as pedras da serra, e a cidade acorda com o cheiro de pão quente. "
              "Na feira, a vendedora de frutas conta histórias sobre a chuva de ontem e o preço do café. ")


def corpus_file(tmp: Path) -> Path:
    """`tmp`/corpus.txt: 60 distinct Portuguese documents."""
    docs = [f"Documento {i}. " + PORTUGUESE * (1 + i % 3) + f"Fim da história número {i * 7}." for i in range(60)]
    (tmp / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    return tmp / "corpus.txt"


def prepared_corpus(tmp: Path) -> Path:
    """A small prepared corpus under `tmp`: `corpus_file`'s documents, tokenizer trained on them."""
    prepare_data([corpus_file(tmp)], tmp / "prepared", vocab_size=400, val_fraction=0.1)
    return tmp / "prepared"


def corpus_halves(tmp: Path, first: int) -> Path:
    """`tmp`/a and `tmp`/b: `corpus_file`'s first `first` documents and the rest, prepared with one tokenizer (trained
    on a's); `tmp`/b.txt stays for a caller to prepare otherwise."""
    docs = corpus_file(tmp).read_text(encoding="utf-8").split("\n\n")
    (tmp / "a.txt").write_text("\n\n".join(docs[:first]), encoding="utf-8")
    (tmp / "b.txt").write_text("\n\n".join(docs[first:]), encoding="utf-8")
    prepare_data([tmp / "a.txt"], tmp / "a", vocab_size=400, val_fraction=0.15, workers=1)
    prepare_data([tmp / "b.txt"], tmp / "b", tokenizer=tmp / "a", val_fraction=0.15, workers=1)
    return tmp


def run_config(*overrides: str):
    return load_run_config(None, [*MICRO_MODEL, "model.vocab_size=400", *FAST, *overrides])


def set_arguments(*overrides: str) -> list[str]:
    """The --set arguments that give scripts/pretrain.py the config `run_config(*overrides)` builds."""
    return [x for o in [*MICRO_MODEL, "model.vocab_size=400", *FAST, *overrides] for x in ("--set", o)]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def random_model(run, seed: int = 0) -> LlamaForCausalLM:
    """`run`'s model with random weights (biases and norms included), in training mode."""
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(run.model_config()), seed).train()


def same_weights(a: Path, b: Path) -> bool:
    """Whether the checkpoints `a` and `b` hold the same tensors, bit for bit."""
    x, y = load_pretrained(a).state_dict(), load_pretrained(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def same_state(a, b) -> bool:
    """Equal nested dicts and lists of tensors and plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
