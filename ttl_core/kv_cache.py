"""The static KV cache generation decodes over, and the decoder that runs a causal LM on it: a prefill pass over
left-padded prompts, then one-token steps whose tensors keep their shapes and addresses, so that a step can be
captured in a CUDA graph (`ttl_core.decode_session`)."""

from __future__ import annotations

import functools
import inspect
import weakref

import torch

import ttl_kernels

from .attention import causal_mask, requested_backend
from .config import LlamaConfig
from .model import LlamaForCausalLM, autocast_dtype


@functools.cache
def _flash_attn_with_kvcache():
    """flash-attn's `flash_attn_with_kvcache`, or None when flash-attn is missing or older than 2.6 (the
    first release with `cache_leftpad`, which left-padded batches need). Cached: every layer of every decode
    step asks, and the import and signature check cost tens of microseconds."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache if "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters else None


class StaticKVCache:
    """Keys and values of every layer for `max_len` positions, allocated once and written in place.

    Implements the model's cache protocol: `update(layer_idx, qkv, cos, sin, backend)` rotates the new
    tokens' queries and keys, writes the keys and values at the positions in `write_index` (a device tensor,
    so a decode step keeps static shapes; on the Triton path in the rotary kernel itself) and returns the
    queries and the first `visible` cached positions in the model's (batch, seq, kv_heads, head_dim) layout.
    For SDPA the storage is (batch, kv_heads, max_len, head_dim) per layer, which SDPA reads without a copy.
    With `flash=True` the storage is flash-attn's (batch, max_len, kv_heads, head_dim) and, while `attends`
    is set, the model calls `attend()` instead, which appends and attends in one `flash_attn_with_kvcache`
    kernel (`seqlens`: the absolute cache lengths, `leftpad`: each row's left padding, int32 as flash-attn wants)."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 flash: bool = False):
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        shape = (batch, max_len, kv_heads, head_dim) if flash else (batch, kv_heads, max_len, head_dim)
        self.seq_dim = 1 if flash else 2
        # zeros, not empty: masked-out slots are still multiplied by a zero probability, and 0 * NaN is NaN
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.write_index: torch.Tensor | None = None
        self.visible = max_len
        self.attends = False
        self.seqlens = self.leftpad = None

    def update(self, layer_idx: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate the new tokens' fused projection (batch, new, heads + 2 * kv_heads, head_dim), write their
        keys and values at `write_index`; return the rotated queries and the cached keys and values."""
        keys, values = (store.transpose(1, 2) if self.seq_dim == 2 else store
                        for store in (self.keys[layer_idx], self.values[layer_idx]))
        q = ttl_kernels.rotary_into_cache(qkv, cos, sin, keys, values, self.write_index, backend=backend)
        return q, keys[:, :self.visible], values[:, :self.visible]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v at `seqlens` and attend q over each row's cache (flash layout only)."""
        return _flash_attn_with_kvcache()(q, self.keys[layer_idx], self.values[layer_idx], k=k, v=v,
                                          cache_seqlens=self.seqlens, cache_leftpad=self.leftpad, causal=True)


class KVDecoder:
    """Runs a causal LM over a `StaticKVCache`: `prefill(input_ids)` over left-padded prompts, then
    `step(tokens)` one token per row. Returns the last position's logits (batch, vocab) in the model's dtype.
    `verify(tokens)` and `accept(kept)` feed several tokens a row at once and keep the first of them (prompt lookup),
    `rewind(count)` forgets the last tokens fed (assisted decoding's draft model).

    Positions follow transformers: each row counts from 0 at its first real token (cumsum of the mask - 1).
    A decode step's tensors keep their shapes and addresses, so it can be captured in a CUDA graph, and
    `reset(attention_mask)` starts over with new prompts of the same shape in the same tensors."""

    def __init__(self, model: LlamaForCausalLM, attention_mask: torch.Tensor, max_new_tokens: int,
                 flash: bool | None = None):
        self.model_ref = weakref.ref(model)  # cached decoders (see DecodeSession) must not keep their model alive
        batch, prompt_len = attention_mask.shape
        device = attention_mask.device
        dtype = autocast_dtype(device.type) or model.lm_head.weight.dtype  # the projections' (the keys' and values')
        if flash is None:
            flash = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                     and requested_backend(model.config.attention) in ("auto", "flash_attn")
                     and _flash_attn_with_kvcache() is not None)
        self.flash = flash
        # a multiple of 16 keeps the mask rows aligned for SDPA's memory-efficient kernel; extra slots stay masked
        max_len = -(-(prompt_len + max_new_tokens) // 16) * 16
        self.prompt_len = prompt_len
        self.key_ok = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        # The decode steps' mask, additive (0 or -inf) in the model's dtype: SDPA turns a boolean mask into
        # that form in every layer's call, two kernels a layer. It starts with the prompt's real keys and
        # each step opens the column of its new token (one kernel).
        self.key_bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        self.key_index = torch.arange(max_len, device=device)
        # rotary (cos, sin) of every position the cache can hold, as the model computes them: a step gathers
        # its rows in one kernel instead of computing them in seven
        cos, sin = model.backbone.rotary(self.key_index[None], model.backbone.embed.weight.dtype)
        self.angle_table = torch.stack((cos[0], sin[0]), dim=1)  # (max_len, 2, head_dim)
        self.prompt_positions = torch.zeros(batch, prompt_len, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.decode_index = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = StaticKVCache(model.config, batch, max_len, device, dtype, flash=flash)
        if flash:
            self.cache.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
            self.cache.leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor) -> None:
        """Forget the cached prompts; the next `prefill` takes prompts padded as `attention_mask` says."""
        real = attention_mask.bool()
        self.key_ok[:, :self.prompt_len].copy_(real)
        self.key_bias.zero_().masked_fill_(~self.key_ok | (self.key_index >= self.prompt_len), float("-inf"))
        self.prompt_positions.copy_((real.long().cumsum(-1) - 1).clamp_min(0))
        self.position.copy_(self.prompt_positions[:, -1:] + 1)
        self.decode_index.fill_(self.prompt_len)
        for store in self.cache.keys + self.cache.values:
            store.zero_()  # masked slots are multiplied by zero probabilities: keep NaN from older calls out
        if self.flash:
            self.cache.seqlens.fill_(self.prompt_len)
            self.cache.leftpad.copy_((~real).sum(-1))

    def prefill(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the cache with the prompts (their ids, or their embeddings `inputs_embeds`, which then stand in for
        the ids); logits of each row's next token."""
        cache, n, device = self.cache, self.prompt_len, self.key_ok.device
        cache.write_index = torch.arange(n, device=device)
        cache.visible, cache.attends = n, False
        # A padding query may attend itself: a query with no key at all makes some SDPA kernels return NaN,
        # which would land in the cache; real queries never see padding keys either way.
        mask = causal_mask(n, n, device, key_padding=self.key_ok[:, :n])
        mask = mask | torch.eye(n, dtype=torch.bool, device=device)
        logits = self.model_ref()(None if inputs_embeds is not None else input_ids, attention_mask=mask,
                                  position_ids=self.prompt_positions, kv_cache=cache, logits_to_keep=1,
                                  inputs_embeds=inputs_embeds).logits[:, -1]
        cache.write_index = self.decode_index
        cache.visible, cache.attends = cache.max_len, self.flash
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (batch, 1) at the next position; logits of the token after it."""
        # every row sees at least its new token, so no row of this additive mask is all -inf
        self.key_bias.index_fill_(1, self.decode_index, 0.0)
        angles = self.angle_table[self.position]  # (batch, 1, 2, head_dim)
        logits = self.model_ref()(tokens, attention_mask=self.key_bias[:, None, None, :], position_ids=self.position,
                                  kv_cache=self.cache, logits_to_keep=1, angles=angles.unbind(2)).logits[:, -1]
        self.decode_index.add_(1)
        self.position.add_(1)
        if self.flash:
            self.cache.seqlens.add_(1)
        return logits

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (batch, n) at the next n positions in one pass, each seeing the cache and the tokens before
        it; logits after each of them (batch, n, vocab). Their keys and values are written but stay masked until
        `accept` keeps the first of them (the rest are overwritten later). Not in the flash-attn layout, whose
        kernel reads its own lengths instead of the mask."""
        if self.flash:
            raise ValueError("KVDecoder.verify needs the SDPA cache layout: build the decoder with flash=False")
        n = tokens.shape[1]
        slots = self.decode_index + torch.arange(n, device=tokens.device)
        # query i sees the open keys and the new slots up to its own: causal among the new tokens
        own = (self.key_index >= self.decode_index) & (self.key_index <= slots[:, None])  # (n, max_len)
        bias = self.key_bias[:, None, :].masked_fill(own, 0.0)
        positions = self.position + slots - self.decode_index
        self.cache.write_index = slots
        try:
            return self.model_ref()(tokens, attention_mask=bias[:, None], position_ids=positions, kv_cache=self.cache,
                                    angles=self.angle_table[positions].unbind(2)).logits
        finally:
            self.cache.write_index = self.decode_index

    def accept(self, kept: int) -> None:
        """Keep the first `kept` tokens of the last `verify` in the cache, as if `step` had fed them."""
        self.key_bias[:, self.decode_index:self.decode_index + kept] = 0.0
        self.decode_index.add_(kept)
        self.position.add_(kept)

    def rewind(self, count: int) -> None:
        """Forget the last `count` tokens fed (an assistant's rejected drafts): their slots are masked again and
        the next tokens overwrite them."""
        self.decode_index.sub_(count)
        self.position.sub_(count)
        self.key_bias[:, self.decode_index:self.decode_index + count] = float("-inf")
