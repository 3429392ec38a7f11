"""A `tokenizers` BPE `tokenizer.json` (Llama style: "▁" word boundaries, byte fallback) as a sentencepiece model,
refused when sentencepiece would split some text differently.

The two BPEs choose merges differently. `tokenizers` merges only the pairs listed in `merges`, lowest rank first
(a pair listed twice keeps its last rank); sentencepiece merges any two adjacent parts whose concatenation is a
piece, highest piece score first, leftmost first on ties. With score = minus the rank of the piece's first merge,
they make the same merge at every step when
1. every two adjacent parts that form a piece are a listed merge, and
2. the merges into one piece have consecutive ranks, so ordering merges and ordering pieces agree.
Condition 1 fails somewhere exactly when some piece, split alone by the listed merges, ends in two parts: the
merges inside a stretch of text happen in the same order whatever surrounds it, so two parts that meet anywhere also
meet in the piece alone, where nothing else can merge them (and the piece's text between two characters the
vocabulary lacks is then split differently). Condition 2 is only sufficient: a file breaking it is refused even if
the merges it orders apart never compete. Files converted from sentencepiece list every split of every piece,
ranked piece by piece; files the `tokenizers` trainer writes list one merge per piece, made of parts that met in
the trainer's own splitting; both pass. Not checked: when two merges into one piece apply at once in a text,
`tokenizers` takes the lower-ranked first and sentencepiece the leftmost, which matters only if the piece made
first then joins a part of the other; converted Llama files share this with their own `tokenizer.model`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from .errors import TokenizerError
from .tokenizer_config import TokenFlags, read_tokenizer_json, token_flags

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback piece
_Piece = spm_pb2.ModelProto.SentencePiece


def tokenizer_json_to_sentencepiece(path: str | os.PathLike, beside: str | os.PathLike | None = None,
                                    added_tokens: dict[int, str] | None = None) \
        -> tuple[bytes, tuple[int | None, int | None], dict[str, TokenFlags]]:
    """Convert a `tokenizers` BPE `tokenizer.json` into an equivalent serialized sentencepiece model, or refuse
    one whose merges sentencepiece cannot follow (see the module docstring); returns the model, the ids the
    file's post-processor puts before and after a text (see `template_ends`) and how its added tokens are
    treated (see `tokenizer_config.TokenFlags`). `added_tokens` (id -> text) replace the file's own, as
    tokenizer_config.json's `added_tokens_decoder` does in transformers 5. `beside` is the
    `tokenizer.model` of the same directory, which transformers ignores: the model returned is that one (its own
    scores, the added tokens appended) when it splits every text alike, and a refusal names the first difference
    between the two files."""
    proto, first_rank, problem, template, flags = _convert(Path(path), added_tokens)
    original = _read_model(Path(beside)) if beside is not None else None
    if problem is None:
        if original is not None:
            for piece in proto.pieces[len(original.pieces):]:
                original.pieces.add().CopyFrom(piece)
            original.trainer_spec.vocab_size = len(original.pieces)
            if _splits_alike(original, proto, first_rank):
                return original.SerializeToString(), template, flags
        return proto.SerializeToString(), template, flags
    if beside is None:
        raise TokenizerError(f"{path}: sentencepiece cannot reproduce these merges exactly: {problem}")
    difference = original is not None and _first_vocabulary_difference(original, proto, Path(beside).name)
    raise TokenizerError(f"{path} and {beside} disagree, and ttl cannot follow {Path(path).name} as transformers "
                         f"does (it ignores {Path(beside).name}): {difference or problem}")


def _read_model(path: Path) -> spm_pb2.ModelProto | None:
    """The sentencepiece model in `path`, or None when it is unreadable (transformers would not read it either)."""
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or OSError
        return None
    return proto


def _splits_alike(model: spm_pb2.ModelProto, converted: spm_pb2.ModelProto, first_rank: dict[str, int]) -> bool:
    """Whether sentencepiece splits every text alike with `model` as with `converted`: the same pieces of the same
    types, and the pieces merges make ranked in the same order by `model`'s scores, none tied (a tie would let the
    position decide)."""
    if [(p.piece, p.type) for p in model.pieces] != [(p.piece, p.type) for p in converted.pieces]:
        return False
    score = {p.piece: p.score for p in model.pieces if p.type == _Piece.NORMAL}
    scores = [score[piece] for piece in sorted(first_rank, key=first_rank.__getitem__) if piece in score]
    return all(a > b for a, b in zip(scores, scores[1:]))


def _convert(path: Path, added_tokens: dict[int, str] | None) \
        -> tuple[spm_pb2.ModelProto, dict[str, int], str | None, tuple[int | None, int | None],
                 dict[str, TokenFlags]]:
    """The sentencepiece model of a tokenizer.json, the rank of the first merge into each piece a merge makes,
    why the model would split some text differently (None: never), the ids its post-processor puts around a
    text (see `template_ends`) and the flags of its added tokens ({} when `added_tokens` replace them).
    Piece score = minus that rank; `<0xNN>` pieces are typed BYTE, added tokens the model cannot make USER_DEFINED."""
    spec = read_tokenizer_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise TokenizerError(f"{path}: expected a JSON object with a \"model\" object, as the tokenizers library "
                             f"writes")
    model = spec["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: unsupported tokenizer type {model.get('type')!r} (only BPE converts)")
    pipeline = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if "ByteLevel" in pipeline or "▁" not in pipeline:
        raise TokenizerError(f"{path}: unsupported tokenizer type: BPE without sentencepiece-style '▁' word "
                             f"boundaries (e.g. GPT-2's byte-level BPE); only Llama-style BPE converts")
    vocab, merges = model.get("vocab"), model.get("merges") or []
    flags = {}
    if added_tokens is None:
        added_tokens, flags = added_tokens_of(path, spec), token_flags(path, spec.get("added_tokens") or [])
    if not isinstance(vocab, dict) or not vocab or not all(type(i) is int for i in vocab.values()):
        raise TokenizerError(f"{path}: model.vocab must be a non-empty object mapping tokens to integer ids")
    pairs = [_pair(merge) for merge in merges] if isinstance(merges, list) else [None]
    if None in pairs:
        bad = merges[pairs.index(None)] if isinstance(merges, list) else merges
        raise TokenizerError(f"{path}: model.merges must be a list of \"a b\" strings or [\"a\", \"b\"] pairs; "
                             f"found {bad!r}")
    ranks = {pair: r for r, pair in enumerate(pairs)}  # later duplicates win, as in tokenizers
    first_rank: dict[str, int] = {}
    before, order_problem = None, None  # condition 2 of the module docstring: each piece's merges ranked together
    for (left, right), r in sorted(ranks.items(), key=lambda item: item[1]):
        piece = left + right
        if left not in vocab or right not in vocab or piece not in vocab:
            raise TokenizerError(f"{path}: merge {f'{left} {right}'!r} uses or makes a token that is not in "
                                 "model.vocab")
        if piece != before and piece in first_rank and order_problem is None:
            order_problem = (f"a merge into {before!r} is ranked between two merges into {piece!r}; a sentencepiece "
                             f"piece has one score for all of its merges")
        first_rank.setdefault(piece, r)
        before = piece
    own = set(vocab)  # the model's pieces, before the added tokens join them
    for i, token in added_tokens.items():
        vocab.setdefault(token, i)
    pieces = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in pieces] != list(range(len(pieces))):
        raise TokenizerError(f"{path}: vocabulary ids are not contiguous from 0")
    unk = model.get("unk_token") or "<unk>"
    if unk not in vocab:
        raise TokenizerError(f"{path}: the vocabulary has no unknown token {unk!r}, which sentencepiece needs")
    # Added tokens are matched whole before the model sees the text. Those the model can also make (a piece of its
    # own that is one character, a byte, or made by a merge) keep their kind, so that the model still makes them
    # where they are not matched whole (a single_word token inside a word; a special one with split_special_tokens).
    made = {t for t in own if len(t) == 1 or t in first_rank or BYTE_PIECE.fullmatch(t)}
    added = set(added_tokens.values()) - made
    proto = spm_pb2.ModelProto()
    for piece, i in pieces:
        if piece == unk:
            kind = _Piece.UNKNOWN
        elif piece in ("<s>", "</s>", "<pad>"):
            kind = _Piece.CONTROL
        elif piece in added:
            kind = _Piece.USER_DEFINED
        elif BYTE_PIECE.fullmatch(piece):
            kind = _Piece.BYTE
        else:
            kind = _Piece.NORMAL
        proto.pieces.add(piece=piece, score=-float(first_rank.get(piece, 0)) if kind == _Piece.NORMAL else 0.0,
                         type=kind)
    ids = {piece: i for piece, i in pieces}
    t = proto.trainer_spec
    t.model_type = spm_pb2.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = bool(model.get("byte_fallback"))
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = (ids.get(unk, 0), ids.get("<s>", -1), ids.get("</s>", -1),
                                              ids.get("<pad>", -1))
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = unk, "<s>", "</s>", "<pad>"
    n = proto.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", True, False, True
    normal = [p.piece for p in proto.pieces if p.type == _Piece.NORMAL and len(p.piece) > 1]
    return (proto, first_rank, order_problem or _unlisted_merge_problem(normal, vocab, ranks),
            template_ends(path, spec.get("post_processor")), flags)


def template_ends(path: Path, processor: object) -> tuple[int | None, int | None]:
    """The ids a tokenizer.json's `post_processor` puts before and after an encoded text (None: nothing), which
    transformers 5 follows whatever tokenizer_config.json's `add_bos_token` / `add_eos_token` say; a file without
    one adds nothing. Only templates of one special token (or none) on each side of the text are read."""
    if processor is None:
        return None, None
    kind = processor.get("type") if isinstance(processor, dict) else type(processor).__name__
    single = processor.get("single") if kind == "TemplateProcessing" else None
    specials = processor.get("special_tokens") if kind == "TemplateProcessing" else None
    if not isinstance(single, list) or not isinstance(specials, dict):
        raise TokenizerError(f"{path}: unsupported post_processor {kind!r}: ttl reads a TemplateProcessing that puts "
                             f"at most one special token on each side of the text")
    template = []  # the text as "$A", a special token as its ids
    for item in single:
        text, special = (item.get("Sequence"), item.get("SpecialToken")) if isinstance(item, dict) else (None, None)
        if isinstance(special, dict):
            ids = (specials.get(special.get("id")) or {}).get("ids")
            template.append(tuple(ids) if isinstance(ids, list) else ())
        else:
            template.append("$A" if isinstance(text, dict) and text.get("id") == "A" else repr(item))
    if "$A" in template:
        before, after = template[:template.index("$A")], template[template.index("$A") + 1:]
        if len(before) <= 1 and len(after) <= 1 and all(len(ids) == 1 and type(ids[0]) is int
                                                        for ids in before + after):
            return before[0][0] if before else None, after[0][0] if after else None
    raise TokenizerError(f"{path}: unsupported post_processor template (ids around the text $A: {template}): ttl "
                         f"reads templates that put at most one special token on each side of the text")


def _unlisted_merge_problem(pieces: list[str], vocab: dict[str, int], ranks: dict[tuple[str, str], int]) \
        -> str | None:
    """Condition 1 of the module docstring: the first piece that the listed merges leave in two parts, or None.
    Only pieces with an unlisted split into parts that can occur (pieces, or single characters) can be one."""
    units = vocab.keys() | set().union(*pieces)
    for piece in pieces:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in units and right in units and (left, right) not in ranks:
                break
        else:  # every split is a listed merge
            continue
        parts = _split_by_merges(piece, ranks)
        if len(parts) == 2:
            return (f"tokenizers never merges {parts[0]!r} + {parts[1]!r} (no merge {' '.join(parts)!r}), "
                    f"which sentencepiece merges into the piece {piece!r}")
    return None


def _split_by_merges(text: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """`text` split as `tokenizers`' BPE splits one word: starting from characters, the listed merge of lowest rank
    is applied first, the leftmost of equal ones first, until no listed merge applies."""
    parts = list(text)
    while len(parts) > 1:
        rank, k = min((ranks.get(pair, math.inf), k) for k, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    return parts


def _first_vocabulary_difference(model: spm_pb2.ModelProto, converted: spm_pb2.ModelProto, name: str) -> str | None:
    """The first id whose piece differs between the tokenizer.model `model` (called `name`) and the converted
    tokenizer.json (which may go on with added tokens), or None when they agree that far."""
    for i, (ours, theirs) in enumerate(zip(model.pieces, converted.pieces)):
        if ours.piece != theirs.piece:
            return f"id {i} is {ours.piece!r} in {name}, {theirs.piece!r} in tokenizer.json"
    if len(model.pieces) > len(converted.pieces):
        return f"{name} has {len(model.pieces)} pieces, tokenizer.json {len(converted.pieces)}"
    return None


def added_tokens_of(path: Path, spec: object) -> dict[int, str]:
    """id -> text of a `tokenizer.json`'s `added_tokens` (a list of {"id": ..., "content": ...})."""
    tokens = (spec.get("added_tokens") or []) if isinstance(spec, dict) else None
    if not isinstance(tokens, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in tokens):
        raise TokenizerError(f"{path}: added_tokens must be a list of objects with a string 'content' and an "
                             f"integer 'id'")
    return {t["id"]: t["content"] for t in tokens}


def _pair(merge: object) -> tuple[str, str] | None:
    """A `tokenizers` merge, "a b" (older files) or ["a", "b"] (parts may hold spaces), as a pair; None when it
    is neither."""
    if type(merge) is str:
        parts = merge.split(" ")
    elif type(merge) is list:
        parts = merge
    else:
        return None
    if len(parts) == 2 and type(parts[0]) is str and type(parts[1]) is str and parts[0] and parts[1]:
        return parts[0], parts[1]
    return None
