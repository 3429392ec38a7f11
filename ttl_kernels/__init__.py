"""Triton kernels for ttl, each beside its plain-PyTorch reference. Tensors in, tensors out: this package
knows nothing of models. (Not named `kernels`: that import name is Hugging Face's kernel-hub package, which
transformers >= 5.25 installs and imports.)"""

from .cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .flash_attention import flash_attention, flash_attention_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_qkv, apply_rotary_reference, rotary_into_cache
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "apply_rotary", "apply_rotary_qkv", "apply_rotary_reference", "cross_entropy", "cross_entropy_reference",
    "flash_attention", "flash_attention_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "rms_norm", "rms_norm_reference",
    "rotary_into_cache", "swiglu", "swiglu_reference",
]
