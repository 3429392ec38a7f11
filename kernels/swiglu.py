"""SwiGLU activation: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU, as transformers' Llama MLP computes it."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up."""
    return swiglu_reference(gate, up)
