"""Per-block activation statistics for training-stability research (`train.log_activation_stats`).

Loss spikes tend to follow activations that grow: the residual stream's RMS block after block, a sublayer's output,
or an attention logit (q·k/sqrt(head_dim)) that runs away and saturates its softmax (what z-loss, QK-norm and muP
address). `activation_stats` runs one extra forward pass with hooks on every decoder block and returns, per block N:

- `act_rms/layers.N`: the RMS of the residual stream after block N,
- `attn_out_rms/layers.N` and `mlp_out_rms/layers.N`: the RMS of the attention and MLP outputs,
- `attn_logit_max/layers.N`: the largest pre-softmax logit over heads and the (query, key) pairs the mask lets
  attend, after rotary, as attention computes it; fused kernels never form the logits, so they are recomputed from
  the block's q and k in float32, a chunk of queries at a time.

RMS is over the hidden units of the real tokens (those a 2-D `attention_mask` marks, else all). The pass is eager
(torch.compile'd blocks run uncompiled, so that the hooks run) and in eval mode: no dropout, no RNG drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ttl_kernels

from .attention import causal_mask, packed_mask
from .distributed import World, unwrap
from .errors import ConfigError
from .mixture import val_loader
from .run_config import RunConfig
from .step import autocast, model_inputs

KINDS = ("act_rms", "attn_out_rms", "mlp_out_rms", "attn_logit_max")
# scores computed at once by the logit pass, (batch, heads, query chunk, keys): bounds its memory at 64 MiB
LOGIT_CHUNK_ELEMENTS = 2**24


def _squares(x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """(sum over tokens of the mean square over the hidden units, tokens) of `x` (batch, seq, hidden) in float32,
    over the tokens `tokens` (batch, seq) marks, else all: summed over ranks, the two make the global RMS."""
    per_token = x.float().square().mean(-1)
    per_token = per_token if tokens is None else per_token[tokens]
    return torch.stack([per_token.sum(), torch.tensor(per_token.numel(), device=x.device)])


def _logit_max(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The largest q·k/sqrt(head_dim) in float32 over the heads and the (query, key) pairs `allowed` (batch, 1, seq,
    kv_len) lets attend; q (batch, seq, heads, head_dim), k (batch, kv_len, kv_heads, head_dim)."""
    batch, seq, heads, head_dim = q.shape
    qh = q.float().transpose(1, 2)
    kh = k.float().transpose(1, 2).repeat_interleave(heads // k.shape[2], dim=1).transpose(-1, -2)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // (batch * heads * k.shape[1]))
    best = torch.tensor(float("-inf"), device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # the run's autocast would round the matmul to its dtype
        for start in range(0, seq, chunk):
            scores = qh[:, :, start:start + chunk] @ kh  # masked in place: one chunk of scores alive at a time
            best = torch.maximum(best, scores.masked_fill_(~allowed[:, :, start:start + chunk], float("-inf")).amax())
    # scaled after the maximum: rounding x * c is monotone in x for c > 0, so the largest scaled score's bits
    return best * head_dim**-0.5


def _allowed_pairs(mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int | None, batch: int,
                   seq: int, device: torch.device) -> torch.Tensor:
    """The boolean (batch or 1, 1, seq, seq) (query, key) pairs an attention call given `mask` or packed documents
    (`cu_seqlens`, `max_seqlen`), or neither (causal), lets attend."""
    if cu_seqlens is not None:
        return packed_mask(cu_seqlens, batch, seq, max_seqlen)
    if mask is None:
        return causal_mask(seq, seq, device)
    # boolean, or additive with the dtype's most negative value where masked
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@contextlib.contextmanager
def recording_activations(model: torch.nn.Module, tokens: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
    """Hooks on every decoder block of `model` (ttl's causal LM, bare or DDP/FSDP-wrapped) while the context is open;
    yields the dict the forward pass run inside fills, per figure's name, with `_squares`' pair for an RMS and a
    0-d tensor for a logit maximum (`activation_stats` turns them into figures). `tokens` (batch, seq), True on real
    tokens, limits the RMS and the logits' queries and keys to them."""
    raw: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(unwrap(model).backbone.layers):
        attn, projected = block.attn, {}

        def keep_projection(module, args, out, projected=projected):
            projected["qkv"] = out

        def attention_stats(module, args, out, i=i, projected=projected):
            x, cos, sin, mask, _, cu_seqlens, max_seqlen = args
            batch, seq = x.shape[:2]
            qkv = projected.pop("qkv").view(batch, seq, module.heads + 2 * module.kv_heads, module.head_dim)
            q, k, _ = ttl_kernels.apply_rotary_qkv(qkv, cos, sin, module.kv_heads, backend=module.kernel_backend)
            allowed = _allowed_pairs(mask, cu_seqlens, max_seqlen, batch, seq, x.device)
            if tokens is not None:
                allowed = allowed & tokens[:, None, :, None] & tokens[:, None, None, :]
            raw[f"attn_logit_max/layers.{i}"] = _logit_max(q, k, allowed)
            raw[f"attn_out_rms/layers.{i}"] = _squares(out, tokens)

        def mlp_stats(module, args, out, i=i):
            raw[f"mlp_out_rms/layers.{i}"] = _squares(out, tokens)

        def block_stats(module, args, out, i=i):
            delta, residual = out  # the block's output is their sum, which the next norm adds
            raw[f"act_rms/layers.{i}"] = _squares(delta.float() + residual.float(), tokens)

        handles += [attn.qkv.register_forward_hook(keep_projection), attn.register_forward_hook(attention_stats),
                    block.mlp.register_forward_hook(mlp_stats), block.register_forward_hook(block_stats)]
    try:
        yield raw
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def activation_stats(model: torch.nn.Module, inputs: dict[str, Any], world: World | None = None) -> dict[str, float]:
    """The figures of one extra forward of `model(**inputs)` (see the module's docstring), eager and in eval mode,
    leaving the model in the mode it had; a 2-D `inputs["attention_mask"]` marks the real tokens. With a `world` of
    several ranks, each runs its own batch and the figures are those of all the ranks' batches together."""
    if inputs.get("kv_cache") is not None:
        raise ConfigError("activation statistics are measured in one pass over whole rows, without a kv_cache")
    mask = inputs.get("attention_mask")
    tokens = mask.bool() if mask is not None and mask.dim() == 2 else None
    training = model.training
    model.eval()
    try:
        with recording_activations(model, tokens) as raw, torch.compiler.set_stance("force_eager"):
            model(**inputs)
    finally:
        model.train(training)
    rms = [name for name in raw if not name.startswith("attn_logit_max/")]
    maxima = [name for name in raw if name.startswith("attn_logit_max/")]
    squares = torch.stack([raw[name] for name in rms]).to(world.reduce_device if world else "cpu")
    largest = torch.stack([raw[name] for name in maxima]).to(squares.device)
    if world is not None and world.distributed:  # one collective each, for every block
        dist.all_reduce(squares)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    values = (squares[:, 0] / squares[:, 1].clamp_min(1)).sqrt().tolist() + largest.tolist()
    # by kind (KINDS' order), then block
    return dict(sorted(zip(rms + maxima, values), key=lambda item: (KINDS.index(item[0].split("/")[0]),
                                                                    int(item[0].rsplit(".", 1)[1]))))


def eval_activation_stats(model: torch.nn.Module, data_dir: Path, run: RunConfig, world: World,
                          bos_id: int | None) -> dict[str, float]:
    """`activation_stats` of the first global batch of `data_dir`'s val.bin, the first one `evaluate` reads (each
    rank its micro-batch of it: the same figures whatever the number of ranks), under the run's autocast."""
    inputs = model_inputs(next(iter(val_loader(data_dir, run, world))), world.device, run.data.document_masking, bos_id)
    with autocast(world.device, run.train.dtype):
        return activation_stats(model, inputs, world)
