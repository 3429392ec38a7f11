"""New embedding and LM-head tables for `resize_token_embeddings`, sized and filled as transformers' are, so that
after the same seed a resized model holds transformers' rows."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import padding_index
from .errors import ConfigError, is_integer


def requested_vocab_size(new_vocab_size: int | None, current: int, pad_to_multiple_of: int | None) -> int | None:
    """The size a resize asks for: `new_vocab_size` (the `current` one where None) rounded up to a multiple of
    `pad_to_multiple_of` where given; None where neither is given, which transformers reads as "change nothing"."""
    for name, value in (("new_vocab_size", new_vocab_size), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (not is_integer(value) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if pad_to_multiple_of is None:
        return new_vocab_size
    rows = current if new_vocab_size is None else new_vocab_size
    return -(-rows // pad_to_multiple_of) * pad_to_multiple_of


def resized_embedding(old: nn.Embedding, size: int, pad_token_id: int | None) -> nn.Embedding:
    """An input embedding of `size` rows filled from `old` (`_fill_resized_table`). Its padding row: the pad id's,
    where the pad id is in the new table (else none, as in transformers); a negative id counts from the new end, as
    transformers reads the resized checkpoint (its model in memory keeps the old row: docs/models.md)."""
    in_vocab = pad_token_id is not None and -size <= pad_token_id < size
    embed = nn.Embedding(size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype,
                         padding_idx=padding_index(pad_token_id, size) if in_vocab else None)
    _fill_resized_table(embed.weight, old.weight)
    return embed


def resized_head(old: nn.Linear, size: int) -> nn.Linear:
    """An LM head of `size` rows filled from `old` (`_fill_resized_table`)."""
    head = nn.Linear(old.in_features, size, bias=False, device=old.weight.device, dtype=old.weight.dtype)
    _fill_resized_table(head.weight, old.weight)
    return head


@torch.no_grad()
def _fill_resized_table(new: nn.Parameter, old: nn.Parameter) -> None:
    """Fill a resized embedding or LM-head table as transformers' `resize_token_embeddings` does by default: the
    old rows it still holds and, where it grew, rows drawn around the old rows' mean, from a normal with 1e-9 times
    their covariance (a new token starts as an "average" one, not as noise), or the mean itself where that
    covariance is not positive definite. It requires grad as the old table did."""
    added = len(new) - len(old)
    if added > 0:
        rows = old.float()
        mean = rows.mean(0)
        covariance = 1e-9 * ((rows - mean).T @ (rows - mean) / len(old))
        if torch.distributions.constraints.positive_definite.check(covariance).all():
            new[len(old):] = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((added,))
        else:
            new[len(old):] = mean
    new[:len(old)] = old[:len(new)]
    new.requires_grad_(old.requires_grad)
