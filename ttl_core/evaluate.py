"""Held-out loss and perplexity of a causal LM over a prepared token stream, in sliding windows: what
`scripts/evaluate.py` reports.

The stream (a split of a prepared data directory: documents as `<s>` ids `</s>`, end to end, as the model was
trained on them) is read in windows of `seq_len` tokens that start every `stride` tokens. Each window predicts its
tokens' successors and scores those no earlier window scored, so every token after the first is scored once, with
at least `seq_len - stride` tokens of context (fewer only at the stream's start). `stride = seq_len` (the
default) is the training loop's evaluation (disjoint blocks, no token lost between them); a smaller stride trades
compute for context, as in transformers' perplexity guide.

`by_position` also splits the loss by the context each scored token was predicted from: the window's tokens
before it (1 to `seq_len`; with document masking only its own document's), in buckets that double (1, 2, 3-4, 5-8,
..., the last ending at `seq_len`) or of equal width. With a stride below `seq_len`, contexts up to
`seq_len - stride` come only from the stream's first window (and, with document masking, documents' starts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .errors import ConfigError, DataError
from .loader import read_meta, token_file
from .metrics import perplexity, save_png
from .model import LlamaForCausalLM
from .step import model_inputs


@dataclass
class StreamLoss:
    """The summed negative log-likelihood (nats) of the `tokens` scored."""

    tokens: int
    nll: float
    # with `by_position`: (first, last context length, the loss of the tokens scored with such a context) per bucket
    by_position: list[tuple[int, int, StreamLoss]] | None = None

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def split_tokens(data_dir: str | Path, split: str) -> tuple[np.ndarray, dict]:
    """The token stream of `DATA_DIR/{split}.bin` (memory-mapped; a DataError when it holds nothing to predict) and
    the directory's meta.json."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.bin"
    if not (data_dir / "meta.json").is_file() or not path.is_file():
        raise DataError(f"{data_dir}: no meta.json or {split}.bin (prepare the data with scripts/prepare_data.py)")
    meta = read_meta(data_dir / "meta.json")
    tokens = token_file(path, meta, split)
    if len(tokens) < 2:  # a val.bin prepared with val_fraction 0 is empty
        hint = " (--split train, or prepare the data with a --val-fraction above 0)" if split == "val" else ""
        raise DataError(f"{path} holds {len(tokens)} token(s): nothing to evaluate{hint}")
    return tokens, meta


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over a stream of `n_tokens`: it reads tokens [start, end) and
    scores the predictions of tokens [first_scored, end + 1). Windows start every `stride` tokens until one
    predicts the stream's last token."""
    scored_until = 1  # the first token has nothing to be predicted from
    for start in range(0, max(n_tokens - 1, 0), stride):
        end = min(start + seq_len, n_tokens - 1)
        yield start, end, scored_until
        scored_until = end + 1
        if end == n_tokens - 1:
            return


def count_windows(n_tokens: int, seq_len: int, stride: int) -> int:
    """How many `windows` a stream of `n_tokens` has."""
    if n_tokens < 2:
        return 0
    return min(-(-(n_tokens - 1) // stride), max(0, -(-(n_tokens - 1 - seq_len) // stride)) + 1)


PositionBuckets = str | int  # "log2" (doubling buckets) or a number of equal-width ones


def position_buckets(seq_len: int, buckets: PositionBuckets = "log2") -> list[int]:
    """The edges of the context-length buckets over 1..`seq_len`: bucket i holds contexts edges[i] to
    edges[i + 1] - 1. "log2": 1, 2, 3-4, 5-8, ... (each ends at a power of two, so a model trained at a power-of-two
    length has a bucket end there), the last cut at `seq_len`; an int N: N buckets of equal width (to a token)."""
    if buckets == "log2":
        return [1, *(2 ** k + 1 for k in range((seq_len - 1).bit_length()))] + [seq_len + 1]
    if isinstance(buckets, bool) or not isinstance(buckets, int):
        raise ConfigError(f"position buckets are 'log2' or a number of equal-width buckets, got {buckets!r}")
    if not 1 <= buckets <= seq_len:
        raise ConfigError(f"{buckets} position buckets over a window of {seq_len} tokens: need 1 to {seq_len} "
                          f"(one context length each at most)")
    return [1 + i * seq_len // buckets for i in range(buckets)] + [seq_len + 1]


@torch.no_grad()
def stream_loss(model: LlamaForCausalLM, tokens: np.ndarray, seq_len: int, stride: int | None = None,
                batch_size: int = 8, document_ids: tuple[int | None, int] | None = None, progress: bool = False,
                by_position: PositionBuckets | None = None) -> StreamLoss:
    """Score `tokens` (a 1-d id stream) in windows of `seq_len` every `stride` (default `seq_len`), `batch_size`
    windows per forward pass; the loss is the fused cross-entropy's, so no logits are built. With `document_ids`
    (the stream's BOS id, None where it has none, and EOS id), documents are masked as the training loop masks them
    (`data.document_masking`): each attends within itself, with positions from 0, and its BOS is not scored.
    `progress` shows a tqdm bar. `by_position` ("log2" or a number of buckets, `position_buckets`) also fills the
    result's `by_position`."""
    stride = _checked_stream_arguments(model, tokens, seq_len, stride, batch_size)
    edges = position_buckets(seq_len, by_position) if by_position is not None else [1, seq_len + 1]
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    # the bucket of each position (a context of position + 1 tokens)
    bucket_of = torch.repeat_interleave(torch.arange(len(edges) - 1), torch.tensor(edges).diff()).to(device)
    # summed on the device (no host sync per batch): the stream's nll and tokens by plain sums, the same bits on every
    # run, and each bucket's by index_add_ (atomics on a GPU: its last bits may vary)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    nll = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    scored = torch.zeros(len(edges) - 1, dtype=torch.long, device=device)

    def score(group: list[tuple[int, int, int]]) -> None:
        block = torch.stack([torch.from_numpy(np.asarray(tokens[s:e + 1], dtype=np.int64)) for s, e, _ in group])
        targets = block[:, 1:].clone()
        for row, (start, _, first_scored) in enumerate(group):
            targets[row, :first_scored - start - 1] = -100  # scored by an earlier window
        batch = {"input_ids": block[:, :-1], "labels": targets}
        if document_ids is not None:  # documents start at each window's start and after each EOS, as PackedLoader's
            batch["doc_starts"] = torch.cat([torch.ones_like(block[:, :1], dtype=torch.bool),
                                             block[:, :-2] == document_ids[1]], dim=1)
        inputs = model_inputs(batch, device, document_ids is not None, document_ids[0] if document_ids else None)
        losses = model(**inputs, loss_reduction="none").loss.double()  # 0 where a target is not scored
        is_scored = (inputs["targets"] != -100).flatten()
        total.add_(torch.stack([losses.sum(), is_scored.sum().double()]))
        if by_position is not None:
            positions = inputs.get("position_ids",
                                   torch.arange(block.shape[1] - 1, device=device).expand(len(group), -1))
            bucket = bucket_of[positions].flatten()
            nll.index_add_(0, bucket, losses)
            scored.index_add_(0, bucket, is_scored.long())
        bar.update(len(group))

    group: list[tuple[int, int, int]] = []  # windows of one length (only the last may be shorter)
    with tqdm(total=count_windows(len(tokens), seq_len, stride), unit="window", leave=False,
              disable=not progress) as bar:
        for window in windows(len(tokens), seq_len, stride):
            if group and (len(group) == batch_size or window[1] - window[0] != group[0][1] - group[0][0]):
                score(group)
                group = []
            group.append(window)
        score(group)
    model.train(was_training)
    (stream_nll, stream_tokens), counts, sums = total.tolist(), scored.tolist(), nll.tolist()
    buckets = [(first, after - 1, StreamLoss(n, bucket_nll))
               for first, after, n, bucket_nll in zip(edges, edges[1:], counts, sums)]
    return StreamLoss(tokens=int(stream_tokens), nll=stream_nll,
                      by_position=buckets if by_position is not None else None)


def _checked_stream_arguments(model: LlamaForCausalLM, tokens: np.ndarray, seq_len: int, stride: int | None,
                              batch_size: int) -> int:
    """`stream_loss`'s arguments checked against the model and the token stream; returns the stride (default
    `seq_len`)."""
    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"perplexity needs a LlamaForCausalLM, got a {getattr(model, 'architecture', type(model))}")
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise ConfigError(f"seq_len {seq_len} is longer than the model's context ({context} tokens)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(tokens) < 2:
        raise DataError(f"the stream holds {len(tokens)} token(s): nothing to predict")
    top = int(tokens.max())
    if top >= model.config.vocab_size:
        raise DataError(f"the stream holds id {top}, outside the model's vocabulary of {model.config.vocab_size} "
                        f"(data prepared with another tokenizer?)")
    stride = seq_len if stride is None else stride  # not `stride or seq_len`: a stride of 0 is refused, not defaulted
    if not (seq_len >= 1 and 1 <= stride <= seq_len):
        raise ConfigError(f"need seq_len >= 1 and a stride in [1, seq_len], got seq_len={seq_len}, stride={stride}")
    return stride


def plot_by_position(plt: Any, result: StreamLoss, out: str | Path, title: str,
                     original_context: int | None = None) -> Path:
    """Draw `result`'s loss per `by_position` bucket against the context (log scale), its overall loss dashed and,
    for a rope-scaled model, its `original_context` (the length it was trained at) dotted, to the PNG `out`; `plt`
    is `metrics.pyplot`'s."""
    firsts, lasts, buckets = zip(*result.by_position)
    fig, ax = plt.subplots(figsize=(7, 4))
    # each context c spans [c - 0.5, c + 0.5], so buckets of doubling contexts end near powers of two
    ax.stairs([bucket.loss for bucket in buckets], [first - 0.5 for first in firsts] + [lasts[-1] + 0.5],
              baseline=None, linewidth=1.5, label="loss by context")
    ax.axhline(result.loss, color="gray", linestyle="--", linewidth=1, label="overall loss")
    if original_context is not None:  # between its last trained context and the first one past it
        ax.axvline(original_context + 0.5, color="red", linestyle=":", label=f"original context ({original_context})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context (tokens the prediction read)", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(plt, fig, Path(out))
