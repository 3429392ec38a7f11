"""Zero-shot multiple-choice scoring (`ttl_core.choices`, scripts/evaluate_choices.py) against a plain transformers
computation: log-likelihoods, lm-eval's context/continuation split, left truncation, the metrics and their
standard errors, adapters, the bundled sample task, and bad task files."""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import load_script
from hf_reference import hf_causal_lm
from lora_helpers import saved_peft_adapter

import ttl_core
import ttl_core.choices
import ttl_core.cli
from ttl_core.choices import (Question, continuation_loglikelihoods, encode_pair, encode_questions, evaluate_questions,
                              forward_shapes, question_scores, read_questions)
from ttl_core.config import LlamaConfig
from ttl_core.model import LlamaForCausalLM
from ttl_core.errors import DataError
from ttl_core.finetune import SAMPLE_DATA
from ttl_core.tokenizer_train import train_tokenizer

SAMPLE_TASK = SAMPLE_DATA / "escolhas_pt.jsonl"
CONTEXT = 32  # the model's max_position_embeddings: small, so that long contexts are cut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random transformers Llama saved with a tokenizer trained on the bundled Portuguese samples."""
    tmp = tmp_path_factory.mktemp("choices")
    texts = [SAMPLE_DATA / name for name in ("cronicas.txt", "noticias.txt", "ciencia.txt")]
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in texts) + "\n" + SAMPLE_TASK.read_text(encoding="utf-8")
    (tmp / "corpus.txt").write_text(corpus, encoding="utf-8")
    tokenizer = train_tokenizer([tmp / "corpus.txt"], tmp / "tok.model", vocab_size=500)
    hf_causal_lm(seed=5, vocab_size=tokenizer.vocab_size,
                 max_position_embeddings=CONTEXT).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp / "model"


def reference_loglikelihood(hf, context_ids: list[int], continuation_ids: list[int]) -> float:
    """transformers' model over the joined ids (the last CONTEXT + 1 of them, the last not fed), in float64: the
    summed log-softmax at the continuation's positions."""
    ids = (context_ids + continuation_ids)[-(CONTEXT + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()
    n = len(continuation_ids)
    return float(logits[-n:].log_softmax(-1).gather(1, torch.tensor(ids[-n:])[:, None]).sum())


def sample_pairs(tokenizer, limit: int = 6) -> list[tuple[list[int], list[int]]]:
    """Pairs from the sample's first questions, with contexts ending in one, two or no spaces, and an empty one."""
    pairs = []
    for k, question in enumerate(read_questions(SAMPLE_TASK)[:limit]):
        context = "" if k == 0 else question.context + " " * (k % 3)
        pairs += [encode_pair(tokenizer, context, " " + choice) for choice in question.choices]
    return pairs


def test_loglikelihoods_are_transformers_full_forward_batched_or_not(checkpoint):
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    model, tokenizer = ttl_core.load_pretrained(checkpoint), ttl_core.Tokenizer.from_pretrained(checkpoint)
    pairs = sample_pairs(tokenizer)
    want = [reference_loglikelihood(hf, *pair) for pair in pairs]
    unbatched = continuation_loglikelihoods(model, pairs, batch_size=1)
    batched = continuation_loglikelihoods(model, pairs, batch_size=7)  # groups of unequal lengths: padded
    assert len({len(c) + len(x) for c, x in pairs}) > 3
    assert max(abs(g - w) for g, w in zip(unbatched, want)) <= 1e-5
    assert max(abs(b - u) for b, u in zip(batched, unbatched)) <= 1e-5


def test_a_float64_model_is_scored_in_float64(checkpoint):
    """`--dtype float64` scores to float64 precision (a float32 log-softmax would leave errors of 1e-6 nats)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint).double().eval()
    model = ttl_core.load_pretrained(checkpoint, dtype="float64")
    pairs = sample_pairs(ttl_core.Tokenizer.from_pretrained(checkpoint))
    want = [reference_loglikelihood(hf, *pair) for pair in pairs]
    assert max(abs(g - w) for g, w in zip(continuation_loglikelihoods(model, pairs), want)) <= 1e-10


def test_trailing_spaces_of_the_context_move_to_the_continuation_and_the_joined_text_is_split(checkpoint):
    tokenizer = ttl_core.Tokenizer.from_pretrained(checkpoint)
    for spaces in ("", " ", "  "):
        context, continuation = "A capital do Brasil é" + spaces, " Brasília"
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        whole = tokenizer.encode("A capital do Brasil é" + spaces + " Brasília")
        assert context_ids == tokenizer.encode("A capital do Brasil é") and context_ids[0] == tokenizer.bos_id
        assert continuation_ids == whole[len(context_ids):] and tokenizer.bos_id not in continuation_ids
    # the moved spaces are scored with the answer: more spaces, other continuation ids
    assert encode_pair(tokenizer, "A capital do Brasil é  ", " Brasília")[1] != \
        encode_pair(tokenizer, "A capital do Brasil é", " Brasília")[1]
    # an empty context is <s> alone, the continuation encoded without it
    assert encode_pair(tokenizer, "", " Brasília") == ([tokenizer.bos_id], tokenizer.encode(" Brasília", add_bos=False))


@pytest.mark.parametrize("flags", [{}, {"add_eos_token": True}, {"add_bos_token": False, "add_eos_token": True},
                                   {"bos_token": None, "add_eos_token": True}])
def test_the_split_is_lm_evals_rule_written_with_transformers_tokenizer(checkpoint, tmp_path, flags):
    """lm-eval's causal `_encode_pair` with transformers' tokenizer of the same directory: special tokens as the
    config adds them, except for a text that starts with a written prefix token (<s>, or </s> for a tokenizer
    without <s>), encoded with add_special_tokens=False (no <s> and no </s> either)."""
    shutil.copytree(checkpoint, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    tokenizer = ttl_core.Tokenizer.from_pretrained(tmp_path / "model")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")

    def lm_eval_encode(text: str) -> list[int]:
        return theirs.encode(text, add_special_tokens=not text.startswith(theirs.bos_token or theirs.eos_token))

    for context in ("O contrário de quente é ", "Dois mais dois é igual a\n", "A semana tem sete", "<s> A semana tem ",
                    "<s>Dois mais dois é\t", "</s> A semana tem "):
        stripped = context.rstrip()
        continuation = context[len(stripped):] + " dias"
        context_ids = lm_eval_encode(stripped)
        assert encode_pair(tokenizer, context, " dias") == (context_ids,
                                                            lm_eval_encode(stripped + continuation)[len(context_ids):])


def test_an_empty_context_without_special_tokens_to_start_from_is_refused_in_one_line(checkpoint, tmp_path):
    """lm-eval scores an empty context after its prefix token (<s>, else </s>); a tokenizer with neither has none."""
    shutil.copytree(checkpoint, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": None,
                                                                          "eos_token": None}))
    tokenizer = ttl_core.Tokenizer.from_pretrained(tmp_path / "model")
    question = Question("tasks.jsonl:1", "", ["sim", "não"], 0)
    with pytest.raises(DataError, match=r"^tasks.jsonl:1: choice 0 is \d+ tokens after a context of 0; need a context"):
        encode_questions(tokenizer, [question], 32)


def test_a_context_too_long_is_cut_from_the_left(checkpoint):
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    model, tokenizer = ttl_core.load_pretrained(checkpoint), ttl_core.Tokenizer.from_pretrained(checkpoint)
    context = " ".join(q.context for q in read_questions(SAMPLE_TASK)[:8])
    pairs = [encode_pair(tokenizer, context, " " + choice) for choice in ("Brasília", "Lisboa")]
    assert all(len(c) + len(x) > CONTEXT + 5 for c, x in pairs)
    got = continuation_loglikelihoods(model, pairs, batch_size=2)
    want = [reference_loglikelihood(hf, *pair) for pair in pairs]
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-5


def test_a_choice_is_scored_whole_or_refused_at_the_model_s_context(checkpoint):
    """A continuation of as many tokens as the model's context is scored after its context's last token; one token
    more would leave it no context (and its first position would index the row's end)."""
    tokenizer = ttl_core.Tokenizer.from_pretrained(checkpoint)
    choice = " ".join(random.choices(["casa", "rio", "sol", "mar", "céu"], k=12))
    length = len(encode_pair(tokenizer, "Pergunta:", " " + choice)[1])
    question = Question("tasks.jsonl:3", "Pergunta:", [choice, "não"], 0)
    assert len(encode_questions(tokenizer, [question], length)[0][1]) == length
    with pytest.raises(DataError, match=rf"^tasks.jsonl:3: choice 0 is {length} tokens after a context of \d+; "
                                        rf"need a context and 1 to {length - 1} "):
        encode_questions(tokenizer, [question], length - 1)


def test_each_question_s_picks_are_lm_evals_argmax_with_ties_to_the_first():
    """Random choices (accented letters: bytes outnumber characters) and log-likelihoods of a few integer values
    (ties are common, within a metric and after normalisation): each metric's pick is numpy's argmax of the
    log-likelihoods over 1, the choice's characters (the delimiter not counted) or its UTF-8 bytes, as lm-eval's."""
    rng = random.Random()
    for _ in range(300):
        choices = ["".join(rng.choices("abcéãçõ", k=rng.randint(1, 5))) for _ in range(rng.randint(2, 5))]
        label, loglikelihoods = rng.randrange(len(choices)), [-float(rng.randint(1, 6)) for _ in choices]
        question = Question("q:1", "x", choices, label, rng.choice([" ", "\n", ": "]))
        lengths = {"acc": [1] * len(choices), "acc_norm": [len(c) for c in choices],
                   "acc_bytes": [len(c.encode("utf-8")) for c in choices]}
        expected = {metric: float(np.argmax(np.array(loglikelihoods) / np.array(length)) == label)
                    for metric, length in lengths.items()}
        assert question_scores(question, loglikelihoods) == expected, (question, loglikelihoods)
@pytest.mark.parametrize("batch_size", [1, 3, 16, 64])
def test_forward_shapes_are_the_forwards_scoring_makes(batch_size):
    """What a plan counts of scoring (`forward_shapes`) against the forwards `continuation_loglikelihoods` makes,
    hooked: each batch's rows and padded length (contexts cut to the model's context included), and the positions the
    LM head scores (the continuations' alone)."""
    generator = torch.Generator().manual_seed(batch_size)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT))
    lengths = torch.randint(1, 2 * CONTEXT, (37, 2), generator=generator).tolist()
    pairs = [(torch.randint(0, 50, (c,), generator=generator).tolist(),
              torch.randint(0, 50, (min(k, CONTEXT),), generator=generator).tolist()) for c, k in lengths]
    forwards = []  # [rows, length, positions scored] of each forward
    model.backbone.register_forward_pre_hook(lambda module, args: forwards.append(list(args[0].shape)))
    model.lm_head.register_forward_pre_hook(lambda module, args: forwards[-1].append(args[0].shape[0]))
    continuation_loglikelihoods(model, pairs, batch_size=batch_size)
    assert any(c + k > CONTEXT + 1 for c, k in lengths)  # some cut
    assert [tuple(f) for f in forwards] == forward_shapes(pairs, CONTEXT, batch_size)


def test_acc_acc_norm_acc_bytes_and_their_stderr_are_lm_evals(checkpoint, monkeypatch):
    """Log-likelihoods chosen so that the three metrics pick differently: acc the highest sum, acc_norm the highest
    per character (of the choice, the delimiter not counted), acc_bytes the highest per UTF-8 byte ("é" is 2)."""
    questions = [Question("q:1", "x", ["é", "ab"], 0), Question("q:2", "x", ["é", "ab"], 1),
                 Question("q:3", "x", ["ab", "abcdef"], 1), Question("q:4", "x", ["ab", "abcd", "a"], 2)]
    loglikelihoods = [-1.5, -2.5,  # sums: 0; per character -1.5, -1.25: 1; per byte -0.75, -1.25: 0
                      -1.5, -2.5,
                      -2.0, -3.0,  # sums: 0; per character -1.0, -0.5: 1 (bytes the same)
                      -3.0, -4.0, -0.5]  # every metric: 2
    monkeypatch.setattr(ttl_core.choices, "continuation_loglikelihoods", lambda *args, **kw: loglikelihoods)
    figures = evaluate_questions(ttl_core.load_pretrained(checkpoint),
                                 ttl_core.Tokenizer.from_pretrained(checkpoint), questions)
    scores = {"acc": [1, 0, 0, 1], "acc_norm": [0, 1, 1, 1], "acc_bytes": [1, 0, 1, 1]}
    assert figures["questions"] == 4
    for metric, values in scores.items():
        mean = sum(values) / 4
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / 3) / 2  # sample std / sqrt(n)
        assert figures[metric] == mean and figures[f"{metric}_stderr"] == pytest.approx(stderr, rel=1e-12)
    assert (figures["acc"], figures["acc_norm"], figures["acc_bytes"]) == (0.5, 0.75, 0.75)
    assert figures["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    single = evaluate_questions(ttl_core.load_pretrained(checkpoint), ttl_core.Tokenizer.from_pretrained(checkpoint),
                                questions[:1])  # lm-eval's "N/A": no spread from one question
    assert single["acc_stderr"] is None


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        ttl_core.cli.run_cli(load_script("evaluate_choices").main, list(argv))
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_the_cli_scores_the_bundled_sample_as_the_reference_does(checkpoint, tmp_path, capsys):
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = ttl_core.Tokenizer.from_pretrained(checkpoint)
    questions = read_questions(SAMPLE_TASK)
    assert 20 <= len(questions) <= 40 and "sample_data/*.jsonl" in (Path(__file__).parents[1] / "setup.py").read_text()
    code, out, _ = run_cli(capsys, "--model", str(checkpoint), "--json", str(tmp_path / "acc.json"),
                           "--batch-size", "5")
    assert code == 0 and "escolhas_pt.jsonl: 32 questions" in out and "acc_norm" in out
    figures = json.loads((tmp_path / "acc.json").read_text())["tasks"][str(SAMPLE_TASK)]
    right = 0
    for question in questions:
        scores = [reference_loglikelihood(hf, *encode_pair(tokenizer, question.context, " " + choice))
                  for choice in question.choices]
        right += scores.index(max(scores)) == question.label
    assert figures["questions"] == 32 and figures["acc"] == right / 32
    code, out, _ = run_cli(capsys, "--model", str(checkpoint), "--tasks", str(SAMPLE_TASK), "--limit", "5")
    assert code == 0 and "5 questions" in out


def test_a_peft_adapter_directory_is_a_model(checkpoint, tmp_path, capsys):
    base = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    # saved without a tokenizer, as PEFT saves adapters: the base's is used
    theirs = saved_peft_adapter(transformers.LlamaForCausalLM.from_pretrained(checkpoint), tmp_path / "adapter",
                                seed=2).eval()
    tokenizer = ttl_core.Tokenizer.from_pretrained(checkpoint)
    questions = read_questions(SAMPLE_TASK)[:8]
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "adapter"), "--limit", "8", "--json",
                           str(tmp_path / "acc.json"))
    assert code == 0, err
    ours = ttl_core.cli.load_causal_lm(argparse.Namespace(model=str(tmp_path / "adapter"), base=None, device="cpu",
                                                          dtype="float32"), "choice scoring")
    pairs = sample_pairs(tokenizer, limit=3)
    got, want = continuation_loglikelihoods(ours, pairs), [reference_loglikelihood(theirs, *p) for p in pairs]
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-5
    right, moved = 0, 0.0
    for question in questions:
        pairs = [encode_pair(tokenizer, question.context, " " + c) for c in question.choices]
        scores = [reference_loglikelihood(theirs, *pair) for pair in pairs]
        moved = max(moved, *(abs(s - reference_loglikelihood(base, *pair)) for s, pair in zip(scores, pairs)))
        right += scores.index(max(scores)) == question.label
    assert moved > 0.1  # the adapter is no no-op: scoring the base instead would not pass for it
    assert json.loads((tmp_path / "acc.json").read_text())["tasks"][str(SAMPLE_TASK)]["acc"] == right / 8


@pytest.mark.parametrize("line, message", [
    ('{"choices": ["a", "b"], "label": 0}', "no 'context' field"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "'label' must be an integer in [0, 2)"),
    ('{"context": "x", "choices": ["a", "b"], "label": true}', "'label' must be an integer"),
    ('{"context": "x", "choices": ["a"], "label": 0}', "'choices' must be a list of at least 2 non-empty strings"),
    ('{"context": "x", "choices": ["a", ""], "label": 0}', "at least 2 non-empty strings"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "'context' must be text"),
    ('{"context": "x", "choices": ["a", "b"], "label": 0', "malformed JSON"),
    ("", "no examples"),
])
def test_a_bad_task_file_is_refused_in_one_line_naming_file_and_line(checkpoint, tmp_path, capsys, line, message):
    task = tmp_path / "bad.jsonl"
    good = '{"context": "x", "choices": ["a", "b"], "label": 1}\n'
    task.write_text(good + line + "\n" if line else "")
    with pytest.raises(DataError):
        read_questions(task)
    code, out, err = run_cli(capsys, "--model", str(checkpoint), "--tasks", str(task))
    assert code == 2 and not out and err.count("\n") == 1 and message in err
    assert err.startswith(f"error: {task}:2: " if line else f"error: {task}: ")
