"""Float64 truths for the cross-entropy kernels: the per-token loss written out, its reductions, and targets with
ignored rows (shared by test_cross_entropy.py and test_fused_linear_cross_entropy.py)."""

import torch

FLCE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # the fused loss's: matmul-bound
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(label_smoothing=0.2, z_loss=1e-2)]
OPTION_IDS = ["plain", "smooth", "zloss", "both"]


def targets_for(n, vocab, seed=0, ignored_every=5, device="cpu"):
    """`n` random class indices below `vocab`, every `ignored_every`-th one ignored (-100)."""
    t = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    t[::ignored_every] = -100
    return t


def formula(logits, targets, label_smoothing=0.0, z_loss=0.0):
    """Per-token loss written out independently: lse - (1-ε)·x_t - ε·mean(x) + z·lse², 0 where ignored."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != -100
    x_t = x.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * x_t - label_smoothing * x.mean(-1) + z_loss * lse**2
    return torch.where(valid, loss, torch.zeros_like(loss))


def reduce(per_token, targets, reduction):
    """The per-token losses reduced as the kernels do: a mean over the targets not ignored."""
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / (targets != -100).sum().clamp(min=1)
