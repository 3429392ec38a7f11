"""The classifier fine-tuning recipe against a plain loop written from its documentation with transformers'
tokenizer and LlamaForSequenceClassification, torch's AdamW and transformers' schedule: the same task file, base
and seed in, so the same losses, gradient norms, lrs, evaluations and best checkpoint out."""

from __future__ import annotations

import copy
import csv
import math
import random
from pathlib import Path

import torch
import transformers

from finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
from hf_reference import assert_trained_as_closely_as_transformers, reference_adamw, reference_lr
from ttl_core.finetune import FinetuneConfig, finetune_classifier
from ttl_core.metrics import read_metrics


def task_rows(path: Path, count: int) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))[:count]


def encoded(tokenizer, rows: list[dict[str, str]], max_length: int) -> list[tuple[list[int], int]]:
    """(ids, label index) per row: title and text joined by a blank line, cut to `max_length` by transformers."""
    return [(tokenizer(row["title"] + "\n\n" + row["text"], truncation=True, max_length=max_length)["input_ids"],
             NEWS.labels.index(row["label"])) for row in rows]


def padded(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with their attention mask and the labels."""
    longest = max(len(ids) for ids, _ in batch)
    return {"input_ids": torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids, _ in batch]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in batch]),
            "labels": torch.tensor([label for _, label in batch])}


@torch.no_grad()
def accuracy(model: transformers.LlamaForSequenceClassification, examples: list, pad_id: int) -> float:
    model.eval()
    batch = padded(examples, pad_id)
    right = (model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1) == batch["labels"])
    model.train()
    return right.sum().item() / len(examples)


def reference_fine_tuning(model: transformers.LlamaForSequenceClassification, examples: list, eval_examples: list,
                          cfg: FinetuneConfig) -> tuple[list[dict], list[float], dict]:
    """Epoch e visits the examples in the order random.Random(seed * 1000 + e) shuffles them into, in batches of
    `batch_size`, one update per `grad_accum_steps` batches (the last window may be short) on the mean loss over
    its examples; the lr warms up and then follows the cosine to 0 over all the run's updates. Returns each
    update's figures, each epoch's eval accuracy, and the weights after the first epoch of the best accuracy."""
    pad_id = model.config.pad_token_id
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    max_steps = math.ceil(batches_per_epoch / cfg.grad_accum_steps) * cfg.epochs
    optimizer = reference_adamw(model, cfg.lr, cfg.weight_decay)
    figures, accuracies, best = [], [], {}
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = list(range(len(examples)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        batches = [[examples[i] for i in order[at:at + cfg.batch_size]] for at in range(0, len(order), cfg.batch_size)]
        for first in range(0, len(batches), cfg.grad_accum_steps):
            window = batches[first:first + cfg.grad_accum_steps]
            count = sum(len(batch) for batch in window)
            loss = 0.0
            for batch in window:
                part = model(**padded(batch, pad_id)).loss * len(batch) / count
                part.backward()
                loss += part.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            lr = reference_lr(len(figures) + 1, cfg.lr, 0.0, cfg.warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad()
            figures.append({"step": len(figures) + 1, "epoch": epoch, "loss": loss, "grad_norm": grad_norm, "lr": lr})
        accuracies.append(accuracy(model, eval_examples, pad_id))
        if accuracies[-1] > max(accuracies[:-1], default=-1.0):
            best = copy.deepcopy(model.state_dict())
    return figures, accuracies, best


def test_classifier_fine_tuning_is_the_recipe_written_out_with_transformers(tmp_path):
    """Truncation, right padding and last-token pooling, the score head drawn from the seed, accumulation over
    batches of unequal size, clipping, decay groups, warmup + cosine, and the first best epoch kept."""
    base = saved_base_model(tmp_path)
    train_rows, eval_rows = task_rows(NEWS_TRAIN, 36), task_rows(NEWS_EVAL, 24)
    for name, rows in (("train.csv", train_rows), ("eval.csv", eval_rows)):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["title", "text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    cfg = FinetuneConfig(lr=2e-3, batch_size=8, grad_accum_steps=3, epochs=3, warmup_steps=1, max_length=24,
                         weight_decay=0.1, grad_clip=3.0, seed=1)
    result = finetune_classifier(base, tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "out", NEWS, cfg,
                                 verbose=False)

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    examples, eval_examples = encoded(tokenizer, train_rows, 24), encoded(tokenizer, eval_rows, 24)
    assert any(len(ids) == 24 for ids, _ in examples)  # some are cut
    head = dict(num_labels=4, id2label=dict(enumerate(NEWS.labels)),
                label2id={name: i for i, name in enumerate(NEWS.labels)})
    torch.manual_seed(cfg.seed)
    reference = transformers.LlamaForSequenceClassification.from_pretrained(base, **head)
    truth = copy.deepcopy(reference).double()
    expected, accuracies, best = reference_fine_tuning(reference, examples, eval_examples, cfg)
    _, exact_accuracies, exact_best = reference_fine_tuning(truth, examples, eval_examples, cfg)

    logged = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in logged] == [(e["step"], e["epoch"]) for e in expected]
    assert len(expected) == 6  # 5 batches an epoch: a window of 3 and one of 2 unequal ones (8 and 4 examples)
    assert min(e["grad_norm"] for e in expected) < cfg.grad_clip < max(e["grad_norm"] for e in expected)
    for got, want in zip(logged, expected):
        assert math.isclose(got["lr"], want["lr"], rel_tol=1e-12), got["step"]
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5), (got, want)
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=1e-5), (got, want)
    assert [h["accuracy"] for h in result.history] == accuracies == exact_accuracies
    assert max(accuracies) in accuracies[:-1]  # the weights kept are not the last ones (here epochs 2 and 3 tie)
    trained = transformers.LlamaForSequenceClassification.from_pretrained(result.checkpoint)
    assert_trained_as_closely_as_transformers(trained.state_dict(), best, exact_best)
