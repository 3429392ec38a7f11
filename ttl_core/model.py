"""The Llama architecture (TeenyTinyLlama): causal LM and sequence classifier in one readable file.

Projections are fused (q/k/v in one matrix, gate/up in another) so each needs one matmul; `ttl_core.hf`
splits and joins them when reading or writing Hugging Face checkpoints. Numerics follow transformers'
`LlamaForCausalLM` step by step, so the PyTorch path reproduces its logits to fp32 rounding.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import ttl_kernels

from .attention import attention, causal_mask, default_position_ids, packed_mask, runs_packed_natively
from .config import LlamaConfig, padding_index
from .errors import CheckpointError, ConfigError, GenerationError, is_integer
from .generate_output import GenerateOutput, GenerationSettings
from .model_io import (KVCache, ModelOutput, causal_lm_loss, check_inputs, classification_loss, next_token_targets,
                       parameters_device, parameters_dtype)
from .rope import RotaryEmbedding
from .vocab_resize import requested_vocab_size, resized_embedding, resized_head


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives matmul outputs on this device type; None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel_backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.kernel_backend = eps, kernel_backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without a residual, (norm(x), x). Under autocast the
        normed output comes in the autocast dtype: every consumer is a matmul that would cast it so."""
        normed = ttl_kernels.rms_norm(x, self.weight, self.eps, residual=residual,
                                      out_dtype=autocast_dtype(x.device.type), backend=self.kernel_backend)
        return (normed, x) if residual is None else normed


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                             bias=config.attention_bias)
        self.out = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.kernel_backend = config.kernels
        self.attention_backend = config.attention
        self.attention_dropout = config.attention_dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        kv_cache: KVCache | None = None, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, self.heads + 2 * self.kv_heads, self.head_dim)
        cache_attends = kv_cache is not None and kv_cache.attends  # appends and attends in one kernel (flash-attn)
        if kv_cache is None or cache_attends:
            q, k, v = ttl_kernels.apply_rotary_qkv(qkv, cos, sin, self.kv_heads, backend=self.kernel_backend)
        else:  # the new keys are rotated straight into the cache
            q, k, v = kv_cache.update(self.layer_idx, qkv, cos, sin, self.kernel_backend)
        if cache_attends:
            out = kv_cache.attend(self.layer_idx, q, k, v)
        else:
            out = attention(q, k, v, mask=mask, causal=True, backend=self.attention_backend, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out(out.reshape(batch, seq, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.kernel_backend = config.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ttl_kernels.swiglu(self.gate_up(x), backend=self.kernel_backend))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.mlp = MLP(config)
        self.gradient_checkpointing = False  # set by the model's activation_checkpointing_enable()

    def forward(
        self, delta: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None, kv_cache: KVCache | None = None, cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous sublayer's output and the residual stream before it; returns the same pair
        for this block, so each residual add fuses into the next RMSNorm."""
        if self.gradient_checkpointing and self.training:
            # in the block's own frame, not around its call: `block.compile()` traces from here and compiles the
            # checkpoint with the block, while a compiled block called under a checkpoint silently runs eager
            return checkpoint(self.sublayers, delta, residual, cos, sin, mask, kv_cache, cu_seqlens, max_seqlen,
                              use_reentrant=False)
        return self.sublayers(delta, residual, cos, sin, mask, kv_cache, cu_seqlens, max_seqlen)

    def sublayers(
        self, delta: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None, kv_cache: KVCache | None = None, cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.attn_norm(delta, residual)
        delta = self.attn(x, cos, sin, mask, kv_cache, cu_seqlens, max_seqlen)
        x, residual = self.mlp_norm(delta, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embedding, decoder blocks and final norm: token ids (or their embeddings) in, final hidden states out."""

    device, dtype = property(parameters_device), property(parameters_dtype)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # As in transformers, the pad token's embedding row receives no gradient.
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size,
                                  padding_idx=padding_index(config.pad_token_id, config.vocab_size))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.rotary = RotaryEmbedding(config)
        self.init_weights()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> LlamaModel:
        """The decoder of the checkpoint at `path`, its head left out, as transformers' `LlamaModel.from_pretrained`
        (or `AutoModel`) loads it for embeddings: `ttl_core.load_pretrained(path, **kwargs).backbone`."""
        from .hf import load_pretrained  # hf.py imports this module
        return load_pretrained(path, **kwargs).backbone

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize as transformers does, in its order (a fused projection piece by piece: q, k, v; gate, up),
        after as many draws at construction, so after the same `torch.manual_seed` the weights are transformers'
        to the bit: normal(0, initializer_range), zero biases and pad row, norm weights 1."""
        c = self.config
        pieces = {"qkv": [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2,
                  "gate_up": [c.intermediate_size] * 2}
        for name, module in self.named_modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                for piece in module.weight.split(pieces.get(name.rsplit(".", 1)[-1], len(module.weight))):
                    piece.normal_(0.0, c.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, RMSNorm):  # reset too when a trained model is re-initialized (transformers does)
                module.weight.fill_(1.0)
        if self.embed.padding_idx is not None:
            self.embed.weight[self.embed.padding_idx] = 0.0

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None, inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False, use_cache: bool | None = None, return_dict: bool | None = True,
    ) -> ModelOutput | tuple:
        """`last_hidden_state` (batch, seq, hidden), the final norm's output (under autocast in its dtype, where
        transformers' stays float32), and, with `output_hidden_states`, `hidden_states` as transformers gives them:
        the embeddings, each block's output but the last, and `last_hidden_state` (num_hidden_layers + 1 tensors);
        `return_dict=False` gives a tuple. `use_cache` may be False (or None): `ttl_core.generate` keeps the cache.

        Takes `input_ids` (batch, seq) or, instead, their embeddings `inputs_embeds` (batch, seq, hidden).
        `attention_mask` is either (batch, kv_len) with 1 on real tokens (a causal mask is built, the
        queries being the last `seq` positions) or a ready (batch, 1, seq, kv_len) mask, boolean or additive
        (see `ttl_core.attention`).
        `position_ids` default to 0..seq-1, restarting in each `cu_seqlens` document; they only place the rotary angles
        and never split a row into documents (transformers does that from non-consecutive positions when it runs without
        a cache; here packed documents are `cu_seqlens`, see `LlamaForCausalLM.forward`). `kv_cache`, if given, has an
        `attends` flag and `update(layer_idx, qkv, cos, sin, kernel_backend)` taking the new tokens' fused projection
        and returning the rotated queries and the keys and values to attend over, or, while `attends` is true,
        `attend(layer_idx, q, k, v)` returning the attention output itself (see `ttl_core.kv_cache.StaticKVCache`).
        `angles`, if given, are the rotary (cos, sin) of the positions (batch, seq, head_dim) computed beforehand (a
        decoder gathers them from a table: one kernel a step instead of seven)."""
        check_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids, kv_cache is not None,
                     output_hidden_states, use_cache)
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        batch, seq = inputs.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(batch, seq, inputs.device, cu_seqlens)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:
            mask = causal_mask(seq, mask.shape[1], inputs.device, key_padding=mask)
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if cu_seqlens is not None and mask is None and max_seqlen is not None:  # else attention() refuses the call
            # SDPA and eager take packed documents as a (batch, 1, seq, seq) mask: built here once, not in every
            # layer (and again in each checkpointed layer's recomputation); the queries come in autocast's dtype
            query_dtype = autocast_dtype(hidden.device.type) or hidden.dtype
            if not runs_packed_natively(self.config.attention, self.config.head_dim, hidden.device, query_dtype):
                mask, cu_seqlens, max_seqlen = packed_mask(cu_seqlens, batch, seq, max_seqlen), None, None
        cos, sin = angles if angles is not None else self.rotary(position_ids, hidden.dtype)
        residual = None
        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:  # a block's output is the residual stream, whose add ttl fuses into the next norm
                hidden_states.append(hidden if residual is None else hidden + residual)
            hidden, residual = layer(hidden, residual, cos, sin, mask, kv_cache, cu_seqlens, max_seqlen)
        hidden = self.norm(hidden, residual)[0]
        out = ModelOutput(last_hidden_state=hidden,
                          hidden_states=(*hidden_states, hidden) if output_hidden_states else None)
        return out.returned(return_dict)


def _output_requires_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    output.requires_grad_(True)


class _LlamaBase(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.backbone = LlamaModel(config)
        # as transformers, a model that generates starts from its config's token ids; a checkpoint's file replaces them
        generates = self.architecture == "LlamaForCausalLM"
        self.generation_config = GenerationSettings.from_model_config(config) if generates else None
        self._input_require_grads_hook = None

    @property
    def generation_config(self) -> GenerationSettings | None:
        """A causal LM's generation settings (token ids, sampling defaults): its checkpoint's generation_config.json as
        ttl_core.hf loaded it, else, as in transformers, those of its config; None for a classifier. A dict whose
        settings are also read and set as attributes, as transformers' GenerationConfig's are (see
        `ttl_core.generate_output.GenerationSettings`); transformers' GenerationConfig may be assigned."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, settings: Any) -> None:
        self._generation_config = GenerationSettings.assigned(settings)

    device, dtype = property(parameters_device), property(parameters_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every weight as transformers does: the backbone's, then the head's (a tied one is drawn once)."""
        self.backbone.init_weights()
        head = self.get_output_embeddings() or self.score
        if head.weight is not self.backbone.embed.weight:
            head.weight.normal_(0.0, self.config.initializer_range)

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head when the config asks for it (no-op otherwise)."""

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.embed

    def set_input_embeddings(self, embedding: nn.Module) -> None:
        """As in transformers, a tied LM head keeps the table it had until `tie_weights()` ties it to this one."""
        self.backbone.embed = embedding

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head; None for a classifier, as in transformers."""
        return getattr(self, "lm_head", None)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1) -> None:
        """Recompute the activations of every `every_n_layers`-th decoder block (from the first) in the backward
        instead of storing them, in training mode, as transformers does (non-reentrant `torch.utils.checkpoint`,
        the only kind taken). The gradients are those without, bit for bit; parameter names are unchanged."""
        if activation_checkpointing_kwargs not in (None, {}, {"use_reentrant": False}):
            raise ConfigError(f"activation checkpointing takes only {{'use_reentrant': False}}, got "
                              f"{activation_checkpointing_kwargs}")
        if not is_integer(every_n_layers) or every_n_layers < 1:
            raise ConfigError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        for index, block in enumerate(self.backbone.layers):
            block.gradient_checkpointing = index % every_n_layers == 0

    def activation_checkpointing_disable(self) -> None:
        for block in self.backbone.layers:
            block.gradient_checkpointing = False

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(block.gradient_checkpointing for block in self.backbone.layers)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1) -> None:
        """transformers' older name for `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers)

    gradient_checkpointing_disable = activation_checkpointing_disable
    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, as transformers does, so that a frozen model trained
        through adapters (PEFT's recipe calls this) still backpropagates through its blocks."""
        self.disable_input_require_grads()
        self._input_require_grads_hook = self.get_input_embeddings().register_forward_hook(_output_requires_grad)

    def disable_input_require_grads(self) -> None:
        if self._input_require_grads_hook is not None:
            self._input_require_grads_hook.remove()
            self._input_require_grads_hook = None

    def resize_token_embeddings(self, new_vocab_size: int | None = None,
                                pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Change the vocabulary size (e.g. after adding special tokens) as transformers does by default: existing
        rows keep their values, new input-embedding and LM-head rows are drawn close around the mean of the existing
        ones (see `ttl_core.vocab_resize`), with the same draws, so after the same seed they are transformers' rows. A
        table already of that size is kept as it is. `pad_to_multiple_of` rounds the size (the current one when
        `new_vocab_size` is None) up to a multiple of it; with neither, nothing changes. Returns the input embedding."""
        new_vocab_size = requested_vocab_size(new_vocab_size, self.config.vocab_size, pad_to_multiple_of)
        if new_vocab_size is None:
            return self.get_input_embeddings()
        # as transformers, each table of another size is replaced: a new one of the same size would draw its init
        # from the global RNG for nothing (moving what is drawn next off transformers' draws)
        if self.backbone.embed.num_embeddings != new_vocab_size:
            self.backbone.embed = resized_embedding(self.backbone.embed, new_vocab_size, self.config.pad_token_id)
            if self._input_require_grads_hook is not None:  # it was on the old table (transformers keeps its module)
                self.enable_input_require_grads()
        head = getattr(self, "lm_head", None)
        if head is not None and not self.config.tie_word_embeddings and len(head.weight) != new_vocab_size:
            self.lm_head = resized_head(head, new_vocab_size)
        self.config = self.backbone.config = self.config.replace(vocab_size=new_vocab_size)
        self.tie_weights()
        return self.get_input_embeddings()

    def num_parameters(self, only_trainable: bool = False, *, exclude_embedding: bool = False) -> int:
        """Distinct parameters (`only_trainable`: those that require grad, as in transformers); `exclude_embedding`
        leaves out the input embedding table (for MFU; unlike transformers' `exclude_embeddings`, a tied head
        counts)."""
        params = {id(p): p for p in self.parameters() if p.requires_grad or not only_trainable}
        embed, head = self.backbone.embed.weight, self.get_output_embeddings()
        if exclude_embedding and not (head is not None and head.weight is embed):  # a tied head still does a matmul
            params.pop(id(embed), None)
        return sum(p.numel() for p in params.values())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> _LlamaBase:
        """`ttl_core.load_pretrained(path, architecture=this class, **kwargs)`, called as transformers' classes are:
        `LlamaForSequenceClassification.from_pretrained(causal_lm_dir, num_labels=3)` starts a classifier."""
        from .hf import load_pretrained  # hf.py imports this module
        return load_pretrained(path, architecture=cls.architecture, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, safe_serialization: bool = True, **kwargs: Any) -> None:
        """`ttl_core.save_pretrained(self, path, **kwargs)`: a directory transformers loads, in safetensors (older
        transformers code passes `safe_serialization=True`)."""
        if safe_serialization is not True:
            raise CheckpointError(f"safe_serialization={safe_serialization!r}: ttl writes safetensors only")
        from .hf import save_pretrained
        save_pretrained(self, path, **kwargs)


class LlamaForCausalLM(_LlamaBase):
    """Llama with an LM head. `model(ids, labels=labels).loss` is the shifted next-token loss."""

    architecture = "LlamaForCausalLM"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # drawn even if tied next, as transformers does, so that later draws (dropout, LoRA) are transformers' too
        nn.init.normal_(self.lm_head.weight, 0.0, config.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed.weight
            self.lm_head.out_features = len(self.lm_head.weight)  # as transformers: else its repr names the old size

    def untie_embeddings(self) -> None:
        """Give the LM head its own copy of a shared input embedding; the config then says untied."""
        embed = self.backbone.embed.weight
        if self.lm_head.weight is embed:
            self.lm_head.weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
        self.config = self.backbone.config = self.config.replace(tie_word_embeddings=False)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        logits_to_keep: int | torch.Tensor = 0, return_logits: bool = False, loss_reduction: str = "mean",
        targets: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None, inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False, use_cache: bool | None = None, return_dict: bool | None = True,
        z_loss: float = 0.0, label_smoothing: float = 0.0,
    ) -> ModelOutput | tuple:
        """Logits (batch, seq, vocab) without labels; with integer labels (batch, seq, -100 ignored) the mean loss
        of predicting token t+1 at position t, computed by the fused linear cross-entropy so the logits
        are never built unless `return_logits`. `logits_to_keep=n` keeps only the last n positions (a 1-d tensor:
        the positions it indexes, as in transformers).
        `loss_reduction="sum"` returns the summed loss (for exact gradient accumulation). `targets` are
        labels already shifted (the token to predict at each position, as a packed data loader yields
        them) and replace `labels`. `cu_seqlens` / `max_seqlen` (see `ttl_core.attention.document_layout`) pack
        several documents per row that do not attend to each other (positions restart in each). `angles`,
        `inputs_embeds` (in place of `input_ids`), `output_hidden_states`, `use_cache` and `return_dict`: see
        `LlamaModel.forward`. `z_loss` > 0 adds z_loss * logsumexp(logits)**2 per target to the loss (PaLM's z-loss),
        and that part alone, reduced alike, is the output's `z_loss`; `label_smoothing` > 0 smooths the targets as
        torch's `F.cross_entropy(label_smoothing=)` does, the unsmoothed cross-entropy then being the output's `nll`."""
        base = self.backbone(input_ids, attention_mask, position_ids, kv_cache, cu_seqlens, max_seqlen, angles,
                             inputs_embeds, output_hidden_states, use_cache)
        hidden = base.last_hidden_state
        loss = logits = z_part = nll = None
        if labels is not None or targets is not None:
            targets = next_token_targets(labels, targets, hidden.shape[:2], hidden.device)
            loss, z_part, nll = causal_lm_loss(hidden, self.lm_head.weight, targets, loss_reduction, label_smoothing,
                                               z_loss, self.config.kernels)
        if loss is None or return_logits:
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # -0: all
            logits = self.lm_head(hidden[:, kept])
        out = ModelOutput(logits=logits, loss=loss, hidden_states=base.hidden_states, z_loss=z_part, nll=nll)
        return out.returned(return_dict)

    def generate(self, inputs: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 input_ids: torch.Tensor | None = None, **settings):
        """`ttl_core.generate(self, prompt, attention_mask, **settings)`, as transformers' `model.generate`, which
        names the prompt `inputs` and takes it as `input_ids` too (the tokenizer's dict unpacked), never both."""
        if inputs is not None and input_ids is not None:
            raise GenerationError("generate() got both `inputs` and `input_ids`: pass the prompt as one of them")
        from .generate import generate  # generate.py imports this module
        return generate(self, input_ids if inputs is None else inputs, attention_mask, **settings)

    def compute_transition_scores(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                                  beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """transformers' name for the `transition_scores` of a generate() output, given its fields."""
        output = GenerateOutput(sequences, tuple(scores), beam_indices=beam_indices)
        return output.transition_scores(normalize_logits)


class LlamaForSequenceClassification(_LlamaBase):
    """Llama with a bias-free `score` head, pooled at each sequence's last non-pad token like transformers."""

    architecture = "LlamaForSequenceClassification"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, 0.0, config.initializer_range)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
        inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False, use_cache: bool | None = None,
        return_dict: bool | None = True, label_smoothing: float = 0.0,
    ) -> ModelOutput | tuple:
        """Pooled logits (sequences, num_labels): one sequence per row, or, packed, the sequences that `cu_seqlens` /
        `max_seqlen` delimit in the flattened tokens (see `ttl_core.attention.document_layout`; positions restart in
        each), each pooled where its own padded row would be. Loss: MSE for one label (regression), cross-entropy for
        integer labels, BCE-with-logits for float multi-label targets (or as `config.problem_type` says), the mean over
        sequences (labels of another shape than one per sequence, or for several regression or multi-label outputs the
        logits', are a ConfigError); `label_smoothing` > 0 smooths the cross-entropy's targets, the unsmoothed one then
        being the output's `nll`. The first loss records the problem type it inferred in `config.problem_type`, as
        transformers does. Given `inputs_embeds`, which show no pad token, each sequence is pooled at its last position,
        as transformers pools them (it warns; so does ttl). The other arguments: see `LlamaModel.forward`."""
        base = self.backbone(input_ids, attention_mask, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                             inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                             use_cache=use_cache)
        token_logits = self.score(base.last_hidden_state)  # every position, as transformers does: identical rounding
        batch, seq = token_logits.shape[:2]
        if cu_seqlens is None:
            if self.config.pad_token_id is None and batch != 1:
                raise ConfigError("pad_token_id is None: sequence classification of a batch > 1 needs it")
            cu_seqlens = torch.arange(0, batch * seq + 1, seq, device=token_logits.device)  # a sequence per row
        if inputs_embeds is not None and self.config.pad_token_id is not None:
            warnings.warn("inputs_embeds show no pad token: each sequence is pooled at its last position, as "
                          "transformers pools them; pass input_ids to pool at the last token that is not padding")
        cu_seqlens = cu_seqlens.long()
        last_tokens = cu_seqlens[1:] - 1 if input_ids is None else self._pooled_tokens(input_ids.flatten(), cu_seqlens)
        logits = token_logits.flatten(0, 1)[last_tokens]
        labelled = labels is not None
        loss, nll = classification_loss(self.config, logits, labels, label_smoothing) if labelled else (None, None)
        out = ModelOutput(logits=logits, loss=loss, hidden_states=base.hidden_states, nll=nll)
        return out.returned(return_dict)

    def _pooled_tokens(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Index into the flat `ids` of the token each sequence is pooled at: transformers' argmax of position *
        (token != pad), i.e. the last token that is not the pad id, or the first when no later one is (without
        a pad id, the last token)."""
        pad = self.config.pad_token_id
        candidate = torch.ones_like(ids, dtype=torch.bool) if pad is None else ids != pad
        candidate[cu_seqlens[:-1]] = True  # the argmax of all zeros: the first position
        # a running max of the candidates' indices holds, at a sequence's end, its own last candidate: those of the
        # sequences before it all lie below its first token
        tokens = torch.arange(ids.numel(), device=ids.device)
        return torch.where(candidate, tokens, 0).cummax(0).values[cu_seqlens[1:] - 1]

def build_model(config: LlamaConfig, architecture: str = "LlamaForCausalLM") -> _LlamaBase:
    """The model class named by a transformers `architectures` entry."""
    classes = {cls.architecture: cls for cls in (LlamaForCausalLM, LlamaForSequenceClassification)}
    if architecture not in classes:
        raise ConfigError(f"unknown architecture {architecture!r}; ttl builds {', '.join(classes)}")
    return classes[architecture](config)
