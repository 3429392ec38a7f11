"""Sentencepiece BPE tokenizer in TeenyTinyLlama's style, HF tokenizer-directory interop, and the chat formats.

TeenyTinyLlama's tokenizer is a BPE with `<unk>`, `<s>`, `</s>`, `<pad>` as ids 0..3, byte fallback (no text
is ever unknown), Llama-2's whitespace handling (a "▁" prepended, spaces replaced by "▁"), BOS added, no
EOS. `Tokenizer` wraps a sentencepiece model with that behaviour. HF directories load from
`tokenizer.model`, or from a BPE `tokenizer.json` alone (as TeenyTinyLlama publishes), which is converted
into an equivalent sentencepiece model in memory: each merge's result becomes a piece scored by the
merge's rank, so sentencepiece's highest-score-first merging replays the BPE merge order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .errors import TokenizerError
from .fileio import atomic_write, write_json

SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
PREFIX_SCHEMES = ("first", "always", "never", "normalizer")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
Piece = model_pb2.ModelProto.SentencePiece


class Tokenizer:
    """A sentencepiece model plus the special ids. `encode` adds BOS by default, as TeenyTinyLlama does."""

    def __init__(self, model_path: str | Path | None = None, *, model_proto: bytes | None = None,
                 prefix_scheme: str = "first", hf_json: dict | None = None):
        if model_proto is None:
            path = Path(model_path)
            if not path.is_file():
                raise TokenizerError(f"tokenizer model {path} does not exist")
            model_proto = path.read_bytes()
        # Where transformers prepends "▁" to the text segments between special tokens: "first" (its Llama
        # tokenizer, legacy=False) the first segment only, "always" (legacy=True) every one, "never" none;
        # both skip a segment that starts with a space. "normalizer" (a tokenizer.json with Llama-2's
        # normalizer) prefixes every segment unconditionally.
        if prefix_scheme not in PREFIX_SCHEMES:
            raise TokenizerError(f"unknown prefix scheme {prefix_scheme!r}; expected one of {', '.join(PREFIX_SCHEMES)}")
        self.prefix_scheme = prefix_scheme
        self.hf_json = hf_json  # the tokenizer.json this came from, written back by save_pretrained
        self.proto = model_pb2.ModelProto()
        try:
            self.proto.ParseFromString(model_proto)
            self._refresh()
        except Exception as e:  # protobuf and sentencepiece raise assorted types for a corrupt file
            raise TokenizerError(f"{model_path or 'model_proto'} is not a sentencepiece model ({e})") from None

    def _refresh(self) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto.SerializeToString())
        continuation = model_pb2.ModelProto()
        continuation.CopyFrom(self.proto)
        continuation.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = spm.SentencePieceProcessor(model_proto=continuation.SerializeToString())
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        # HF tokenizers cut special and added tokens (<s>, </s>, Aira's markers) out of the text before
        # anything else; sentencepiece never produces control pieces from text, so encode() cuts them itself
        self._specials = {p.piece: i for i, p in enumerate(self.proto.pieces)
                          if p.type in (Piece.CONTROL, Piece.USER_DEFINED)}
        self._special_split = (re.compile("(" + "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))) + ")")
                               if self._specials else None)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Load an HF tokenizer directory (or a data directory from prepare_data): `tokenizer.model` when
        present, else a BPE `tokenizer.json` converted to sentencepiece."""
        directory = Path(directory)
        if (directory / "tokenizer.model").is_file():
            return cls(directory / "tokenizer.model")
        if (directory / "tokenizer.json").is_file():
            proto, scheme, hf_json = tokenizer_json_to_sentencepiece(directory / "tokenizer.json")
            return cls(model_proto=proto, prefix_scheme=_hf_class_scheme(directory) or scheme, hf_json=hf_json)
        raise TokenizerError(f"{directory} holds no tokenizer.model or tokenizer.json")

    # --- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings such as "</s>" in the text become their ids)."""
        ids = [self.bos_id] if add_bos else []
        parts = self._special_split.split(text) if self._special_split else [text]
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._encode_plain(part, first=i == 0))
        return ids + ([self.eos_id] if add_eos else [])

    def _encode_plain(self, text: str, first: bool) -> list[int]:
        scheme = self.prefix_scheme
        prefix = scheme == "normalizer" or (not text.startswith(" ") and (scheme == "always" or scheme == "first" and first))
        return (self.sp if prefix else self._sp_continuation).encode(text)

    def encode_batch(self, texts: Iterable[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        special_ids = set(self._specials.values())
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in special_ids])
        out, run = [], []
        for i in ids:
            if i in special_ids:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.unk_id and token != self.sp.id_to_piece(self.unk_id) else i

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Append tokens (e.g. Aira's `<|startofinstruction|>`) at the end of the vocabulary, matched as
        whole units in text; returns their ids (existing tokens keep theirs)."""
        for token in tokens:
            if self.token_to_id(token) is None:
                if self.hf_json is not None:
                    self.hf_json["added_tokens"].append({
                        "id": len(self.proto.pieces), "content": token, "single_word": False, "lstrip": False,
                        "rstrip": False, "normalized": False, "special": True})
                self.proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.USER_DEFINED))
        self._refresh()
        return [self.token_to_id(t) for t in tokens]

    # --- saving ------------------------------------------------------------------------------------------
    def save_model(self, path: str | Path) -> None:
        atomic_write(path, lambda tmp: tmp.write_bytes(self.proto.SerializeToString()))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `tokenizer.model`, `tokenizer_config.json` and `special_tokens_map.json` so that
        `transformers.AutoTokenizer.from_pretrained(directory)` gives the same ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_model(directory / "tokenizer.model")
        if self.hf_json is not None:
            write_json(directory / "tokenizer.json", self.hf_json)
        piece = self.sp.id_to_piece
        specials = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.unk_id)}
        if self.pad_id is not None:
            specials["pad_token"] = piece(self.pad_id)
        added = {str(i): {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
                 for i, p in enumerate(self.proto.pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)}
        write_json(directory / "tokenizer_config.json", {
            # transformers' Llama tokenizer sets its own prefix scheme; only a generic one follows tokenizer.json
            "tokenizer_class": "PreTrainedTokenizerFast" if self.prefix_scheme == "normalizer" else "LlamaTokenizer",
            "legacy": self.prefix_scheme == "always", "add_prefix_space": self.prefix_scheme != "never",
            "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 2048,
            "padding_side": "right", "sp_model_kwargs": {}, "added_tokens_decoder": added, **specials,
        })
        write_json(directory / "special_tokens_map.json", specials)


def train_tokenizer(files: Iterable[str | Path], out_path: str | Path, vocab_size: int = 32000,
                    max_sentences: int = 2_000_000) -> Tokenizer:
    """Train a TeenyTinyLlama-style BPE tokenizer on text files and write the model to `out_path`.

    Special pieces `<unk>` `<s>` `</s>` `<pad>` are ids 0..3; 256 byte pieces give byte fallback; whitespace is
    kept as is (identity normalization, runs of spaces preserved, "▁" prepended); digits are split."""
    files = [str(f) for f in files]
    if not files:
        raise TokenizerError("train_tokenizer needs at least one text file")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_path.with_suffix("")
    try:
        spm.SentencePieceTrainer.train(
            input=files, model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {str(e).splitlines()[-1]}") from None
    if prefix.with_suffix(".model") != out_path:
        prefix.with_suffix(".model").replace(out_path)
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    return Tokenizer(out_path)


def _hf_class_scheme(directory: Path) -> str | None:
    """The prefix scheme transformers imposes on a directory whose tokenizer_config.json names its Llama
    tokenizer class (which ignores tokenizer.json's normalizer), or None when tokenizer.json decides."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("tokenizer_class") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return None
    if config.get("add_prefix_space") is False:
        return "never"
    return "always" if config.get("legacy", False) else "first"


def _json_scheme(hf: dict) -> str:
    """The prefix scheme of a tokenizer.json's whitespace handling ("▁" prepended, spaces -> "▁"): Llama-2's
    normalizer, or a non-splitting Metaspace pre-tokenizer; anything else is unsupported."""
    normalizer, pre = hf.get("normalizer") or {}, hf.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    kinds = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content")) for n in steps]
    if kinds == [("Prepend", "\u2581", None, None), ("Replace", None, " ", "\u2581")] and not pre:
        return "normalizer"
    if not normalizer and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" \
            and pre.get("split") is False and pre.get("prepend_scheme", "always") in ("first", "always", "never"):
        return pre.get("prepend_scheme", "always")
    raise TokenizerError("unsupported tokenizer.json whitespace handling: expected Llama-2's normalizer "
                         f"(Prepend '▁' + Replace ' ' -> '▁') or a Metaspace pre-tokenizer; got normalizer "
                         f"{normalizer.get('type')!r}, pre_tokenizer {pre.get('type')!r}")


def tokenizer_json_to_sentencepiece(path: Path) -> tuple[bytes, str, dict]:
    """A serialized sentencepiece BPE model equivalent to a SentencePiece-style BPE `tokenizer.json`, its
    prefix scheme (see `Tokenizer`), and the parsed JSON."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable tokenizer.json ({e})") from None
    model = hf.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: unsupported tokenizer model type {model.get('type')!r} (ttl reads BPE)")
    if not model.get("byte_fallback"):
        raise TokenizerError(f"{path}: a BPE without byte_fallback is not supported (TeenyTinyLlama's has it)")
    scheme = _json_scheme(hf)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in hf.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise TokenizerError(f"{path}: token ids are not contiguous from 0")
    # a merge's rank orders the merges: a piece made by an earlier merge gets a higher score
    rank = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    unk = model.get("unk_token") or "<unk>"
    proto = model_pb2.ModelProto()
    for token, _ in by_id:
        if token == unk:
            proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.UNKNOWN))
        elif BYTE_PIECE.fullmatch(token):
            proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.BYTE))
        elif token in added and added[token].get("special"):
            proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.CONTROL))
        elif token in added:
            proto.pieces.append(Piece(piece=token, score=0.0, type=Piece.USER_DEFINED))
        else:
            proto.pieces.append(Piece(piece=token, score=-float(rank.get(token, len(rank))), type=Piece.NORMAL))
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(by_id)
    spec.byte_fallback = True
    ids = {name: vocab.get(piece, -1) for name, piece in (("unk", unk), ("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"))}
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids["unk"], ids["bos"], ids["eos"], ids["pad"]
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = unk, "<s>", "</s>", "<pad>"
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    hf.setdefault("added_tokens", [])
    return proto.SerializeToString(), scheme, hf


# --- chat formats ---------------------------------------------------------------------------------------------
CHAT_FORMATS = ("aira", "alpaca")
AIRA_SPECIAL_TOKENS = ("<|startofinstruction|>", "<|endofinstruction|>", "<|endofcompletion|>")
ALPACA_HEADER_WITH_INPUT = ("Abaixo está uma instrução que descreve uma tarefa, emparelhada com uma entrada que "
                            "fornece mais contexto. Escreva uma resposta que conclua adequadamente a solicitação.")
ALPACA_HEADER = "Abaixo está uma instrução que descreve uma tarefa. Escreva uma resposta que conclua adequadamente a solicitação."


def chat_prompt(format: str, instruction: str, input: str = "") -> str:
    """The prompt text up to where the model's response begins, in Aira's or Alpaca-PTBR's format."""
    if format == "aira":
        return f"{AIRA_SPECIAL_TOKENS[0]}{instruction}{AIRA_SPECIAL_TOKENS[1]}"
    if format == "alpaca":
        if input:
            return f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruções:\n{instruction}\n\n### Entrada:\n{input}\n\n### Resposta:\n"
        return f"{ALPACA_HEADER}\n\n### Instruções:\n{instruction}\n\n### Resposta:\n"
    raise TokenizerError(f"unknown chat format {format!r}; choose one of {', '.join(CHAT_FORMATS)}")


def chat_response(format: str, response: str) -> str:
    """The response text as trained: Aira closes it with `<|endofcompletion|>`; Alpaca's ends with the EOS
    token, which the caller appends as an id."""
    if format == "aira":
        return response + AIRA_SPECIAL_TOKENS[2]
    if format == "alpaca":
        return response
    raise TokenizerError(f"unknown chat format {format!r}; choose one of {', '.join(CHAT_FORMATS)}")
