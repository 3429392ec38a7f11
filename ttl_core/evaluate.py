"""Held-out loss and perplexity of a causal LM over a prepared token stream, in sliding windows: what
`scripts/evaluate.py` reports.

The stream (a split of a prepared data directory: documents as `<s>` ids `</s>`, end to end, as the model was
trained on them) is read in windows of `seq_len` tokens that start every `stride` tokens. Each window predicts its
tokens' successors and scores those no earlier window scored, so every token after the first is scored once, with
at least `seq_len - stride` tokens of context (fewer only at the stream's start). `stride = seq_len` (the
default) is the training loop's evaluation (disjoint blocks, no token lost between them); a smaller stride trades
compute for context, as in transformers' perplexity guide."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import read_meta, token_file
from .errors import ConfigError, DataError
from .model import LlamaForCausalLM
from .train import model_inputs


@dataclass
class StreamLoss:
    """The summed negative log-likelihood (nats) of the `tokens` scored."""

    tokens: int
    nll: float

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.loss)
        except OverflowError:  # a loss past ~709 nats
            return math.inf


def split_tokens(data_dir: str | Path, split: str) -> tuple[np.ndarray, dict]:
    """The token stream of `DATA_DIR/{split}.bin` (memory-mapped) and the directory's meta.json."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.bin"
    if not (data_dir / "meta.json").is_file() or not path.is_file():
        raise DataError(f"{data_dir}: no meta.json or {split}.bin (prepare the data with scripts/prepare_data.py)")
    meta = read_meta(data_dir / "meta.json")
    return token_file(path, meta, split), meta


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over a stream of `n_tokens`: it reads tokens [start, end) and
    scores the predictions of tokens [first_scored, end + 1). Windows start every `stride` tokens until one
    predicts the stream's last token."""
    if not (seq_len >= 1 and 1 <= stride <= seq_len):
        raise ConfigError(f"need seq_len >= 1 and a stride in [1, seq_len], got seq_len={seq_len}, stride={stride}")
    spans, scored_until = [], 1  # the first token has nothing to be predicted from
    for start in range(0, max(n_tokens - 1, 0), stride):
        end = min(start + seq_len, n_tokens - 1)
        spans.append((start, end, scored_until))
        scored_until = end + 1
        if end == n_tokens - 1:
            break
    return spans


@torch.no_grad()
def stream_loss(model: LlamaForCausalLM, tokens: np.ndarray, seq_len: int, stride: int | None = None,
                batch_size: int = 8, document_ids: tuple[int, int] | None = None) -> StreamLoss:
    """Score `tokens` (a 1-d id stream) in windows of `seq_len` every `stride` (default `seq_len`), `batch_size`
    windows per forward pass; the loss is the fused cross-entropy's, so no logits are built. With `document_ids`
    (the stream's BOS and EOS ids), documents are masked as the training loop masks them (`data.document_masking`):
    each attends within itself, with positions from 0, and its BOS is not scored."""
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
    spans = windows(len(tokens), seq_len, stride or seq_len)
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    # summed on the device: no host sync per batch
    nll, scored = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long, device=device)
    full = [w for w in spans if w[1] - w[0] == seq_len]  # every window but perhaps the last, which is shorter
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in spans[len(full):]]
    for group in batches:
        block = torch.stack([torch.from_numpy(np.asarray(tokens[s:e + 1], dtype=np.int64)) for s, e, _ in group])
        targets = block[:, 1:].clone()
        for row, (start, _, first_scored) in enumerate(group):
            targets[row, :first_scored - start - 1] = -100  # scored by an earlier window
        batch = {"input_ids": block[:, :-1], "labels": targets}
        if document_ids is not None:  # documents start at each window's start and after each EOS, as PackedLoader's
            batch["doc_starts"] = torch.cat([torch.ones_like(block[:, :1], dtype=torch.bool),
                                             block[:, :-2] == document_ids[1]], dim=1)
        inputs = model_inputs(batch, device, document_ids is not None, document_ids[0] if document_ids else None)
        nll += model(**inputs, loss_reduction="sum").loss.double()
        scored += (inputs["targets"] != -100).sum()
    model.train(was_training)
    return StreamLoss(tokens=int(scored), nll=float(nll))
