"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RMSNorm, rounding exactly like transformers' `LlamaRMSNorm` (fp32 statistics, the
    normalized value cast back to the input dtype before the weight multiply). With `residual`, normalizes
    `x + residual` and also returns that sum."""
    if residual is not None:
        x = residual + x
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out, x) if residual is not None else out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
    *, backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; with `residual`, returns `(normed, x + residual)`."""
    return rms_norm_reference(x, weight, eps, residual)
