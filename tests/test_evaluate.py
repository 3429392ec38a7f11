"""Held-out loss and perplexity (`ttl_core.evaluate`, scripts/evaluate.py): sliding windows that score each token
once, against transformers' model scoring the same windows, and the training loop's evaluation blocks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, load_script
from hf_reference import hf_causal_lm, hf_classifier
from train_helpers import prepared_corpus, run_config

import ttl_core
from ttl_core.data import PackedLoader
from ttl_core.distributed import World
from ttl_core.errors import ConfigError, DataError
from ttl_core.evaluate import count_windows, split_tokens, stream_loss, windows
from ttl_core.train import evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(a random transformers model saved with the tokenizer of the prepared corpus, that corpus)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = prepared_corpus(tmp)
    hf_causal_lm(seed=3, vocab_size=400, max_position_embeddings=64).save_pretrained(tmp / "model")
    shutil.copy(data / "tokenizer.model", tmp / "model")
    return tmp / "model", data


def reference_nll(hf, tokens: np.ndarray, seq_len: int, stride: int) -> float:
    """transformers' model over the windows of transformers' perplexity guide, written out: windows of `seq_len`
    every `stride`, each scoring, in float64, the next tokens no earlier window scored."""
    ids, total, scored_until = torch.from_numpy(tokens.astype(np.int64)), 0.0, 1
    for start in range(0, len(ids) - 1, stride):
        end = min(start + seq_len, len(ids) - 1)
        with torch.no_grad():
            logits = hf(ids[None, start:end]).logits[0].double()
        nll = -logits.log_softmax(-1).gather(1, ids[start + 1:end + 1, None])[:, 0]
        total += float(nll[scored_until - start - 1:].sum())
        scored_until = end + 1
        if end == len(ids) - 1:
            return total


@pytest.mark.parametrize("n, seq_len, stride", [(2, 5, 5), (7, 5, 5), (103, 16, 16), (103, 16, 5), (40, 64, 7),
                                                (17, 4, 1)])
def test_windows_score_every_token_after_the_first_once_with_the_context_the_stride_leaves(n, seq_len, stride):
    scored = []
    for start, end, first in windows(n, seq_len, stride):
        assert end - start <= seq_len and start < first <= end + 1
        for token in range(first, end + 1):
            scored.append(token)
            assert token - start >= min(token, seq_len - stride + 1)  # its context: every earlier token read
    assert scored == list(range(1, n)) and count_windows(n, seq_len, stride) == len(list(windows(n, seq_len, stride)))


@pytest.mark.parametrize("stride, batch_size", [(16, 1), (16, 4), (5, 3)])
def test_the_loss_is_transformers_models_over_the_same_windows(checkpoint, stride, batch_size):
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint[0]).eval()
    tokens = np.random.default_rng(stride + batch_size).integers(0, 400, 203).astype(np.uint16)
    got = stream_loss(ttl_core.load_pretrained(checkpoint[0]), tokens, 16, stride, batch_size)
    want = reference_nll(hf, tokens, 16, stride)
    assert got.tokens == 202 and abs(got.nll - want) <= 1e-5 * want
    assert got.perplexity == pytest.approx(math.exp(want / 202), rel=1e-5)


@pytest.mark.parametrize("masking", [False, True])
def test_disjoint_windows_are_the_training_loops_evaluation(checkpoint, masking):
    """With the stride at seq_len, the windows are PackedLoader's blocks (no token lost between them): over the
    tokens its batches cover, the loss is the training loop's eval_loss, with document masking too."""
    model, data = ttl_core.load_pretrained(checkpoint[0]), checkpoint[1]
    run = run_config("train.seq_len=16", "train.micro_batch_size=2", "train.eval_batches=1000",
                     f"data.document_masking={str(masking).lower()}")
    eval_loss = evaluate(model, data, run, World(0, 1, torch.device("cpu")), bos_id=1)
    covered = PackedLoader(data, "val", 16, 2, shuffle=False).batches_per_epoch * 2 * 16
    meta = json.loads((data / "meta.json").read_text())
    got = stream_loss(model, split_tokens(data, "val")[0][:covered + 1], 16, batch_size=3,
                      document_ids=(meta["bos_id"], meta["eos_id"]) if masking else None)
    assert got.loss == pytest.approx(eval_loss, rel=1e-6) and (got.tokens < covered) == masking
    unmasked = stream_loss(model, split_tokens(data, "val")[0][:covered + 1], 16)
    assert abs(unmasked.loss - got.loss) > 1e-3 if masking else unmasked.loss == got.loss


def test_bad_streams_and_settings_are_named(checkpoint):
    model = ttl_core.load_pretrained(checkpoint[0])
    tokens = np.arange(50, dtype=np.uint16)
    for call, error, message in [
        (lambda: stream_loss(model, tokens, 65), ConfigError, r"seq_len 65 is longer than the model's context \(64"),
        (lambda: stream_loss(model, tokens, 16, stride=17), ConfigError, r"a stride in \[1, seq_len\]"),
        (lambda: stream_loss(model, tokens, 16, stride=0), ConfigError, r"a stride in \[1, seq_len\], got .*stride=0"),
        (lambda: stream_loss(model, tokens[:1], 16), DataError, r"holds 1 token\(s\): nothing to predict"),
        (lambda: stream_loss(model, tokens + 390, 16), DataError, r"id 439, outside the model's vocabulary of 400"),
    ]:
        with pytest.raises(error, match=message):
            call()


def test_the_script_reports_a_split_and_text_files_with_bits_per_byte(checkpoint, tmp_path, capsys):
    model_dir, data = checkpoint
    script = load_script("evaluate")
    assert script.main(["--model", str(model_dir), "--data", str(data), "--seq-len", "16",
                        "--json", str(tmp_path / "val.json")]) == 0
    report = json.loads((tmp_path / "val.json").read_text())
    val = split_tokens(data, "val")[0]
    want = stream_loss(ttl_core.load_pretrained(model_dir), val, 16)
    assert report["tokens"] == len(val) - 1 and report["loss"] == pytest.approx(want.loss, rel=1e-6)
    assert "bits_per_byte" not in report and f"perplexity: {want.perplexity:.4f}" in capsys.readouterr().out
    assert script.main(["--model", str(model_dir), "--data", str(data), "--seq-len", "16", "--document-masking",
                        "--json", str(tmp_path / "masked.json")]) == 0
    masked = stream_loss(ttl_core.load_pretrained(model_dir), val, 16, document_ids=(1, 2))
    report = json.loads((tmp_path / "masked.json").read_text())
    assert report["document_masking"] and report["loss"] == pytest.approx(masked.loss, rel=1e-6) != want.loss
    text = tmp_path / "held_out.txt"
    documents = ["Ontem choveu na serra e o rio subiu.", "A feira abriu cedo; o café acabou às nove."]
    text.write_text("\n\n".join(documents), encoding="utf-8")
    assert script.main(["--model", str(model_dir), "--text", str(text), "--stride", "8",
                        "--json", str(tmp_path / "text.json")]) == 0
    report = json.loads((tmp_path / "text.json").read_text())
    tok = ttl_core.Tokenizer.from_pretrained(model_dir)
    ids = [i for d in documents for i in [tok.bos_id, *tok.encode(d, add_bos=False, add_eos=False), tok.eos_id]]
    want = stream_loss(ttl_core.load_pretrained(model_dir), np.array(ids), 64, 8)
    assert report["tokens"] == len(ids) - 1 and report["loss"] == pytest.approx(want.loss, rel=1e-6)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    assert report["bits_per_byte"] == pytest.approx(want.nll / math.log(2) / n_bytes, rel=1e-6)


def test_the_script_refuses_another_tokenizer_s_data_and_a_classifier(checkpoint, tmp_path):
    model_dir, data = checkpoint
    script = load_script("evaluate")
    other = tmp_path / "other"  # a tokenizer trained on other text: the same vocabulary size, other pieces
    ttl_core.data.prepare_data([ROOT / "ttl_core" / "sample_data" / "ciencia.txt"], other, vocab_size=400)
    with pytest.raises(ConfigError, match="was tokenized with another tokenizer than"):
        script.main(["--model", str(model_dir), "--data", str(other)])
    held_out_nothing = tmp_path / "no-val"  # prepared with val_fraction 0: an empty val.bin
    ttl_core.data.prepare_data([data.parent / "corpus.txt"], held_out_nothing, tokenizer=data, val_fraction=0.0)
    with pytest.raises(DataError, match=r"no-val/val.bin holds 0 token\(s\): nothing to evaluate \(--split train"):
        script.main(["--model", str(model_dir), "--data", str(held_out_nothing)])
    hf_classifier(vocab_size=400).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ConfigError, match="LlamaForSequenceClassification; evaluation needs a LlamaForCausalLM"):
        script.main(["--model", str(tmp_path / "classifier"), "--data", str(data)])



@pytest.mark.gpu
@pytest.mark.parametrize("masking", [False, True])
def test_cuda_evaluation_matches_the_cpu_s(checkpoint, masking):
    """On the GPU's kernels (fused cross-entropy, and with masking the packed attention backend), float32 within
    1e-5 of the CPU's loss and bfloat16 within 1e-2."""
    model_dir, data = checkpoint
    tokens, documents = split_tokens(data, "val")[0], (1, 2) if masking else None
    cpu = stream_loss(ttl_core.load_pretrained(model_dir), tokens, 16, 5, document_ids=documents)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = stream_loss(ttl_core.load_pretrained(model_dir, dtype=dtype, device="cuda"), tokens, 16, 5,
                          document_ids=documents)
        assert got.tokens == cpu.tokens and abs(got.loss - cpu.loss) <= tolerance * cpu.loss, (dtype, got, cpu)
