"""Held-out loss and perplexity (`ttl_core.evaluate`, scripts/evaluate.py): sliding windows that score each token
once, against transformers' model scoring the same windows, and the training loop's evaluation blocks."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, load_script
from hf_reference import hf_causal_lm, hf_classifier
from train_helpers import prepared_corpus, run_config

import ttl_core
from ttl_core.distributed import World
from ttl_core.errors import ConfigError, DataError
from ttl_core.evaluate import count_windows, position_buckets, split_tokens, stream_loss, windows
from ttl_core.loader import PackedLoader
from ttl_core.step import evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(a random transformers model saved with the tokenizer of the prepared corpus, that corpus)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = prepared_corpus(tmp)
    hf_causal_lm(seed=3, vocab_size=400, max_position_embeddings=64).save_pretrained(tmp / "model")
    shutil.copy(data / "tokenizer.model", tmp / "model")
    return tmp / "model", data


def reference_token_losses(hf, tokens: np.ndarray, seq_len: int, stride: int,
                           document_ids: tuple[int, int] | None = None) -> list[tuple[int, float]]:
    """(context, negative log-likelihood) of each token scored by transformers' model (in its own dtype, the loss in
    float64) over the windows of transformers' perplexity guide, written out: windows of `seq_len` every `stride`,
    each scoring the next tokens no earlier window scored, a token's context being the window's tokens before it.
    With `document_ids` (BOS, EOS) each piece of a window between document starts (after an EOS) is a forward of its
    own, a token's context the piece's tokens before it, and no BOS is scored."""
    ids, scored, scored_until = torch.from_numpy(tokens.astype(np.int64)), [], 1
    for start in range(0, len(ids) - 1, stride):
        end = min(start + seq_len, len(ids) - 1)
        cuts = [start, *(i + 1 for i in range(start, end - 1) if document_ids and ids[i] == document_ids[1]), end]
        for first, after in zip(cuts, cuts[1:]):  # the piece reads tokens [first, after) to predict [first + 1, after]
            with torch.no_grad():
                logits = hf(ids[None, first:after]).logits[0].double()
            nll = -logits.log_softmax(-1).gather(1, ids[first + 1:after + 1, None])[:, 0]
            scored += [(i - first, float(nll[i - first - 1])) for i in range(max(first + 1, scored_until), after + 1)
                       if not (document_ids and ids[i] == document_ids[0])]
        scored_until = end + 1
        if end == len(ids) - 1:
            return scored


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
    want = sum(nll for _, nll in reference_token_losses(hf, tokens, 16, stride))
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


def test_document_masking_of_data_whose_meta_json_names_no_bos(checkpoint, tmp_path):
    """meta.json's bos_id is optional (read_meta checks eos_id alone): without it, documents still end at each </s>,
    and no id is left unscored as a document's <s>."""
    model_dir, data = checkpoint
    shutil.copytree(data, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    del meta["bos_id"]
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    assert load_script("evaluate").main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--seq-len",
                                         "16", "--document-masking", "--json", str(tmp_path / "r.json")]) == 0
    want = stream_loss(ttl_core.load_pretrained(model_dir), split_tokens(data, "val")[0], 16,
                       document_ids=(None, meta["eos_id"]))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == want.tokens == len(split_tokens(data, "val")[0]) - 1
    assert report["loss"] == pytest.approx(want.loss, rel=1e-6)


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


def document_stream(seed: int, n_tokens: int) -> np.ndarray:
    """`n_tokens` of documents `<s>` ids `</s>` (BOS 1, EOS 2, random ids) of random lengths, end to end."""
    rng, ids = np.random.default_rng(seed), []
    while len(ids) < n_tokens:
        ids += [1, *rng.integers(3, 400, rng.integers(1, 24)), 2]
    return np.array(ids[:n_tokens], dtype=np.uint16)


def assert_buckets_are_the_reference_s(got, reference: list[tuple[int, float]], edges: list[int]) -> None:
    """Each bucket of `got.by_position` holds the `reference` tokens of its contexts and their summed loss within
    float32 rounding (measured: at most 3.1e-7 relative); the buckets add up to the overall figures."""
    assert [(first, last) for first, last, _ in got.by_position] == [(a, b - 1) for a, b in zip(edges, edges[1:])]
    for first, last, bucket in got.by_position:
        want = [nll for context, nll in reference if first <= context <= last]
        assert bucket.tokens == len(want) and abs(bucket.nll - sum(want)) <= 2e-6 * sum(want), (first, last)
    assert got.tokens == len(reference) == sum(bucket.tokens for *_, bucket in got.by_position)
    weighted = sum(bucket.loss * bucket.tokens for *_, bucket in got.by_position if bucket.tokens) / got.tokens
    assert weighted == pytest.approx(got.loss, rel=1e-12)


@pytest.mark.parametrize("stride, masking, buckets", [(16, False, "log2"), (5, False, 16), (16, True, "log2"),
                                                      (7, True, 3)])
def test_losses_by_position_are_transformers_per_token_losses_by_context(checkpoint, stride, masking, buckets):
    """Against transformers' model in float64 scoring the same windows token by token, its per-token losses gathered
    by context: the window's tokens before each, or with document masking its own document's."""
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint[0]).double().eval()
    tokens, documents = document_stream(stride + masking, 150), (1, 2) if masking else None
    got = stream_loss(ttl_core.load_pretrained(checkpoint[0]), tokens, 16, stride, 3, documents, by_position=buckets)
    reference = reference_token_losses(hf, tokens, 16, stride, documents)
    assert_buckets_are_the_reference_s(got, reference, position_buckets(16, buckets))
    counts = [bucket.tokens for *_, bucket in got.by_position]
    if stride < 16 and not masking:  # contexts under seq_len - stride + 1: the first window's tokens alone
        assert counts[:11] == [1] * 11 and min(counts[11:]) > 1
    if masking:  # every document's start: short contexts, many tokens, whatever the window
        assert counts[0] > len(tokens) / 30


def test_position_buckets_double_or_are_of_equal_width_and_bad_counts_are_named():
    assert position_buckets(16) == [1, 2, 3, 5, 9, 17]  # 1, 2, 3-4, 5-8, 9-16
    assert position_buckets(100)[-2:] == [65, 101] and position_buckets(2) == [1, 2, 3]
    assert position_buckets(1) == [1, 2] and position_buckets(7, 1) == [1, 8]
    assert position_buckets(10, 3) == [1, 4, 7, 11] and position_buckets(5, 5) == [1, 2, 3, 4, 5, 6]
    assert position_buckets(10, 4) == [1, 3, 6, 8, 11]  # widths 2, 3, 2, 3: no remainder heaped on the last
    rng = random.Random()
    for _ in range(50):  # equal to a token: every width is the floor or the ceiling of seq_len / buckets
        seq_len = rng.randint(1, 300)
        buckets = rng.randint(1, seq_len)
        edges = position_buckets(seq_len, buckets)
        assert edges[0] == 1 and edges[-1] == seq_len + 1 and len(edges) == buckets + 1, (seq_len, buckets)
        assert {b - a for a, b in zip(edges, edges[1:])} <= {seq_len // buckets, -(-seq_len // buckets)}, \
            (seq_len, buckets)
    for buckets, message in [(0, r"0 position buckets over a window of 16 tokens: need 1 to 16"),
                             (17, r"17 position buckets over a window of 16 tokens"), (-2, "need 1 to 16"),
                             ("linear", r"'log2' or a number of equal-width buckets, got 'linear'"),
                             (True, "got True")]:
        with pytest.raises(ConfigError, match=message):
            position_buckets(16, buckets)


def test_a_yarn_model_past_its_original_context_by_position_and_the_script_s_table_json_and_plot(
        checkpoint, tmp_path, monkeypatch, capsys):
    """A YaRN model (original context 16) evaluated in windows of 48: its buckets past 16 against transformers'; the
    script's table, its JSON and its plot (the buckets' losses, the original context marked) give the same figures."""
    import matplotlib.axes
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}
    yarn = hf_causal_lm(seed=5, vocab_size=400, max_position_embeddings=64, rope_parameters=rope)
    yarn.save_pretrained(tmp_path / "m")
    shutil.copy(checkpoint[1] / "tokenizer.model", tmp_path / "m")
    hf = yarn.double()
    tokens = split_tokens(checkpoint[1], "val")[0]
    got = stream_loss(ttl_core.load_pretrained(tmp_path / "m"), tokens, 48, 12, by_position="log2")
    assert_buckets_are_the_reference_s(got, reference_token_losses(hf, tokens, 48, 12), position_buckets(48))
    assert [first for first, *_ in got.by_position[-2:]] == [17, 33] and got.by_position[-1][2].tokens > 100
    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "stairs", lambda ax, values, edges, **kw: drawn.update(stairs=(
        list(values), list(edges))))
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x, **kw: drawn.update(axvline=x))
    script = load_script("evaluate")
    assert script.main(["--model", str(tmp_path / "m"), "--data", str(checkpoint[1]), "--seq-len", "48", "--stride",
                        "12", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["by_position"]
    assert [(r["context_from"], r["context_to"], r["tokens"]) for r in report] == [
        (first, last, bucket.tokens) for first, last, bucket in got.by_position]
    assert [r["loss"] for r in report] == pytest.approx([bucket.loss for *_, bucket in got.by_position], rel=1e-6)
    out = capsys.readouterr().out
    assert f"        33-48 {got.by_position[-1][2].tokens:>12,} {got.by_position[-1][2].loss:8.4f}" in out
    assert drawn["stairs"][0] == pytest.approx([r["loss"] for r in report], rel=1e-6) and drawn["axvline"] == 16.5
    assert drawn["stairs"][1] == [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 48.5] and (tmp_path / "p.png").is_file()


def test_the_script_s_position_buckets_empty_ones_and_refusals(checkpoint, tmp_path, monkeypatch, capsys):
    model_dir, data = checkpoint
    script = load_script("evaluate")
    common = ["--model", str(model_dir), "--data", str(data), "--seq-len", "16"]
    assert script.main([*common, "--max-tokens", "9", "--by-position", "2", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["by_position"]  # contexts 1 to 8: the second bucket empty
    assert [(r["tokens"], r["loss"] is None, r["perplexity"] is None) for r in report] == [(8, False, False),
                                                                                         (0, True, True)]
    assert "         9-16            0        -            -\n" in capsys.readouterr().out
    for option, message in [("0", "0 position buckets over a window of 16 tokens: need 1 to 16"),
                            ("17", "17 position buckets over a window of 16 tokens")]:
        with pytest.raises(ConfigError, match=message):
            script.main([*common, "--by-position", option])
    with pytest.raises(SystemExit):
        script.main([*common, "--by-position", "linear"])
    assert "expected log2 or a number of buckets, got 'linear'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import then raises ImportError
    assert script.main([*common, "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: matplotlib is not installed (pip install matplotlib); no plot {tmp_path / 'p.png'} "
                          "written\n") and "9-16" in out and not (tmp_path / "p.png").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("masking", [False, True])
def test_cuda_evaluation_matches_the_cpu_s(checkpoint, masking):
    """On the GPU's kernels (fused cross-entropy, and with masking the packed attention backend), float32 within
    1e-5 of the CPU's loss and bfloat16 within 1e-2; by position, the same tokens in each bucket and, in float32,
    each bucket's loss within 1e-3 (a bucket may hold a single token)."""
    model_dir, data = checkpoint
    tokens, documents = split_tokens(data, "val")[0], (1, 2) if masking else None
    cpu = stream_loss(ttl_core.load_pretrained(model_dir), tokens, 16, 5, document_ids=documents, by_position="log2")
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = stream_loss(ttl_core.load_pretrained(model_dir, dtype=dtype, device="cuda"), tokens, 16, 5,
                          document_ids=documents, by_position="log2")
        assert got.tokens == cpu.tokens and abs(got.loss - cpu.loss) <= tolerance * cpu.loss, (dtype, got, cpu)
        for (*edges, bucket), (*cpu_edges, cpu_bucket) in zip(got.by_position, cpu.by_position, strict=True):
            assert edges == cpu_edges and bucket.tokens == cpu_bucket.tokens, (dtype, edges)
            if dtype == torch.float32:
                assert bucket.loss == pytest.approx(cpu_bucket.loss, rel=1e-3), edges
