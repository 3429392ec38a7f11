"""Rotary position embedding in the Hugging Face `rotate_half` layout."""

from __future__ import annotations

import torch


def _broadcast_angles(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # (seq, dim) or (batch, seq, dim) -> broadcastable against (batch, seq, heads, dim)
    return t[None, :, None, :] if t.dim() == 2 else t[:, :, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim) by the angles whose cos/sin
    are given per position, computed in the input dtype exactly as transformers does."""
    cos = _broadcast_angles(cos, q).to(q.dtype)
    sin = _broadcast_angles(sin, q).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to q and k; see `apply_rotary_reference` for the layout."""
    return apply_rotary_reference(q, k, cos, sin)
