"""Sentencepiece BPE tokenizer like TeenyTinyLlama's, and Hugging Face tokenizer files with their chat templates.

The model is a sentencepiece `ModelProto` (BPE, byte fallback, identity normalization, `<unk>` `<s>` `</s>`
`<pad>` = 0..3). `Tokenizer` follows transformers' Llama tokenizer (`legacy: false`) rather than raw
sentencepiece where the two differ, so ids and text equal `AutoTokenizer`'s: the "▁" word prefix is added only
at the start of the text and only when the text does not already start with a space or "▁" (or, as the
config's `legacy` / `add_prefix_space` say, also after every special token, or nowhere); special and added
tokens written in the text (`</s>`, Aira's `<|startofinstruction|>`) are matched whole before the model sees the
rest (taking the whitespace beside them, or only as whole words, where their lstrip / rstrip / single_word flags
say; see `ttl_core.added_tokens`), the special ones unless `split_special_tokens`; `<s>` and `</s>` go around a
text as the directory's files tell transformers 5 (tokenizer.json's post-processor, else tokenizer_config.json's
`add_bos_token` / `add_eos_token`); and decoding follows transformers' decoder chain, where a run of byte-fallback
pieces that is not valid UTF-8 becomes one U+FFFD per byte. A `tokenizer.json` (the `tokenizers` library's BPE, as
TeenyTinyLlama publishes) converts to the same sentencepiece model format, or is refused where sentencepiece would
split text differently (see `ttl_core.tokenizer_json`).
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from .added_tokens import WHITE_SPACE, AddedTokenSplitter
from .errors import ConfigError, TokenizerError
from .fileio import atomic_write
from .tokenizer_call import (ROLE_IDS, add_special_tokens_dict, convert_ids_to_tokens, convert_tokens_to_ids,
                             encode_for_model, get_vocab, pad_encodings, role_id_property, role_token_property,
                             tokenize, vocabulary_length)
from .tokenizer_config import NO_LENGTH_LIMIT, TokenFlags
from .tokenizer_json import BYTE_PIECE
from .tokenizer_pretrained import read_tokenizer_dir, write_tokenizer_dir

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")  # corpus files ttl_core.data reads (and tokenizer_train trains on)
_Piece = spm_pb2.ModelProto.SentencePiece


class Tokenizer:
    """A sentencepiece BPE model with Llama/TeenyTinyLlama conventions. `add_bos_token` / `add_eos_token`
    (transformers' names) say whether `encode` puts `<s>` / `</s>` (`bos_id` / `eos_id`) around a text unless
    told: `<s>` only, for a model file itself; as transformers reads them, for a tokenizer directory
    (`from_pretrained`), whose config may also name other tokens for these roles and for `<pad>`.

    `tokenizer(texts, padding=True, return_tensors="pt")` is transformers' call (see `ttl_core.tokenizer_call`): it
    pads and truncates on the sides `padding_side` / `truncation_side` name, at most `model_max_length` tokens by
    default, as a directory's config says (no side named: LlamaTokenizer's left padding, right truncation; no length:
    transformers' int(1e30), no limit); a model file alone pads on the right, the side ttl's saved configs have always
    named, with no length limit."""

    # transformers' names for the calls below and the special tokens (see ttl_core.tokenizer_call)
    __call__, __len__, tokenize, pad = encode_for_model, vocabulary_length, tokenize, pad_encodings
    convert_ids_to_tokens, convert_tokens_to_ids, get_vocab = convert_ids_to_tokens, convert_tokens_to_ids, get_vocab
    bos_token, eos_token, unk_token, pad_token = map(role_token_property, ROLE_IDS)
    bos_token_id, eos_token_id, unk_token_id, pad_token_id = map(role_id_property, ROLE_IDS)

    def __init__(self, model: str | os.PathLike | bytes):
        """Load a sentencepiece `.model` file (a path) or its serialized bytes."""
        self.add_bos_token, self.add_eos_token = True, False
        self.prefix_scheme = "first"  # where encode puts the "▁" word prefix (see tokenizer_config.prefix_scheme)
        self.split_special_tokens = False  # encode's default, as a directory's config says
        self._role_ids: dict[str, int] = {}  # bos_token/eos_token/pad_token -> id (-1: none) where not the model's
        self._pad_set: int | None = None  # `set_pad_id`'s padding id (-1: none), which wins over the roles'
        # pieces of the model that transformers matches whole though they are not control pieces: those the config
        # names for a role (always special) and those listed among its added tokens (special as their flags say)
        self._role_piece_ids: set[int] = set()
        self._listed_piece_ids: set[int] = set()
        self._token_flags: dict[str, TokenFlags] = {}  # added tokens' flags as read; unlisted ones: TokenFlags()
        self.chat_template: str | dict[str, str] | None = None  # a directory's, carried to save_pretrained
        self.padding_side, self.truncation_side, self.model_max_length = "right", "right", NO_LENGTH_LIMIT
        where = ""  # the file, for error messages
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise TokenizerError(f"{path}: no such sentencepiece model file")
            where, model = f"{path}: ", path.read_bytes()
        elif not isinstance(model, bytes):
            raise TokenizerError(f"Tokenizer expects a .model file path or its bytes, got {type(model).__name__}")
        proto = spm_pb2.ModelProto()
        try:
            proto.ParseFromString(model)
        except Exception as e:  # protobuf's DecodeError: the file is not a sentencepiece model
            raise TokenizerError(f"{where}not a sentencepiece model ({e})") from None
        if not proto.pieces:
            raise TokenizerError(f"{where}not a sentencepiece model (no pieces)")
        # protobuf hands a piece whose bytes are not UTF-8 (a damaged byte) over as bytes, not text
        if (broken := next((i for i, p in enumerate(proto.pieces) if not isinstance(p.piece, str)), None)) is not None:
            raise TokenizerError(f"{where}not a sentencepiece model (piece {broken} is not UTF-8 text)")
        try:
            self._load(proto)
        except RuntimeError as e:  # a well-formed proto sentencepiece still refuses (e.g. no <unk> piece)
            raise TokenizerError(f"{where}sentencepiece cannot load the model ({str(e).splitlines()[0]})") from None

    def _load(self, proto) -> None:
        self.proto = proto
        # The "▁" prefix is our job (see module docstring) and transformers ignores the model's normalizer (NFKC,
        # whitespace removal), so the processor does neither. Special tokens in the text are matched (or not, with
        # split_special_tokens) by `AddedTokenSplitter`; the processor would always match user-defined pieces, so it
        # sees them as control pieces, which text never produces.
        runtime = spm_pb2.ModelProto.FromString(proto.SerializeToString())
        runtime.normalizer_spec.CopyFrom(spm_pb2.NormalizerSpec(name="identity", add_dummy_prefix=False,
                                                                remove_extra_whitespaces=False))
        for piece in runtime.pieces:
            if piece.type == _Piece.USER_DEFINED:
                piece.type = _Piece.CONTROL
        self.sp = spm.SentencePieceProcessor(model_proto=runtime.SerializeToString())
        self.added_tokens = [p.piece for p in proto.pieces if p.type == _Piece.USER_DEFINED]
        self._added_ids = {t: self.sp.piece_to_id(t) for t in self.added_tokens}
        self._index_special_tokens()
        # what each piece adds to a decoded text: a byte (byte-fallback pieces) or a string, "▁" read as a space
        self._piece_text = [p.piece.replace("\u2581", " ") for p in proto.pieces]
        self._piece_byte = {i: piece_bytes(p.piece)[0] for i, p in enumerate(proto.pieces)
                            if BYTE_PIECE.fullmatch(p.piece)}

    def _index_special_tokens(self) -> None:
        """The tokens transformers matches whole in a text: the model's <unk>, <s>, </s> and <pad> (those there are),
        the tokens a config names for those roles or lists among its added tokens, and the added tokens. All are
        dropped by `decode(skip_special_tokens=True)` but the added ones whose flags say they are not special (a
        role's token stays special whatever its flags say, as in transformers)."""
        roles = {i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(),
                             *self._role_ids.values(), *self._role_piece_ids) if i >= 0}
        whole = roles | self._listed_piece_ids | set(self._added_ids.values())
        self._whole_ids = {self.sp.id_to_piece(i): i for i in whole}
        self._plain_ids = {i for i in whole - roles
                           if not self._token_flags.get(self.sp.id_to_piece(i), TokenFlags()).special}
        self._splitter = AddedTokenSplitter({t: self._token_flags.get(t, TokenFlags()) for t in self._whole_ids},
                                            {t for t, i in self._whole_ids.items() if i not in self._plain_ids})

    def _take_roles(self, path: Path, roles: dict[str, str | None], template: tuple[int | None, int | None] | None,
                    flags: tuple[bool, bool]) -> None:
        """Settle, as transformers 5 does, which tokens play <s>, </s> and <pad> and whether `encode` puts <s> / </s>
        around a text: the tokens a tokenizer.json's template (`template`: the ids before and after a text) puts
        there, and then only those; else the config's `add_bos_token` / `add_eos_token` (`flags`). The roles are
        the config's tokens (`roles`), else the model's own. Every token the config names for a role is special
        (matched whole, skipped when decoding) even where a template's token or, for the unknown-token role, the
        model's own <unk> plays the role."""
        ids = {role: -1 if text is None else self.token_to_id(text) for role, text in roles.items()}
        self._role_piece_ids |= {i for i in ids.values() if i >= 0}
        ids.pop("unk_token", None)
        if template is None:
            self.add_bos_token, self.add_eos_token = flags
        else:
            self.add_bos_token, self.add_eos_token = (i is not None for i in template)
            ids |= {role: i for role, i in zip(("bos_token", "eos_token"), template) if i is not None}
            outside = [i for i in template if i is not None and not 0 <= i < self.vocab_size]
            if outside:
                raise TokenizerError(f"{path}: the post-processor adds token id {outside[0]}, outside the vocabulary "
                                     f"(ids 0..{self.vocab_size - 1})")
        self._role_ids = ids
        self._index_special_tokens()

    # -- ids and vocabulary ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._role_ids.get("bos_token", self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return self._role_ids.get("eos_token", self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        """The padding token's id, -1 where there is none."""
        return self._pad_set if self._pad_set is not None else self._role_ids.get("pad_token", self.sp.pad_id())

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def set_pad_id(self, i: int | None) -> None:
        """Pad with token `i` from now on (None: no padding token), as transformers' `tokenizer.pad_token_id = i`,
        which leaves an ordinary piece ordinary: still split from the text and kept by decode (saved, the config
        names it the padding token, which makes it special when read back, in transformers too)."""
        self._pad_set = -1 if i is None else self._checked_id(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece (`"▁de"`, `"<s>"`, an added token), or None when it is not in the vocabulary."""
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(self._checked_id(i))

    def first_different_id(self, other: Tokenizer) -> int | None:
        """The lowest id, among those both vocabularies have, whose token `other` spells differently; None when
        they agree on all of them (one may still have more tokens than the other)."""
        shared = min(self.vocab_size, other.vocab_size)
        return next((i for i in range(shared) if self.sp.id_to_piece(i) != other.sp.id_to_piece(i)), None)

    def _checked_id(self, i: int) -> int:
        """`i` as an int, or a TokenizerError when the vocabulary has no such id (sentencepiece's IndexError
        would not say which id, nor how large the vocabulary is)."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        return i

    def add_special_tokens(self, tokens: list[str] | dict[str, str | list[str]]) -> list[int] | int:
        """Append special tokens (matched whole, never split, dropped by decode(skip_special_tokens=True)) at the
        end of the vocabulary; return their ids. transformers' dict (`{"pad_token": "[PAD]"}`,
        `{"additional_special_tokens": [...]}`) is taken as there, returning how many tokens are new.

        Tokens already added (or special) keep their id and how they are treated, so calling twice is harmless; an
        ordinary piece of the model keeps its id but becomes an added token, as in transformers."""
        if isinstance(tokens, dict):
            return add_special_tokens_dict(self, tokens)
        return self._append_tokens("add_special_tokens", tokens, TokenFlags())

    def add_tokens(self, tokens: str | list[str]) -> list[int]:
        """As `add_special_tokens`, for tokens that are not special (transformers' `add_tokens`, which also takes one
        token): matched whole, but kept by decode(skip_special_tokens=True)."""
        return self._append_tokens("add_tokens", tokens, TokenFlags(normalized=True, special=False))

    def _append_tokens(self, caller: str, tokens: str | list[str], flags: TokenFlags) -> list[int]:
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)  # one token, as transformers' add_tokens takes
        if not all(isinstance(token, str) for token in tokens):
            raise TokenizerError(f"{caller} takes token strings, got {[type(t).__name__ for t in tokens]}")
        if not all(tokens):
            raise TokenizerError(f"{caller}: empty token")
        unique = [token for token in dict.fromkeys(tokens) if token not in self._whole_ids]
        new = [token for token in unique if self.token_to_id(token) is None]
        self._listed_piece_ids |= {self.token_to_id(token) for token in unique if token not in new}
        for token in unique:
            self._token_flags[token] = flags
        if new:
            for token in new:
                self.proto.pieces.add(piece=token, score=0.0, type=_Piece.USER_DEFINED)
            self.proto.trainer_spec.vocab_size = len(self.proto.pieces)
            self._load(self.proto)
        elif unique:
            self._index_special_tokens()
        return [self.token_to_id(t) for t in tokens]

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               split_special_tokens: bool | None = None, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with `<s>` first and `</s>` last when asked, or by default as `add_bos_token` and
        `add_eos_token` say (transformers' `add_special_tokens=True`; False, as there, adds neither).

        Special tokens written in the text (`</s>`, `<|endofcompletion|>`) become their ids, as in transformers;
        with `split_special_tokens` (transformers' name; by default as the directory's config says, else False) the
        special ones are ordinary text, which keeps a corpus that mentions `</s>` from ending its documents there,
        while added tokens that are not special still match."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if not text.isascii():
            checked_utf8(text, "the text")
        ids, end = self.special_ends(add_bos, add_eos) if add_special_tokens else ([], [])
        parts = self._splitter.split(text, self.split_special_tokens if split_special_tokens is None
                                     else split_special_tokens)
        for k, part in enumerate(parts):
            if k % 2:  # a special or added token, matched whole
                ids.append(self._whole_ids[part])
            elif part:
                if ((k == 0 and self.prefix_scheme == "first") or self.prefix_scheme == "always") \
                        and not part.startswith((" ", "\u2581")):  # as transformers' Metaspace pre-tokenizer
                    part = " " + part
                ids.extend(self.sp.encode(part))
        return ids + end

    def special_ends(self, add_bos: bool | None = None, add_eos: bool | None = None) -> tuple[list[int], list[int]]:
        """The ids `encode(text, add_bos, add_eos)` puts before and after the text's own."""
        # a tokenizer without <s> or </s> (null in the config) never adds it, as in transformers
        add_bos = (self.add_bos_token if add_bos is None else add_bos) and self.bos_id >= 0
        add_eos = (self.add_eos_token if add_eos is None else add_eos) and self.eos_id >= 0
        return [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []

    def encode_batch(self, texts: Iterable[str], add_bos: bool | None = None, add_eos: bool | None = None,
                     split_special_tokens: bool | None = None) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos, split_special_tokens=split_special_tokens)
                for t in texts]

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids `decode(..., skip_special_tokens=True)` drops: `<unk>` `<s>` `</s>` `<pad>`, special added tokens."""
        return frozenset(self._whole_ids.values()) - self._plain_ids

    @property
    def plain_tokens_take_whitespace(self) -> bool:
        """Whether an added token that matches in text (one not special) takes the whitespace beside it (lstrip /
        rstrip) or, matched only as a whole word (single_word), starts with whitespace, so that a text cut next to
        it (or before its first space, hiding the word before) encodes otherwise than the whole."""
        special = self.special_ids
        return any((flags.lstrip or flags.rstrip or flags.single_word and token[0] in WHITE_SPACE)
                   and self.token_to_id(token) not in special for token, flags in self._token_flags.items())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of `ids`, as transformers decodes them; special tokens are dropped when `skip_special_tokens`, else
        written as their text (as added tokens that are not special always are). `clean_up_tokenization_spaces`
        changes nothing, as in transformers 5, which ignores it for Llama's BPE tokenizer (v4 stripped " ." to ".").

        Like transformers' decoder chain (not sentencepiece): a run of byte-fallback pieces that is not valid
        UTF-8 as a whole becomes one U+FFFD per byte, and skipped special tokens do not interrupt a run. As there,
        an id past the vocabulary (a model's embedding table may be larger, and sample it) is no text and
        interrupts no run; a negative id is an error, and so are a float id (int() would cut it to some token) and a
        batch."""
        try:  # integers of any kind: Python's, a tensor's, an array's
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TokenizerError("decode takes one sequence of integer token ids (a batch: decode_batch): "
                                 f"{e}") from None
        special, size = self.special_ids, self.vocab_size
        out: list[str] = []
        run = bytearray()  # the bytes of consecutive byte-fallback pieces
        for i in ids:
            if i >= size or (skip_special_tokens and i in special):
                continue
            self._checked_id(i)
            if i in self._piece_byte:
                run.append(self._piece_byte[i])
                continue
            if run:
                out.append(_bytes_text(run))
                run.clear()
            out.append(self._piece_text[i])
        if run:
            out.append(_bytes_text(run))
        text = "".join(out)
        return text[1:] if text.startswith(" ") and self.prefix_scheme != "never" else text

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """`decode` of each row (also named `batch_decode`, as in transformers, but dropping special tokens unless
        `skip_special_tokens=False`, where transformers' keeps them unless told)."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in batch]

    batch_decode = decode_batch

    # -- files -------------------------------------------------------------------------------------------------
    # a Hugging Face tokenizer directory, read and written as transformers 5 does (see ttl_core.tokenizer_pretrained)
    from_pretrained, save_pretrained = classmethod(read_tokenizer_dir), write_tokenizer_dir

    def save(self, path: str | os.PathLike) -> None:
        """Write the sentencepiece model file atomically."""
        atomic_write(path, lambda tmp: tmp.write_bytes(self.proto.SerializeToString()))


def piece_bytes(piece: str) -> bytes:
    """The UTF-8 bytes a sentencepiece piece adds to a text, as transformers' decoder reads it: a byte-fallback
    piece `<0xNN>` is that byte, "▁" is a space, any other piece (special tokens included) its own text."""
    if BYTE_PIECE.fullmatch(piece):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def checked_utf8(text: str, what: str) -> bytes:
    """`text` in UTF-8, or a TokenizerError naming its first lone surrogate (sentencepiece's error would not)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} is not valid Unicode: character {e.start} is a lone surrogate {text[e.start]!r} "
                             "(a byte that is not UTF-8, as from a terminal in another encoding)") from None


def _bytes_text(run: bytearray) -> str:
    """The text of a run of byte-fallback pieces as transformers' ByteFallback decoder gives it: the UTF-8 text,
    or one U+FFFD per byte when the run as a whole is not valid UTF-8."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def check_same_tokenizer(source: Path, tokenizer: Tokenizer, data_path: Path, resuming: bool) -> None:
    """Refuse data tokenized with another tokenizer than the one saved beside the weights trained on: its ids
    would index embeddings learned for other tokens, silently when its vocabulary is no larger. Tokens one of
    the two adds after the other's (added special tokens) change no id's meaning; weights saved without a
    tokenizer (or with one ttl cannot read) leave nothing to compare."""
    try:
        saved = Tokenizer.from_pretrained(source)
    except TokenizerError:
        return
    if saved.first_different_id(tokenizer) is not None:
        fix = ("resume on the data the run was trained on (its --data)" if resuming
               else f"prepare the data with scripts/prepare_data.py --tokenizer {source}")
        raise ConfigError(f"{data_path} was tokenized with another tokenizer than {source}'s: {fix}")
