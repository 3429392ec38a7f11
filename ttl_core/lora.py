"""LoRA adapters on ttl's (fused) projections, computed, initialised and merged as PEFT does.

`apply_lora` replaces the targeted `nn.Linear` layers by `LoRALinear`, an `nn.Linear` that keeps the frozen
base weight under its usual name and adds, for each targeted slice of its output rows, a low-rank update
`B (A dropout(x)) * scale` (with DoRA, rescaled row by row: `LoRALinear.dora_update`). A fused projection (qkv,
gate_up) thus adapts `q_proj` and `v_proj` (or any subset) independently, exactly as PEFT adapts the separate
HF projections. The mapping between ttl's modules and HF names, and which layers PEFT's options pick, come from
`ttl_core.lora_targets`; PEFT's adapter files (save_adapter, load_adapter, load_with_adapter) are
`ttl_core.lora_files`.

PEFT's LoRA options that ttl reproduces: r, lora_alpha, lora_dropout, use_rslora, use_dora, target_modules (names,
paths, patterns, "all-linear"), exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern,
modules_to_save, ensure_weight_tying, and any init_lora_weights that leaves the base weights alone. Those it
cannot (LoRA on the embeddings or the LM head, trainable tokens, biases trained beside the adapter, inits
that rewrite the base such as PiSSA, other PEFT types) are refused in one line naming the option.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SIZE_LIMIT
from .errors import AdapterError, is_integer, is_number
from .lora_targets import (EMBEDDING_PARAMS, check_option_types, checked_pattern, linear_slices,
                           modules_to_save_params, pattern_value, target_names, targeted_slices, tied)
from .model import LlamaForCausalLM, LlamaForSequenceClassification


class LoRALinear(nn.Linear):
    """A frozen linear layer plus one LoRA pair per adapted slice of its output rows.

    `slices` maps an HF projection name to the (start, stop) rows it occupies in this layer's output; `ranks` and
    `alphas` give each its rank and alpha (PEFT's rank_pattern and alpha_pattern can set them per module);
    `use_dora` adds each slice a DoRA magnitude vector, `lora_magnitude[name]`."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], ranks: dict[str, int],
                 alphas: dict[str, float], dropout: float, use_rslora: bool, use_dora: bool = False):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same tensors, under the same names
        self.slices, self.ranks = dict(slices), dict(ranks)
        self.scales = {n: alphas[n] / (math.sqrt(ranks[n]) if use_rslora else ranks[n]) for n in slices}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, base.weight.dtype
        # on a half-precision base the adapters stay float32, as PEFT keeps them (autocast_adapter_dtype), so
        # small optimizer steps on them are not rounded away
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        # each slice's pair is made as PEFT makes a module's (the caller goes through them in PEFT's module order), so
        # a seed gives PEFT's initial adapters on any device and base dtype: built on the CPU in the default dtype,
        # each nn.Linear taking the draws of its own default init, then A kaiming-uniform and B zero (a no-op at
        # start), then cast to the base's device and dtype, which rounds A on a half-precision base
        for n, (start, stop) in slices.items():
            a, b = nn.Linear(self.in_features, ranks[n], bias=False), nn.Linear(ranks[n], stop - start, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            self.lora_A[n] = a.to(device, dtype).to(adapter_dtype)
            self.lora_B[n] = b.to(device, dtype).to(adapter_dtype)
        # PEFT's initial magnitude: the row norms of W + s B A, i.e. of W (B is zero), taken in the base's dtype
        self.lora_magnitude = nn.ParameterDict({n: torch.linalg.norm(base.weight.detach()[start:stop], dim=1).to(
            adapter_dtype) for n, (start, stop) in slices.items()} if use_dora else {})
        self.merged = False
        self.merged_factors: dict[str, torch.Tensor | float] = {}  # what `folded` scaled each slice by when merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        names = list(self.slices)
        x = x.to(self.lora_A[names[0]].weight.dtype)
        if isinstance(self.dropout, nn.Identity):  # one matmul for every slice's A
            inputs = [x] * len(names)
            downs = F.linear(x, torch.cat([self.lora_A[n].weight for n in names])).split(
                [self.ranks[n] for n in names], dim=-1)
        else:  # each slice draws its own dropout mask, as each of PEFT's separate modules does
            inputs = [self.dropout(x) for _ in names]
            downs = [self.lora_A[n](dropped) for n, dropped in zip(names, inputs)]
        for n, dropped, down in zip(names, inputs, downs):
            start, stop = self.slices[n]
            out = self.lora_B[n](down)
            update = (self.dora_update(n, dropped, y[..., start:stop], out) if n in self.lora_magnitude
                      else out * self.scales[n])
            # add_ on the view, not `y[...] += ...`: with a bias, y is torch's view of the matmul's output, and the
            # write-back that `+=` adds through indexing is refused by autograd when the slice is the whole output
            y[..., start:stop].add_(update)
        return y

    def dora_update(self, name: str, x: torch.Tensor, base_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """DoRA's change to one slice's base output `base_out` (W x + bias), as PEFT computes it: (g - 1) W x + g s
        B A x, with g = m / ||W + s B A|| per row and `out` = B A x. With dropout in training, W x is computed again
        from the dropped-out input `x` that `out` saw, as in PEFT."""
        start, stop = self.slices[name]
        factor = self.dora_factor(name, x.dtype)
        if self.training and not isinstance(self.dropout, nn.Identity):
            base_out = F.linear(x, self.weight[start:stop].to(x.dtype))
        elif self.bias is not None:
            base_out = base_out - self.bias[start:stop]
        else:  # a copy, which backward needs: forward goes on to add to these rows in place
            base_out = base_out.clone()
        return (factor - 1) * base_out + factor * out * self.scales[name]

    def dora_factor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's g = m / ||W + s B A|| for each row of one slice, in `dtype`; the norm takes no gradient, as in the
        paper (section 4.3) and PEFT."""
        start, stop = self.slices[name]
        with torch.no_grad():
            norm = torch.linalg.norm(self.weight[start:stop].to(dtype) + self.delta(name, dtype), dim=1)
        return self.lora_magnitude[name].to(dtype) / norm

    def delta(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense weight update B A * scale of one slice, in float64 so merging rounds once, unless `dtype`."""
        return (self.lora_B[name].weight.to(dtype) @ self.lora_A[name].weight.to(dtype)) * self.scales[name]

    def folded(self, name: str) -> tuple[torch.Tensor, torch.Tensor | float]:
        """One slice's rows with its adapter folded in, in float64, and the factor they were scaled by: W + s B A
        and 1, or with DoRA g (W + s B A) and g, PEFT's merge."""
        start, stop = self.slices[name]
        factor = self.dora_factor(name, torch.float64)[:, None] if name in self.lora_magnitude else 1.0
        return (self.weight[start:stop].double() + self.delta(name)) * factor, factor

    def set_merged(self, merged: bool) -> None:
        """Fold (or take back out) every slice's update into the base weight; forward then skips (or runs) LoRA."""
        if merged == self.merged:
            return
        with torch.no_grad():
            for n, (start, stop) in self.slices.items():
                rows = self.weight[start:stop]
                if merged:
                    folded, self.merged_factors[n] = self.folded(n)
                else:  # DoRA's g kept from merging: the merged rows' norms are m, which cannot give ||W + s B A||
                    factor = torch.as_tensor(self.merged_factors.pop(n), device=rows.device)  # the model may have moved
                    folded = rows.double() / factor - self.delta(n)
                rows.copy_(folded.to(rows.dtype))
        self.merged = merged


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped layers by module path (none before `apply_lora`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: LlamaForCausalLM | LlamaForSequenceClassification, r: int = 8, alpha: float = 16,
               dropout: float = 0.05, targets: str | Iterable[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
               modules_to_save: Iterable[str] | None = None, ensure_weight_tying: bool = False,
               exclude_modules: str | list[str] | None = None, layers_to_transform: int | list[int] | None = None,
               layers_pattern: str | list[str] | None = None, rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None,
               use_dora: bool = False) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """Add LoRA adapters in place and freeze everything else; returns the model. A classifier's `score` head is
    always trained in full (as PEFT does for SEQ_CLS), and `modules_to_save` (HF module names such as "embed_tokens",
    "lm_head", matched as PEFT does) are trained in full too. On a model whose LM head shares the input
    embedding, training either one unties them, as PEFT does (the other keeps the original weights), unless
    `ensure_weight_tying` (PEFT's option of that name) trains the shared tensor as one. `targets`,
    `exclude_modules`, `layers_to_transform` and `layers_pattern` choose the adapted layers as PEFT's options of
    those names do (see `targeted_slices`), and `rank_pattern` and `alpha_pattern` give the layers whose path a key
    ends (as a regular expression) their own r and alpha, as PEFT's do. `use_dora` makes them DoRA adapters (PEFT's
    option): each adapted row also gets a trainable magnitude, starting at its weight's norm. From the same torch
    seed, the new adapters are those PEFT's `get_peft_model` draws. The options are kept in `model.lora_config`,
    which `save_adapter` writes."""
    if lora_layers(model):
        raise AdapterError("the model already has LoRA adapters; merge or load into a fresh model instead")
    rank_pattern, alpha_pattern = _checked_numbers(r, alpha, dropout, rank_pattern, alpha_pattern)
    check_option_types({"target_modules": targets, "exclude_modules": exclude_modules,
                        "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
                        "modules_to_save": modules_to_save, "use_rslora": use_rslora, "use_dora": use_dora,
                        "ensure_weight_tying": ensure_weight_tying})
    full_modules = _trained_in_full(model, modules_to_save)
    trains_embedding = set(EMBEDDING_PARAMS) & set(modules_to_save_params(model, full_modules))
    targeted = targeted_slices(model, targets, exclude_modules, layers_to_transform, layers_pattern, full_modules)
    if tied(model) and trains_embedding and not ensure_weight_tying:
        model.untie_embeddings()
    full_params = modules_to_save_params(model, full_modules)  # once untied, the LM head has a weight of its own
    for param in model.parameters():
        param.requires_grad_(False)
    hf_prefixes = {path: prefix for path, (prefix, _) in linear_slices(model).items()}
    for path, chosen in targeted.items():  # in PEFT's module order, so a seed draws PEFT's initial adapters
        ranks = _per_slice(rank_pattern, hf_prefixes[path], chosen, r)
        alphas = _per_slice(alpha_pattern, hf_prefixes[path], chosen, alpha)
        layer = LoRALinear(model.get_submodule(path), chosen, ranks, alphas, dropout, use_rslora, use_dora)
        _replace_module(model, path, layer.train(model.training))
    for name in full_params:
        model.get_parameter(name).requires_grad_(True)
    names = target_names(targets)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": names if isinstance(names, str) else sorted(names),
                         "exclude_modules": exclude_modules, "layers_to_transform": layers_to_transform,
                         "layers_pattern": layers_pattern, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": full_modules,
                         "ensure_weight_tying": ensure_weight_tying and tied(model)}
    return model


def _checked_numbers(r: Any, alpha: Any, dropout: Any, rank_pattern: Any, alpha_pattern: Any) -> tuple[dict, dict]:
    """`rank_pattern` and `alpha_pattern` as dicts (empty when unset), once r, alpha, they and dropout are known to
    be what `apply_lora` takes; the first that is not is a one-line AdapterError."""
    if not valid_rank(r):
        raise AdapterError(f"LoRA rank r must be an integer in [1, 2**31), got {r!r}")
    if not _valid_alpha(alpha):
        raise AdapterError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    rank_pattern = checked_pattern("rank_pattern", rank_pattern, valid_rank, "an integer in [1, 2**31)")
    alpha_pattern = checked_pattern("alpha_pattern", alpha_pattern, _valid_alpha, "a positive finite number")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    return rank_pattern, alpha_pattern


def _trained_in_full(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    """The HF module names trained in full beside the adapters: `modules_to_save`, and a classifier's `score` head,
    which PEFT always trains for SEQ_CLS."""
    names = list(modules_to_save or [])
    if model.architecture == "LlamaForSequenceClassification" and "score" not in names:
        names.append("score")
    return names


def _per_slice(pattern: dict, hf_prefix: str, chosen: Iterable[str], default: Any) -> dict[str, Any]:
    """Each chosen projection's rank (or alpha): the value `pattern` (rank_pattern, alpha_pattern) gives its HF
    module path, `hf_prefix`.name, which is what PEFT's patterns match; else `default`."""
    return {n: pattern_value(pattern, f"{hf_prefix}.{n}", default) for n in chosen}


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, child = path.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, module)


def valid_rank(value: Any) -> bool:
    """An integer in [1, 2**31): the sizes a model's config allows."""
    return is_integer(value) and 1 <= value < SIZE_LIMIT


def _valid_alpha(value: Any) -> bool:
    return is_number(value) and 0 < value < math.inf  # an infinite scale makes every adapted output NaN


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then costs nothing extra)."""
    for layer in lora_layers(model).values():
        layer.set_merged(True)


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`: the base weights return to their values up to rounding in their own dtype."""
    for layer in lora_layers(model).values():
        layer.set_merged(False)


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters with every adapter folded into its base weight and the LoRA pairs left out,
    for `save_pretrained(model, dir, state_dict=merged_weights(model))`; the model itself is unchanged."""
    weights = {name: p.detach() for name, p in model.named_parameters() if ".lora_" not in name}
    for path, layer in lora_layers(model).items():
        if layer.merged:
            continue
        merged = layer.weight.detach().double().clone()
        for n, (start, stop) in layer.slices.items():
            merged[start:stop] = layer.folded(n)[0]
        weights[f"{path}.weight"] = merged.to(layer.weight.dtype)
    return weights


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put plain `nn.Linear` layers back, leaving a model `save_pretrained` can
    write as an ordinary HF checkpoint."""
    for path, layer in lora_layers(model).items():
        layer.set_merged(True)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        _replace_module(model, path, plain)
    model.__dict__.pop("lora_config", None)
    return model
