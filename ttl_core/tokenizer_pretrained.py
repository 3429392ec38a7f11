"""`Tokenizer.from_pretrained` and `Tokenizer.save_pretrained`: a Hugging Face tokenizer directory (tokenizer.json
or tokenizer.model beside tokenizer_config.json, special_tokens_map.json and chat templates) read and written as
transformers 5 reads and writes it. These are `Tokenizer`'s methods, kept apart from its encoding and decoding; the
files' own settings are read by `ttl_core.tokenizer_config` and `ttl_core.tokenizer_json`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TokenizerError
from .fileio import write_json
from .tokenizer_config import (ROLES, added_tokens_decoder, added_tokens_entries, bos_eos_flags, extra_special_tokens,
                               length_settings, prefix_scheme, read_chat_template, read_config, read_tokenizer_json,
                               replace_chat_template_files, role_tokens, split_special_tokens_flag, token_flags)
from .tokenizer_json import added_tokens_of, template_ends, tokenizer_json_to_sentencepiece

if TYPE_CHECKING:
    from .tokenizer import Tokenizer
    from .tokenizer_config import TokenFlags


def read_tokenizer_dir(cls: type[Tokenizer], directory: str | os.PathLike) -> Tokenizer:
    """Load an HF tokenizer directory as transformers does: its BPE `tokenizer.json` if present (transformers
    then ignores `tokenizer.model`), else `tokenizer.model`; plus the tokens tokenizer_config.json adds and
    the tokens it (or, beside tokenizer.json, special_tokens_map.json) names for the <s> </s> <unk> <pad>
    roles, appended where the vocabulary lacks them. Either file may also be given itself (`--tokenizer
    DIR/tokenizer.model`), and is then the one read.

    Each added token keeps its flags (see `tokenizer_config.TokenFlags`): those marked not special are matched
    whole but kept by decode(skip_special_tokens=True). Where ttl differs from transformers: `bos_id` /
    `eos_id` are the tokens a tokenizer.json template puts around a text even where the config names others for
    those roles; `unk_id` stays the model's `<unk>`; which tokens transformers lists in `all_special_tokens`
    is not read (`save_pretrained` lists the special added tokens), so a token listed among the config's
    extra special tokens but marked not special, or marked special but not listed, is listed otherwise after
    ttl saves it, though encoded and decoded alike."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TokenizerError(f"a tokenizer directory or file path is needed, got {directory!r}")
    path = Path(directory)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"{path}: no tokenizer.model or tokenizer.json")
        path = found[0]
    elif not path.is_file():
        raise TokenizerError(f"{path}: does not exist (no tokenizer.model or tokenizer.json)")
    saved = path.name in ("tokenizer.model", "tokenizer.json")  # files transformers saves with a config
    config_path = path.with_name("tokenizer_config.json")
    config = read_config(config_path) if saved else None
    decoder = added_tokens_decoder(config_path, config)
    if path.suffix != ".json":
        tokenizer = cls(path)
        template, flags = _add_saved_tokens(tokenizer, path, decoder) if saved else (None, {})
    else:
        beside = path.with_name("tokenizer.model")
        model, template, flags = tokenizer_json_to_sentencepiece(path, beside if beside.is_file() else None,
                                                                 decoder)
        try:
            tokenizer = cls(model)
        except TokenizerError as e:  # the converted model names no file
            raise TokenizerError(f"{path}: {e}") from None
    roles = role_tokens(config_path, config)
    if template is not None:  # with tokenizer.json, transformers 5 lets special_tokens_map.json name them too
        map_path = path.with_name("special_tokens_map.json")
        roles |= role_tokens(map_path, read_config(map_path))
    if config is not None:  # transformers' LlamaTokenizer pads with nothing unless a pad token is named
        roles.setdefault("pad_token", None)
    # appended in the order of ROLES, as transformers appends them, wherever each was named
    tokenizer.add_special_tokens([roles[r] for r in ROLES if roles.get(r) is not None]
                                 + extra_special_tokens(config_path, config))
    if decoder is not None:  # the added tokens' flags come from where their ids do
        flags = token_flags(config_path, list((config.get("added_tokens_decoder") or {}).values()))
    tokenizer._token_flags = flags
    # the model's pieces listed among the added tokens are matched whole too (the flags name every listed token)
    tokenizer._listed_piece_ids |= {tokenizer.token_to_id(token) for token in flags} - {None}
    tokenizer._take_roles(path, roles, template, bos_eos_flags(config_path, config))
    tokenizer.prefix_scheme = prefix_scheme(config_path, config)
    tokenizer.split_special_tokens = split_special_tokens_flag(config_path, config)
    if config is not None:
        tokenizer.padding_side, tokenizer.truncation_side, tokenizer.model_max_length = length_settings(
            config_path, config)
    tokenizer.chat_template = read_chat_template(path.parent, config) if saved else None
    return tokenizer


def _add_saved_tokens(tokenizer: Tokenizer, model_file: Path, decoder: dict[int, str] | None) \
        -> tuple[tuple[int | None, int | None] | None, dict[str, TokenFlags]]:
    """Append the tokens transformers added to the model in `model_file` (its `add_special_tokens` never
    writes tokenizer.model): the config's `added_tokens_decoder` (`decoder`), else tokenizer.json's
    `added_tokens` (transformers 5 reads those only then); their ids must follow on from the model's pieces.
    Returns, where a tokenizer.json is beside it, the ids its post-processor puts around a text (transformers 5
    saves that setting only there) and its added tokens' flags; else (None, {})."""
    json_path = model_file.with_name("tokenizer.json")
    spec = read_tokenizer_json(json_path) if json_path.is_file() else None
    template, flags = None, {}
    if spec is not None:
        template = template_ends(json_path, spec.get("post_processor") if isinstance(spec, dict) else None)
        if decoder is None:
            decoder = added_tokens_of(json_path, spec)
            flags = token_flags(json_path, spec.get("added_tokens") or [])
    extra = sorted((i, token) for i, token in (decoder or {}).items() if i >= tokenizer.vocab_size)
    ids, expected = [i for i, _ in extra], list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(extra)))
    if ids != expected:
        raise TokenizerError(f"{model_file.parent}: added token ids {ids} do not continue {model_file.name}'s "
                             f"{tokenizer.vocab_size} pieces (expected {expected})")
    for (i, token), j in zip(extra, tokenizer.add_special_tokens([token for _, token in extra])):
        if i != j:
            raise TokenizerError(f"{model_file.parent}: added token {token!r} (id {i}) is already in "
                                 f"{model_file.name} as id {j}")
    return template, flags


def write_tokenizer_dir(tokenizer: Tokenizer, directory: str | os.PathLike,
                        model_max_length: int | None = None) -> None:
    """Write `tokenizer.model`, `tokenizer_config.json` (with the chat template) and `special_tokens_map.json`, and
    remove a `tokenizer.json` and template files. The config's `model_max_length`, where transformers truncates,
    is the one given (a model's context, saved beside it), else the tokenizer's own, as transformers writes it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer.model")
    # transformers and from_pretrained read a tokenizer.json before tokenizer.model: an older one would win
    (directory / "tokenizer.json").unlink(missing_ok=True)
    # a Llama-2 style model has no pad piece (id -1): transformers reads that as pad_token null
    ids = {"unk_token": tokenizer.unk_id, "bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
           "pad_token": tokenizer.pad_id}
    special = {name: tokenizer.sp.id_to_piece(i) if i >= 0 else None for name, i in ids.items()}
    decoder = added_tokens_entries({i: token for token, i in tokenizer._whole_ids.items()}, tokenizer._token_flags,
                                   tokenizer.special_ids)
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": tokenizer.prefix_scheme == "always",
              "add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
              "add_prefix_space": False if tokenizer.prefix_scheme == "never" else None,
              "clean_up_tokenization_spaces": False,
              "model_max_length": tokenizer.model_max_length if model_max_length is None else model_max_length,
              "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
              "sp_model_kwargs": {}, "added_tokens_decoder": decoder, **special}
    if tokenizer.split_special_tokens:  # transformers too writes it only when set
        config["split_special_tokens"] = True
    # transformers lists these in all_special_tokens: the added tokens that are special, as it saves them
    listed = [token for token in tokenizer.added_tokens if tokenizer._added_ids[token] in tokenizer.special_ids]
    extra = {"additional_special_tokens": listed} if listed else {}
    template = replace_chat_template_files(directory, tokenizer.chat_template)
    write_json(directory / "tokenizer_config.json", {**config, **extra, **template})
    write_json(directory / "special_tokens_map.json", {**special, **extra})
