"""Shared pieces of the LoRA tests: ttl copies of transformers models, adapters that are not a no-op, inputs."""

from __future__ import annotations

import peft
import torch

import ttl_core

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def to_ttl(hf_model, tmp_path, name="base"):
    hf_model.save_pretrained(tmp_path / name)
    return ttl_core.load_pretrained(tmp_path / name).eval()


def randomize_lora_(model, seed: int, scale: float = 0.2) -> None:
    """Non-zero B (and fresh A) so the adapter changes the output and a wrong mapping cannot hide; DoRA magnitudes
    move off their initial row norms by factors 1 + N(0, scale^2), as training moves them (drawn near zero instead,
    merging would scale rows by almost nothing, and unmerging divide by it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + torch.randn(p.shape, generator=gen) * scale)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def saved_peft_adapter(hf_model, directory, seed: int, **options):
    """PEFT's LoRA model of `hf_model` (rank 4, no dropout, a causal LM unless `options` say otherwise) with random
    adapter weights drawn from `seed`, saved in `directory`."""
    theirs = peft.get_peft_model(hf_model, peft.LoraConfig(**{"r": 4, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
                                                               **options}))
    randomize_lora_(theirs, seed)
    theirs.save_pretrained(directory)
    return theirs


def scale_saved_modules_(model, factor: float = 1.5) -> None:
    """Move PEFT's modules_to_save copies away from the base's weights, so an adapter that drops them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.mul_(factor)


def ids(batch=2, seq=9, vocab=131, seed=1):
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
