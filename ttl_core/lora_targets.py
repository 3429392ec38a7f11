"""Which of a model's modules PEFT's LoRA options pick, found on ttl's (fused) layers.

PEFT names the separate HF projections (`model.layers.0.self_attn.q_proj`); ttl fuses q/k/v and gate/up into
one linear layer each. The functions here translate PEFT's target_modules, exclude_modules, layers_to_transform,
layers_pattern and modules_to_save into ttl's layers and the rows each HF projection occupies in them, with the
mapping from `ttl_core.hf.hf_plan`, and rank_pattern and alpha_pattern into each projection's rank and alpha.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch.nn as nn

from .errors import AdapterError
from .hf import hf_plan

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # the HF modules of the input embedding and the LM head
EMBEDDING_PARAMS = ("backbone.embed.weight", "lm_head.weight")  # and ttl's parameters of them
# the types PEFT's LoraConfig takes for the options that choose the adapted layers (NoneType: may be unset)
OPTION_TYPES = {"target_modules": (str, list), "exclude_modules": (str, list, type(None)),
                "layers_to_transform": (int, list, type(None)), "layers_pattern": (str, list, type(None)),
                "modules_to_save": (list, type(None)), "use_rslora": (bool,), "use_dora": (bool,),
                "ensure_weight_tying": (bool,)}
TYPE_WORDS = {str: "a string", int: "an integer", list: "a list"}


def linear_slices(model: nn.Module) -> dict[str, tuple[str, dict[str, tuple[int, int]]]]:
    """ttl linear module path -> (HF module prefix, {HF projection name: (start, stop) rows})."""
    plan = hf_plan(model.config, model.architecture)
    out = {}
    for param, pieces in plan.items():
        module, kind = param.rsplit(".", 1)
        if kind != "weight" or not any(p[0].rsplit(".", 2)[-2] in LINEAR_NAMES for p in pieces):
            continue
        slices, start = {}, 0
        for hf_name, rows in pieces:
            rows = rows if rows is not None else model.get_parameter(param).shape[0]
            slices[hf_name.rsplit(".", 2)[-2]] = (start, start + rows)
            start += rows
        out[module] = (pieces[0][0].rsplit(".", 2)[0], slices)
    return out


def check_option_types(options: dict[str, Any]) -> None:
    """Refuse a LoRA option (PEFT's name -> value) of a type PEFT does not take, in one line naming it: a string
    where a list belongs would pick modules by its letters, and any text would count as a true flag. A tuple (or a
    set of target names) is taken where PEFT's JSON holds a list."""
    for key, value in options.items():
        kinds = OPTION_TYPES[key]
        if not isinstance(value, (*kinds, *((tuple, set, frozenset) if list in kinds else ()))):
            expected = " or ".join(TYPE_WORDS[kind] for kind in kinds if kind in TYPE_WORDS) or "true or false"
            raise AdapterError(f"LoRA {key} must be {expected}, got {value!r}")
        element = int if int in kinds else str  # a list holds what the option names alone: layer indices, or names
        if isinstance(value, (list, tuple, set, frozenset)) and not all(
                isinstance(item, element) and not isinstance(item, bool) for item in value):
            raise AdapterError(f"LoRA {key} must list {TYPE_WORDS[element].split()[-1]}s, got {value!r}")


def target_names(targets: str | Iterable[str]) -> list[str] | str:
    """`targets` as a list of names, or, as PEFT reads a string other than "all-linear", as a pattern."""
    if isinstance(targets, str):
        return list(LINEAR_NAMES) if targets.lower() == "all-linear" else targets
    return list(targets)


def _ends_with_one_of(key: str, names: list | str) -> set:
    """The entries of `names` that PEFT's list rule matches to the module path `key`: itself, or "." + it at its
    end; a string `names` is a pattern the whole path must match."""
    if isinstance(names, str):
        return {names} if re.fullmatch(names, key) else set()
    return {n for n in names if isinstance(n, str) and f".{key}".endswith(f".{n}")}


def _layer_index(key: str, layers_pattern: str | list | None) -> int | None:
    """The layer number in a module path, found as PEFT finds it for `layers_to_transform`: the first number
    after a part named in `layers_pattern` (any part when there is none)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next(filter(None, (re.match(regex, key) for regex in regexes)), None)
    return int(match["idx"]) if match else None


def _other_module_paths(model: nn.Module) -> list[str]:
    """The paths of the transformers model's modules other than the attention and MLP projections."""
    head = "lm_head" if model.architecture == "LlamaForCausalLM" else "score"
    paths = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", head]
    for i in range(model.config.num_hidden_layers):
        paths += [f"model.layers.{i}{part}" for part in ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm",
                                                         ".post_attention_layernorm")]
    return paths


def _names_a_module(target: object, paths: list[str]) -> bool:
    return isinstance(target, str) and any(_ends_with_one_of(path, [target]) for path in paths)


def _trained_in_full(path: str, modules_to_save: Iterable[str]) -> bool:
    """Whether a modules_to_save entry names the module at `path` or one above it, which PEFT then trains in full
    and never adapts (its own rule, the entry read as a pattern)."""
    return any(re.match(rf"(^|.*\.){saved}($|\..*)", path) for saved in modules_to_save)


def present_targets(model: nn.Module, targets: str | list) -> str | list:
    """A target list without the entries that name no module of the model, which PEFT passes over (the layer
    names of other architectures, in lists written for several) unless no entry is left; a pattern or
    "all-linear" as it is."""
    if isinstance(targets, str):
        return targets
    paths = [f"{prefix}.{name}" for prefix, slices in linear_slices(model).values() for name in slices]
    paths += _other_module_paths(model)
    present = [t for t in targets if not isinstance(t, str) or _names_a_module(t, paths)]  # a non-name: an error later
    return present or targets  # none left: the list as it is, for targeted_slices to name


def _check_selection_options(names: list[str] | str, exclude_modules: str | list | None,
                             layers_to_transform: int | list | None, layers_pattern: str | list | None) -> None:
    """Refuse the layer options PEFT refuses with these target `names`, and patterns that are no regular
    expressions."""
    if isinstance(names, str) and (layers_to_transform is not None or layers_pattern is not None):
        option = "layers_to_transform" if layers_to_transform is not None else "layers_pattern"
        raise AdapterError(f"LoRA {option} cannot go with the target pattern {names!r}, which picks the layers "
                           "itself (as in PEFT; list the target names instead)")
    if layers_pattern and layers_to_transform is None:
        raise AdapterError(f"LoRA layers_pattern {layers_pattern!r} needs layers_to_transform (as in PEFT)")
    for what, pattern in (("target", names), ("exclude_modules", exclude_modules)):
        try:
            if isinstance(pattern, str):
                re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"LoRA {what} pattern {pattern!r} is not a regular expression ({e})") from None


def targeted_slices(model: nn.Module, targets: str | Iterable[str], exclude_modules: str | list | None = None,
                    layers_to_transform: int | list | None = None, layers_pattern: str | list | None = None,
                    modules_to_save: Iterable[str] = ()) -> dict[str, dict[str, tuple[int, int]]]:
    """ttl linear module path -> the slices (HF projection name: rows) that PEFT's rules adapt. An HF module
    ("model.layers.0.self_attn.q_proj") is adapted when a listed target is its path or ends it ("q_proj",
    "self_attn.q_proj", as in the lists PEFT writes for "all-linear"), or a pattern target matches it whole;
    unless `exclude_modules` names it the same way, `modules_to_save` names it or a module above it (trained in
    full instead), or `layers_to_transform` (with a list of targets) leaves its layer out (a target that is the
    module's whole path is exempt, as in PEFT). A listed target that names no linear layer of the model, targets
    that leave none, and layer options PEFT refuses are errors."""
    names = target_names(targets)
    _check_selection_options(names, exclude_modules, layers_to_transform, layers_pattern)
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform or []
    chosen, named = {}, set()
    for path, (prefix, slices) in linear_slices(model).items():
        for name, rows in slices.items():
            key = f"{prefix}.{name}"
            hits = _ends_with_one_of(key, names)
            named |= hits
            excluded = exclude_modules and _ends_with_one_of(key, exclude_modules)
            if not hits or excluded or _trained_in_full(key, modules_to_save):
                continue
            if layers and key not in names and _layer_index(key, layers_pattern) not in layers:
                continue
            chosen.setdefault(path, {})[name] = rows
    if isinstance(names, str):  # PEFT refuses a pattern that matches any module other than ttl's linear layers
        other = next((key for key in _other_module_paths(model) if re.fullmatch(names, key)), None)
        if other:
            raise AdapterError(f"LoRA target pattern {names!r} also matches {other}, which is not one of the "
                               f"linear layers {', '.join(LINEAR_NAMES)}")
    saved_in_full = [path for path in _other_module_paths(model) if _trained_in_full(path, modules_to_save)]

    def names_nothing(target: object) -> bool:  # neither a linear layer nor a module trained in full instead
        if not isinstance(target, str):
            return True
        return target not in named and not _names_a_module(target, saved_in_full)

    unknown = [] if isinstance(names, str) else [t for t in names if names_nothing(t)]
    unadaptable = [t for t in unknown if _names_a_module(t, _other_module_paths(model))]
    if unadaptable:  # PEFT would adapt an embedding or the LM head: loading without it would change the logits
        raise AdapterError(f"LoRA on {unadaptable} is not supported: ttl adapts only the attention and MLP "
                           f"projections ({', '.join(LINEAR_NAMES)})")
    if unknown:
        raise AdapterError(f"unknown LoRA target module(s) {unknown}; choose from {', '.join(LINEAR_NAMES)}, "
                           "'all-linear', module paths such as model.layers.0.self_attn.q_proj, or a pattern that "
                           "matches whole paths")
    if not chosen:
        raise AdapterError(f"LoRA targets {names!r} leave no linear layer of the model to adapt (with "
                           f"exclude_modules={exclude_modules!r}, layers_to_transform={layers_to_transform!r}; a "
                           f"string is a pattern over whole module paths, as in PEFT)")
    return chosen


def modules_to_save_params(model: nn.Module, names: Iterable[str], strict: bool = True) -> dict[str, str]:
    """ttl parameter name -> PEFT key for the HF modules `modules_to_save` names (score, embed_tokens, lm_head,
    norm, ...): as PEFT matches them, each module whose path ends with a name, as a string ("norm": every norm).
    Unless `strict`, names the model lacks are skipped (PEFT writes "classifier" beside "score" for a classifier).
    A name taking part of a fused projection (q_proj) is refused: ttl cannot train one in full."""
    plan = hf_plan(model.config, model.architecture)
    if tied(model):
        plan["lm_head.weight"] = [("lm_head.weight", None)]
    modules = {p: [key.rsplit(".", 1)[0] for key, _ in pieces] for p, pieces in plan.items()}  # HF module paths
    out = {}
    for name in names:
        found = [p for p, paths in modules.items() if any(path.endswith(name) for path in paths)]
        fused = next((modules[p] for p in found if len(modules[p]) > 1), None)
        if fused:
            raise AdapterError(f"modules_to_save names {name!r}, which takes {', '.join(fused)}: a fused projection "
                               "ttl cannot train in full (adapt it with LoRA instead)")
        if tied(model) and set(EMBEDDING_PARAMS) & set(found):  # one tensor, two names: PEFT's ensure_weight_tying
            found += EMBEDDING_PARAMS  # saves it under both
        if not found and strict:
            raise AdapterError(f"modules_to_save names {name!r}, which this {model.architecture} does not have")
        out.update({p: PEFT_PREFIX + plan[p][0][0] for p in found})
    return out


def tied(model: nn.Module) -> bool:
    """Whether the model's LM head is its input embedding (a classifier has no LM head to share it, whatever
    its config says)."""
    return model.architecture == "LlamaForCausalLM" and model.config.tie_word_embeddings


def checked_pattern(option: str, pattern: Any, valid: Callable[[Any], bool], what: str) -> dict:
    """`pattern` (rank_pattern or alpha_pattern: module path pattern -> value; None for none) once its keys are
    known to be regular expressions and its values `valid`."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"LoRA {option} must map module name patterns to values, got {pattern!r}")
    for key, value in pattern.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise AdapterError(f"LoRA {option} key {key!r} is not a regular expression ({e})") from None
        if not valid(value):
            raise AdapterError(f"LoRA {option}[{key!r}] must be {what}, got {value!r}")
    return dict(pattern)


def pattern_value(pattern: dict, key: str, default: Any) -> Any:
    """The value a rank_pattern or alpha_pattern gives the HF module path `key`, as PEFT's get_pattern_key finds
    it: that of the first pattern the path ends with (after a dot, or as a whole), else `default`."""
    return next((value for p, value in pattern.items() if re.match(rf"(.*\.)?({p})$", key)), default)
