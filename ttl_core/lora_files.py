"""PEFT's LoRA adapter files, written and read: adapter_config.json and adapter_model.safetensors.

`save_adapter` writes a model's adapters (from `ttl_core.lora.apply_lora`) as PEFT does, `load_adapter` puts an
adapter directory's (ours or PEFT's) on a model, checking it fits first, and `load_with_adapter` turns an adapter
directory into a ready causal LM: its base, resized and merged. PEFT's key names are derived from the HF module names
of `ttl_core.lora_targets`. An adapter_config.json setting that ttl cannot reproduce (the list: `ttl_core.lora`) is
refused in one line naming the file and the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdapterError, CheckpointError
from .fileio import atomic_write, read_json, write_json
from .hf import NATIVE_CONFIG, load_pretrained, read_model_config, refuse_non_float
from .lora import apply_lora, lora_layers, unload_lora
from .lora_targets import (EMBEDDING_MODULES, OPTION_TYPES, PEFT_PREFIX, check_option_types, linear_slices,
                           modules_to_save_params, present_targets)
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
    overwrite the model's. Everything is checked before the model changes: an adapter that does not fit, or that
    ttl cannot reproduce on this model, is a one-line AdapterError naming the file. `is_trainable=False` freezes it
    too and sets eval mode (inference); returns the model."""
    directory = Path(path)
    config = _read_adapter_config(directory)
    _check_reproducible(directory, config, model, is_trainable)
    found = _read_adapter_weights(directory, lambda f, key: f.get_tensor(key))
    try:  # the options PEFT takes but ttl cannot reproduce on this model are refused naming the adapter's file
        settings = _lora_settings(model, config)
        expected = _adapter_shapes(model, settings)
    except AdapterError as e:
        raise AdapterError(f"{directory / CONFIG_FILE}: {e}") from None
    embeddings = _saved_embeddings(directory, model, found, expected)
    base_weights = {name: found.pop(key) for name, key in embeddings.items()}
    _check_fits(directory, found, expected, config["r"])
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


def _check_reproducible(directory: Path, config: dict, model: nn.Module, is_trainable: bool) -> None:
    """Refuse what ttl cannot reproduce of PEFT loading the adapter_config.json `config` onto `model`: trained
    biases on a model that has biases, and training an init_lora_weights='mica' adapter."""
    if is_trainable and config.get("init_lora_weights") == "mica":
        raise AdapterError(f"{directory}: init_lora_weights='mica' trains lora_A only in PEFT, which ttl does not; "
                           "load it for inference (is_trainable=False)")
    # PEFT's bias="all" / "lora_only" train and save the base layers' biases, which a Llama without them lacks
    if config.get("bias", "none") != "none" and any(name.endswith(".bias") for name, _ in model.named_parameters()):
        raise AdapterError(f"{directory}: bias={config['bias']!r} is not supported on a model with biases (ttl "
                           "trains LoRA adapters only, as bias='none')")


def _lora_settings(model: nn.Module, config: dict) -> dict[str, Any]:
    """`apply_lora`'s arguments for the adapter_config.json `config` on `model`, without the target_modules and
    modules_to_save entries that name no module of the model, which PEFT passes over (lists written for several
    architectures; "classifier" beside "score")."""
    saved = [n for n in config.get("modules_to_save") or [] if modules_to_save_params(model, [n], strict=False)]
    return dict(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                targets=present_targets(model, config["target_modules"]),
                use_rslora=config.get("use_rslora", False), use_dora=config.get("use_dora", False),
                modules_to_save=saved, ensure_weight_tying=config.get("ensure_weight_tying", False),
                **{key: config.get(key) for key in ("exclude_modules", "layers_to_transform", "layers_pattern",
                                                    "rank_pattern", "alpha_pattern")})


def _saved_embeddings(directory: Path, model: nn.Module, found: dict[str, torch.Tensor],
                      expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """ttl parameter -> PEFT key of the input embedding and LM head that the adapter's weights `found` hold beside
    the `expected` adapter tensors: PEFT saves a resized vocabulary's (save_embedding_layers) and loads them into
    the base model, and so does ttl, once the model's vocabulary is resized to match, which is checked here."""
    embeddings = {name: key for name, key in modules_to_save_params(model, EMBEDDING_MODULES, strict=False).items()
                  if key in found and key not in expected}
    for name, key in embeddings.items():
        if tuple(found[key].shape) != tuple(model.get_parameter(name).shape):
            raise AdapterError(f"{directory}: {key} has shape {tuple(found[key].shape)}, the model's is "
                               f"{tuple(model.get_parameter(name).shape)} (resize its token embeddings first)")
    return embeddings


def _check_fits(directory: Path, found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], r: int) -> None:
    """Refuse adapter weights `found` that are not exactly the `expected` keys and shapes (rank `r` in the message)."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{directory}: the adapter does not fit this model: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if tuple(found[key].shape) != shape:
            raise AdapterError(f"{directory}: {key} has shape {tuple(found[key].shape)}, the model needs {shape} "
                               f"(r={r})")


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
