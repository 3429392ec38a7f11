"""Differential fuzzing of the evaluation tools against references written here from their documented definitions:
sliding-window perplexity (which tokens each window scores, after how much context, by position, with document
masking) and multiple-choice log-likelihoods and metrics against transformers' model in float64, checkpoint averages
against the exact rational weighted mean rounded once, and compare_runs' table against figures computed by hand.
Each case is drawn from a fixed seed; the other tests of these modules change one thing at a time."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_reference import randomize_
from safetensors.torch import load_file, save_file

import ttl_core
from ttl_core.averaging import average_checkpoints
from ttl_core.choices import continuation_loglikelihoods, encode_questions, evaluate_questions, read_questions
from ttl_core.compare import load_run, summarize
from ttl_core.evaluate import stream_loss
from ttl_core.finetune import SAMPLE_DATA
from ttl_core.tokenizer_train import train_tokenizer

BOS, EOS = 1, 2
WORDS = ("casa rio sol mar céu capital é de não sim água ação coração pão três você Ω ß 日本 🙂 e\u0301 naïve ç "
         "— …").split()


def save_micro_llama(rng: random.Random, seed: int, directory: Path, vocab: int, max_positions: int, scale: float = 0.3,
                     dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A random transformers Llama of a few heads and layers saved to `directory`; returned in float64 with SDPA
    attention (the eager one takes its softmax in float32), which ttl's float64 model matches to the last bits."""
    heads = rng.choice([1, 2, 4])
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=heads * rng.choice([4, 8]), intermediate_size=rng.randint(8, 40),
        num_hidden_layers=rng.randint(1, 2), num_attention_heads=heads,
        num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]), max_position_embeddings=max_positions,
        rope_theta=10 ** rng.uniform(2, 4), tie_word_embeddings=rng.random() < 0.3, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=3)
    torch.manual_seed(seed)
    randomize_(transformers.LlamaForCausalLM(config), seed, scale).to(dtype).save_pretrained(directory)
    return transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="sdpa").double().eval()


def draw_stream(rng: random.Random, kind: str, vocab: int, seq_len: int) -> list[int]:
    """A token stream shorter than a window, of random ids, or of documents `<s>` ids `</s>` cut anywhere."""
    if kind == "short":
        return [rng.randrange(vocab) for _ in range(rng.randint(2, max(2, seq_len)))]
    if kind == "random":
        return [rng.randrange(vocab) for _ in range(rng.randint(seq_len + 2, 60))]
    ids = []
    while len(ids) < 60:
        ids += [BOS, *(rng.randrange(3, vocab) for _ in range(rng.randint(0, 9))), EOS]
    start = rng.randrange(4)
    return ids[start:start + rng.randint(seq_len + 2, 56)]


def reference_contexts(ids: list[int], seq_len: int, stride: int, masking: bool) -> list[tuple[int, int]]:
    """(token, first token of its context) of each token scored. The window starting at s reads tokens s to
    s + seq_len - 1 and predicts s + 1 to s + seq_len; windows start at 0, stride, 2 stride, ... and a token is scored
    by the first one predicting it, after the window's tokens before it, with masking its own document's (documents
    start at the window's start and after each `</s>`; no `<s>` is scored)."""
    scored = []
    for token in range(1, len(ids)):
        start = max(0, -(-(token - seq_len) // stride)) * stride
        if masking:
            if ids[token] == BOS:
                continue
            start = max([start] + [j + 1 for j in range(start, token - 1) if ids[j] == EOS])
        scored.append((token, start))
    return scored


@pytest.mark.parametrize("seed", range(8))
def test_sliding_windows_score_each_token_once_after_the_documented_context(seed, tmp_path):
    rng = random.Random(seed)
    vocab, max_positions = rng.randint(8, 40), rng.choice([4, 8, 16])
    hf = save_micro_llama(rng, seed, tmp_path, vocab, max_positions)
    seq_len = rng.randint(1, max_positions)
    stride = [1, seq_len, rng.randint(1, seq_len)][seed % 3]  # one token, disjoint blocks, any (dividing or not)
    ids = draw_stream(rng, ["short", "random", "documents", "documents"][seed % 4], vocab, seq_len)
    masking = seed % 4 >= 2 and rng.random() < 0.8
    buckets = ["log2", seq_len, rng.randint(1, seq_len)][seed // 2 % 3]  # seq_len buckets: one context length each
    got = stream_loss(ttl_core.load_pretrained(tmp_path, dtype="float64"), np.array(ids), seq_len, stride,
                      rng.randint(1, 4), (BOS, EOS) if masking else None, by_position=buckets)
    scored = reference_contexts(ids, seq_len, stride, masking)
    logprobs = {}  # by context start: transformers' log-probabilities of the tokens after it
    for token, start in scored:
        if start not in logprobs:
            with torch.no_grad():
                logprobs[start] = hf(torch.tensor([ids[start:start + seq_len]])).logits[0].log_softmax(-1)
    nll = [-float(logprobs[start][token - start - 1, ids[token]]) for token, start in scored]

    def bucket_of(context: int) -> int:  # 1, 2, 3-4, 5-8, ... or equal widths: context c in ceil(c * N / seq_len)
        return (context - 1).bit_length() if buckets == "log2" else -(-context * buckets // seq_len) - 1

    want = [[None, None, 0, 0.0] for _ in range(bucket_of(seq_len) + 1)]  # first, last context, tokens, nll
    for context in range(1, seq_len + 1):
        bucket = want[bucket_of(context)]
        bucket[0], bucket[1] = bucket[0] or context, context
    for (token, start), loss in zip(scored, nll):
        bucket = want[bucket_of(token - start)]
        bucket[2], bucket[3] = bucket[2] + 1, bucket[3] + loss
    case = (seed, len(ids), seq_len, stride, masking, buckets)
    assert got.tokens == len(scored) and got.nll == pytest.approx(sum(nll), rel=1e-10, abs=1e-12), case
    assert [(first, last, bucket.tokens) for first, last, bucket in got.by_position] == \
        [tuple(bucket[:3]) for bucket in want], case
    assert [bucket.nll for *_, bucket in got.by_position] == pytest.approx([b[3] for b in want], rel=1e-10), case


FLAGS = [{}, {"add_eos_token": True}, {"add_bos_token": False}, {"bos_token": None, "add_eos_token": True},
         {"add_bos_token": False, "add_eos_token": True}, {"bos_token": None}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer trained on a sample text and the fuzz's words (accents, CJK, an emoji: byte pieces too)."""
    directory = tmp_path_factory.mktemp("fuzz-tokenizer")
    text = (SAMPLE_DATA / "cronicas.txt").read_text(encoding="utf-8") + "\n" + " ".join(WORDS)
    train_tokenizer([text], directory / "tokenizer.model", vocab_size=360).save_pretrained(directory)
    return directory


def draw_question(rng: random.Random) -> dict:
    """A question of the task-file format: contexts empty, long (cut to the model's context), ending in whitespace
    or starting with a written special token; choices whose characters and bytes differ; other delimiters."""
    context = "" if rng.random() < 0.12 else " ".join(rng.choices(WORDS, k=rng.choice([1, 3, 30])))
    if context and rng.random() < 0.4:
        context += rng.choice([" ", "  ", "\n", "\t"])
    if context and rng.random() < 0.1:
        context = rng.choice(["<s>", "<s> ", "</s>"]) + context
    choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 2))) for _ in range(rng.randint(2, 4))]
    record = {"context": context, "choices": choices, "label": rng.randrange(len(choices))}
    if rng.random() < 0.4:
        record["target_delimiter"] = rng.choice(["", "\n", ": ", "  "])
    return record


def lm_eval_pair(theirs, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal context/continuation split as choices.py states it, with transformers' tokenizer."""
    prefix = theirs.bos_token or theirs.eos_token
    if not context:
        return [theirs.convert_tokens_to_ids(prefix)], theirs.encode(continuation, add_special_tokens=False)
    stripped = context.rstrip()

    def encode(text: str) -> list[int]:
        return theirs.encode(text, add_special_tokens=not text.startswith(prefix))

    context_ids = encode(stripped)
    return context_ids, encode(context + continuation)[len(context_ids):]


def lm_eval_figures(records: list[dict], loglikelihoods: list[float]) -> dict:
    """acc, acc_norm (per character of the choice), acc_bytes (per UTF-8 byte), each numpy's argmax (ties to the
    first), and their standard errors: the sample standard deviation over the square root of the questions."""
    scores, start = {"acc": [], "acc_norm": [], "acc_bytes": []}, 0
    for record in records:
        choices = record["choices"]
        ll = np.array(loglikelihoods[start:start + len(choices)])
        start += len(choices)
        for metric, lengths in (("acc", [1] * len(choices)), ("acc_norm", [len(c) for c in choices]),
                                ("acc_bytes", [len(c.encode("utf-8")) for c in choices])):
            scores[metric].append(float(np.argmax(ll / np.array(lengths)) == record["label"]))
    figures = {"questions": len(records)}
    for metric, values in scores.items():
        figures[metric] = statistics.mean(values)
        figures[f"{metric}_stderr"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return figures


@pytest.mark.parametrize("seed", range(6))
def test_multiple_choice_is_lm_evals_scoring_with_transformers_model(seed, tmp_path, tokenizer_dir):
    rng = random.Random(seed)
    max_positions = rng.choice([16, 32])
    vocab = ttl_core.Tokenizer.from_pretrained(tokenizer_dir).vocab_size
    hf = save_micro_llama(rng, seed, tmp_path, vocab, max_positions)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **FLAGS[seed % len(FLAGS)]}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    records = [draw_question(rng) for _ in range(rng.randint(5, 10))]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    questions, tokenizer = read_questions(tmp_path / "task.jsonl"), ttl_core.Tokenizer.from_pretrained(tmp_path)
    pairs = encode_questions(tokenizer, questions, max_positions)
    assert pairs == [lm_eval_pair(theirs, r["context"], r.get("target_delimiter", " ") + choice)
                     for r in records for choice in r["choices"]], seed
    assert any(len(c) + len(x) > max_positions + 1 for c, x in pairs) or seed % 2, seed  # some cut on the left
    model, batch_size = ttl_core.load_pretrained(tmp_path, dtype="float64"), rng.randint(1, 7)
    got = continuation_loglikelihoods(model, pairs, batch_size)
    for (context, continuation), loglikelihood in zip(pairs, got):  # the last context + 1 ids, the last not fed
        ids = (context + continuation)[-(max_positions + 1):]
        with torch.no_grad():
            logprobs = hf(torch.tensor([ids[:-1]])).logits[0, -len(continuation):].log_softmax(-1)
        assert loglikelihood == pytest.approx(float(logprobs.gather(1, torch.tensor([ids[-len(continuation):]]).T)
                                                    .sum()), abs=1e-9), seed
    # the metrics of ttl's own log-likelihoods, so that ties (equal choices) tie alike
    assert evaluate_questions(model, tokenizer, questions, batch_size) == pytest.approx(lm_eval_figures(records, got),
                                                                                     rel=1e-12), seed


STEPS = {torch.float32: 1, torch.bfloat16: 1 << 16}  # one step of each dtype, on float32 bit patterns


def float32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def stepped(x: float, step: int, up: bool) -> float:
    """The next value up or down of the dtype whose `step` on float32 bit patterns is given."""
    if x == 0:
        bits, sign = step, 1 if up else -1
    else:
        bits, sign = float32_bits(abs(x)) + (step if (x > 0) == up else -step), math.copysign(1, x)
    return sign * struct.unpack("<f", struct.pack("<I", bits))[0]


def rounded_once(exact: Fraction, dtype: torch.dtype) -> tuple[float, float]:
    """`exact` rounded to the nearest `dtype` value, ties to even, and how far it lies from a tie (in the dtype's
    steps there)."""
    guess = torch.tensor(float(exact), dtype=torch.float64).to(dtype).item()
    candidates = sorted([stepped(guess, STEPS[dtype], False), guess, stepped(guess, STEPS[dtype], True)],
                        key=lambda c: (abs(Fraction(c) - exact), float32_bits(c) // STEPS[dtype] % 2))
    best, second = candidates[0], candidates[1]
    tie = (Fraction(best) + Fraction(second)) / 2
    return best, float(abs(exact - tie) / abs(Fraction(second) - Fraction(best)))


@pytest.mark.parametrize("seed", range(4))
def test_each_averaged_element_is_the_exact_weighted_mean_rounded_once(seed, tmp_path):
    """Against the rational mean of the stored values: equal or small integer weights (some elements of the
    checkpoints cancelling to near zero), or fractional ones; a miss only within 2**-27 of a step of a tie."""
    rng = random.Random(seed)
    stored = [torch.float32, torch.bfloat16][seed % 2]
    count, out_dtype = rng.randint(2, 4), rng.choice([None, "float32", "bfloat16"])
    weights = [None, [rng.randint(1, 9) for _ in range(count)], [rng.uniform(0.01, 3) for _ in range(count)]][seed % 3]
    dirs = [tmp_path / f"step-{k}" for k in range(count)]
    for k, directory in enumerate(dirs):
        save_micro_llama(random.Random(seed), 10 * seed + k, directory, 16, 8, scale=0.5, dtype=stored)
    tensors = [load_file(d / "model.safetensors") for d in dirs]
    w = [Fraction(x) for x in weights or [1] * count]
    if seed % 3 != 2:  # the last checkpoint's embedding nearly cancels the others' weighted sum
        others = sum(float(wk) * t["model.embed_tokens.weight"].double() for wk, t in zip(w, tensors[:-1]))
        tensors[-1]["model.embed_tokens.weight"] = (-others / float(w[-1])).to(stored)
        save_file(tensors[-1], dirs[-1] / "model.safetensors", metadata={"format": "pt"})
    average_checkpoints(dirs, tmp_path / "average", weights, out_dtype)
    want_dtype = getattr(torch, out_dtype) if out_dtype else stored
    values = [{key: t.flatten().tolist() for key, t in load_file(d / "model.safetensors").items()} for d in dirs]
    for key, tensor in load_file(tmp_path / "average" / "model.safetensors").items():
        assert tensor.dtype == want_dtype, key
        for i, got in enumerate(tensor.flatten().tolist()):
            exact = sum(wk * Fraction(v[key][i]) for wk, v in zip(w, values)) / sum(w)
            want, from_tie = rounded_once(exact, want_dtype)
            assert got == want or from_tie < 2 ** -27, (seed, key, i, got, want, float(exact))


@pytest.mark.parametrize("seed", range(3))
def test_the_compare_table_is_the_figures_computed_by_hand(seed, tmp_path):
    rng = random.Random(seed)
    records, step = [], 0
    for _ in range(rng.randint(5, 40)):
        step += rng.choice([1, 1, 2, 5])
        records.append({"step": step, "loss": rng.choice([rng.uniform(0.5, 9)] * 6 + [math.nan, math.inf]),
                        "batch_tokens": rng.randint(1, 5000), "tokens_per_s": rng.uniform(1, 1e5)})
        if rng.random() < 0.4:
            records.append({"step": step, "eval_loss": rng.choice([rng.uniform(1, 9), 2.5, math.nan]),
                            "acc/task": rng.choice([rng.random(), math.nan])})
    tmp_path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    weight = rng.choice([0.0, 0.6, 0.95])
    got = summarize(load_run(tmp_path, "run"), weight)
    training = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in training if math.isfinite(r["loss"])]
    # TensorBoard's smoothing at the last finite loss: the mean of them all weighted by weight ** age
    smoothed = sum(weight ** age * loss for age, loss in enumerate(reversed(losses))) / \
        sum(weight ** age for age in range(len(losses)))
    evals = [(r["step"], r["eval_loss"]) for r in records if math.isfinite(r.get("eval_loss", math.nan))]
    best = min(evals, key=lambda e: e[1], default=(None, None))
    accuracies = [r["acc/task"] for r in records if math.isfinite(r.get("acc/task", math.nan))]
    want = {"steps": len(training), "tokens": sum(r["batch_tokens"] for r in training),
            "last_eval_loss": evals[-1][1] if evals else None, "last_eval_step": evals[-1][0] if evals else None,
            "best_eval_loss": best[1], "best_eval_step": best[0], "train_loss_smoothed": smoothed,
            "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in training]))}
    if any("acc/task" in r for r in records):
        want["acc/task"] = accuracies[-1] if accuracies else None
    assert got.keys() - want.keys() == {"label", "run"} and all((got[key] is None) == (want[key] is None)
                                                               for key in want), (seed, got, want)
    assert {key: got[key] for key in want if want[key] is not None} == pytest.approx(
        {key: value for key, value in want.items() if value is not None}, rel=1e-12), seed
