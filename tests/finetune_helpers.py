"""What the fine-tuning tests share: a tiny causal LM with a tokenizer trained on the bundled samples."""

import csv
import json
from pathlib import Path

import torch

from ttl_core.config import LlamaConfig
from ttl_core.finetune import SAMPLE_DATA
from ttl_core.hf import save_pretrained
from ttl_core.model import LlamaForCausalLM
from ttl_core.task_files import TaskSpec
from ttl_core.tokenizer_train import train_tokenizer

NEWS_TRAIN, NEWS_EVAL = SAMPLE_DATA / "agnews_pt_train.csv", SAMPLE_DATA / "agnews_pt_eval.csv"
NEWS = TaskSpec(["title", "text"], "label", labels=["MUNDO", "ESPORTES", "NEGÓCIOS", "TECNOLOGIA"])


def saved_base_model(tmp: Path) -> Path:
    """A tiny random causal LM saved under `tmp` with a tokenizer trained on the bundled sample texts."""
    texts = []
    for name in ("agnews_pt_train.csv", "sts_pt_train.csv", "nli_pt_train.csv"):
        with open(SAMPLE_DATA / name, encoding="utf-8") as f:
            texts += [" ".join(v for k, v in row.items() if k not in ("label", "score")) for row in csv.DictReader(f)]
    texts += [" ".join(json.loads(line).values())
              for line in open(SAMPLE_DATA / "instrucoes_pt.jsonl", encoding="utf-8")]
    (tmp / "corpus.txt").write_text("\n".join(texts), encoding="utf-8")
    tokenizer = train_tokenizer([tmp / "corpus.txt"], tmp / "tok.model", vocab_size=600)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    save_pretrained(LlamaForCausalLM(config), tmp / "model", tokenizer=tokenizer)
    return tmp / "model"
