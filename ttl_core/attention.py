"""The one attention entry point that the model, the trainer and the sampler call.

Tensors use the flash-attn layout: q (batch, q_len, heads, head_dim), k and v (batch, kv_len, kv_heads,
head_dim) with kv_heads dividing heads (grouped-query attention without repeating K/V in memory where the
backend allows). Masks are boolean (batch or 1, 1, q_len, kv_len), True where a query may attend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError


def causal_mask(
    q_len: int, kv_len: int, device: torch.device, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean causal mask whose queries are the last `q_len` of `kv_len` positions.

    `key_padding` (batch, kv_len) marks real tokens with 1 and padding with 0. A left-padding query then
    sees no key at all; SDPA returns zeros for such rows, exactly what transformers' SDPA path produces."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]
    if key_padding is None:
        return mask
    return mask & key_padding.bool()[:, None, None, :]


def document_causal_mask(doc_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, mask) for packed rows: `doc_starts` (batch, seq) is True where a document begins.
    Positions restart at 0 in each document and the boolean (batch, 1, seq, seq) mask lets a token attend
    only to earlier tokens of its own document, so every document is computed as if it were alone."""
    seq = doc_starts.shape[1]
    index = torch.arange(seq, device=doc_starts.device).expand_as(doc_starts)
    starts = doc_starts.clone()
    starts[:, 0] = True
    doc_start_index = torch.where(starts, index, 0).cummax(dim=1).values
    doc_id = starts.long().cumsum(dim=1)
    same_doc = doc_id[:, :, None] == doc_id[:, None, :]
    return index - doc_start_index, (same_doc & causal_mask(seq, seq, doc_starts.device)[0])[:, None]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True
) -> torch.Tensor:
    """Explicit-softmax attention (fp32 softmax), the reference the fast backends are tested against.

    Masked scores get the most negative finite value rather than -inf, as in transformers' eager path, so
    a query that may see no key averages all values instead of producing NaN."""
    q_len, kv_len, heads, kv_heads = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = causal_mask(q_len, kv_len, q.device)
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = (qh @ kh.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return (probs @ vh).transpose(1, 2)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True
) -> torch.Tensor:
    """torch's scaled_dot_product_attention; a causal call without a mask on unequal q/kv lengths gets an
    explicit bottom-right mask, since SDPA's `is_causal` aligns the triangle top-left."""
    q_len, kv_len = q.shape[1], k.shape[1]
    if mask is None and causal and q_len != kv_len:
        mask = causal_mask(q_len, kv_len, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention by the chosen backend; returns (batch, q_len, heads, head_dim).

    `mask`, when given, already holds causality and padding; `causal` applies only without a mask."""
    if backend in ("auto", "sdpa"):
        return sdpa_attention(q, k, v, mask, causal)
    if backend == "eager":
        return eager_attention(q, k, v, mask, causal)
    raise ConfigError(f"attention backend {backend!r} is not available in this build")
