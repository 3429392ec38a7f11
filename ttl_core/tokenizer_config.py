"""tokenizer_config.json (and special_tokens_map.json) as transformers 5 reads them beside a tokenizer file: the
tokens they add to the vocabulary and how each is treated (special or not, how it is matched), the tokens that play
<s>, </s> and <pad>, whether <s> / </s> go around an encoded text, and the chat template."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .errors import TokenizerError, is_integer, is_number
from .fileio import LONE_SURROGATE, read_json

ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"  # transformers 5's
# transformers' model_max_length where nothing names one, and the lengths past which it neither pads nor truncates
# to model_max_length (its VERY_LARGE_INTEGER and LARGE_INTEGER), both meaning "no limit"
NO_LENGTH_LIMIT, LIMITLESS_PAST = int(1e30), int(1e20)


def read_tokenizer_json(path: Path) -> object:
    """The JSON document of a tokenizer file at `path` (tokenizer.json, tokenizer_config.json, ...): a string in it
    holding half an escaped UTF-16 pair ("\\ud83d" alone), which no token's text can, is a TokenizerError naming
    the file, where sentencepiece or protobuf would fail on it naming neither file nor token."""
    document = read_json(path, TokenizerError, expect=object)
    todo = [document]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo += [*node, *node.values()]
        elif isinstance(node, list):
            todo += node
        elif isinstance(node, str) and (lone := LONE_SURROGATE.search(node)):
            raise TokenizerError(f"{path}: the string {node[:40]!r} holds a lone surrogate {lone.group()!r} (half an "
                                 "escaped UTF-16 pair)")
    return document


def read_config(path: Path) -> dict | None:
    """The tokenizer_config.json or special_tokens_map.json at `path`, or None where there is none."""
    if not path.is_file():
        return None
    config = read_tokenizer_json(path)
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def bos_eos_flags(path: Path, config: dict | None) -> tuple[bool, bool]:
    """Whether transformers 5 puts <s> / </s> around a text it encodes with a tokenizer.model (no tokenizer.json)
    whose config is `config`: as its `add_bos_token` / `add_eos_token` say, and not where they are absent (which
    older releases read as <s> and no </s>). Without a config transformers reads no Llama tokenizer at all (its
    releases split text differently there): <s> and no </s> then, as for a model file itself."""
    if config is None:
        return True, False
    flags = [config.get(key, False) for key in ("add_bos_token", "add_eos_token")]
    if not all(isinstance(flag, bool) for flag in flags):
        raise TokenizerError(f"{path}: add_bos_token and add_eos_token must be true or false, got {flags[0]!r} and "
                             f"{flags[1]!r}")
    return flags[0], flags[1]


def split_special_tokens_flag(path: Path, config: dict | None) -> bool:
    """A config's `split_special_tokens`: whether transformers reads the special tokens written in a text as text
    unless a call says otherwise (absent: no)."""
    flag = config.get("split_special_tokens", False) if config else False
    if not isinstance(flag, bool):
        raise TokenizerError(f"{path}: split_special_tokens must be true or false, got {flag!r}")
    return flag


def length_settings(path: Path, config: dict) -> tuple[str, str, int | float]:
    """A config's `padding_side`, `truncation_side` and `model_max_length` as transformers 5's LlamaTokenizer reads
    them: padding on the left and truncation on the right where it names no side, and `NO_LENGTH_LIMIT` where it
    names no length (or null)."""
    sides = [config.get(key, default) for key, default in (("padding_side", "left"), ("truncation_side", "right"))]
    if not all(side in ("left", "right") for side in sides):
        raise TokenizerError(f"{path}: padding_side and truncation_side must be \"left\" or \"right\", got "
                             f"{sides[0]!r} and {sides[1]!r}")
    limit = config.get("model_max_length")
    return sides[0], sides[1], checked_length_limit(NO_LENGTH_LIMIT if limit is None else limit, f"{path}: ")


def checked_length_limit(limit: object, where: str) -> int | float:
    """`limit` as a `model_max_length`, or a TokenizerError starting with `where`: a non-negative integer, or any
    number past `LIMITLESS_PAST` (a JSON writer may spell transformers' int(1e30) as 1e+30), which means no limit."""
    if not (is_integer(limit) and limit >= 0 or is_number(limit) and limit > LIMITLESS_PAST):
        raise TokenizerError(f"{where}model_max_length must be a non-negative integer (int(1e30): no limit, as in "
                             f"transformers), got {limit!r}")
    return limit


def prefix_scheme(path: Path, config: dict | None) -> str:
    """Where transformers 5's LlamaTokenizer puts the "▁" word prefix (its Metaspace `prepend_scheme`): "first",
    at the start of the text only (`legacy: false`, the default); "always", also after every special token in
    it (`legacy: true`); "never" (`add_prefix_space: false`, which also keeps the decoded text's first space)."""
    legacy, add_prefix_space = (config.get("legacy"), config.get("add_prefix_space")) if config else (None, None)
    if not (legacy in (None, True, False) and add_prefix_space in (None, True, False)):
        raise TokenizerError(f"{path}: legacy and add_prefix_space must be true, false or null, got {legacy!r} and "
                             f"{add_prefix_space!r}")
    return "never" if add_prefix_space is False else "always" if legacy else "first"


def role_tokens(path: Path, config: dict | None) -> dict[str, str | None]:
    """role (`bos_token` ...) -> the token a config (or special tokens map) names for it, None where it says null;
    roles it does not name are left out. A token may be written as a string or as {"content": ...}. transformers
    appends those the vocabulary lacks, in the order of `ROLES`, before the extra special tokens."""
    roles = {}
    for role in ROLES:
        if config is None or role not in config:
            continue
        value = config[role]
        text = value.get("content") if isinstance(value, dict) else value
        if value is not None and not (isinstance(text, str) and text):
            raise TokenizerError(f"{path}: {role} must be a token string, an object with a string 'content', or "
                                 f"null; got {value!r}")
        roles[role] = text
    return roles


class TokenFlags(NamedTuple):
    """How transformers treats an added token (an entry of tokenizer_config.json's `added_tokens_decoder` or of
    tokenizer.json's `added_tokens`). Every added token is matched whole in a text, taking the whitespace before it
    (`lstrip`), after it (`rstrip`), or only where no letter, digit or mark touches it (`single_word`); `special`
    ones are dropped by decode(skip_special_tokens=True), the others kept. transformers 5's LlamaTokenizer has no
    normalizer, so `normalized` only orders the search: those not normalized are found first (see
    `ttl_core.added_tokens`)."""
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False
    special: bool = True


def token_flags(path: Path, entries: list) -> dict[str, TokenFlags]:
    """text -> flags of the added-token entries (tokenizer_config.json's `added_tokens_decoder` values,
    tokenizer.json's `added_tokens`). An entry without "special" is not special, as transformers' `AddedToken`
    defaults; without "normalized", normalized when not special, as it also defaults."""
    flags = {}
    for entry in entries:
        special = entry.get("special", False)
        values = [entry.get(key, False) for key in ("lstrip", "rstrip", "single_word")]
        values += [entry.get("normalized", not special), special]
        if not all(isinstance(value, bool) for value in values):
            raise TokenizerError(f"{path}: added token {entry.get('content')!r}: lstrip, rstrip, single_word, "
                                 f"normalized and special must be true or false, got {tuple(values)}")
        flags[entry["content"]] = TokenFlags(*values)
    return flags


def added_tokens_entries(tokens: dict[int, str], flags: dict[str, TokenFlags], special: set[int]) -> dict:
    """tokenizer_config.json's `added_tokens_decoder` for `tokens` (id -> text), with the flags they were read
    with (none read: a token's defaults) and `special` as the ids in `special` say."""
    entries = {}
    for i, token in sorted(tokens.items()):
        entry = flags.get(token, TokenFlags())._asdict()
        entries[str(i)] = {"content": token, **entry, "special": i in special}
    return entries


def added_tokens_decoder(path: Path, config: dict | None) -> dict[int, str] | None:
    """id -> text of a `tokenizer_config.json`'s `added_tokens_decoder` ({"<id>": {"content": ...}}); None when the
    config has none, and tokenizer.json's `added_tokens` count instead."""
    if config is None or "added_tokens_decoder" not in config:
        return None
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(
            key.isdigit() and isinstance(t, dict) and isinstance(t.get("content"), str) for key, t in decoder.items()):
        raise TokenizerError(f"{path}: added_tokens_decoder must map token ids to objects with a string 'content'")
    return {int(key): t["content"] for key, t in decoder.items()}


def extra_special_tokens(path: Path, config: dict | None) -> list[str]:
    """The texts a `tokenizer_config.json` lists in `extra_special_tokens` (a list, or a dict of named tokens),
    or, when that is absent or empty, in the older `additional_special_tokens` (strings or {"content": ...}
    objects): transformers 5 reads the older key only then, and appends them in order."""
    if config is None:
        return []
    names = {}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        tokens = config.get(key) or []
        tokens = list(tokens.values()) if isinstance(tokens, dict) else tokens
        texts = [t.get("content") if isinstance(t, dict) else t for t in tokens] if isinstance(tokens, list) else None
        if texts is None or not all(isinstance(t, str) and t for t in texts):
            raise TokenizerError(f"{path}: {key} must be a list of token strings")
        names[key] = list(dict.fromkeys(texts))
    return names["extra_special_tokens"] or names["additional_special_tokens"]


def read_chat_template(directory: Path, config: dict | None) -> str | dict[str, str] | None:
    """A tokenizer directory's chat template as transformers 5 reads it: chat_template.jinja (the "default") and
    additional_chat_templates/NAME.jinja where any exist, else the config's `chat_template` (a template, or a list
    of {"name", "template"}, or a dict name -> template); several come as a dict name -> template, as in
    transformers."""
    files = {"default": directory / CHAT_TEMPLATE_FILE, **{f.stem: f for f in (directory / CHAT_TEMPLATE_DIR).glob(
        "*.jinja")}}
    try:
        templates = {name: f.read_text(encoding="utf-8") for name, f in files.items() if f.is_file()}
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{directory}: unreadable chat template ({e})") from None
    if not templates:
        value = (config or {}).get("chat_template")
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, dict) for t in value):  # transformers' own saves
            value = {t.get("name"): t.get("template") for t in value}
        if not (isinstance(value, dict) and all(isinstance(name, str) and isinstance(template, str)
                                                for name, template in value.items())):
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: chat_template must be a template string, "
                                 "a list of {\"name\", \"template\"} objects or an object name -> template")
        templates = value
    return templates["default"] if list(templates) == ["default"] else templates


def replace_chat_template_files(directory: Path, template: str | dict[str, str] | None) -> dict:
    """Remove the chat template files of `directory`, which transformers reads before the config, and return the
    tokenizer_config.json entry that holds `template` (empty for none), as transformers writes it there."""
    for f in [directory / CHAT_TEMPLATE_FILE, *(directory / CHAT_TEMPLATE_DIR).glob("*.jinja")]:
        f.unlink(missing_ok=True)
    if isinstance(template, dict):
        return {"chat_template": [{"name": name, "template": text} for name, text in template.items()]}
    return {} if template is None else {"chat_template": template}
