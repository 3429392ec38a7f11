"""Fine-tuning recipes: the classifier loop against transformers, regression metrics, gradient accumulation,
packed (padding-free) classifier batches where the attention backend runs packed sequences, the benchmark over a
task list, scripts and errors (task files: test_task_files.py; instruction tuning: test_instruct.py; a whole
classifier run against a loop written with transformers: test_finetune_reference.py)."""

from __future__ import annotations

import json
import math
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
from tests.helpers import largest, load_script, rel_err, run_script
import ttl_kernels
from ttl_core import LlamaConfig, LlamaForSequenceClassification
from ttl_core.errors import CheckpointError, ConfigError
from ttl_core.finetune import (SAMPLE_DATA, FinetuneConfig, classifier_collator, collate, finetune_classifier, pack,
                               predict)
from ttl_core.hf import load_pretrained, save_pretrained
from ttl_core.metrics import read_metrics
from ttl_core.instruct import finetune_instruct
from ttl_core.task_files import TaskSpec, load_task, read_task_file
from ttl_core.tokenizer import Tokenizer

STS = TaskSpec(["sentence1", "sentence2"], "score", pair=True, regression=True)
FAST = dict(lr=3e-3, batch_size=16, epochs=2, max_length=96)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def news_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("news")
    return finetune_classifier(base_dir, NEWS_TRAIN, NEWS_EVAL, out, NEWS, FinetuneConfig(**FAST), verbose=False)


# --- classification --------------------------------------------------------------------------------------

def test_classifier_learns_a_separable_task(news_run):
    assert news_run.best["accuracy"] > 0.9, news_run.history
    assert len(news_run.history) == 2 and news_run.best["f1"] > 0.9
    config = json.loads((news_run.checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "MUNDO", "1": "ESPORTES", "2": "NEGÓCIOS", "3": "TECNOLOGIA"}
    assert config["label2id"]["TECNOLOGIA"] == 3
    records = [json.loads(line) for line in (news_run.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_accuracy"] for r in records if "eval_accuracy" in r] == [h["accuracy"] for h in news_run.history]


def test_saved_classifier_matches_transformers_and_pipeline(news_run):
    transformers = pytest.importorskip("transformers")
    directory = news_run.checkpoint
    tokenizer = Tokenizer.from_pretrained(directory)
    examples = load_task(NEWS_EVAL, tokenizer, NEWS, list(NEWS.labels), 96)[:24]
    ours = predict(load_pretrained(directory), examples, 8, torch.device("cpu"))
    hf = transformers.LlamaForSequenceClassification.from_pretrained(directory).eval()
    batch = collate(examples, hf.config.pad_token_id)  # right padding: pooling must pick each row's last token
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    classify = transformers.pipeline("text-classification", model=str(directory), device="cpu")
    rows = [r for _, r in read_task_file(NEWS_EVAL)][:8]
    got = [p["label"] for p in classify([r["title"] + "\n\n" + r["text"] for r in rows])]
    assert got == [NEWS.labels[i] for i in ours[:8].argmax(-1).tolist()]


def test_regression_reports_pearson_and_mse_of_the_saved_model(base_dir, tmp_path):
    """Sentence pairs (STS): the metrics are those of the saved model, whose predictions transformers' pipeline
    reproduces from the text `sentence1 + "<s>" + sentence2 + "</s>"`."""
    train, evals = SAMPLE_DATA / "sts_pt_train.csv", SAMPLE_DATA / "sts_pt_eval.csv"
    result = finetune_classifier(base_dir, train, evals, tmp_path, STS, FinetuneConfig(**{**FAST, "epochs": 1}),
                                 verbose=False)
    model = load_pretrained(result.checkpoint)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    examples = load_task(evals, Tokenizer.from_pretrained(result.checkpoint), STS, None, 96)
    pred = predict(model, examples, 5, torch.device("cpu"))[:, 0].double().numpy()
    target = np.array([t for _, t in examples])
    assert result.best["pearson"] == pytest.approx(np.corrcoef(pred, target)[0, 1], abs=1e-5)
    assert result.best["mse"] == pytest.approx(np.mean((pred - target) ** 2), rel=1e-5)
    # a pair's text form reproduces ttl's predictions in transformers' pipeline
    transformers = pytest.importorskip("transformers")
    regress = transformers.pipeline("text-classification", model=str(result.checkpoint), device="cpu")
    texts = [r["sentence1"] + "<s>" + r["sentence2"] + "</s>" for _, r in read_task_file(evals)]
    assert np.abs(np.array([out["score"] for out in regress(texts)]) - pred).max() <= 1e-5


def test_float16_fine_tuning_scales_its_loss(base_dir, tmp_path, monkeypatch):
    """fp16 gradients of small losses underflow; the update goes through a GradScaler, as in pretraining, and each
    step logs its loss scale and whether the scaler skipped it."""
    scaled = []

    class CountingScaler(torch.amp.GradScaler):
        def scale(self, outputs):
            scaled.append(outputs.dtype)
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    for name, rows in (("train.csv", 17), ("eval.csv", 9)):
        source = NEWS_TRAIN if name == "train.csv" else NEWS_EVAL
        (tmp_path / name).write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]),
                                     encoding="utf-8")
    cfg = FinetuneConfig(**{**FAST, "epochs": 1, "batch_size": 8, "dtype": "float16"})
    result = finetune_classifier(base_dir, tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "out", NEWS,
                                 cfg, verbose=False)
    assert len(scaled) == 2 and np.isfinite(result.history[0]["accuracy"])
    steps = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 2 and steps[0]["loss_scale"] == 2.0**16
    assert all(r["skipped"] == (not math.isfinite(r["grad_norm"])) for r in steps)


def test_a_classifier_base_keeps_its_label_order_over_the_discovered_one(base_dir, tmp_path):
    """Fine-tuning a classifier further (TeenyTinyLlama-160m-AgNews on more news, say) keeps its trained head: with
    no --labels, the train file's names sorted would give row 0 (MUNDO) to ESPORTES. As in transformers'
    run_classification, a base naming the discovered set keeps its order; other names don't, and --labels wins."""
    header, *rows = NEWS_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)
    few = [next(row for row in rows if row.rstrip().endswith("," + name)) for name in NEWS.labels]
    (tmp_path / "few.csv").write_text(header + "".join(few), encoding="utf-8")
    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=1, max_length=32)
    for names, given, expected in ((NEWS.labels, None, NEWS.labels), (list("ABCD"), None, sorted(NEWS.labels)),
                                   (NEWS.labels, sorted(NEWS.labels), sorted(NEWS.labels))):
        save_pretrained(load_pretrained(base_dir, architecture="LlamaForSequenceClassification",
                                        id2label=dict(enumerate(names))), tmp_path / "clf",
                        tokenizer=Tokenizer.from_pretrained(base_dir))
        result = finetune_classifier(tmp_path / "clf", tmp_path / "few.csv", tmp_path / "few.csv", tmp_path / "out",
                                     TaskSpec(["title", "text"], "label", labels=given), cfg, verbose=False)
        assert json.loads((tmp_path / "out" / "results.json").read_text())["labels"] == expected
        assert load_pretrained(result.checkpoint).config.id2label == dict(enumerate(expected))


def test_classifier_head_from_a_causal_lm(base_dir):
    lm = load_pretrained(base_dir)
    torch.manual_seed(1)
    clf = load_pretrained(base_dir, architecture="LlamaForSequenceClassification", id2label={0: "a", 1: "b", 2: "c"})
    lm_state, clf_state = lm.backbone.state_dict(), clf.backbone.state_dict()
    assert all(torch.equal(lm_state[k], clf_state[k]) for k in lm_state)
    assert clf.score.weight.shape == (3, 64) and 0.01 < clf.score.weight.std() < 0.03  # normal(0, 0.02)
    assert clf.config.label2id == {"a": 0, "b": 1, "c": 2}
    save_pretrained(clf, base_dir.parent / "clf")
    with pytest.raises(CheckpointError, match="cannot be loaded as LlamaForCausalLM"):
        load_pretrained(base_dir.parent / "clf", architecture="LlamaForCausalLM")


@pytest.mark.parametrize("kind", ["classifier", "instruct"])
def test_gradient_accumulation_updates_as_one_large_batch(base_dir, tmp_path, monkeypatch, kind):
    """2 accumulated batches of 4 give each update the gradient one batch of 8 gives, the short last one
    included: the mean over all examples (classifier) or over all target tokens (instruction tuning, whose
    batches hold different token counts, so a mean of batch means would differ). The update itself is
    skipped (the gradients recorded and dropped), so the weights stay put and every update compares exactly;
    evaluation runs without autograd."""
    import ttl_core.finetune as finetune

    lines = (NEWS_TRAIN if kind == "classifier" else SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines()
    data = tmp_path / ("few.csv" if kind == "classifier" else "few.jsonl")
    data.write_text("\n".join(lines[:21 if kind == "classifier" else 20]) + "\n")  # 20 examples: a short last batch
    grads: dict[int, list] = {}

    def recording_update(model, optimizer, train_cfg, lr, scaler=None, parts=None):
        grads[current].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0, {}

    eval_grad_modes = []
    monkeypatch.setattr(finetune, "optimizer_update", recording_update)
    losses = {}
    for current, accum in ((8, 1), (4, 2)):
        grads[current] = []
        cfg = FinetuneConfig(lr=3e-3, batch_size=current, grad_accum_steps=accum, epochs=1, max_length=96)
        out = tmp_path / f"b{current}"
        if kind == "classifier":
            finetune_classifier(base_dir, data, data, out, NEWS, cfg, verbose=False)
        else:
            handle = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, args: eval_grad_modes.append(torch.is_grad_enabled()) if not module.training else None)
            try:
                finetune_instruct(base_dir, data, out, "alpaca", replace(cfg, lora=False, max_length=512),
                                  eval_file=data, verbose=False)
            finally:
                handle.remove()
        records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in records] == [1, 2, 3]  # 3 updates either way
        losses[current] = [r["loss"] for r in records]
    assert losses[4] == pytest.approx(losses[8], rel=1e-6)
    for whole, accumulated in zip(grads[8], grads[4], strict=True):
        assert whole.keys() == accumulated.keys()
        for name, grad in whole.items():
            assert rel_err(accumulated[name], grad) <= 1e-5, name  # measured: under 4e-7
    if kind == "instruct":
        assert eval_grad_modes and not any(eval_grad_modes)


# --- packed batches ---------------------------------------------------------------------------------------------

def tiny_classifier(attention: str, num_labels: int = 3, problem_type: str | None = None):
    """A random classifier padding with id 0, with one head of 64 dims (a head size the Triton attention kernel
    runs)."""
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                         num_labels=num_labels, problem_type=problem_type, attention=attention)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config)


def pad_ending_examples(labels: list) -> list[tuple[list[int], object]]:
    """Five examples (ids 1..99, so 0 is only the pad id) of 9, 13, 3, 6 and 2 tokens, not all pooled at their last:
    the second ends in two pad-id tokens, the third has only its first token other than the pad id, the last is
    pad ids only (pooled at its first token, the argmax of zeros in transformers' position * (token != pad))."""
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 100, (n,), generator=gen).tolist() for n in (9, 11, 1, 6)]
    ids[1] += [0, 0]
    ids[2] += [0, 0]
    return list(zip(ids + [[0, 0]], labels))


@pytest.mark.parametrize("problem, lora", [("single_label_classification", False), ("regression", False),
                                           ("multi_label_classification", False),
                                           ("single_label_classification", True)])
def test_packed_classifier_batches_give_the_logits_loss_and_gradients_of_padded_ones(problem, lora, tmp_path,
                                                                                     monkeypatch):
    """The same examples packed into one row, through our Triton attention kernel's varlen path (interpreted here),
    pool each example where its right-padded row does (transformers' pooling, which the padded batch reproduces),
    so the logits, the loss (cross-entropy, MSE or BCE over the examples) and the gradients (every weight's, or
    LoRA's and the score head's) are those of the padded batch, whose padding mask sends attention to SDPA.
    `predict` packs too."""
    from ttl_core.lora import apply_lora

    model = tiny_classifier("triton", 1 if problem == "regression" else 3, problem)
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear", modules_to_save=["score"])
        with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    targets = {"single_label_classification": torch.tensor([0, 2, 1, 2, 0]),
               "regression": torch.randn(5, generator=gen),
               "multi_label_classification": torch.rand(5, 3, generator=gen)}[problem]
    examples = pad_ending_examples(targets.tolist())
    packed_calls, flash_attention = [], ttl_kernels.flash_attention

    def counted_flash_attention(*args, **kwargs):
        packed_calls.append(kwargs.get("cu_seqlens") is not None)
        return flash_attention(*args, **kwargs)

    monkeypatch.setattr(ttl_kernels, "flash_attention", counted_flash_attention)
    assert classifier_collator(model, "float32") is pack
    results = []
    for batch in (collate(examples, pad_id=0), pack(examples)):
        batch["labels"] = targets  # multi-label targets are rows of floats, which task files never give
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.item(), grads))
    assert packed_calls == [True] * model.config.num_hidden_layers  # the packed forward ran the Triton kernel
    (padded_logits, padded_loss, padded_grads), (packed_logits, packed_loss, packed_grads) = results
    assert packed_logits.shape == (5, model.config.num_labels)
    assert (packed_logits - padded_logits).abs().max() <= 1e-5 and abs(packed_loss - padded_loss) <= 1e-5
    assert all("lora_" in name or "score" in name for name in padded_grads) == lora
    for name, grad in padded_grads.items():
        assert rel_err(packed_grads[name], grad) <= 1e-4, name
    assert (predict(model, examples, 5, torch.device("cpu")) - padded_logits).abs().max() <= 1e-5
    if not lora:  # transformers pools the padded batch at the same tokens
        transformers = pytest.importorskip("transformers")
        save_pretrained(model, tmp_path / "clf")
        hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
        padded = collate(examples, pad_id=0)
        with torch.no_grad():
            theirs = hf(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert (theirs - packed_logits).abs().max() <= 1e-5


def test_classifier_batches_are_packed_only_where_attention_runs_packed_sequences(monkeypatch):
    """SDPA and eager (and "auto" on a CPU) keep `collate`'s right-padded batches; Triton packs the examples end to
    end, positions restarting, with the padded batch's labels (the rule is instruction tuning's, `packs_batches`)."""
    examples = pad_ending_examples([0, 1, 2, 1, 0])
    monkeypatch.delenv("TTL_ATTENTION", raising=False)
    padded = collate(examples, pad_id=0)
    for backend in ("sdpa", "eager", "auto"):
        batch = classifier_collator(tiny_classifier(backend), "float32")(examples)
        assert batch.keys() == padded.keys() and all(torch.equal(batch[k], padded[k]) for k in batch), backend
    assert classifier_collator(tiny_classifier("triton"), "bfloat16") is pack
    packed, lengths = pack(examples), [len(ids) for ids, _ in examples]
    assert packed["input_ids"].tolist() == [[token for ids, _ in examples for token in ids]]
    assert packed["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    assert packed["cu_seqlens"].tolist() == [0, 9, 22, 25, 31, 33] and packed["max_seqlen"] == 13
    assert torch.equal(packed["labels"], padded["labels"])


@pytest.mark.parametrize("lora", [False, True])
def test_classifier_fine_tuning_with_triton_attention_packs_and_trains_as_padded(base_dir, tmp_path, monkeypatch,
                                                                                  lora):
    """finetune_classifier with TTL_ATTENTION=triton (interpreted here) trains and evaluates on packed rows, says so
    in results.json, and logs the step losses and evaluations of the padded SDPA run up to fp32 rounding (LoRA
    without dropout, whose masks would be drawn for differently shaped batches)."""
    rows = NEWS_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:9]  # the header and 8 examples
    (tmp_path / "few.csv").write_text("".join(rows), encoding="utf-8")
    cfg = FinetuneConfig(lr=1e-2 if lora else 1e-3, batch_size=4, epochs=1, max_length=64, lora=lora,
                         lora_dropout=0.0)
    runs = {}
    for backend in ("sdpa", "triton"):
        monkeypatch.setenv("TTL_ATTENTION", backend)
        out = tmp_path / backend
        result = finetune_classifier(base_dir, tmp_path / "few.csv", tmp_path / "few.csv", out, NEWS, cfg,
                                     verbose=False)
        losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        runs[backend] = json.loads((out / "results.json").read_text())["packed"], losses, result.history
    assert runs["sdpa"][0] is False and runs["triton"][0] is True
    assert len(runs["triton"][1]) == 2 and \
        largest(abs(a - b) for a, b in zip(runs["sdpa"][1], runs["triton"][1])) <= 1e-5
    assert runs["triton"][2] == runs["sdpa"][2]


# --- scripts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["finetune_classifier", "finetune_benchmark", "finetune_instruct"])
def test_scripts_help(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main(["--help"])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0 and "--model" in printed and "--lora" in printed


def test_classifier_script_end_to_end_and_errors(base_dir, tmp_path):
    result = run_script("finetune_classifier", "--model", base_dir, "--out", tmp_path / "run", "--epochs", "1",
                        "--lr", "3e-3", "--max-length", "96")
    assert result.returncode == 0, result.stderr
    assert "best epoch 1: accuracy" in result.stdout and (tmp_path / "run" / "best" / "model.safetensors").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("title,text,label\na,b,MUNDO\nc,d,ESPORTE\n", encoding="utf-8")
    result = run_script("finetune_classifier", "--model", base_dir, "--train", bad, "--eval", bad,
                        "--labels", "MUNDO,ESPORTES", "--out", tmp_path / "bad")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:3: unknown label 'ESPORTE' (labels: MUNDO, ESPORTES)"


def test_benchmark_script_prints_one_table(base_dir, tmp_path):
    tasks = [{"name": "noticias", "train": str(NEWS_TRAIN), "eval": str(NEWS_EVAL), "labels": NEWS.labels},
             {"name": "sts", "train": str(SAMPLE_DATA / "sts_pt_train.csv"),
              "eval": str(SAMPLE_DATA / "sts_pt_eval.csv"),
              "text_fields": ["sentence1", "sentence2"], "label_field": "score", "pair": True, "regression": True}]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    result = run_script("finetune_benchmark", "--model", base_dir, "--tasks", tmp_path / "tasks.json", "--out",
                        tmp_path / "bench", "--epochs", "1", "--lr", "3e-3", "--max-length", "64")
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| task | kind | best epoch | accuracy | f1 | pearson | mse |" and len(table) == 4
    assert table[2].startswith("| noticias | classification | 1 |")
    assert table[3].split("|")[4:6] == [" - ", " - "]  # regression has no accuracy / F1
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert rows[1]["pearson"] is not None and rows[0]["accuracy"] > 0.5


def test_benchmark_rows_json_and_markdown_table(tmp_path, monkeypatch):
    """One row per task with its kind and its best epoch's metrics (a metric the task lacks, or a NaN, is '-'),
    each task run on its own train and eval files into OUT/NAME; results.md holds the printed table."""
    import ttl_core.task_benchmark as bench

    best = {"noticias": {"epoch": 2, "accuracy": 0.75, "f1": 0.5, "loss": 0.1},
            "sts": {"epoch": 3, "pearson": float("nan"), "mse": 0.125}}
    calls = []

    def fake_finetune(model_dir, train, eval_, out, spec, cfg, verbose):
        calls.append((train.name, eval_.name, out, verbose))
        out.mkdir(parents=True)  # as the real run does
        return types.SimpleNamespace(best=best[out.name])

    monkeypatch.setattr(bench, "finetune_classifier", fake_finetune)
    tasks = [bench.Task("noticias", tmp_path / "n_train.csv", tmp_path / "n_eval.csv", NEWS),
             bench.Task("sts", tmp_path / "s_train.csv", tmp_path / "s_eval.csv", STS)]
    rows = bench.run_benchmark(tmp_path / "model", tasks, tmp_path / "out", FinetuneConfig(epochs=3), verbose=False)
    assert calls == [("n_train.csv", "n_eval.csv", tmp_path / "out" / "noticias", False),
                     ("s_train.csv", "s_eval.csv", tmp_path / "out" / "sts", False)]
    assert rows[0] == {"task": "noticias", "kind": "classification", "epoch": 2, "accuracy": 0.75, "f1": 0.5,
                       "pearson": None, "mse": None}
    assert rows[1]["kind"] == "regression" and rows[1]["epoch"] == 3 and rows[1]["mse"] == 0.125
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0] == rows[0] and saved["config"]["epochs"] == 3
    assert (tmp_path / "out" / "results.md").read_text(encoding="utf-8").splitlines() == [
        "| task | kind | best epoch | accuracy | f1 | pearson | mse |",
        "|---|---|---|---|---|---|---|",
        "| noticias | classification | 2 | 0.7500 | 0.5000 | - | - |",
        "| sts | regression | 3 | - | - | - | 0.1250 |"]


def test_classifier_keeps_the_first_best_epoch_and_decays_the_lr_over_all_updates(base_dir, tmp_path, monkeypatch):
    """With scripted evaluations 0.5, 0.8, 0.8 the checkpoint is saved after epochs 1 and 2 only (a tie is no
    improvement). The logged lr warms up for `warmup_steps` and then follows the cosine to 0 over the run's
    updates: 10 examples in batches of 4 accumulated 2 by 2 are 2 updates per epoch, 6 in all."""
    import ttl_core.finetune as finetune

    scores, evaluated, saved = iter([0.5, 0.8, 0.8]), [], []

    def scripted_evaluation(*args, **kwargs):
        evaluated.append(True)
        return {"accuracy": next(scores)}

    monkeypatch.setattr(finetune, "evaluate_classifier", scripted_evaluation)
    monkeypatch.setattr(finetune, "save_finetuned", lambda *args: saved.append(len(evaluated)))  # the epoch
    rows = NEWS_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:11]  # the header and 10 examples
    (tmp_path / "train.csv").write_text("".join(rows), encoding="utf-8")
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, grad_accum_steps=2, epochs=3, warmup_steps=1, max_length=96)
    result = finetune_classifier(base_dir, tmp_path / "train.csv", tmp_path / "train.csv", tmp_path / "out", NEWS,
                                 cfg, verbose=False)
    assert saved == [1, 2] and result.best == {"epoch": 2, "accuracy": 0.8}
    assert [h["accuracy"] for h in result.history] == [0.5, 0.8, 0.8]
    records = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    expected = [1e-3] + [0.5e-3 * (1 + math.cos(math.pi * (step - 2) / 5)) for step in range(2, 7)]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)


def test_predict_leaves_a_training_model_in_training_mode(base_dir):
    """Evaluating after an epoch must not switch dropout off for the epochs that follow."""
    model = load_pretrained(base_dir, architecture="LlamaForSequenceClassification", id2label={0: "a", 1: "b"})
    examples = [([5, 9, 14, 3 + k], k % 2) for k in range(3)]
    for training in (True, False):
        model.train(training)
        predict(model, examples, 2, torch.device("cpu"))
        assert model.training == training


def test_collate_pads_right_and_keeps_regression_targets_fractional():
    batch = collate([([5, 6, 7], 3.75), ([8], 0.2)], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([3.75, 0.2])
    assert collate([([5], 2), ([6], 0)], pad_id=3)["labels"].dtype == torch.long


def test_each_epoch_visits_every_example_once_in_a_new_seeded_order(tmp_path):
    """train_epochs reshuffles per epoch (one order for all epochs would repeat the same batches), covers every
    example each epoch, the short last batch included, and the same seed gives the same orders."""
    from ttl_core.finetune import train_epochs
    from ttl_core.metrics import MetricsLog
    from ttl_core.model_io import ModelOutput

    def epoch_orders(seed: int) -> list[list[int]]:
        seen: list[int] = []
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(torch.tensor([0.5]))
        # train_epochs calls model(**batch, label_smoothing=).loss: this one notes the examples of each batch it sees
        model.forward = lambda ids, label_smoothing: (seen.extend(ids.tolist()),
                                                      ModelOutput(loss=(model.weight * ids).mean()))[1]
        (tmp_path / f"run{seed}").mkdir(exist_ok=True)
        log, cfg = MetricsLog(tmp_path / f"run{seed}"), FinetuneConfig(lr=1e-3, batch_size=4, epochs=3, seed=seed)
        train_epochs(model, list(range(10)), cfg, lambda ids: {"ids": torch.tensor(ids)},
                     lambda batch: len(batch["ids"]), log, lambda epoch, step: None)
        log.close()
        return [seen[i:i + 10] for i in range(0, 30, 10)]

    orders = epoch_orders(1)
    assert len(orders) == 3 and all(sorted(order) == list(range(10)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert epoch_orders(1) == orders != epoch_orders(2)


def test_merge_lora_without_lora_is_refused():  # every weight would be trained and the full model saved
    with pytest.raises(ConfigError, match=r"merge_lora \(--merge-lora\) merges LoRA adapters .*; it needs --lora"):
        FinetuneConfig(merge_lora=True)
