"""LoRA adapters on ttl's (fused) projections, saved and loaded in PEFT's format.

`apply_lora` replaces the targeted `nn.Linear` layers by `LoRALinear`, an `nn.Linear` that keeps the frozen
base weight under its usual name and adds, for each targeted slice of its output rows, a low-rank update
`B (A dropout(x)) * scale` (with DoRA, rescaled row by row: `LoRALinear.dora_update`). A fused projection (qkv,
gate_up) thus adapts `q_proj` and `v_proj` (or any subset) independently, exactly as PEFT adapts the separate
HF projections. The mapping between ttl's modules and HF names, and which layers PEFT's options pick, come from
`ttl_core.lora_targets`; PEFT's key names are derived from them.
`load_with_adapter` turns an adapter directory into a ready causal LM: its base, resized and merged.

PEFT's LoRA options that ttl reproduces: r, lora_alpha, lora_dropout, use_rslora, use_dora, target_modules (names,
paths, patterns, "all-linear"), exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern,
modules_to_save, ensure_weight_tying, and any init_lora_weights that leaves the base weights alone. Those it
cannot (LoRA on the embeddings or the LM head, trainable tokens, biases trained beside the adapter, inits
that rewrite the base such as PiSSA, other PEFT types) are refused in one line naming the option.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .config import SIZE_LIMIT
from .errors import AdapterError, CheckpointError, is_integer, is_number
from .fileio import atomic_write, read_json, write_json
from .hf import NATIVE_CONFIG, load_pretrained, read_model_config, refuse_non_float
from .lora_targets import (EMBEDDING_MODULES, EMBEDDING_PARAMS, OPTION_TYPES, PEFT_PREFIX, check_option_types,
                           checked_pattern, linear_slices, modules_to_save_params, pattern_value, present_targets,
                           target_names, targeted_slices, tied)
from .model import LlamaForCausalLM, LlamaForSequenceClassification, build_model

CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# adapter_config.json fields that change what the adapter computes; ttl refuses them when set rather than
# load an adapter whose outputs would differ from PEFT's
UNSUPPORTED_ADAPTER_FIELDS = (
    "layer_replication", "lora_bias", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
    "use_qalora", "use_bdlora",
    "megatron_config", "loftq_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config",
    "arrow_config", "kasa_config",
)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
TASK_TYPES = {"LlamaForCausalLM": "CAUSAL_LM", "LlamaForSequenceClassification": "SEQ_CLS"}


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
    seed, the new adapters are those PEFT's `get_peft_model` draws."""
    if lora_layers(model):
        raise AdapterError("the model already has LoRA adapters; merge or load into a fresh model instead")
    if not valid_rank(r):
        raise AdapterError(f"LoRA rank r must be an integer in [1, 2**31), got {r!r}")
    if not _valid_alpha(alpha):
        raise AdapterError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    rank_pattern = checked_pattern("rank_pattern", rank_pattern, valid_rank, "an integer in [1, 2**31)")
    alpha_pattern = checked_pattern("alpha_pattern", alpha_pattern, _valid_alpha, "a positive finite number")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    check_option_types({"target_modules": targets, "exclude_modules": exclude_modules,
                        "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
                        "modules_to_save": modules_to_save, "use_rslora": use_rslora, "use_dora": use_dora,
                        "ensure_weight_tying": ensure_weight_tying})
    saved = list(modules_to_save or [])
    if model.architecture == "LlamaForSequenceClassification" and "score" not in saved:
        saved.append("score")
    trains_embedding = set(EMBEDDING_PARAMS) & set(modules_to_save_params(model, saved))
    targeted = targeted_slices(model, targets, exclude_modules, layers_to_transform, layers_pattern, saved)
    if tied(model) and trains_embedding and not ensure_weight_tying:
        model.untie_embeddings()
    full = modules_to_save_params(model, saved)
    for param in model.parameters():
        param.requires_grad_(False)
    hf_prefixes = {path: prefix for path, (prefix, _) in linear_slices(model).items()}
    for path, chosen in targeted.items():
        parent, child = path.rsplit(".", 1)
        keys = {n: f"{hf_prefixes[path]}.{n}" for n in chosen}  # HF module paths, which the patterns match
        ranks = {n: pattern_value(rank_pattern, key, r) for n, key in keys.items()}
        alphas = {n: pattern_value(alpha_pattern, key, alpha) for n, key in keys.items()}
        layer = LoRALinear(model.get_submodule(path), chosen, ranks, alphas, dropout, use_rslora, use_dora)
        layer.train(model.training)
        setattr(model.get_submodule(parent), child, layer)
    for name in full:
        model.get_parameter(name).requires_grad_(True)
    names = target_names(targets)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": names if isinstance(names, str) else sorted(names),
                         "exclude_modules": exclude_modules, "layers_to_transform": layers_to_transform,
                         "layers_pattern": layers_pattern, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": saved,
                         "ensure_weight_tying": ensure_weight_tying and tied(model)}
    return model


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
        parent, child = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, plain)
    model.__dict__.pop("lora_config", None)
    return model


def _peft_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for every LoRA weight of the model (PEFT saves a DoRA magnitude without ".weight")."""
    slices = linear_slices(model)
    keys = {}
    for path, layer in lora_layers(model).items():
        for n in layer.slices:
            prefix = f"{PEFT_PREFIX}{slices[path][0]}.{n}"
            keys.update({f"{prefix}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[n].weight for ab in "AB"})
            if n in layer.lora_magnitude:
                keys[f"{prefix}.lora_magnitude_vector"] = layer.lora_magnitude[n]
    return keys


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for everything an adapter file holds: the LoRA pairs and the modules_to_save."""
    saved = modules_to_save_params(model, model.lora_config["modules_to_save"])
    return {**_peft_keys(model), **{key: model.get_parameter(name) for name, key in saved.items()}}


def _adapter_shapes(model: nn.Module, settings: dict) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of what `apply_lora(model, **settings)` would create, found on a weightless copy
    of the model's structure, so an adapter that does not fit is refused before the model changes."""
    with torch.device("meta"):
        probe = build_model(model.config, model.architecture)
    apply_lora(probe, **settings)
    return {key: tuple(t.shape) for key, t in _adapter_tensors(probe).items()}


def _grown_embeddings(model: nn.Module, base: str | None) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor of the input embedding and LM head when the model's vocabulary differs from that of the
    base checkpoint directory `base` (either layout): PEFT's save_embedding_layers="auto" saves them beside the
    adapter then, so that it loads onto the base with the rows of the tokens fine-tuning added. Nothing for a
    base that is not a local checkpoint, as PEFT offline."""
    if not base or not any((Path(base) / name).is_file() for name in ("config.json", NATIVE_CONFIG)):
        return {}
    if read_model_config(base)[0].vocab_size == model.config.vocab_size:
        return {}
    embeddings = modules_to_save_params(model, EMBEDDING_MODULES, strict=False)
    return {key: model.get_parameter(name) for name, key in embeddings.items()}


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | Path | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT does (loadable with
    `PeftModel.from_pretrained`); with the embedding and LM head too when the vocabulary differs from that of
    the base directory `base_model_name_or_path`, as PEFT's save_embedding_layers="auto" does."""
    settings = getattr(model, "lora_config", None)
    if settings is None:
        raise AdapterError("the model has no LoRA adapters to save (call apply_lora or load_adapter first)")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise AdapterError("the adapters are merged into the base weights; unmerge_lora before saving them")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    base = None if base_model_name_or_path is None else str(base_model_name_or_path)  # a Path, as JSON text
    tensors = {**_grown_embeddings(model, base), **_adapter_tensors(model)}
    payload = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(payload, str(tmp), metadata={"format": "pt"}))
    write_json(directory / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": TASK_TYPES[model.architecture], "r": settings["r"],
        "lora_alpha": settings["lora_alpha"], "lora_dropout": settings["lora_dropout"],
        "target_modules": settings["target_modules"], "use_rslora": settings["use_rslora"],
        "modules_to_save": settings["modules_to_save"] or None, "base_model_name_or_path": base,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "exclude_modules": settings["exclude_modules"], "layers_to_transform": settings["layers_to_transform"],
        "layers_pattern": settings["layers_pattern"], "rank_pattern": settings["rank_pattern"],
        "alpha_pattern": settings["alpha_pattern"],
        "use_dora": settings["use_dora"], "revision": None,
        **({"ensure_weight_tying": True} if settings["ensure_weight_tying"] else {}),
    })


def _read_adapter_config(directory: Path) -> dict:
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(f"{directory} holds no {CONFIG_FILE}")
    config = read_json(directory / CONFIG_FILE, AdapterError)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{directory}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    # fan_in_fan_out is not checked: PEFT sets it to false on every nn.Linear, which all of a Llama's projections are
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{directory}: bias={config['bias']!r} is not one of PEFT's 'none', 'all', 'lora_only'")
    for key in UNSUPPORTED_ADAPTER_FIELDS:
        value = config.get(key)
        # PEFT writes these unset as null, false, {} or []; layers_to_transform=0 is set (layer 0 only)
        if value is not None and value is not False and value != {} and value != []:
            raise AdapterError(f"{directory}: {key}={value!r} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{directory}: init_lora_weights={init!r} is not supported (PEFT rewrites the base "
                           "weights with it when loading)")
    if config.get("use_dora") is True and init == "mica":  # two LoRA variants at once
        raise AdapterError(f"{directory}: use_dora=True cannot go with init_lora_weights='mica' (as in PEFT)")
    try:  # an unset flag is false
        check_option_types({key: config.get(key, False if kinds == (bool,) else None)
                            for key, kinds in OPTION_TYPES.items()})
    except AdapterError as e:
        raise AdapterError(f"{directory}: {e}") from None
    if "r" not in config or "lora_alpha" not in config:
        raise AdapterError(f"{directory}: {CONFIG_FILE} needs r and lora_alpha")
    return config


def _read_adapter_weights(directory: Path, read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """PEFT key -> `read(file, key)` for each tensor of the adapter's weights file (`get_tensor`, or a shape from
    the header alone), the adapter name PEFT may leave in a key ("default") taken out."""
    if not (directory / WEIGHTS_FILE).is_file():
        if (directory / PICKLE_WEIGHTS_FILE).is_file():  # what PEFT writes with safe_serialization=False
            raise AdapterError(f"{directory / PICKLE_WEIGHTS_FILE} is a pickle, which ttl never unpickles (it can run "
                               "code); re-save the adapter in a trusted environment with PEFT: PeftModel."
                               f"from_pretrained(base, DIR).save_pretrained(OUT), which writes {WEIGHTS_FILE}")
        raise AdapterError(f"{directory} holds no {WEIGHTS_FILE}")
    try:
        with safe_open(directory / WEIGHTS_FILE, "pt") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            found = {key: read(f, key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise AdapterError(f"{directory / WEIGHTS_FILE}: unreadable ({e})") from None
    for key, dtype in dtypes.items():  # a header naming another dtype (damage, or a foreign file) loads garbage
        refuse_non_float(directory / WEIGHTS_FILE, key, dtype, AdapterError)
    weights = {}
    # PEFT saving a module trained in full (modules_to_save) whose vocabulary grew can also write its wrapper's two
    # copies: the trained one again (".modules_to_save.") and the base's (".original_module."), which it replaces
    for key in sorted(found, key=lambda k: ".modules_to_save.weight" in k):  # the plain key first
        if ".original_module." not in key:
            name = key.replace(".modules_to_save.default.", ".").replace(".default.", ".")
            weights.setdefault(name.replace(".modules_to_save.", "."), found[key])
    return weights


def load_adapter(model: LlamaForCausalLM | LlamaForSequenceClassification, path: str | Path,
                 is_trainable: bool = False) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """Apply the LoRA adapter at `path` (ours or PEFT's) to a model without adapters; embedding rows it saves
    overwrite the model's. `is_trainable=False` freezes it too and sets eval mode (inference); returns the model."""
    directory = Path(path)
    config = _read_adapter_config(directory)
    if is_trainable and config.get("init_lora_weights") == "mica":
        raise AdapterError(f"{directory}: init_lora_weights='mica' trains lora_A only in PEFT, which ttl does not; "
                           "load it for inference (is_trainable=False)")
    # PEFT's bias="all" / "lora_only" train and save the base layers' biases, which a Llama without them lacks
    if config.get("bias", "none") != "none" and any(name.endswith(".bias") for name, _ in model.named_parameters()):
        raise AdapterError(f"{directory}: bias={config['bias']!r} is not supported on a model with biases (ttl "
                           "trains LoRA adapters only, as bias='none')")
    found = _read_adapter_weights(directory, lambda f, key: f.get_tensor(key))
    try:  # the options PEFT takes but ttl cannot reproduce on this model are refused naming the adapter's file
        saved = [n for n in config.get("modules_to_save") or [] if modules_to_save_params(model, [n], strict=False)]
        settings = dict(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                        targets=present_targets(model, config["target_modules"]),
                        use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora", False),
                        modules_to_save=saved, ensure_weight_tying=config.get("ensure_weight_tying", False),
                        **{key: config.get(key) for key in ("exclude_modules", "layers_to_transform", "layers_pattern",
                                                            "rank_pattern", "alpha_pattern")})
        expected = _adapter_shapes(model, settings)
    except AdapterError as e:
        raise AdapterError(f"{directory / CONFIG_FILE}: {e}") from None
    # PEFT saves a resized vocabulary's embedding and LM head beside the adapter (save_embedding_layers) and
    # loads them into the base model; so does ttl, once the model's vocabulary is resized to match
    embeddings = {name: key for name, key in modules_to_save_params(model, EMBEDDING_MODULES, strict=False).items()
                  if key in found and key not in expected}
    for name, key in embeddings.items():
        if tuple(found[key].shape) != tuple(model.get_parameter(name).shape):
            raise AdapterError(f"{directory}: {key} has shape {tuple(found[key].shape)}, the model's is "
                               f"{tuple(model.get_parameter(name).shape)} (resize its token embeddings first)")
    base_weights = {name: found.pop(key) for name, key in embeddings.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{directory}: the adapter does not fit this model: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(found[key].shape) != shape:
            raise AdapterError(f"{directory}: {key} has shape {tuple(found[key].shape)}, the model needs {shape} "
                               f"(r={config['r']})")
    apply_lora(model, **settings)  # only now that the adapter is known to fit
    with torch.no_grad():
        for key, target in _adapter_tensors(model).items():
            target.copy_(found[key])
        for name, tensor in base_weights.items():
            model.get_parameter(name).copy_(tensor)
    if not is_trainable:  # inference, as PEFT's from_pretrained leaves it: frozen, dropout off
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
    return model


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (it holds adapter_config.json) rather than a checkpoint."""
    return (Path(path) / CONFIG_FILE).is_file()


def adapter_base(path: str | Path, base: str | Path | None = None) -> Path:
    """The base model directory of the PEFT adapter directory `path`: `base` when given (the base has moved),
    else the `base_model_name_or_path` its adapter_config.json names; one that is missing is a one-line error."""
    directory = Path(path)
    named = base is None  # the base is the one the adapter names
    base = _read_adapter_config(directory).get("base_model_name_or_path") if named else base
    if named and not (isinstance(base, str) and base):
        raise AdapterError(f"{directory / CONFIG_FILE}: no base_model_name_or_path; give the base model's directory")
    if not Path(base).is_dir():
        where = (f" (base_model_name_or_path in {directory / CONFIG_FILE}; pass its new place as base=, --base in the "
                 "scripts)") if named else ""
        raise CheckpointError(f"{base}: no such base model directory{where}")
    return Path(base)


def load_with_adapter(path: str | Path, base: str | Path | None = None, dtype: torch.dtype | str | None = None,
                      device: str | torch.device | None = None) -> LlamaForCausalLM:
    """The causal LM that the PEFT adapter directory `path` makes of its base, for inference: the base
    (`base`, else adapter_config.json's `base_model_name_or_path`) loaded in `dtype` on `device`, its
    vocabulary grown to the embedding rows the adapter saves when fine-tuning added tokens (Aira's), the
    adapter loaded and merged into the base weights, so the model runs at the base's speed. Use it with the
    tokenizer saved in the adapter directory (or the base's, when PEFT saved the adapter without one). A
    missing base directory, or an adapter that is not a causal LM's (a classifier's), is a one-line error
    naming the path."""
    directory = Path(path)
    config = _read_adapter_config(directory)
    if config.get("task_type") not in (None, TASK_TYPES["LlamaForCausalLM"]):
        raise AdapterError(f"{directory}: a {config['task_type']} adapter, not a causal LM's (task_type CAUSAL_LM)")
    base = adapter_base(directory, base)
    model = load_pretrained(base, dtype=dtype, device=device)
    if not isinstance(model, LlamaForCausalLM):
        raise AdapterError(f"{base}: holds a {model.architecture}; the adapter {directory} needs a LlamaForCausalLM")
    embeddings = set(modules_to_save_params(model, EMBEDDING_MODULES).values())
    shapes = _read_adapter_weights(directory, lambda f, key: f.get_slice(key).get_shape())
    rows = max((shape[0] for key, shape in shapes.items() if key in embeddings), default=0)
    if rows > model.config.vocab_size:  # load_adapter then loads the saved rows into the grown tables
        model.resize_token_embeddings(rows)
    load_adapter(model, directory)
    return unload_lora(model)
