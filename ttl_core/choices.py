"""Zero-shot multiple-choice accuracy of a causal LM, scored as lm-evaluation-harness scores its `multiple_choice`
tasks (HellaSwag, ARC, PIQA; ASSIN, ENEM, OAB in the Portuguese harness): what `scripts/evaluate_choices.py` reports.

A task file holds one question per line, JSON: `{"context": str, "choices": [str, ...], "label": int}` (`label`
indexes the right choice; at least 2 choices, none empty), and optionally `"target_delimiter": str`, the text
between the context and each choice (default " ", lm-eval's). Each choice is scored by the summed log-likelihood
of its tokens, `target_delimiter + choice`, given the context, as lm-eval's `loglikelihood` does:

- whitespace that ends the context moves to the start of the continuation; then the context is encoded alone and
  the joined text whole, and the continuation is what the joined ids hold past the context's token count (the
  model's tokenizer adds `<s>` and `</s>` as it says, none to a text that writes its own `<s>` (`</s>` for a
  tokenizer without `<s>`, lm-eval's prefix token); an empty context is that prefix token alone);
- the ids fed are the context's then the continuation's, cut from the left to the model's context + 1 and
  without the last, so a continuation is always scored whole, after as much context as fits.

`acc` picks the choice of highest log-likelihood, `acc_norm` the highest per character of the choice (lm-eval's
`len(choice)`, the delimiter not counted), `acc_bytes` per UTF-8 byte of it; each standard error is lm-eval's, the
sample standard deviation of the 0/1 scores over the square root of the number of questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import ConfigError, DataError, is_integer
from .fileio import refuse_lone_surrogate
from .model import LlamaForCausalLM
from .task_files import read_task_file
from .tokenizer import Tokenizer

METRICS = ("acc", "acc_norm", "acc_bytes")
BATCH_SIZE = 16  # choices scored per forward pass


@dataclass(frozen=True)
class Question:
    """One line of a task file; `where` is its "FILE:LINE", for errors."""

    where: str
    context: str
    choices: list[str]
    label: int
    target_delimiter: str = " "


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSON-lines task file; a malformed line is a DataError naming file and line."""
    path = Path(path)
    questions = []
    for number, record in read_task_file(path):
        where = f"{path}:{number}"
        missing = [key for key in ("context", "choices", "label") if key not in record]
        if missing:
            raise DataError(f"{where}: no {', '.join(map(repr, missing))} field "
                            f"(fields: {', '.join(map(repr, record))})")
        context, choices, label = record["context"], record["choices"], record["label"]
        delimiter = record.get("target_delimiter", " ")
        for name, text in (("context", context), ("target_delimiter", delimiter)):
            if not isinstance(text, str):
                raise DataError(f"{where}: {name!r} must be text, got {type(text).__name__}")
            refuse_lone_surrogate(path, number, name, text)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r:.80}")
        for choice in choices:
            refuse_lone_surrogate(path, number, "choices", choice)
        if not is_integer(label) or not 0 <= label < len(choices):
            raise DataError(f"{where}: 'label' must be an integer in [0, {len(choices)}) indexing 'choices', "
                            f"got {label!r}")
        questions.append(Question(where, context, choices, label, delimiter))
    return questions


def _prefix_id(tokenizer: Tokenizer) -> int:
    # lm-eval's prefix token: what an empty context is, <s>, or </s> for a tokenizer without one
    return tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # as lm-eval's tok_encode: a text that writes the prefix token itself is encoded with add_special_tokens=False,
    # so neither a second <s> nor the </s> of a tokenizer that adds one
    prefix = _prefix_id(tokenizer)
    written = prefix >= 0 and text.startswith(tokenizer.id_to_token(prefix))
    return tokenizer.encode(text, add_bos=False, add_eos=False) if written else tokenizer.encode(text)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal `loglikelihood` splits them (see the module's doc)."""
    if not context:
        ids = tokenizer.encode(continuation, add_bos=False, add_eos=False)
        prefix = _prefix_id(tokenizer)
        # no context ids for a tokenizer with neither <s> nor </s>: nothing to score after, refused as such
        return (ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix] if prefix >= 0 else [], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = _encode(tokenizer, context)
    return context_ids, _encode(tokenizer, context + continuation)[len(context_ids):]


Pairs = list[tuple[list[int], list[int]]]  # (context ids, continuation ids) per choice


def pair_inputs(pairs: Pairs, max_length: int) -> list[list[int]]:
    """The ids fed for each pair: its context's then its continuation's, cut from the left to the model's context
    (`max_length`) + 1 and without the last (whose prediction nothing scores)."""
    return [(context + continuation)[-(max_length + 1):-1] for context, continuation in pairs]


def forward_groups(inputs: list[list[int]], batch_size: int) -> list[list[int]]:
    """The indices of the inputs each forward pass takes: longest first, `batch_size` a pass, so that a pass pads
    its rows to its first's length."""
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    return [order[first:first + batch_size] for first in range(0, len(order), batch_size)]


def forward_shapes(pairs: Pairs, max_length: int, batch_size: int = BATCH_SIZE) -> list[tuple[int, int, int]]:
    """(rows, length, scored) of each forward pass `continuation_loglikelihoods` makes over `pairs`: the backbone runs
    on rows x length ids (padding included), the LM head on the `scored` positions of the continuations alone. What
    scoring costs, as a plan counts it."""
    inputs = pair_inputs(pairs, max_length)
    return [(len(group), len(inputs[group[0]]), sum(len(pairs[i][1]) for i in group))
            for group in forward_groups(inputs, batch_size)]


def _group_batch(pairs: Pairs, inputs: list[list[int]],
                 group: list[int]) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """One forward pass's `inputs` (of the pairs in `group`) right-padded with zeros into (rows, longest) ids, and,
    for each continuation token, the row and position whose prediction scores it and the token itself."""
    ids = torch.zeros(len(group), len(inputs[group[0]]), dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, i in enumerate(group):
        ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
        continuation = pairs[i][1]
        rows += [row] * len(continuation)
        positions += range(len(inputs[i]) - len(continuation), len(inputs[i]))
        targets += continuation
    return ids, rows, positions, targets


@torch.no_grad()
def continuation_loglikelihoods(model: LlamaForCausalLM, pairs: Pairs,
                                batch_size: int = BATCH_SIZE, progress: bool = False) -> list[float]:
    """The summed log-likelihood (nats) of each pair's continuation ids given its context ids, `batch_size` pairs
    per forward pass (longest first, right-padded: causal attention keeps padding out of the scored positions)."""
    device = model.lm_head.weight.device
    inputs = pair_inputs(pairs, model.config.max_position_embeddings)
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    with tqdm(total=len(pairs), unit="choice", leave=False, disable=not progress) as bar:
        for group in forward_groups(inputs, batch_size):
            ids, rows, positions, targets = _group_batch(pairs, inputs, group)
            hidden = model.backbone(ids.to(device)).last_hidden_state
            # only the continuations' positions go through the head: (batch, seq, vocab) logits are never built
            logits = model.lm_head(hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)])
            # bfloat16 / float16 logits are scored in float32, float64 ones in float64 (--dtype float64)
            scored = logits.to(torch.promote_types(logits.dtype, torch.float32))
            token_scores = scored.log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None])
            sums = torch.zeros(len(group), dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(rows, device=device), token_scores[:, 0].double())
            for i, total in zip(group, sums.tolist()):
                scores[i] = total
            bar.update(len(group))
    model.train(was_training)
    return scores


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and lm-eval's standard error of it (None for a single value, lm-eval's "N/A")."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def question_scores(question: Question, loglikelihoods: list[float]) -> dict[str, float]:
    """1.0 or 0.0 per metric for one question, from its choices' log-likelihoods (ties go to the first, as
    numpy's argmax breaks them)."""
    lengths = {"acc": [1] * len(question.choices), "acc_norm": [len(c) for c in question.choices],
               "acc_bytes": [len(c.encode("utf-8")) for c in question.choices]}
    scores = {}
    for metric, length in lengths.items():
        normed = [ll / n for ll, n in zip(loglikelihoods, length)]
        scores[metric] = float(normed.index(max(normed)) == question.label)
    return scores


def encode_questions(tokenizer: Tokenizer, questions: list[Question], max_length: int) -> Pairs:
    """(context ids, continuation ids) of every choice of every question, in order; a choice the model's context
    (`max_length`) cannot score is a DataError naming its line."""
    pairs = []
    for question in questions:
        for k, choice in enumerate(question.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, question.context, question.target_delimiter + choice)
            if not context_ids or not 1 <= len(continuation_ids) <= max_length:
                raise DataError(f"{question.where}: choice {k} is {len(continuation_ids)} tokens after a context of "
                                f"{len(context_ids)}; need a context and 1 to {max_length} (the model's context)")
            pairs.append((context_ids, continuation_ids))
    return pairs


def score_questions(questions: list[Question], loglikelihoods: list[float]) -> dict[str, float | int | None]:
    """`questions` (the number), and each metric of METRICS with its `_stderr`, from the log-likelihoods of every
    choice of every question, in order."""
    per_question, start = [], 0
    for question in questions:
        per_question.append(question_scores(question, loglikelihoods[start:start + len(question.choices)]))
        start += len(question.choices)
    figures: dict[str, float | int | None] = {"questions": len(questions)}
    for metric in METRICS:
        figures[metric], figures[f"{metric}_stderr"] = mean_and_stderr([s[metric] for s in per_question])
    return figures


def evaluate_questions(model: LlamaForCausalLM, tokenizer: Tokenizer, questions: list[Question],
                       batch_size: int = BATCH_SIZE, progress: bool = False) -> dict[str, float | int | None]:
    """`questions` (the number), and each metric of METRICS with its `_stderr`, over `questions`."""
    if not questions:
        raise DataError("no questions to evaluate")
    pairs = encode_questions(tokenizer, questions, model.config.max_position_embeddings)
    return score_questions(questions, continuation_loglikelihoods(model, pairs, batch_size, progress))


Task = tuple[list[Question], Pairs]  # a task's questions and their encoded choices


def read_task_questions(paths: list[str], limit: int) -> dict[str, list[Question]]:
    """The first `limit` questions (0: all) of each task file, by name (the file's stem), which names its figures:
    two files of one stem are refused, as is a file without questions."""
    tasks: dict[str, list[Question]] = {}
    named: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem
        if name in named:
            raise ConfigError(f"train.eval_tasks: {named[name]} and {path} are both named {name!r} (a task's name "
                              f"is its file's stem, logged as acc/{name}); rename one")
        named[name] = path
        tasks[name] = read_questions(path)[:limit or None]
    return tasks


def read_tasks(paths: list[str], limit: int, tokenizer: Tokenizer, max_length: int) -> dict[str, Task]:
    """`read_task_questions`, each task's questions encoded and checked against the model's context (`max_length`):
    what `train.eval_tasks` scores at each evaluation."""
    return {name: (questions, encode_questions(tokenizer, questions, max_length))
            for name, questions in read_task_questions(paths, limit).items()}


def task_figures(model: LlamaForCausalLM, tasks: dict[str, Task]) -> dict[str, float]:
    """acc/NAME and acc_norm/NAME of each task (acc_bytes, which matches acc_norm but for accented letters, is left
    to scripts/evaluate_choices.py to keep an eval record readable)."""
    figures = {}
    for name, (questions, pairs) in tasks.items():
        scores = score_questions(questions, continuation_loglikelihoods(model, pairs))
        figures.update({f"acc/{name}": scores["acc"], f"acc_norm/{name}": scores["acc_norm"]})
    return figures
