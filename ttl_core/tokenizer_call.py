"""`Tokenizer.__call__`: transformers' `tokenizer(texts, padding=True, return_tensors="pt")`, whose result `**`
unpacks into `generate` or a model, giving the `input_ids` and `attention_mask` transformers 5's LlamaTokenizer
gives for the same texts and settings: the special tokens `add_special_tokens` puts around each text, padding with
the tokenizer's pad id, truncation that keeps those special tokens, and the settings' defaults and interplay
(`max_length` alone truncates; padding="max_length" or truncation without `max_length` use `model_max_length`, and
nothing where that is past 10**20, as transformers' "no limit" int(1e30) is). One text, or a list of them: text
pairs, pre-split words and the other `return_*` outputs are refused, and so is what transformers answers oddly:
`max_length` shorter than the special tokens when truncating (its tokenizers library then does not truncate at all),
an empty list (an IndexError there) and tensors of rows of different lengths (for "np" an array of arrays there, for
"pt" an error, but an empty float tensor where the first row is empty), or padding to a length that cannot fit in
memory (a MemoryError there).

Also the other names transformers' programs call a tokenizer by: `len(tokenizer)`, the special tokens and their ids
(`tokenizer.eos_token_id`; `tokenizer.pad_token = tokenizer.eos_token` sets the padding token), `tokenize`,
`convert_ids_to_tokens`, `convert_tokens_to_ids`, `get_vocab`, `add_special_tokens` given transformers' dict and
`pad`, which transformers' data collators call."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .errors import TokenizerError, is_integer
from .tokenizer_config import LIMITLESS_PAST, checked_length_limit

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

PADDING = {"longest": "longest", "max_length": "max_length", "do_not_pad": None}
TRUNCATION = {"longest_first": True, "only_first": True, "do_not_truncate": False}  # one text: both strategies agree
# where transformers warns the same (in its own words)
MAX_LENGTH_IGNORED = ("tokenizer(): max_length does nothing here: padding=True pads to the longest text and nothing "
                      "truncates (padding='max_length' pads to it, truncation=True cuts to it)")
# transformers' other options, accepted at the value that asks for nothing (None, False, 0)
OFF_ONLY = ("text_pair", "text_target", "text_pair_target", "stride", "is_split_into_words", "pad_to_multiple_of",
            "return_token_type_ids", "return_overflowing_tokens", "return_special_tokens_mask",
            "return_offsets_mapping", "return_length", "tokenizer_kwargs")


class BatchEncoding(dict):
    """What `tokenizer(...)` returns, as transformers' BatchEncoding: a dict (`input_ids`, `attention_mask`) read
    also as attributes (`enc.input_ids`), whose tensors `.to(device)` moves."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the encoding has no {name!r} (it holds {', '.join(self) or 'nothing'})") from None

    def to(self, device: str | torch.device) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


ROLE_IDS = {"bos_token": "bos_id", "eos_token": "eos_id", "unk_token": "unk_id", "pad_token": "pad_id"}


def role_id_property(role: str) -> property:
    """transformers' `tokenizer.<role>_id` (`eos_token_id`, ...): the token's id, None where the tokenizer has none
    (ttl's own `eos_id` etc. say -1); the padding one is settable (`tokenizer.pad_token_id = tokenizer.eos_token_id`).
    """
    def read(tokenizer: Tokenizer) -> int | None:
        i = getattr(tokenizer, ROLE_IDS[role])
        return None if i < 0 else i
    return property(read, (lambda tokenizer, i: tokenizer.set_pad_id(i)) if role == "pad_token" else None)


def role_token_property(role: str) -> property:
    """transformers' `tokenizer.<role>` (`eos_token`, ...): the token's text, None where the tokenizer has none; the
    padding one is settable to a token of the vocabulary (`tokenizer.pad_token = tokenizer.eos_token`), where
    transformers would pad with the unknown token's id for a text it does not hold."""
    def read(tokenizer: Tokenizer) -> str | None:
        i = getattr(tokenizer, ROLE_IDS[role])
        return None if i < 0 else tokenizer.id_to_token(i)

    def write(tokenizer: Tokenizer, token: str | None) -> None:
        i = None if token is None else tokenizer.token_to_id(token)
        if token is not None and i is None:
            raise TokenizerError(f"pad_token {token!r} is not in the vocabulary: add it with add_special_tokens first")
        tokenizer.set_pad_id(i)
    return property(read, write if role == "pad_token" else None)


def vocabulary_length(tokenizer: Tokenizer) -> int:
    """`len(tokenizer)`: every id, added tokens included (what `resize_token_embeddings(len(tokenizer))` needs)."""
    return tokenizer.vocab_size


def get_vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """Every token's id by its text, added tokens included, as transformers' `get_vocab()` gives them."""
    return {tokenizer.id_to_token(i): i for i in range(tokenizer.vocab_size)}


def tokenize(tokenizer: Tokenizer, text: str, add_special_tokens: bool = False) -> list[str]:
    """The tokens of `text` as transformers' `tokenize` spells them, with the special tokens `<s>` / `</s>` the
    tokenizer puts around a text only when `add_special_tokens`."""
    return convert_ids_to_tokens(tokenizer, tokenizer.encode(text, add_special_tokens=add_special_tokens))


def convert_ids_to_tokens(tokenizer: Tokenizer, ids: int | list[int], skip_special_tokens: bool = False) \
        -> str | list[str]:
    """The token of one id, or the tokens of a sequence of them (without the special ones when asked)."""
    if is_integer(ids):
        return tokenizer.id_to_token(ids)
    special = tokenizer.special_ids if skip_special_tokens else frozenset()
    return [tokenizer.id_to_token(i) for i in ids if int(i) not in special]


def convert_tokens_to_ids(tokenizer: Tokenizer, tokens: str | list[str]) -> int | list[int]:
    """The id of one token, or the ids of a list of them; a token the vocabulary lacks is the unknown token's id, as
    in transformers (`token_to_id` says None instead)."""
    def one(token: str) -> int:
        i = tokenizer.token_to_id(token)
        return tokenizer.unk_id if i is None else i
    return one(tokens) if isinstance(tokens, str) else [one(token) for token in tokens]


def add_special_tokens_dict(tokenizer: Tokenizer, tokens: dict[str, Any]) -> int:
    """transformers' `tokenizer.add_special_tokens({"pad_token": "[PAD]", "additional_special_tokens": [...]})` (or
    transformers 5's `extra_special_tokens`): the tokens added as special ones, the `pad_token` then padding; returns
    how many are new to the vocabulary. The other roles (bos, eos, unk) come from the tokenizer's files: naming the
    token a role already has changes nothing, as there; another is refused, and so is any other key."""
    fixed = {role: tokens[role] for role in ("bos_token", "eos_token", "unk_token") if role in tokens}
    unknown = sorted(set(tokens) - {"pad_token", "additional_special_tokens", "extra_special_tokens", *fixed})
    changed = sorted(role for role, token in fixed.items() if token != getattr(tokenizer, role))
    if unknown or changed:
        raise TokenizerError(f"add_special_tokens: {', '.join(unknown + changed)} not taken by ttl, which adds "
                             "pad_token and additional (extra) special tokens (<s>, </s> and <unk> are the tokenizer "
                             "files')")
    pad = tokens.get("pad_token")
    extra = [*tokens.get("additional_special_tokens", []), *tokens.get("extra_special_tokens", [])]
    if not (isinstance(pad, str) or pad is None) or not all(isinstance(token, str) for token in extra):
        raise TokenizerError(f"add_special_tokens takes a pad_token string and lists of special token strings, got "
                             f"{tokens!r}")
    before = len(tokenizer)
    tokenizer.add_special_tokens(([] if pad is None else [pad]) + extra)
    if pad is not None:
        tokenizer.pad_token = pad
    return len(tokenizer) - before


def pad_rows(rows: list[list[int]], width: int, value: int, side: str) -> list[list[int]]:
    """Each row filled up to `width` with `value` on `side` ("left" or "right"); longer rows are kept whole."""
    return [[value] * (width - len(row)) + row if side == "left" else row + [value] * (width - len(row))
            for row in rows]


def encode_for_model(tokenizer: Tokenizer, text: str | list[str] | tuple[str, ...], text_pair: None = None, *,
                     add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                     max_length: int | None = None, padding_side: str | None = None,
                     return_tensors: str | None = None, return_attention_mask: bool | None = None,
                     split_special_tokens: bool | None = None, verbose: bool = True,
                     **options: Any) -> BatchEncoding:
    """`input_ids` and `attention_mask` (unless `return_attention_mask=False`) of one text (a row, or with
    `return_tensors` a batch of one) or of a list of texts (rows), as transformers' `tokenizer(...)` returns them:
    lists of ints, or with return_tensors="pt" / "np" int64 tensors / arrays, which need rows of one length.

    padding: True / "longest" pads to the longest row, "max_length" to `max_length`, with the pad id on
    `padding_side` (by default the tokenizer's); truncation: True / "longest_first" cuts each text's own tokens on
    the tokenizer's `truncation_side` so that with its special tokens it is at most `max_length` long.
    `split_special_tokens` as in `Tokenizer.encode`; `verbose=False` silences transformers' warning that
    padding=True ignores `max_length`."""
    options = {"text_pair": text_pair, **options}
    unknown = [name for name in options if name not in OFF_ONLY]
    if unknown:
        raise TokenizerError(f"tokenizer() got unknown argument(s) {', '.join(unknown)} (the sides: padding_side=, "
                             "or set tokenizer.padding_side / tokenizer.truncation_side)")
    asked = [(name, v) for name, v in options.items() if not (v is None or v is False or is_integer(v) and v == 0)]
    if asked:
        raise TokenizerError(f"tokenizer(): {asked[0][0]}={asked[0][1]!r} is not supported by ttl, which encodes one "
                             "text or a list of texts into input_ids and attention_mask (a pair: join the texts)")
    batched = isinstance(text, (list, tuple))
    texts = list(text) if batched else [text]
    wrong = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if wrong or not texts:
        got = "an empty list" if not texts else f"a {wrong[0]}" + (" among the texts" if batched else "")
        raise TokenizerError(f"tokenizer() takes a str or a non-empty list of str, got {got}")
    for name, value in (("add_special_tokens", add_special_tokens), ("return_attention_mask", return_attention_mask),
                        ("split_special_tokens", split_special_tokens)):
        if not (isinstance(value, bool) or value is None and name != "add_special_tokens"):
            raise TokenizerError(f"{name} must be True or False, got {value!r}")
    _check_return_tensors(return_tensors)
    side = tokenizer.padding_side if padding_side is None else padding_side
    for name, value in (("padding_side", side), ("truncation_side", tokenizer.truncation_side)):
        if value not in ("left", "right"):
            raise TokenizerError(f"{name} must be 'left' or 'right', got {value!r}")
    pad, cut, max_length = _strategies(tokenizer, padding, truncation, max_length, verbose)

    specials = None if add_special_tokens else False  # None: as the tokenizer's add_bos_token / add_eos_token say
    before, after = tokenizer.special_ends(specials, specials)
    room = max_length - len(before) - len(after) if cut else None  # for each text's own tokens
    if room is not None and room < 0:
        raise TokenizerError(f"max_length={max_length} leaves no room for the {len(before) + len(after)} special "
                             "token(s) add_special_tokens puts around each text")
    rows = []
    for t in texts:
        ids = tokenizer.encode(t, add_bos=False, add_eos=False, split_special_tokens=split_special_tokens)
        if room is not None and len(ids) > room:
            ids = ids[:room] if tokenizer.truncation_side == "right" else ids[len(ids) - room:]
        rows.append(before + ids + after)
    masks = [[1] * len(row) for row in rows]
    if pad is not None:
        width = max_length if pad == "max_length" else max(map(len, rows))
        try:
            rows, masks = pad_rows(rows, width, tokenizer.pad_id, side), pad_rows(masks, width, 0, side)
        except (MemoryError, OverflowError):  # a model_max_length meant as "no limit" (transformers pads alike)
            raise TokenizerError(f"padding to max_length={width} does not fit in memory: pass a smaller max_length, "
                                 "or padding=True to pad to the longest text") from None
    out = {"input_ids": rows, **({"attention_mask": masks} if return_attention_mask is not False else {})}
    return _encoding(out, batched, return_tensors)


def pad_encodings(tokenizer: Tokenizer, encoded_inputs: Any, padding: bool | str = True, max_length: int | None = None,
                  pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                  return_attention_mask: bool | None = None, return_tensors: str | None = None,
                  verbose: bool = True) -> BatchEncoding:
    """transformers' `tokenizer.pad(...)`, which its data collators (DataCollatorWithPadding,
    DataCollatorForLanguageModeling) call: encodings, a batch (a list of dicts, or a dict of rows) or one (a dict of
    one row), lists or tensors, padded as `tokenizer(...)` pads (`padding`, `max_length`, `padding_side`), the longest
    row or `max_length` rounded up to a multiple of `pad_to_multiple_of`; the `attention_mask` is padded with 0 (made
    of 1s where missing, unless `return_attention_mask=False`), `token_type_ids` with 0 and `special_tokens_mask`
    with 1, as transformers pads them; other keys are kept as given. Never truncates."""
    if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], dict):
        encoded_inputs = {key: [features[key] for features in encoded_inputs] for key in encoded_inputs[0]}
    if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
        raise TokenizerError("pad() takes encodings with input_ids: a dict, or a non-empty list of dicts")
    _check_return_tensors(return_tensors)

    def as_lists(value: Any) -> Any:  # tensors and arrays, also as a batch's rows
        return value.tolist() if hasattr(value, "tolist") else [as_lists(v) for v in value] \
            if isinstance(value, (list, tuple)) else value

    out = {k: as_lists(v) for k, v in encoded_inputs.items()}
    batched = bool(out["input_ids"]) and not is_integer(out["input_ids"][0])
    if not batched:
        out = {k: [v] for k, v in out.items()}
    rows = out["input_ids"]
    if return_attention_mask is not False:
        out["attention_mask"] = out.get("attention_mask") or [[1] * len(row) for row in rows]
    if pad_to_multiple_of is not None and not (is_integer(pad_to_multiple_of) and pad_to_multiple_of > 0):
        raise TokenizerError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
    pad, _, max_length = _strategies(tokenizer, padding, False, max_length, verbose)
    if pad is not None:
        width = max_length if pad == "max_length" else max(map(len, rows), default=0)
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else width
        side = tokenizer.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
        # as transformers pads them: a padding position is no token (mask 0), of segment 0, and special (1)
        fills = {"input_ids": tokenizer.pad_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
        for key in fills.keys() & out.keys():
            out[key] = pad_rows(out[key], width, fills[key], side)
    return _encoding(out, batched, return_tensors)


def _check_return_tensors(return_tensors: Any) -> None:
    if return_tensors not in (None, "pt", "np"):
        raise TokenizerError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


def _encoding(out: dict[str, list], batched: bool, return_tensors: str | None) -> BatchEncoding:
    """The BatchEncoding of rows `out` (key -> rows): lists (one row's where not `batched`), or the int64 tensors or
    arrays `return_tensors` names, which need rows of one length."""
    if return_tensors is None:
        return BatchEncoding(out if batched else {k: v[0] for k, v in out.items()})
    lengths = sorted({len(row) for row in out["input_ids"]})
    if len(lengths) > 1:
        raise TokenizerError(f"return_tensors={return_tensors!r} needs rows of one length, and these have "
                             f"{lengths[0]} to {lengths[-1]} tokens: pass padding=True (or truncation=True and "
                             "padding='max_length' with max_length)")
    try:
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    except (TypeError, ValueError) as e:  # another key's rows of other lengths (labels not padded alike)
        raise TokenizerError(f"return_tensors={return_tensors!r}: the encodings' values do not make one tensor each "
                             f"({e})") from None
    return BatchEncoding(tensors if return_tensors == "pt" else {k: v.numpy() for k, v in tensors.items()})


def _strategies(tokenizer: Tokenizer, padding: Any, truncation: Any, max_length: Any,
                verbose: bool) -> tuple[str | None, bool, int | None]:
    """(padding: None, "longest" or "max_length"; whether to truncate; the length for either), read from the call's
    settings as transformers reads them."""
    if hasattr(max_length, "tolist"):  # a NumPy integer or a 0-d tensor, as transformers takes them
        max_length = max_length.tolist()
    if max_length is not None and not (is_integer(max_length) and max_length >= 0):
        raise TokenizerError(f"max_length must be a non-negative integer or None, got {max_length!r}")
    if isinstance(padding, bool):
        pad = "longest" if padding else None
    elif isinstance(padding, str) and padding in PADDING:
        pad = PADDING[padding]
    else:
        raise TokenizerError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if truncation is None or isinstance(truncation, bool):
        cut = truncation
    elif isinstance(truncation, str) and truncation in TRUNCATION:
        cut = TRUNCATION[truncation]
    elif truncation == "only_second":
        raise TokenizerError("truncation='only_second' cuts the second text of a pair, and ttl takes no pairs")
    else:
        raise TokenizerError(f"truncation must be True, False, 'longest_first' or 'do_not_truncate', got "
                             f"{truncation!r}")
    if cut is None:  # as in transformers, max_length alone truncates
        cut = padding is False and max_length is not None
    if padding is True and max_length is not None and not cut and verbose:
        warnings.warn(MAX_LENGTH_IGNORED, stacklevel=3)
    if max_length is None and (pad == "max_length" or cut):  # the model's length, unless it means no limit
        max_length = checked_length_limit(tokenizer.model_max_length, "tokenizer.")
        if max_length > LIMITLESS_PAST:  # then transformers neither pads to it nor cuts
            pad, cut, max_length = None if pad == "max_length" else pad, False, None
    if pad is not None and tokenizer.pad_id < 0:
        raise TokenizerError("padding needs a padding token and this tokenizer has none (its config's pad_token is "
                             "null): encode without padding, or name a pad_token in tokenizer_config.json")
    return pad, cut, max_length
