"""Reading and writing Hugging Face (and ttl-native) safetensors checkpoints.

This module knows transformers' tensor names (`ttl_core.muon.is_hf_projection` knows its projections' too). A
*plan* maps each ttl parameter to the checkpoint tensors stacked along dim 0 to form it (q/k/v -> qkv, gate/up ->
gate_up); loading and saving both walk that plan, so the mapping is written once. Weights are read from safetensors
only: pickles are never opened."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import safe_open

from .config import RUNTIME_FIELDS, SUPPORTED_ARCHITECTURES, LlamaConfig
from .errors import CheckpointError, ConfigError, TTLError
from .fileio import fsync_dir, read_json, write_json
from .generate_output import GenerationSettings
from .model import LlamaForCausalLM, LlamaForSequenceClassification, build_model
from .shards import parse_shard_size, remove_stale, write_shards

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# A plan: ttl parameter name -> [(checkpoint tensor name, rows taken along dim 0 or None for all)]
Plan = dict[str, list[tuple[str, int | None]]]

NATIVE_CONFIG = "ttl_config.json"
NATIVE_VERSION = 1  # raised whenever the native layout changes, so an older ttl refuses a newer checkpoint
GENERATION_CONFIG = "generation_config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
# Rotary buffers that carry no weights: each layer's, which older transformers versions saved, and the model's, which
# state dicts gathered with the buffers hold (transformers ignores both).
IGNORED_HF_TENSORS = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def hf_plan(config: LlamaConfig, architecture: str) -> Plan:
    """How transformers' Llama tensor names compose ttl's fused parameters."""
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    plan: Plan = {"backbone.embed.weight": [("model.embed_tokens.weight", None)],
                  "backbone.norm.weight": [("model.norm.weight", None)]}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"backbone.layers.{i}.", f"model.layers.{i}."
        for kind in ["weight"] + (["bias"] if config.attention_bias else []):
            plan[f"{ours}attn.qkv.{kind}"] = [(f"{theirs}self_attn.{p}_proj.{kind}", rows) for p, rows in
                                               (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
            plan[f"{ours}attn.out.{kind}"] = [(f"{theirs}self_attn.o_proj.{kind}", None)]
        for kind in ["weight"] + (["bias"] if config.mlp_bias else []):
            plan[f"{ours}mlp.gate_up.{kind}"] = [(f"{theirs}mlp.{p}_proj.{kind}", config.intermediate_size)
                                                 for p in ("gate", "up")]
            plan[f"{ours}mlp.down.{kind}"] = [(f"{theirs}mlp.down_proj.{kind}", None)]
        plan[f"{ours}attn_norm.weight"] = [(f"{theirs}input_layernorm.weight", None)]
        plan[f"{ours}mlp_norm.weight"] = [(f"{theirs}post_attention_layernorm.weight", None)]
    if architecture == "LlamaForSequenceClassification":
        plan["score.weight"] = [("score.weight", None)]
    elif not config.tie_word_embeddings:
        plan["lm_head.weight"] = [("lm_head.weight", None)]
    return plan


def native_plan(model: torch.nn.Module) -> Plan:
    """ttl-native checkpoints store each parameter under its own name (tied weights once)."""
    return {name: [(name, None)] for name, _ in model.named_parameters()}  # a shared tensor comes once


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files to load, chosen as transformers chooses them: model.safetensors before an index."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    elif index.exists():
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' in the index")
        if not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    else:
        pickles = [f for f in PICKLE_FILES if (directory / f).exists()]
        if pickles:
            raise CheckpointError(
                f"{directory / pickles[0]} is a pickle checkpoint, which ttl never unpickles (it can run code); "
                "convert it in a trusted environment with transformers: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT), which writes safetensors "
                "(transformers >= 4.35)"
            )
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"shard(s) named in the index are missing: {', '.join(missing)}")
    return files


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _list_some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_against_plan(plan: Plan, params: dict[str, torch.Tensor], found: dict[str, tuple[Path, list[int]]],
                       directory: Path, ignorable: Callable[[str], bool]) -> None:
    """A CheckpointError naming the tensors `directory` lacks, holds beyond the plan (unless `ignorable`), or holds
    in another shape than `params` (ttl's, fused) want."""
    wanted = {key for pieces in plan.values() for key, _ in pieces}
    missing = sorted(wanted - set(found))
    unexpected = sorted(k for k in set(found) - wanted if not ignorable(k))
    mismatched = []
    for name, pieces in plan.items():
        for key, rows in pieces:
            if key in found:
                expected = [rows if rows is not None else params[name].shape[0], *params[name].shape[1:]]
                if list(found[key][1]) != expected:
                    mismatched.append(f"{key} {list(found[key][1])} (model expects {expected}, "
                                      f"file {found[key][0].name})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_list_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_list_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_list_some(mismatched, 3)}")
    if problems:
        raise CheckpointError(f"{directory}: " + "; ".join(problems))


def checked_device(device: str | int | torch.device | None) -> torch.device:
    """`device` (default the CPU; an index is a GPU's, as in torch) as a torch device ttl can load onto; anything
    else, CUDA on a machine without it included, is a CheckpointError naming it."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError) as e:  # ValueError: an index past int64
        raise CheckpointError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"ttl loads models onto 'cpu' or 'cuda', not {str(device)!r}")
    return device


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The weights' dtype asked for; None (or transformers' "auto") for the checkpoint's or model's own."""
    if isinstance(dtype, torch.dtype) and dtype not in SAFETENSORS_DTYPES.values():
        raise CheckpointError(f"dtype {dtype} is not a floating-point weight dtype")
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or a table is unhashable: no `in` for it
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_model_config(path: str | os.PathLike) -> tuple[LlamaConfig, str]:
    """The config and architecture of a checkpoint directory (HF `config.json` or ttl `ttl_config.json`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    if (directory / NATIVE_CONFIG).exists():
        meta = read_json(directory / NATIVE_CONFIG, CheckpointError)
        if meta.get("format") != "ttl" or meta.get("version") != NATIVE_VERSION:
            raise CheckpointError(f"{directory / NATIVE_CONFIG}: format {meta.get('format')!r} version "
                                  f"{meta.get('version')!r}, this ttl reads format 'ttl' version {NATIVE_VERSION}")
        try:
            fields = {k: v for k, v in meta["config"].items() if k not in RUNTIME_FIELDS}
            config, architecture = LlamaConfig(**fields), meta["architecture"]
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{directory / NATIVE_CONFIG}: malformed ({e})") from None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{directory / NATIVE_CONFIG}: unsupported architecture {architecture!r}")
        return config, architecture
    if not (directory / "config.json").exists():
        adapter = (directory / "adapter_config.json").is_file()  # a fine-tuning run's OUT/best, say
        raise CheckpointError(f"{directory}: no config.json" + (" (it holds a PEFT adapter: merge it into its base "
                              "with ttl_core.lora_files.load_with_adapter, or give the base model)" if adapter else ""))
    hf = read_json(directory / "config.json", CheckpointError, expect=object)  # from_hf_dict checks its shape
    try:
        config = LlamaConfig.from_hf_dict(hf)
    except TTLError as e:
        raise type(e)(f"{directory / 'config.json'}: {e}") from None
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    return config, architectures[0]


def check_weight_files(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file of a checkpoint directory that `load_pretrained` could not
    start on: its config (ConfigError for values out of range), a missing weight file, or one whose safetensors
    header is unreadable (a cut-off file fails it). The tensors themselves are not read."""
    directory = Path(path)
    read_model_config(directory)
    stored_tensors(directory)


def refuse_non_float(path: Path, key: str, dtype: str, error: type[TTLError]) -> None:
    """Raise `error` for a safetensors tensor not stored in a floating-point dtype (`dtype` as its header names it):
    copied into the float weights, ints, bools or fp8 would be cast silently."""
    if dtype not in SAFETENSORS_DTYPES:
        raise error(f"{path}: tensor {key} has dtype {dtype}; ttl loads floating-point weights "
                    f"({', '.join(SAFETENSORS_DTYPES)})")


def stored_tensors(directory: Path) -> tuple[dict[Path, Any], dict[str, tuple[Path, list[int]]]]:
    """The opened (memory-mapped) safetensors files of a checkpoint directory, and each tensor's file and shape
    by name. A tensor stored twice, or not in a floating-point dtype, is a CheckpointError naming it."""
    handles = {f: _open_safetensors(f) for f in _weight_files(directory)}
    found: dict[str, tuple[Path, list[int]]] = {}
    for f, handle in handles.items():
        for key in handle.keys():
            piece = handle.get_slice(key)
            refuse_non_float(f, key, piece.get_dtype(), CheckpointError)
            if key in found:  # which copy to load would be arbitrary
                raise CheckpointError(f"{directory}: tensor {key} is stored in both {found[key][0].name} and {f.name}")
            found[key] = (f, piece.get_shape())
    return handles, found


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | int | torch.device | None = None,
    architecture: str | None = None, torch_dtype: torch.dtype | str | None = None, **config_overrides: Any,
) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """Load a checkpoint directory into a ttl model.

    Reads transformers' layout (`config.json` + `model.safetensors` or a sharded index) or ttl's native one.
    The model is built on the meta device and filled tensor by tensor from the memory-mapped files, so
    host memory peaks near one copy of the weights. `dtype=None` (or "auto") loads in the dtype config.json
    declares, as transformers' default `dtype="auto"` does (a checkpoint may store fp32 norms beside bf16
    matrices), else in the stored embedding's. `torch_dtype` is `dtype`'s older name, which transformers 5 still
    takes without a warning; passing both is refused (transformers would take `dtype`).
    `config_overrides` set runtime fields such as `kernels="torch"` or `attention="eager"`, or the labels.
    `architecture="LlamaForSequenceClassification"` on a causal-LM checkpoint starts a classifier
    fine-tune: the backbone is loaded, the LM head is left out, and a new `score` head (sized by
    `num_labels` / `id2label` in `config_overrides`) is drawn as transformers draws it: normal(0,
    initializer_range), the only draw from torch's global RNG, so after the same `torch.manual_seed` the head
    is transformers' own (on the CPU). The model comes back in eval mode, as transformers'
    `from_pretrained` returns it: call `.train()` before training (dropout)."""
    if torch_dtype is not None and dtype is not None:
        raise CheckpointError(f"load_pretrained got both dtype={dtype!r} and torch_dtype={torch_dtype!r} (its older "
                              "name): pass dtype alone")
    dtype = torch_dtype if dtype is None else dtype
    directory = Path(path)
    device = checked_device(device)
    config, stored_architecture = read_model_config(directory)
    unknown = sorted(set(config_overrides) - {field.name for field in dataclasses.fields(LlamaConfig)})
    if unknown:  # transformers' loader options (device_map, quantization_config, ...) land here
        raise ConfigError(f"load_pretrained takes no {', '.join(unknown)}: neither a LlamaConfig field nor an option "
                          "of ttl's loader (dtype, device, architecture)")
    if config_overrides:
        config = config.replace(**config_overrides)
    architecture = architecture or stored_architecture
    new_head = architecture != stored_architecture
    if new_head and (stored_architecture, architecture) != ("LlamaForCausalLM", "LlamaForSequenceClassification"):
        raise CheckpointError(f"{directory}: a {stored_architecture} checkpoint cannot be loaded as {architecture} "
                              "(only a LlamaForCausalLM can start a LlamaForSequenceClassification)")
    native = (directory / NATIVE_CONFIG).exists()
    handles, found = stored_tensors(directory)
    if _ties_a_transformers_head(directory, config, architecture):
        config = _untied_if_stored_apart(directory, config, handles, found)
    try:
        with torch.device("meta"):
            model = build_model(config, architecture)
    except ConfigError as e:
        raise ConfigError(f"{directory}: {e}") from None
    plan = native_plan(model) if native else hf_plan(config, architecture)
    if new_head:
        plan.pop("score.weight")  # initialized below; the checkpoint's lm_head.weight is not used
    params = dict(model.named_parameters())
    tied_lm = config.tie_word_embeddings and architecture == "LlamaForCausalLM"
    skip_head = new_head or tied_lm
    # safetensors' save_model keeps a shared tensor under its first name in sorted order, lm_head.weight;
    # transformers then fills the embedding from the head, and so does ttl
    if tied_lm and not native and "model.embed_tokens.weight" not in found and "lm_head.weight" in found:
        plan["backbone.embed.weight"] = [("lm_head.weight", None)]
    check_against_plan(plan, params, found, directory,
                       lambda k: bool(IGNORED_HF_TENSORS.fullmatch(k)) or (skip_head and k == "lm_head.weight"))

    embed_key = plan["backbone.embed.weight"][0][0]
    stored = SAFETENSORS_DTYPES[handles[found[embed_key][0]].get_slice(embed_key).get_dtype()]
    target_dtype = resolve_dtype(dtype) or (None if native else _declared_dtype(directory)) or stored
    model = model.to(target_dtype).to_empty(device=device)
    model.tie_weights()
    if new_head:  # the only draw from torch's RNG, as in transformers: the same seed gives the same head
        with torch.no_grad():
            torch.nn.init.normal_(model.score.weight, mean=0.0, std=config.initializer_range)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, pieces in plan.items():
            start = 0
            for key, rows in pieces:
                tensor = _read_tensor(handles, found, key)
                params[name][start:start + tensor.shape[0]].copy_(tensor)
                start += tensor.shape[0]
    if (directory / GENERATION_CONFIG).exists():
        model.generation_config = GenerationSettings(read_json(directory / GENERATION_CONFIG, CheckpointError))
    return model.eval()


def _declared_dtype(directory: Path) -> torch.dtype | None:
    """The weight dtype a transformers config.json declares (`dtype`, formerly `torch_dtype`), if it names one."""
    hf = read_json(directory / "config.json", CheckpointError, expect=object)
    name = (hf.get("dtype") or hf.get("torch_dtype")) if isinstance(hf, dict) else None
    return DTYPES.get(name) if isinstance(name, str) else None


def read_loaded_config(path: str | os.PathLike) -> tuple[LlamaConfig, str]:
    """`read_model_config`'s config and architecture as `load_pretrained` builds the model from them: a transformers
    causal LM whose config.json ties the LM head but whose stored lm_head.weight differs from its embedding is
    untied. Reads those two tensors at most, and only for such a checkpoint; weights it cannot read leave the config
    as config.json says, for the load to name what is damaged."""
    directory = Path(path)
    config, architecture = read_model_config(directory)
    if _ties_a_transformers_head(directory, config, architecture):
        try:
            config = _untied_if_stored_apart(directory, config, *stored_tensors(directory))
        except CheckpointError:
            pass
    return config, architecture


def _ties_a_transformers_head(directory: Path, config: LlamaConfig, architecture: str) -> bool:
    return (config.tie_word_embeddings and architecture == "LlamaForCausalLM"
            and not (directory / NATIVE_CONFIG).exists())


def _untied_if_stored_apart(directory: Path, config: LlamaConfig, handles: dict,
                            found: dict[str, tuple[Path, list[int]]]) -> LlamaConfig:
    """`config` untied where the checkpoint stores other values for lm_head.weight than for its input embedding
    (absent, the embedding loads from the head, as in transformers)."""
    embed_key = "model.embed_tokens.weight"
    if not {embed_key, "lm_head.weight"} <= found.keys():
        return config
    tensors = [_read_tensor(handles, found, key) for key in (embed_key, "lm_head.weight")]
    if tensors[0].shape == tensors[1].shape and torch.equal(*tensors):
        return config
    # one line for a run whose plan read the config first: the default filter shows it once per process
    warnings.warn(f"{directory}: config.json ties the LM head to the embedding, but the checkpoint stores a "
                  "different lm_head.weight; it is kept untied, as transformers does")
    return config.replace(tie_word_embeddings=False)


def _read_tensor(handles: dict, found: dict[str, tuple[Path, list[int]]], key: str) -> torch.Tensor:
    f = found[key][0]
    try:
        return handles[f].get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot read tensor {key} ({e})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, "float32")


def _planned_tensors(params: dict[str, torch.Tensor], plan: Plan, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, pieces in plan.items():
        start = 0
        for key, rows in pieces:
            rows = params[name].shape[0] if rows is None else rows
            out.append((key, params[name][start:start + rows].to(dtype)))
            start += rows
    return out


def save_pretrained(
    model: LlamaForCausalLM | LlamaForSequenceClassification, path: str | os.PathLike,
    max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None, tokenizer: Tokenizer | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a transformers-loadable directory: safetensors (sharded with an index above `max_shard_size`),
    `config.json`, a causal LM's `generation_config.json`, and the tokenizer files when a tokenizer is given. Every
    file is written atomically, and over an earlier checkpoint its config goes first and comes back last
    (`withdraw_configs`). `dtype=None` writes every tensor in the embedding's dtype (the model's, unless its dtypes
    are mixed). `state_dict` (ttl names) replaces the model's own parameters, e.g. the full weights gathered from an
    FSDP-sharded model."""
    directory = Path(path)
    config = model.config
    plan = hf_plan(config, model.architecture)
    params = dict(model.named_parameters())
    if state_dict is not None:
        _check_state_dict(state_dict, {name: params[name].shape for name in plan})
        params = state_dict
    dtype = resolve_dtype(dtype) or params["backbone.embed.weight"].dtype
    _refuse_unplanned(sorted(set(params) - set(plan) - {"lm_head.weight"}), "an HF checkpoint")
    shard_bytes = parse_shard_size(max_shard_size)
    withdraw_configs(directory)  # a stale ttl_config.json would also take precedence when loading
    stale = write_shards(directory, _planned_tensors(params, plan, dtype), shard_bytes)
    _write_generation_config(directory, model)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory, config.max_position_embeddings)
    write_json(directory / "config.json", config.to_hf_dict(model.architecture, _dtype_name(dtype)))
    remove_stale(stale)


def withdraw_configs(directory: Path) -> None:
    """Remove a checkpoint directory's configs (made first) before new files go in, the new config last: a writer
    killed midway leaves a directory every loader refuses, never new weights under the old config, which loads."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", NATIVE_CONFIG):
        (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)


def _write_generation_config(directory: Path, model) -> None:
    """`generation_config.json`: the model's generation settings as transformers writes them (those its checkpoint
    was loaded with, extra EOS ids and sampling defaults included, else those derived from its config; an id they
    lack stays out, as transformers' generate() then does not read the config's), kept in either layout; for a causal
    LM only, as transformers writes it only for models that generate."""
    if model.architecture != "LlamaForCausalLM":
        return
    settings = model.generation_config
    if settings is None:  # a program set it so
        settings = GenerationSettings.from_model_config(model.config)
    write_json(directory / GENERATION_CONFIG, dict(settings))


def _refuse_unplanned(unplanned: list[str], layout: str) -> None:
    """Refuse, before anything is written, parameters a checkpoint in `layout` cannot represent (loading would
    refuse or drop them): LoRA pairs, typically."""
    if unplanned:
        raise CheckpointError(f"the model holds parameters {layout} cannot represent ({_list_some(unplanned)}); "
                              "LoRA adapters are merged with ttl_core.lora.unload_lora or saved with save_adapter")


def _check_state_dict(state_dict: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
    """A state dict handed to `save_pretrained` holds every weight under the model's own names and shapes
    (an ungathered shard or a wrapper's prefix would otherwise be sliced into a broken checkpoint)."""
    missing = [name for name in shapes if name not in state_dict]
    if missing:
        raise CheckpointError(f"state_dict lacks {_list_some(missing)} (expected the model's own parameter names, "
                              "without DDP or torch.compile prefixes)")
    wrong = [f"{name} {tuple(state_dict[name].shape)} (model: {tuple(shape)})" for name, shape in shapes.items()
             if tuple(state_dict[name].shape) != tuple(shape)]
    if wrong:
        raise CheckpointError(f"state_dict shapes differ from the model's: {_list_some(wrong)}")


def save_native(model: LlamaForCausalLM | LlamaForSequenceClassification, path: str | os.PathLike,
                max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None) -> None:
    """Write ttl's native layout: fused parameters under ttl's names, `ttl_config.json` and, as
    `save_pretrained` does, a causal LM's `generation_config.json`."""
    directory = Path(path)
    dtype = resolve_dtype(dtype) or model.backbone.embed.weight.dtype
    params = dict(model.named_parameters())
    with torch.device("meta"):  # the parameters a model built from this config has, which loading expects
        _refuse_unplanned(sorted(set(params) - set(native_plan(build_model(model.config, model.architecture)))),
                          "ttl's native layout")
    shard_bytes = parse_shard_size(max_shard_size)
    withdraw_configs(directory)  # transformers too would read the new weights under an old config.json
    stale = write_shards(directory, _planned_tensors(params, native_plan(model), dtype), shard_bytes)
    _write_generation_config(directory, model)
    # runtime choices (kernels, attention backend) belong to the machine that loads the checkpoint
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in RUNTIME_FIELDS}
    write_json(directory / NATIVE_CONFIG, {"format": "ttl", "version": NATIVE_VERSION,
                                           "architecture": model.architecture, "config": config})
    remove_stale(stale)
