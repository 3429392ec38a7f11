"""Builders for small random transformers Llama models (built locally, never downloaded), and the pieces of a
plain training loop written with transformers and torch that ttl's training runs are checked against."""

from __future__ import annotations

import torch
import transformers


def hf_config(**overrides) -> transformers.LlamaConfig:
    base = dict(vocab_size=131, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return transformers.LlamaConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Re-draw every parameter so activations are O(1): the default 0.02 init makes logits nearly zero,
    which would let real mismatches hide under the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_((1.0 + noise) if name.endswith("norm.weight") else noise)
    return model


def hf_causal_lm(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(hf_config(**overrides)), seed).eval()


def hf_classifier(seed: int = 0, **overrides) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForSequenceClassification(hf_config(**overrides)), seed).eval()


def reference_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """torch's AdamW with the norms and biases (by transformers' parameter names) exempt from weight decay."""
    named = list(model.named_parameters())
    exempt = [p for name, p in named if "norm" in name or "bias" in name]
    decayed = [p for name, p in named if not ("norm" in name or "bias" in name)]
    assert exempt and decayed
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": exempt, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def reference_lr(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """The lr of update `step` (from 1): a linear warmup to `lr` at step `warmup`, then transformers' cosine
    with a floor, one step behind (transformers numbers its first update 0)."""
    if step <= warmup:
        return lr * step / warmup
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(probe, warmup, max_steps, min_lr=min_lr)
    return schedule.lr_lambdas[0](step - 1) * lr


def assert_trained_as_closely_as_transformers(ours: dict, theirs: dict, exact: dict) -> None:
    """Weights ttl trained (`ours`) against the float64 run of the reference loop (`exact`), as flash-attn judges
    its kernels: no further from it than twice the float32 run of that loop (`theirs`) is, or 1e-5. A direct 1e-5
    against `theirs` would not do: AdamW divides each gradient by its own running scale, so a float32 rounding in
    a near-zero gradient moves its weight by up to lr times its relative error (two steps on ttl's Triton kernels
    put transformers' own float32 run 2e-5 from the float64 one)."""
    assert ours.keys() == exact.keys()
    for name, weight in ours.items():
        their_error = (theirs[name].double() - exact[name]).abs().max().item()
        assert (weight.double() - exact[name]).abs().max().item() <= max(1e-5, 2 * their_error), name
