"""The models' arguments checked (each mistake named in one line), their outputs and the classifier's loss as
transformers gives them, the causal LM's loss with the parts of it logged apart, and the device and dtype that
transformers' programs read off a model."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

import ttl_kernels
from ttl_kernels.cross_entropy import check_label_smoothing

from .config import LlamaConfig
from .errors import ConfigError


class KVCache(Protocol):
    """What the model asks of a key/value cache (generation's `StaticKVCache` is one): `update` rotates the new
    tokens' fused projection (batch, new, heads + 2 * kv_heads, head_dim), stores their keys and values and returns
    the queries with the keys and values to attend over; while `attends` is set, the model calls `attend` instead,
    which appends the new keys and values and attends in one kernel."""

    attends: bool

    def update(self, layer_idx: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModelOutput:
    """`loss` is None without labels; `logits` is None when a loss was computed without `return_logits`;
    `last_hidden_state` is set by `LlamaModel` only; `hidden_states` only when `output_hidden_states=True`.

    Indexed like transformers' outputs, so code written for them runs unchanged: `out[0]` is the first field
    that is not None in the order (loss, logits, last_hidden_state, hidden_states), which is transformers' order
    for a causal LM, a classifier and a base model alike (ttl never returns a cache, so the positions are those
    transformers gives with `use_cache=False`); `out["logits"]` is a field by name; `keys()`, `in` and iteration
    see the fields that are set, as on their dicts."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    z_loss: torch.Tensor | None = None  # the z-loss part of `loss`, when the call asked for one
    nll: torch.Tensor | None = None  # the cross-entropy without label smoothing or z-loss, beside a smoothed `loss`

    def keys(self) -> list[str]:
        """The names of the fields that are set, in order (transformers' outputs are dicts of those)."""
        return [field.name for field in fields(self) if getattr(self, field.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.keys())

    def returned(self, return_dict: bool | None) -> ModelOutput | tuple[Any, ...]:
        """This output as a forward returns it: the tuple for `return_dict=False`, else itself (None stands for
        transformers' config default, which is the output object)."""
        return self if return_dict is None or return_dict else self.to_tuple()

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    # as a dict's: without these, `"logits" in out` and `for key in out` would go through __getitem__ with integers,
    # comparing the name to the tensors (always False) and yielding the tensors
    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


def check_inputs(config: LlamaConfig, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cached: bool,
                 output_hidden_states: bool, use_cache: bool | None) -> None:
    """Raise a ConfigError naming the first argument of `LlamaModel.forward` whose shape or kind does not fit."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ConfigError("pass exactly one of input_ids and inputs_embeds")
    given, inputs = ("input_ids", input_ids) if inputs_embeds is None else ("inputs_embeds", inputs_embeds)
    if input_ids is not None and input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ConfigError(f"inputs_embeds must be (batch, seq, hidden_size), got shape {tuple(inputs_embeds.shape)}")
    if not isinstance(output_hidden_states, bool):  # transformers also takes indices: not supported here
        raise ConfigError(f"output_hidden_states must be True or False, got {output_hidden_states!r}")
    if use_cache:
        raise ConfigError("use_cache=True: the model's forward keeps no cache; ttl_core.generate decodes with its own "
                          "static KV cache")
    batch, seq = inputs.shape[:2]
    if position_ids is not None and not _positions_fit(position_ids, batch, seq):
        raise ConfigError(f"position_ids shape {tuple(position_ids.shape)} does not fit {given} shape "
                          f"{tuple(inputs.shape)}: (batch or 1, seq) or (seq,)")
    mask = attention_mask
    if mask is not None:
        # a mask longer than the row also covers the keys already in the KV cache; a 4-d one may broadcast
        keys = mask.shape[-1] if mask.dim() in (2, 4) else -1  # -1: other ranks fit nothing
        keys_fit = keys == seq or cached and keys > seq
        if mask.dim() == 2:
            rows_fit = mask.shape[0] == batch
        else:  # (batch, heads, queries): each may be 1 and broadcast
            rows_fit = mask.dim() == 4 and all(
                size in (1, full) for size, full in zip(mask.shape[:3], (batch, config.num_attention_heads, seq)))
        if not (keys_fit and rows_fit):
            raise ConfigError(f"attention_mask shape {tuple(mask.shape)} does not fit {given} shape "
                              f"{tuple(inputs.shape)}: (batch, seq) or (batch, 1, seq, seq), longer only "
                              "over cached keys")
        if mask.dim() == 4 and not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise ConfigError(f"a 4-d attention_mask must be boolean (True attends) or additive (0 or -inf), "
                              f"got {mask.dtype}")


def _positions_fit(position_ids: torch.Tensor, batch: int, seq: int) -> bool:
    """(seq,), or (batch, seq) / (1, seq), which broadcasts over the batch."""
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seq:
        return False
    return position_ids.dim() == 1 or position_ids.shape[0] in (1, batch)


def next_token_targets(labels: torch.Tensor | None, targets: torch.Tensor | None, batch_seq: tuple[int, int],
                       device: torch.device) -> torch.Tensor:
    """The int64 token to predict at each position (-100 ignored) of a causal LM, on the logits' `device` (as
    transformers moves labels kept on the CPU): `targets` as given, else `labels` shifted left by one with the last
    position ignored. Raise a ConfigError naming the argument whose shape is not (batch, seq) or whose dtype is not an
    integer one (transformers refuses float labels too)."""
    name, given = ("targets", targets) if targets is not None else ("labels", labels)
    if given.shape != batch_seq:
        raise ConfigError(f"{name} shape {tuple(given.shape)} != (batch, seq) {tuple(batch_seq)}")
    if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
        raise ConfigError(f"{name} must be integer token ids, got {given.dtype}")
    # widened before the -100 padding, which no uint8 holds; nor can a uint8 label hold -100 (written into one it
    # wraps to 156, a token id), so with uint8 labels every position is a class but the shifted-out last one
    given = given.to(device, torch.long)
    return given if targets is not None else F.pad(given[:, 1:], (0, 1), value=-100)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                   label_smoothing: float, z_loss: float, backend: str) -> tuple[torch.Tensor, ...]:
    """The LM head's fused cross-entropy of `hidden` (batch, seq, hidden_size) against `targets` (batch, seq), with
    its z-loss part when `z_loss` > 0 and the negative log-likelihood of the targets when `label_smoothing` > 0
    (each else None), all from one pass over the logits and reduced alike."""
    asked = (z_loss != 0, label_smoothing != 0)  # a bad value (None, negative) asked too: the kernel names it
    result = ttl_kernels.fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, return_z_loss=asked[0], return_nll=asked[1], backend=backend)
    loss, *parts = result if any(asked) else (result,)  # the parts asked for, in the order of `asked`
    return loss, *(parts.pop(0) if wanted else None for wanted in asked)


def classification_loss(config: LlamaConfig, logits: torch.Tensor, labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sequence classifier's loss, chosen as transformers chooses it: MSE for one label (regression),
    cross-entropy for integer labels, BCE-with-logits for float multi-label targets, or as `config.problem_type`
    says; and with `label_smoothing` > 0 (single-label classification only), which smooths the cross-entropy's
    targets over the classes as torch's does, the unsmoothed cross-entropy beside it (else None). Labels on another
    device than the logits (kept on the CPU) are moved to theirs, as in transformers."""
    check_label_smoothing(label_smoothing)
    labels = labels.to(logits.device)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem  # recorded as transformers does, so a saved config keeps it
    if label_smoothing and problem != "single_label_classification":
        raise ConfigError(f"label_smoothing smooths the targets of single-label classification; {problem} has no "
                          "class to smooth over")
    _check_classification_labels(problem, logits, labels)
    # labels keep their dtype, as in transformers: casting float targets to bf16 logits would round them
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze()), None
        return F.mse_loss(logits, labels), None
    if problem == "single_label_classification":  # class ids of any integer width: F.cross_entropy takes int64
        logits, ids = logits.view(-1, config.num_labels), labels.long()
        loss = F.cross_entropy(logits, ids.view(-1), label_smoothing=label_smoothing)
        return loss, F.cross_entropy(logits.detach(), ids.view(-1)) if label_smoothing else None
    if problem == "multi_label_classification":
        if not labels.is_floating_point():  # torch's own error is a cast failure naming neither labels nor problem
            raise ConfigError(f"multi_label_classification takes float targets (a 0..1 value per label), got "
                              f"{labels.dtype}; class ids for single-label classification are int64 or int32")
        return F.binary_cross_entropy_with_logits(logits, labels), None
    raise ConfigError(f"unknown problem_type {problem!r}")


def _check_classification_labels(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """A ConfigError naming labels of a shape or kind `problem` cannot take, where torch would fail inside its loss
    naming neither, or (regression over several labels) broadcast the targets against the wrong outputs."""
    sequences, shape = len(logits), tuple(labels.shape)
    if problem == "single_label_classification" and (labels.is_floating_point() or labels.numel() != sequences):
        raise ConfigError(f"single_label_classification takes one integer class id per sequence ({sequences}), got "
                          f"shape {shape} of {labels.dtype}")
    per_sequence = problem == "regression" and logits.shape[1] == 1  # squeezed, as transformers squeezes both
    if per_sequence and labels.numel() != sequences:
        raise ConfigError(f"regression takes a target per sequence ({sequences}), got shape {shape}")
    if not per_sequence and problem in ("regression", "multi_label_classification") and shape != tuple(logits.shape):
        raise ConfigError(f"{problem} takes a target per label, shape {tuple(logits.shape)}, got {shape}")


def parameters_device(module: nn.Module) -> torch.device:
    """transformers' `model.device`, which its programs read everywhere (`inputs.to(model.device)`): the first
    parameter's device."""
    return next(module.parameters()).device


def parameters_dtype(module: nn.Module) -> torch.dtype:
    """transformers' `model.dtype`: the first floating-point parameter's dtype."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())
