"""Fine-tuning recipes: the classifier loop against transformers, regression metrics, gradient accumulation,
instruction data in both chat formats, LoRA instruction tuning with a PEFT adapter, scripts and errors (task
files: test_task_files.py)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.finetune_helpers import NEWS, NEWS_EVAL, NEWS_TRAIN, saved_base_model
from tests.helpers import run_script
from ttl_core.errors import AdapterError, CheckpointError, ConfigError, DataError
from ttl_core.finetune import (SAMPLE_DATA, FinetuneConfig, classification_metrics, collate, finetune_classifier,
                               predict, regression_metrics)
from ttl_core.hf import load_pretrained, save_pretrained
from ttl_core.metrics import read_metrics
from ttl_core.instruct import add_chat_tokens, build_instruction_data, collate_lm, encode_chat, finetune_instruct
from ttl_core.task_files import TaskSpec, load_task, read_task_file
from ttl_core.tokenizer import AIRA_SPECIAL_TOKENS, Tokenizer, chat_prompt, chat_response, train_tokenizer

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
    """fp16 gradients of small losses underflow; the update goes through a GradScaler, as in pretraining."""
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


def test_metrics_against_hand_counts():
    m = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    # class 0: tp 1, predicted 2, actual 2 -> 0.5; class 1: tp 1, 1, 2 -> 2/3; class 2: tp 2, 3, 2 -> 0.8
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=50), rng.normal(size=50)
    r = regression_metrics(p.tolist(), t.tolist())
    assert r["pearson"] == pytest.approx(np.corrcoef(p, t)[0, 1]) and r["mse"] == pytest.approx(np.mean((p - t) ** 2))


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

    def recording_update(model, optimizer, train_cfg, lr, scaler=None):
        grads[current].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

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
            assert torch.allclose(accumulated[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), name
    if kind == "instruct":
        assert eval_grad_modes and not any(eval_grad_modes)


# --- instruction tuning ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["aira", "alpaca"])
@pytest.mark.parametrize("extra", ["", "O céu está limpo."])
def test_chat_ids_follow_the_template_and_mask_the_prompt(base_dir, fmt, extra):
    tok = Tokenizer.from_pretrained(base_dir)
    if fmt == "aira":
        tok.add_special_tokens([t for t in AIRA_SPECIAL_TOKENS if tok.token_to_id(t) is None])
    ids, labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 512)
    prompt = chat_prompt(fmt, "Descreva o tempo hoje.", extra)
    expected = tok.encode(prompt + chat_response(fmt, "Faz sol e calor."), add_bos=True)
    expected += [tok.eos_id] if fmt == "alpaca" else []
    assert ids == expected and ids[0] == tok.bos_id
    n_prompt = len(tok.encode(prompt, add_bos=True))
    assert ids[:n_prompt] == tok.encode(prompt, add_bos=True)
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert len(labels) > n_prompt
    if fmt == "aira":
        assert ids[-1] == tok.token_to_id("<|endofcompletion|>")
        assert tok.token_to_id("<|startofinstruction|>") in ids and tok.token_to_id("<|endofinstruction|>") in ids
    else:
        assert "### Resposta:" in prompt and ("### Entrada:" in prompt) == bool(extra)
    _, all_labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 512, True)
    assert all_labels == ids
    short_ids, short_labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 10)
    assert short_ids == ids[:10] and short_labels == labels[:10]
    batch = collate_lm([(ids, labels), (ids[:5], labels[:5])], pad_id=3)
    assert batch["input_ids"][1, 5:].eq(3).all() and batch["labels"][1, 5:].eq(-100).all()
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(ids) - 5)


def test_aira_tokens_are_added_and_embeddings_resized(base_dir):
    tok, model = Tokenizer.from_pretrained(base_dir), load_pretrained(base_dir)
    before = model.config.vocab_size
    assert add_chat_tokens(tok, model, "alpaca") == [] and tok.vocab_size == model.config.vocab_size == before
    assert add_chat_tokens(tok, model, "aira") == list(AIRA_SPECIAL_TOKENS)
    assert tok.vocab_size == before + len(AIRA_SPECIAL_TOKENS) == model.config.vocab_size
    assert model.backbone.embed.weight.shape[0] == model.lm_head.weight.shape[0] == tok.vocab_size
    assert tok.encode("<|endofinstruction|>", add_bos=False) == [tok.token_to_id("<|endofinstruction|>")]
    assert add_chat_tokens(tok, model, "aira") == []  # a second call finds them
    with pytest.raises(ConfigError, match="unknown chat format"):
        add_chat_tokens(tok, model, "vicuna")


def test_prompt_longer_than_max_length_is_a_clear_error(base_dir, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "palavra " * 200, "output": "sim"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt fills max_length 64"):
        build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)
    path.write_text(json.dumps({"question": "?", "output": "sim"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:1: no text field among instruction, prompt"):
        build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)
    for record in ({"instruction": "Diga oi.", "output": " \n"}, {"instruction": " ", "output": "Oi."}):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=r"long\.jsonl:1: empty instruction or response"):
            build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)


def test_lora_instruction_tuning_saves_a_peft_adapter(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ttl_core.lora import load_adapter

    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=2, max_length=256, lora=True)
    summary = finetune_instruct(base_dir, SAMPLE_DATA / "instrucoes_pt.jsonl", tmp_path, "aira", cfg, verbose=False)
    assert summary["added_tokens"] == list(AIRA_SPECIAL_TOKENS)
    adapter = tmp_path / "best"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 16, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    tokenizer = Tokenizer.from_pretrained(adapter)
    assert tokenizer.vocab_size == Tokenizer.from_pretrained(base_dir).vocab_size + len(AIRA_SPECIAL_TOKENS)
    # peft loads it onto transformers' model of the base (resized the same way) ...
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    hf.resize_token_embeddings(tokenizer.vocab_size)
    tuned = peft.PeftModel.from_pretrained(hf, adapter).eval()
    # ... and our loader gives the same logits on a chat prompt
    ours = load_pretrained(base_dir)
    ours.resize_token_embeddings(tokenizer.vocab_size)
    load_adapter(ours, adapter)
    ids = torch.tensor([tokenizer.encode(chat_prompt("aira", "Qual é a capital do Brasil?"), add_bos=True)])
    with torch.no_grad():
        assert (ours.eval()(ids).logits - tuned(input_ids=ids).logits).abs().max() <= 1e-4


def test_chat_tokens_added_into_padding_rows_are_trained(base_dir, tmp_path):
    """A base whose vocabulary is padded past its tokenizer needs no resize for Aira's tokens, but their rows
    were never trained: LoRA instruction tuning still trains and saves the embeddings in full."""
    padded = load_pretrained(base_dir)
    padded.resize_token_embeddings(padded.config.vocab_size + 16)
    save_pretrained(padded, tmp_path / "padded", tokenizer=Tokenizer.from_pretrained(base_dir))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:8]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=1, max_length=128, lora=True)
    summary = finetune_instruct(tmp_path / "padded", data, tmp_path / "out", "aira", cfg, verbose=False)
    assert summary["added_tokens"] == list(AIRA_SPECIAL_TOKENS)
    config = json.loads((tmp_path / "out" / "best" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_aira_tuning_is_seeded_stops_at_end_of_completion_and_pads_without_a_pad_token(base_dir, tmp_path,
                                                                                       monkeypatch):
    """The same --seed gives the same adapter (LoRA's A and the new rows came from an unseeded RNG); the saved
    generation_config.json lists `<|endofcompletion|>` as an EOS, so transformers' generate() stops where the
    answers were trained to end; a base with no pad token pads with EOS instead of -1."""
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:8]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=1, max_length=128, lora=True, seed=3)
    for run in ("a", "b"):
        finetune_instruct(base_dir, data, tmp_path / run, "aira", cfg, verbose=False)
    adapters = [load_file(tmp_path / run / "best" / "adapter_model.safetensors") for run in ("a", "b")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

    no_pad = load_pretrained(base_dir)
    no_pad.config = no_pad.config.replace(pad_token_id=None)
    save_pretrained(no_pad, tmp_path / "no_pad", tokenizer=Tokenizer.from_pretrained(base_dir))
    monkeypatch.setattr(Tokenizer, "pad_id", property(lambda self: -1))
    merged = FinetuneConfig(lr=1e-3, batch_size=4, epochs=1, max_length=128, lora=True, merge_lora=True)
    finetune_instruct(tmp_path / "no_pad", data, tmp_path / "merged", "aira", merged, verbose=False)
    tok = Tokenizer.from_pretrained(tmp_path / "merged" / "best")
    settings = transformers.GenerationConfig.from_pretrained(tmp_path / "merged" / "best")
    assert settings.eos_token_id == [tok.eos_id, tok.token_to_id("<|endofcompletion|>")]


# --- scripts ---------------------------------------------------------------------------------------------

def test_generate_script_runs_an_instruction_adapter_merged_into_its_base(base_dir, tmp_path):
    """scripts/generate.py --model on the PEFT adapter finetune_instruct saves: the base it names, grown to the
    adapter's vocabulary (Aira's tokens), with the adapter merged, streams what ttl_core.generate gives on
    that merged model; --base finds a base that moved; a missing base or a classifier's adapter is one line."""
    import ttl_core
    from ttl_core.lora import load_adapter, load_with_adapter, merge_lora

    base = Path(shutil.copytree(base_dir, tmp_path / "base"))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:4]))
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, epochs=1, max_length=128, lora=True)
    finetune_instruct(base, data, tmp_path / "run", "aira", cfg, verbose=False)
    adapter = tmp_path / "run" / "best"
    assert not (adapter / "config.json").exists()
    tok = Tokenizer.from_pretrained(adapter)
    merged = load_pretrained(base)
    merged.resize_token_embeddings(tok.vocab_size)
    merge_lora(load_adapter(merged, adapter))
    question = "Qual é a capital do Brasil?"
    ids = tok.encode(chat_prompt("aira", question))
    out = ttl_core.generate(merged, torch.tensor([ids]), max_new_tokens=12, repetition_penalty=1.2,
                            eos_token_id=[tok.eos_id, tok.token_to_id("<|endofcompletion|>")], pad_token_id=tok.pad_id)
    expected = tok.decode(out[0, len(ids):].tolist()) + "\n"
    args = ["--prompt", question, "--chat", "aira", "--greedy", "--max-new-tokens", "12", "--device", "cpu"]
    run = run_script("generate", "--model", adapter, *args)
    assert run.returncode == 0 and run.stdout == expected, run.stderr

    moved = base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError) as e:
        load_with_adapter(adapter)
    assert str(e.value) == (f"{base}: no such base model directory (base_model_name_or_path in "
                            f"{adapter / 'adapter_config.json'}; give its new place)")
    run = run_script("generate", "--model", adapter, "--base", moved, *args)
    assert run.returncode == 0 and run.stdout == expected, run.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(adapter))}: a SEQ_CLS adapter, not a causal LM's"):
        load_with_adapter(adapter, base=moved)


@pytest.mark.parametrize("script", ["finetune_classifier", "finetune_benchmark", "finetune_instruct"])
def test_scripts_help(script):
    result = run_script(script, "--help")
    assert result.returncode == 0 and "--model" in result.stdout and "--lora" in result.stdout


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
             {"name": "sts", "train": str(SAMPLE_DATA / "sts_pt_train.csv"), "eval": str(SAMPLE_DATA / "sts_pt_eval.csv"),
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
        calls.append((train.name, eval_.name, out))
        out.mkdir(parents=True)  # as the real run does
        return types.SimpleNamespace(best=best[out.name])

    monkeypatch.setattr(bench, "finetune_classifier", fake_finetune)
    tasks = [bench.Task("noticias", tmp_path / "n_train.csv", tmp_path / "n_eval.csv", NEWS),
             bench.Task("sts", tmp_path / "s_train.csv", tmp_path / "s_eval.csv", STS)]
    rows = bench.run_benchmark(tmp_path / "model", tasks, tmp_path / "out", FinetuneConfig(epochs=3), verbose=False)
    assert calls == [("n_train.csv", "n_eval.csv", tmp_path / "out" / "noticias"),
                     ("s_train.csv", "s_eval.csv", tmp_path / "out" / "sts")]
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


def test_metrics_count_a_class_that_is_only_predicted_and_handle_constant_sides():
    """Macro F1 averages over the classes in the predictions or the labels: a class predicted but never true
    scores 0 and counts; one in neither is left out. Pearson is 0, not a ZeroDivisionError, when either the
    predictions or the targets are constant."""
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], 4)
    # class 0: tp 1, predicted 1, actual 1 -> 1; class 1: tp 1, 1, 3 -> 0.5; class 2: tp 0, 2, 0 -> 0; class 3: none
    assert m["accuracy"] == pytest.approx(0.5) and m["f1"] == pytest.approx(1.5 / 3)
    varied = [0.3, -1.2, 2.5, 0.7]
    for p, t in ((varied, [1.5] * 4), ([1.5] * 4, varied)):
        r = regression_metrics(p, t)
        assert r["pearson"] == 0.0 and r["mse"] == pytest.approx(np.mean((np.array(p) - np.array(t)) ** 2))


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

    def epoch_orders(seed: int) -> list[list[int]]:
        seen: list[int] = []
        weight = torch.nn.Parameter(torch.tensor([0.5]))
        model = torch.nn.Module()
        model.weight = weight
        (tmp_path / f"run{seed}").mkdir(exist_ok=True)
        log = MetricsLog(tmp_path / f"run{seed}")
        cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=3, seed=seed)
        train_epochs(model, list(range(10)), cfg, lambda ids: {"ids": torch.tensor(ids)},
                     lambda m, batch: (seen.extend(batch["ids"].tolist()), (m.weight * batch["ids"]).mean())[1],
                     lambda batch: len(batch["ids"]), log, lambda epoch, step: None)
        log.close()
        return [seen[i:i + 10] for i in range(0, 30, 10)]

    orders = epoch_orders(1)
    assert len(orders) == 3 and all(sorted(order) == list(range(10)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert epoch_orders(1) == orders != epoch_orders(2)


def test_a_prompt_token_merged_with_the_response_is_trained_on():
    """A tokenizer trained on Alpaca prompts has a "\\n\\n" piece: the prompt's closing "\\n" and a response that
    starts with "\\n" encode as one token across the boundary, which is partly response and so is not masked;
    every token before it is."""
    rng = random.Random(0)
    words = "a casa de o menino foi para escola com seu cachorro ontem à noite e não voltou mais".split()
    docs = [chat_prompt("alpaca", " ".join(rng.choices(words, k=6))) + "\n" + " ".join(rng.choices(words, k=8))
            for _ in range(200)]
    tok = train_tokenizer(docs, None, vocab_size=300)
    prompt_ids = tok.encode(chat_prompt("alpaca", "Diga oi."))
    ids, labels = encode_chat(tok, "alpaca", "Diga oi.", "", "\nSim.", 512)
    n = len(prompt_ids) - 1  # the prompt's last token, "\n", merged with the response's
    assert ids[:n] == prompt_ids[:n] and ids[n] != prompt_ids[n] and tok.id_to_token(ids[n]) == "\n\n"
    assert labels == [-100] * n + ids[n:]


def test_lm_eval_loss_is_the_mean_over_all_target_tokens(base_dir):
    """Batches of 2 over 3 examples of different lengths, trained on their inputs too (the label at position 0
    is no target: nothing predicts it): the mean of each token's cross entropy, over all examples."""
    from ttl_core.instruct import lm_eval_loss

    tok, model = Tokenizer.from_pretrained(base_dir), load_pretrained(base_dir)
    examples = [encode_chat(tok, "alpaca", instruction, "", response, 512, train_on_inputs=True)
                for instruction, response in (("Diga oi.", "Oi."), ("Conte até três.", "Um, dois, três."),
                                              ("Qual é a capital do Brasil?", "Brasília."))]
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(torch.tensor([ids])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum").item()
            count += len(labels) - 1
    model.train()
    assert lm_eval_loss(model, examples, 2, tok.pad_id, torch.device("cpu")) == pytest.approx(total / count, rel=1e-5)
    assert model.training


def test_instruction_tuning_keeps_the_first_lowest_eval_loss(base_dir, tmp_path, monkeypatch):
    """With scripted eval losses 2, 1, 1 the model is saved after epochs 1 and 2 only (a tie is no improvement);
    final_loss is the last logged training loss. Alpaca adds no tokens, so LoRA trains no embeddings in full, and
    its answers end with the base's EOS alone."""
    import ttl_core.instruct as instruct

    losses, evaluated, saved = iter([2.0, 1.0, 1.0]), [], []

    def scripted_eval_loss(*args):
        evaluated.append(True)
        return next(losses)

    monkeypatch.setattr(instruct, "lm_eval_loss", scripted_eval_loss)
    monkeypatch.setattr(instruct, "save_finetuned", lambda model, *args: saved.append(  # the epoch, the EOS ids
        (len(evaluated), (model.generation_config or {}).get("eos_token_id"))))
    lora_modules_to_save = []
    start_lora = instruct.start_lora
    monkeypatch.setattr(instruct, "start_lora", lambda model, cfg, modules_to_save: (
        lora_modules_to_save.append(modules_to_save), start_lora(model, cfg, modules_to_save=modules_to_save)))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:4]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=3, max_length=512, lora=True)
    summary = finetune_instruct(base_dir, data, tmp_path / "out", "alpaca", cfg, eval_file=data, verbose=False)
    base_eos = (load_pretrained(base_dir).generation_config or {}).get("eos_token_id")  # Aira's end is no EOS here
    assert saved == [(1, base_eos), (2, base_eos)] and summary["best"] == {"epoch": 2, "eval_loss": 1.0}
    assert summary["added_tokens"] == [] and lora_modules_to_save == [None]  # no new rows to train in full
    assert [h["eval_loss"] for h in summary["history"]] == [2.0, 1.0, 1.0]
    train_losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(train_losses) == 3 and summary["final_loss"] == train_losses[-1] != train_losses[0]
