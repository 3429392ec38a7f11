"""The fine-tuning recipes (classifier, in full or with LoRA, and LoRA instruction tuning) against plain loops
written from their documentation with transformers (its tokenizer for the classifier), peft, torch's AdamW and
transformers' schedule: the same files, base and seed in, so the same losses, gradient norms, lrs, evaluations and
kept weights out. One update with label smoothing and gradient norms by part against transformers' and peft's
models in float64 with F.cross_entropy(label_smoothing=)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Callable

import types

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import ttl_core
import ttl_core.finetune as finetune
from finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
from hf_reference import (as_close_as_transformers, assert_figures_as_close_as_transformers,
                          assert_trained_as_closely_as_transformers, hf_causal_lm, hf_classifier)
from plain_finetune import (adapter_snapshot, classifier_scores, lm_loss, lm_padded, padded, reference_fine_tuning,
                            reference_part_norms, response_tokens)
from ttl_core.finetune import SAMPLE_DATA, FinetuneConfig, classifier_collator, finetune_classifier, start_lora
from ttl_core.hf import hf_plan
from ttl_core.instruct import add_chat_tokens, build_instruction_data, finetune_instruct, lm_collator, target_tokens
from ttl_core.lora_files import _adapter_tensors, save_adapter
from ttl_core.metrics import read_metrics
from ttl_core.tokenizer import Tokenizer


def task_rows(path: Path, count: int) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))[:count]


def encoded(tokenizer, rows: list[dict[str, str]], max_length: int) -> list[tuple[list[int], int]]:
    """(ids, label index) per row: title and text joined by a blank line, cut to `max_length` by transformers."""
    return [(tokenizer(row["title"] + "\n\n" + row["text"], truncation=True, max_length=max_length)["input_ids"],
             NEWS.labels.index(row["label"])) for row in rows]


@pytest.mark.parametrize("lora, dora", [(False, False), (True, False), (True, True)], ids=["full", "lora", "dora"])
def test_classifier_fine_tuning_is_the_recipe_written_out_with_transformers(tmp_path, lora, dora):
    """Truncation, right padding and last-token pooling, the score head drawn from the seed, accumulation over
    batches of unequal size, clipping, decay groups, warmup + cosine, and the first best epoch kept; with --lora,
    PEFT's adapters from the seed (drawn after the head) with its dropout masks, and the head trained in full;
    with --lora-dora, PEFT's DoRA magnitudes too (decayed, as transformers' Trainer decays them)."""
    base = saved_base_model(tmp_path)
    train_rows, eval_rows = task_rows(NEWS_TRAIN, 36), task_rows(NEWS_EVAL, 24)
    for name, rows in (("train.csv", train_rows), ("eval.csv", eval_rows)):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["title", "text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    # each run's lr makes its best epoch one before the last
    cfg = FinetuneConfig(lr=2e-3 if not lora else 5e-3 if dora else 1e-2, batch_size=8, grad_accum_steps=3, epochs=3,
                         warmup_steps=1, max_length=24, weight_decay=0.1, grad_clip=3.0 if not lora else 1.8, seed=1,
                         lora=lora, lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_dora=dora)
    result = finetune_classifier(base, tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "out", NEWS, cfg,
                                 verbose=False)

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    examples, eval_examples = encoded(tokenizer, train_rows, 24), encoded(tokenizer, eval_rows, 24)
    assert any(len(ids) == 24 for ids, _ in examples)  # some are cut
    head = dict(num_labels=4, id2label=dict(enumerate(NEWS.labels)),
                label2id={name: i for i, name in enumerate(NEWS.labels)})
    torch.manual_seed(cfg.seed)
    reference = transformers.LlamaForSequenceClassification.from_pretrained(base, **head)
    after_head = torch.get_rng_state()

    def run(model: transformers.LlamaForSequenceClassification,
            evaluations: list[dict]) -> tuple[list[dict], list[float], dict]:
        pad_id = model.config.pad_token_id

        def accuracy(model: torch.nn.Module) -> float:
            evaluations.append(classifier_scores(model, eval_examples, pad_id, len(NEWS.labels)))
            return evaluations[-1]["accuracy"]

        snapshot = lambda model: copy.deepcopy(model.state_dict())  # noqa: E731
        if lora:
            torch.set_rng_state(after_head)
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="SEQ_CLS",
                                                               target_modules=["q_proj", "v_proj"], use_dora=dora))
            snapshot = adapter_snapshot
        return reference_fine_tuning(model, examples, cfg, lambda batch: padded(batch, pad_id),
                                     lambda batch: len(batch["labels"]),
                                     accuracy, higher_is_better=True,
                                     snapshot=snapshot)

    evaluations = []
    exact, exact_accuracies, exact_best = run(copy.deepcopy(reference).double(), [])
    expected, accuracies, best = run(reference, evaluations)
    logged = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert_figures_as_close_as_transformers(logged, expected, exact)
    assert len(expected) == 6  # 5 batches an epoch: a window of 3 and one of 2 unequal ones (8 and 4 examples)
    assert min(e["grad_norm"] for e in expected) < cfg.grad_clip < max(e["grad_norm"] for e in expected)
    assert [h["accuracy"] for h in result.history] == accuracies == exact_accuracies
    assert [h["f1"] for h in result.history] == pytest.approx([e["f1"] for e in evaluations], rel=1e-12)
    assert len({label for _, label in eval_examples}) == len(NEWS.labels)  # no class may be left out of the F1
    assert max(accuracies) in accuracies[:-1]  # the weights kept are not the last ones
    if lora:
        trained = load_file(result.checkpoint / "adapter_model.safetensors")
        adapter_config = json.loads((result.checkpoint / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    else:
        trained = transformers.LlamaForSequenceClassification.from_pretrained(result.checkpoint).state_dict()
    assert_trained_as_closely_as_transformers(trained, best, exact_best)


@pytest.mark.parametrize("chat_format", ["alpaca", "aira"])
def test_lora_instruction_tuning_is_the_recipe_written_out_with_transformers_and_peft(tmp_path, chat_format):
    """LoRA on q and v from the seed as PEFT draws it, with PEFT's dropout masks, the loss over response tokens
    only, batches weighted by their response tokens, clipping, warmup + cosine, and the adapter of the lowest eval
    loss kept (here the last; test_instruct.py checks which is kept). Aira's tokens are added to the vocabulary:
    the embedding and LM head grow as transformers grows them (new rows drawn after the seed) and are trained in
    full, as PEFT's modules_to_save. The examples are ttl's encoding, whose text test_instruct.py checks."""
    base = saved_base_model(tmp_path)
    lines = (SAMPLE_DATA / "instrucoes_pt.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:18]), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("".join(lines[18:26]), encoding="utf-8")
    max_length = 224 if chat_format == "alpaca" else 128  # Alpaca's prompts are long in a 600-token vocabulary
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, grad_accum_steps=2, epochs=3, warmup_steps=1, max_length=max_length,
                         weight_decay=0.1, grad_clip=0.1 if chat_format == "alpaca" else 1.0, seed=2, lora=True,
                         lora_r=4, lora_alpha=8, lora_dropout=0.1)
    summary = finetune_instruct(base, tmp_path / "train.jsonl", tmp_path / "out", chat_format, cfg,
                                eval_file=tmp_path / "eval.jsonl", verbose=False)

    tokenizer = Tokenizer.from_pretrained(base)
    added = add_chat_tokens(tokenizer, chat_format)
    assert bool(added) == (chat_format == "aira")
    examples, eval_examples = (build_instruction_data(tmp_path / name, tokenizer, chat_format, cfg.max_length)
                               for name in ("train.jsonl", "eval.jsonl"))
    assert any(len(ids) == cfg.max_length for ids, _ in examples)  # some are cut

    def run(dtype: torch.dtype) -> tuple[list[dict], list[float], dict]:  # padding with id 0: it is masked out
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        torch.manual_seed(cfg.seed)
        if added:
            model.resize_token_embeddings(tokenizer.vocab_size)
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "v_proj"],
                               modules_to_save=["embed_tokens", "lm_head"] if added else None)
        # built in float32 whatever `dtype`, then cast: float64 draws other numbers from the same seed
        model = peft.get_peft_model(model, lora).to(dtype)
        return reference_fine_tuning(model, examples, cfg, lambda batch: lm_padded(batch, 0), response_tokens,
                                     lambda model: lm_loss(model, eval_examples, 0), higher_is_better=False,
                                     snapshot=adapter_snapshot)

    expected, eval_losses, best = run(torch.float32)
    exact, exact_eval_losses, exact_best = run(torch.float64)
    logged = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert_figures_as_close_as_transformers(logged, expected, exact)
    assert len(expected) == 9  # 5 batches an epoch, the last of 2 examples: windows of 2, 2 and 1 batches
    assert min(e["grad_norm"] for e in expected) < cfg.grad_clip < max(e["grad_norm"] for e in expected)
    for ours, theirs, truth in zip([h["eval_loss"] for h in summary["history"]], eval_losses, exact_eval_losses,
                                   strict=True):
        assert as_close_as_transformers(abs(ours - truth), abs(theirs - truth), 1e-5 * truth)
    saved = load_file(tmp_path / "out" / "best" / "adapter_model.safetensors")
    assert_trained_as_closely_as_transformers(saved, best, exact_best)


# --- one update with label smoothing and gradient norms by part, in float64 ---------------------------------------

SMOOTHING = 0.2
STEP = FinetuneConfig(lr=1e-3, batch_size=3, grad_accum_steps=2, epochs=1, grad_clip=0.5, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, label_smoothing=SMOOTHING, log_grad_norms=True)  # 6 examples: one update


def with_adapters(ours: torch.nn.Module, hf: torch.nn.Module, lora: bool, tmp_path: Path,
                  modules_to_save: list[str] | None = None) -> torch.nn.Module:
    """transformers' model in float64, with (`lora`) the LoRA adapters of `ours` loaded by peft: random B
    matrices, so that the A matrices have gradients too."""
    if lora:
        start_lora(ours, STEP, modules_to_save)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in ours.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        save_adapter(ours, tmp_path / "adapter")
        hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    return hf.double().train()


def one_update(model: torch.nn.Module, examples: list, collate: Callable, weight: Callable,
               monkeypatch) -> tuple[dict, dict[str, torch.Tensor]]:
    """`train_epochs`' one update of STEP: its metrics record and the gradients it applied, by parameter name."""
    grads, records = {}, []

    def recorded(model, *args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return update(model, *args, **kwargs)

    update = finetune.optimizer_update
    monkeypatch.setattr(finetune, "optimizer_update", recorded)
    finetune.train_epochs(model, examples, STEP, collate, weight, types.SimpleNamespace(log=records.append),
                          lambda epoch, step: None)
    [record] = records
    return record, grads


def assert_step_follows(record: dict, grads: dict, ours: torch.nn.Module, reference: torch.nn.Module,
                        logits: torch.Tensor, targets: torch.Tensor, lora: bool) -> None:
    """The record's "loss" is the unsmoothed cross-entropy, "smoothed_loss" the smoothed one, each parameter's
    gradient that of the smoothed loss, and each part's norm the reference's (parts without a trainable parameter
    left out), their squares adding up to grad_norm's; all to 1e-5, relative."""
    nll = F.cross_entropy(logits, targets)
    smoothed = F.cross_entropy(logits, targets, label_smoothing=SMOOTHING)
    smoothed.backward()
    assert abs(smoothed - nll) > 1e-3 * nll and math.isclose(record["loss"], nll.item(), rel_tol=1e-5)
    assert math.isclose(record["smoothed_loss"], smoothed.item(), rel_tol=1e-5)
    theirs = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    if lora:  # by PEFT's adapter keys: ttl's LoRA pairs and score head, peft's with their adapter name
        names = {id(p): name for name, p in ours.named_parameters()}
        pairs = {key: (grads[names[id(p)]], theirs[key.replace(".weight", ".default.weight").replace(
            "score.default", "score.modules_to_save.default")]) for key, p in _adapter_tensors(ours).items()}
        assert len(pairs) == len(grads) == len(theirs)
    else:
        pairs = {name: (grads[name], torch.cat([theirs[key] for key, _ in pieces]))
                 for name, pieces in hf_plan(ours.config, ours.architecture).items()}
    for name, (got, want) in pairs.items():
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), name
    expected = reference_part_norms(reference)
    parts = {key: value for key, value in record.items() if key.startswith("grad_norm/")}
    assert parts.keys() == expected.keys() and ("grad_norm/embed" in parts) == (not lora)
    for part, norm in expected.items():
        assert math.isclose(parts[part], norm, rel_tol=1e-5), (part, parts[part], norm)
    assert math.isclose(sum(n ** 2 for n in parts.values()), record["grad_norm"] ** 2, rel_tol=1e-6)


def random_ids(gen: torch.Generator, vocab: int) -> list[int]:
    """5 to 12 tokens above the pad id (3), so that a classifier pools each example at its last token."""
    return torch.randint(4, vocab, (int(torch.randint(5, 13, (1,), generator=gen)),), generator=gen).tolist()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_classifier_update_with_label_smoothing_follows_transformers_in_float64(tmp_path, monkeypatch, lora):
    """Batches of 3 accumulated twice, smoothed over 3 classes: the score head has its own part, grad_norm/score;
    with LoRA (score trained in full) only the blocks' adapters and the head have gradients."""
    hf = hf_classifier(seed=3, num_labels=3)
    hf.save_pretrained(tmp_path / "base")
    ours = ttl_core.load_pretrained(tmp_path / "base")
    reference = with_adapters(ours, hf, lora, tmp_path, modules_to_save=["score"])
    gen = torch.Generator().manual_seed(4)
    examples = [(random_ids(gen, hf.config.vocab_size), i % 3) for i in range(6)]
    record, grads = one_update(ours, examples, classifier_collator(ours, "float32"),
                               lambda batch: len(batch["labels"]), monkeypatch)
    logits = torch.cat([reference(input_ids=torch.tensor([ids])).logits for ids, _ in examples])
    assert_step_follows(record, grads, ours, reference, logits, torch.tensor([label for _, label in examples]), lora)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_instruction_update_with_label_smoothing_follows_transformers_in_float64(tmp_path, monkeypatch, lora):
    """Padded batches of 3 accumulated twice, weighted by their response tokens, smoothed over the vocabulary, the
    prompt tokens left out as F.cross_entropy's ignore_index=-100 leaves them."""
    hf = hf_causal_lm(seed=5)
    hf.save_pretrained(tmp_path / "base")
    ours = ttl_core.load_pretrained(tmp_path / "base")
    reference = with_adapters(ours, hf, lora, tmp_path)
    gen = torch.Generator().manual_seed(6)
    examples = []
    for _ in range(6):
        ids = random_ids(gen, hf.config.vocab_size)
        prompt = int(torch.randint(1, len(ids) - 1, (1,), generator=gen))
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    record, grads = one_update(ours, examples, lm_collator(ours, "float32", 0), target_tokens, monkeypatch)
    logits = torch.cat([reference(input_ids=torch.tensor([ids])).logits[0, :-1] for ids, _ in examples])
    targets = torch.tensor([label for _, labels in examples for label in labels[1:]])
    assert_step_follows(record, grads, ours, reference, logits, targets, lora)
