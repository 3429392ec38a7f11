"""Rotary position embedding: the per-pair frequencies each `rope_scaling` type gives, and the module that turns
positions into the (cos, sin) every attention path rotates queries and keys with.

The frequencies follow transformers' `modeling_rope_utils` operation by operation, so they are its fp32 bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import LlamaConfig, yarn_factor


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim / 2,) in fp32, scaled as `config.rope_scaling` says. Computed on
    the CPU whatever the default device, as transformers computes them, so they are the same bits everywhere."""
    dim = config.head_dim
    wavelength_scale = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    inv_freq = 1.0 / wavelength_scale
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        blend = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - blend) * slowed / factor + blend * slowed
        in_between = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(in_between, smoothed, slowed)
    elif config.rope_type == "yarn":
        # YaRN: pairs that turn more than beta_fast times over the pretraining context keep their frequency, those
        # turning fewer than beta_slow times are slowed by `factor`, a linear ramp over the pair index in between
        old_len = scaling["original_max_position_embeddings"]
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times
            return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))

        first, last = pair_turning(fast), pair_turning(slow)
        if scaling.get("truncate", True):
            first, last = math.floor(first), math.ceil(last)
        # transformers clamps the end to head_dim - 1, not to the last pair; a zero-width ramp is widened a little
        first, last = max(first, 0), min(last, dim - 1)
        last = last + 0.001 if first == last else last
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - first) / (last - first)).clamp(0, 1)
        kept = 1 - ramp  # the blend weights written as transformers writes them: 1 - kept is not ramp's bits
        slowed = 1.0 / (yarn_factor(scaling, config.max_position_embeddings) * wavelength_scale)
        inv_freq = slowed * (1 - kept) + inv_freq * kept
    return inv_freq


def rope_attention_factor(config: LlamaConfig) -> float:
    """What cos and sin are multiplied by (1 but for YaRN): `attention_factor`, else YaRN's
    0.1 * mscale * ln(factor) + 1, as a ratio of the `mscale` and `mscale_all_dim` forms where both are set."""
    if config.rope_type != "yarn":
        return 1.0
    scaling = config.rope_scaling
    factor = yarn_factor(scaling, config.max_position_embeddings)
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]

    def mscale(weight: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]))
    return mscale(1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.attention_factor = rope_attention_factor(config)
        # Kept as the int32 bit pattern of the fp32 values: `model.to(torch.bfloat16)` casts floating
        # buffers, and rotary angles rounded to bf16 would drift from transformers' fp32 angles.
        self.register_buffer("inv_freq_bits", torch.empty(config.head_dim // 2, dtype=torch.int32), persistent=False)
        self.reset_inv_freq()

    def reset_inv_freq(self) -> None:
        """(Re)compute the frequencies (a no-op on the meta device). A new tensor, not an in-place copy: the
        buffer may have been made under `torch.inference_mode`, which forbids writing into it outside."""
        device = self.inv_freq_bits.device
        if device.type != "meta":
            self.inv_freq_bits = rope_inverse_frequencies(self.config).view(torch.int32).to(device)

    def _apply(self, fn, recurse: bool = True):
        # Every move goes through here, `to_empty` too: it leaves the buffer uninitialized after the model was
        # built on the meta device, and no state dict holds it, so neither init_weights nor load_state_dict
        # would fill it in.
        super()._apply(fn, recurse)
        self.reset_inv_freq()
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (batch, seq, head_dim) for integer positions (batch, seq), times the attention factor in
        fp32, then cast to `dtype`. Every attention path, the KV cache's angle table included, takes them from here."""
        freqs = position_ids[..., None].float() * self.inv_freq_bits.view(torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)
