"""Builders for small random transformers Llama models (built locally, never downloaded)."""

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
