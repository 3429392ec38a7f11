"""The fine-tuning recipes of docs/finetuning.md written out as plain loops with transformers, peft and torch's AdamW:
the batches, losses, updates, evaluations and kept weights that ttl's fine-tuning runs are checked against
(test_finetune_reference.py, test_finetune_fuzz.py)."""

from __future__ import annotations

import math
import random
import re
from typing import Callable

import peft
import torch
import torch.nn.functional as F

from hf_reference import reference_adamw, reference_lr, reference_update
from ttl_core.finetune import FinetuneConfig

# transformers' module names of the parts whose gradient norms ttl logs outside the decoder blocks, by ttl's name
HF_PARTS = (("embed_tokens", "embed"), ("score", "score"), ("lm_head", "lm_head"), ("norm", "norm"))


def right_padded(rows: list[list[int]], value: int, longest: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (longest - len(row)) for row in rows])


def padded(batch: list[tuple[list[int], int | float]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with their attention mask and the labels (class ids, or float targets)."""
    ids = [ids for ids, _ in batch]
    longest = max(map(len, ids))
    return {"input_ids": right_padded(ids, pad_id, longest),
            "attention_mask": right_padded([[1] * len(row) for row in ids], 0, longest),
            "labels": torch.tensor([label for _, label in batch])}


def lm_padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with their attention mask, and the labels (-100 over each prompt) padded with -100."""
    longest = max(len(ids) for ids, _ in batch)
    return {**padded([(ids, 0) for ids, _ in batch], pad_id),
            "labels": right_padded([labels for _, labels in batch], -100, longest)}


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The targets of transformers' shifted loss: labels other than -100 after the first position."""
    return int((batch["labels"][:, 1:] != -100).sum())


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["labels"])


def classifier_losses(label_smoothing: float) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(the loss trained on, the unsmoothed loss) of a classifier batch: transformers' own loss (cross-entropy, or
    MSE for one label), the trained one smoothed over the classes as F.cross_entropy(label_smoothing=) smooths."""
    def losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        if not label_smoothing:
            return out.loss, out.loss
        return F.cross_entropy(out.logits, batch["labels"], label_smoothing=label_smoothing), out.loss
    return losses


def lm_losses(label_smoothing: float) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(the loss trained on, the unsmoothed loss) of a causal-LM batch: transformers' shifted loss over the labels
    that are not -100, the trained one smoothed over the vocabulary."""
    def losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        if not label_smoothing:
            return out.loss, out.loss
        logits = out.logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(logits, batch["labels"][:, 1:].flatten(), label_smoothing=label_smoothing), out.loss
    return losses


def adapter_snapshot(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it: the LoRA pairs and the modules trained in full (without the copies of those
    that PEFT may add from their wrappers: the trained one again and the base's)."""
    return {name: tensor.clone() for name, tensor in peft.get_peft_model_state_dict(model).items()
            if ".modules_to_save." not in name and ".original_module." not in name}


def reference_part_norms(model: torch.nn.Module) -> dict[str, float]:
    """The norm of the gradients of each part of a transformers or peft model, by the name ttl logs it under."""
    grads: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            block = re.search(r"layers\.\d+", name)
            part = block.group() if block else next(ours for theirs, ours in HF_PARTS if theirs in name)
            grads.setdefault(f"grad_norm/{part}", []).append(param.grad.flatten())
    return {part: torch.linalg.vector_norm(torch.cat(g)).item() for part, g in grads.items()}


def reference_fine_tuning(model: torch.nn.Module, examples: list, cfg: FinetuneConfig,
                          collate: Callable[[list], dict], weight: Callable[[dict], int],
                          evaluate: Callable[[torch.nn.Module], float], higher_is_better: bool,
                          snapshot: Callable[[torch.nn.Module], dict],
                          losses: Callable | None = None) -> tuple[list[dict], list[float], dict]:
    """Epoch e visits the examples in the order random.Random(seed * 1000 + e) shuffles them into, in batches of
    `batch_size`, one update per `grad_accum_steps` batches (the last window may be short) on the mean loss over
    its items (a batch's mean weighted by its `weight`: examples or target tokens), `losses(model, batch)` giving the
    loss trained on and the unsmoothed one (transformers' own loss by default); the gradients are clipped to
    `grad_clip` unless it is 0, and the lr warms up and then follows the cosine to 0 over all the run's updates.
    Returns each update's figures as metrics.jsonl names them (the part norms with `log_grad_norms`), each epoch's
    `evaluate` score, and the `snapshot` after the first epoch of the best score."""
    losses = losses or (lambda model, batch: (model(**batch).loss,) * 2)
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    max_steps = math.ceil(batches_per_epoch / cfg.grad_accum_steps) * cfg.epochs
    optimizer = reference_adamw(model, cfg.lr, cfg.weight_decay)
    figures, scores, best = [], [], {}
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = list(range(len(examples)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        batches = [collate([examples[i] for i in order[at:at + cfg.batch_size]])
                   for at in range(0, len(order), cfg.batch_size)]
        for first in range(0, len(batches), cfg.grad_accum_steps):
            window = batches[first:first + cfg.grad_accum_steps]
            total = sum(weight(batch) for batch in window)
            trained = unsmoothed = 0.0
            for batch in window:
                loss, nll = losses(model, batch)
                (loss * weight(batch) / total).backward()
                trained += loss.item() * weight(batch) / total
                unsmoothed += nll.item() * weight(batch) / total
            record = {"step": len(figures) + 1, "epoch": epoch, "loss": unsmoothed}
            if cfg.label_smoothing:
                record["smoothed_loss"] = trained
            if cfg.log_grad_norms:
                record.update(reference_part_norms(model))
            record["lr"] = reference_lr(len(figures) + 1, cfg.lr, 0.0, cfg.warmup_steps, max_steps)
            record["grad_norm"] = reference_update(model, optimizer, record["lr"], cfg.grad_clip or math.inf)
            figures.append(record)
        model.eval()
        with torch.no_grad():
            scores.append(evaluate(model))
        model.train()
        previous = scores[:-1]
        if not previous or (scores[-1] > max(previous) if higher_is_better else scores[-1] < min(previous)):
            best = snapshot(model)
    return figures, scores, best


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy, and macro F1 over the classes predicted or true, from the confusion matrix (F1 = 2PR / (P + R))."""
    predicted = logits.argmax(-1)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    confusion.index_put_((labels, predicted), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    hits, predictions, truths = confusion.diag(), confusion.sum(0), confusion.sum(1)
    precision, recall = hits / predictions.clamp(min=1), hits / truths.clamp(min=1)
    f1 = torch.where(hits > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"accuracy": hits.sum().item() / len(labels), "f1": f1[predictions + truths > 0].mean().item()}


def regression_scores(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Pearson's correlation (torch.corrcoef) and the mean squared error, in float64."""
    pair = torch.stack([predictions.double(), targets.double()])
    return {"pearson": torch.corrcoef(pair)[0, 1].item(), "mse": (pair[0] - pair[1]).pow(2).mean().item()}


def classifier_scores(model: torch.nn.Module, examples: list, pad_id: int, num_labels: int) -> dict[str, float]:
    """The evaluation of a transformers (or peft) classifier on `examples` in one padded batch: accuracy and macro
    F1, or for one label Pearson and MSE."""
    batch = padded(examples, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if num_labels == 1:
        return regression_scores(logits[:, 0], batch["labels"])
    return classification_scores(logits, batch["labels"], num_labels)


def lm_loss(model: torch.nn.Module, examples: list, pad_id: int) -> float:
    """The mean loss over the response tokens of all `examples`."""
    return model(**lm_padded(examples, pad_id)).loss.item()
