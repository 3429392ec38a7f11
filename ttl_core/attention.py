"""Attention behind one entry point (`attention`, whichever backend runs it), and the masks and packed-document
layouts the model, the trainers and generation build for it.

Tensors use the flash-attn layout: q (batch, q_len, heads, head_dim), k and v (batch, kv_len, kv_heads,
head_dim) with kv_heads dividing heads (grouped-query attention without repeating K/V in memory where the
backend allows). Masks are (batch or 1, 1, q_len, kv_len): boolean, True where a query may attend, or
additive in the query's dtype (0 where it may, -inf where not), which a caller builds once for many layers
where SDPA would convert a boolean mask in every call; an additive mask must leave every row some key.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import torch.nn.functional as F

import ttl_kernels
from ttl_kernels.dispatch import check_documents
from ttl_kernels.flash_attention import HEAD_DIMS

from .config import ATTENTION_CHOICES
from .errors import ConfigError

# backends that run packed documents (`cu_seqlens`) with variable-length kernels rather than a mask
VARLEN_BACKENDS = ("flash_attn", "triton")


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


def document_layout(doc_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position_ids, cu_seqlens, max_seqlen) for packed rows: `doc_starts` (batch, seq) is True where a
    document begins (every row start counts as one). Positions restart at 0 in each document; `cu_seqlens`
    (int32) delimits the documents in the flattened batch·seq tokens, for attention that keeps them apart."""
    batch, seq = doc_starts.shape
    starts = doc_starts.clone()
    starts[:, 0] = True
    index = torch.arange(seq, device=doc_starts.device).expand(batch, seq)
    position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
    flat = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([flat, flat.new_tensor([batch * seq])]).to(torch.int32)
    return position_ids, cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _documents_of_tokens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """The index of the document each of the batch·seq flattened tokens belongs to, as (batch, seq)."""
    tokens = torch.arange(batch * seq, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).view(batch, seq)


def default_position_ids(batch: int, seq: int, device: torch.device,
                         cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The positions a forward given none uses: 0..seq-1 in each row or, for packed documents (`cu_seqlens`),
    restarting at 0 in each, where each document alone has them (those `document_layout` gives)."""
    if cu_seqlens is None:
        return torch.arange(seq, device=device)[None].expand(batch, seq)
    doc = _documents_of_tokens(cu_seqlens, batch, seq)
    tokens = torch.arange(batch * seq, device=cu_seqlens.device).view(batch, seq)
    return (tokens - cu_seqlens.long()[doc]).to(device)


def packed_mask(cu_seqlens: torch.Tensor, batch: int, seq: int, max_seqlen: int, causal: bool = True) -> torch.Tensor:
    """The boolean (batch, 1, seq, seq) mask equivalent to `cu_seqlens`: nothing across documents and, when
    `causal`, causal within each (for backends without variable-length kernels). `cu_seqlens` and `max_seqlen`
    are checked as the varlen kernels check them, so a call refused there is not run here on some other mask."""
    check_documents(cu_seqlens, batch * seq, max_seqlen)
    doc = _documents_of_tokens(cu_seqlens, batch, seq)
    same_doc = doc[:, :, None] == doc[:, None, :]
    if causal:
        same_doc = same_doc & causal_mask(seq, seq, cu_seqlens.device)[0]
    return same_doc[:, None]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Explicit-softmax attention (fp32 softmax), the reference the fast backends are tested against.

    Masked scores get the most negative finite value added rather than -inf, as in transformers' eager
    path, so a query that may see no key averages all values instead of producing NaN, and (added, not
    filled in) passes gradients to its scores as transformers' does."""
    q_len, kv_len, heads, kv_heads = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = causal_mask(q_len, kv_len, q.device)
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    # scaled in the input dtype before the fp32 softmax, as transformers' eager attention does: bit-identical
    # to it in bf16/fp16 at every head_dim, not only where the scale is a power of two
    scores = (qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5).float()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores + (~mask).to(scores.dtype) * torch.finfo(scores.dtype).min
    elif mask is not None:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ vh).transpose(1, 2)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention; a causal call without a mask on unequal q/kv lengths gets an
    explicit bottom-right mask, since SDPA's `is_causal` aligns the triangle top-left."""
    q_len, kv_len = q.shape[1], k.shape[1]
    if mask is None and causal and q_len != kv_len:
        mask = causal_mask(q_len, kv_len, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        is_causal=causal and mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


@functools.cache
def flash_attn_module() -> types.ModuleType | None:
    """flash-attn's interface module, or None when the optional package is not installed. Cached: every
    attention call asks, and Python retries a failed import each time (about 34 us, a dozen times a forward)."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


@functools.cache
def _sm_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def flash_attn_usable(q: torch.Tensor) -> bool:
    """flash-attn runs here: installed, an sm80+ GPU, fp16/bf16 tensors, head_dim up to 256."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and _sm_major(q.device.index if q.device.index is not None else torch.cuda.current_device()) >= 8
            and flash_attn_module() is not None)


def requested_backend(backend: str) -> str:
    """`backend` as asked for: a config's "auto" defers to the TTL_ATTENTION environment variable (itself
    "auto" when unset). An unknown name is refused here, where it would otherwise fall through to SDPA."""
    if backend not in ATTENTION_CHOICES:
        raise ConfigError(f"attention backend must be one of {', '.join(ATTENTION_CHOICES)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("TTL_ATTENTION", "auto")
        if backend not in ATTENTION_CHOICES:
            raise ConfigError(f"TTL_ATTENTION must be one of {', '.join(ATTENTION_CHOICES)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that will run: "auto" (or the TTL_ATTENTION environment variable) picks flash-attn when
    usable, else SDPA. Our Triton kernel is opt-in ("triton") until GPU benchmarks show it ahead of SDPA."""
    backend = requested_backend(backend)
    if backend == "auto":
        return "flash_attn" if flash_attn_usable(q) else "sdpa"
    if backend == "triton" and q.shape[-1] not in HEAD_DIMS:
        raise ConfigError(f"attention backend 'triton' supports head_dim {', '.join(map(str, HEAD_DIMS))}, not "
                          f"{q.shape[-1]}; use 'sdpa' or 'eager' for this model")
    if backend == "triton" and q.dtype == torch.float64:  # else the kernel's own refusal names the kernels' switches
        raise ConfigError("attention backend 'triton' computes in float32: use 'sdpa' or 'eager' for a float64 model")
    if backend == "flash_attn" and not flash_attn_usable(q):
        raise ConfigError("attention backend 'flash_attn' needs the flash-attn package, an sm80+ GPU and fp16/bf16 "
                          f"tensors (got {q.dtype} on {q.device.type}, flash-attn "
                          f"{'installed' if flash_attn_module() else 'not installed'})")
    return backend


def runs_packed_natively(backend: str, head_dim: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `backend` resolves, for queries of `head_dim` in `dtype` on `device`, to a variable-length kernel
    (flash-attn or our Triton kernel) that runs `cu_seqlens` at the cost of the documents alone; elsewhere packed
    documents cost a block-diagonal mask over the whole row. Asks `resolve_backend` with an empty stand-in query,
    so the answer (and any ConfigError) is the one the first attention call would give."""
    probe = torch.empty(0, 0, 1, head_dim, device=device, dtype=dtype)
    return resolve_backend(backend, probe) in VARLEN_BACKENDS


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = True,
    backend: str = "auto", cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention by the chosen backend; returns (batch, q_len, heads, head_dim).

    `mask`, when given, already holds causality and padding; `causal` applies only without a mask.
    `cu_seqlens` / `max_seqlen` (from `document_layout`) treat the batch·seq tokens as packed documents that
    never attend to each other. flash-attn and our Triton kernel take unmasked (or packed) calls; a call
    with an explicit mask (padding, KV cache) goes to SDPA with them. `dropout_p` drops attention
    probabilities (training with a config's `attention_dropout`); our Triton kernel has no dropout."""
    backend = resolve_backend(backend, q)
    if dropout_p and backend == "triton":
        raise ConfigError("attention backend 'triton' has no attention dropout; train with attention_dropout=0 or "
                          "another backend")
    if mask is not None and cu_seqlens is not None:  # one of them would silently be ignored
        raise ConfigError("attention: got both a mask (attention_mask) and cu_seqlens; packed documents "
                          "(cu_seqlens) take no mask")
    if cu_seqlens is not None and max_seqlen is None:  # refused by every backend, not only the varlen kernels
        raise ConfigError("attention: got cu_seqlens without max_seqlen (the longest document); "
                          "ttl_core.attention.document_layout returns both")
    batch, seq = q.shape[:2]
    if cu_seqlens is not None:
        if backend in VARLEN_BACKENDS:
            flat = [t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)]
            if backend == "flash_attn":  # which trusts them: our Triton kernel checks its own
                check_documents(cu_seqlens, batch * seq, max_seqlen)
                out = flash_attn_module().flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                                 dropout_p=dropout_p, causal=causal)
            else:
                out = ttl_kernels.flash_attention(*flat, causal=causal, cu_seqlens=cu_seqlens,
                                                  max_seqlen=max_seqlen, backend="triton")
            return out.view(q.shape)
        mask = packed_mask(cu_seqlens, batch, seq, max_seqlen, causal)
    if mask is None and q.shape[1] == k.shape[1]:
        if backend == "flash_attn":
            return flash_attn_module().flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
        if backend == "triton":
            return ttl_kernels.flash_attention(q, k, v, causal=causal, backend="triton")
    if backend == "eager":
        return eager_attention(q, k, v, mask, causal, dropout_p)
    return sdpa_attention(q, k, v, mask, causal, dropout_p)
