"""tokenizer.json as transformers reads it: beside tokenizer.model it is the file transformers 5 uses (tokenizer.model
is ignored), and merges that no sentencepiece model can follow are refused instead of converted into a tokenizer
that splits some texts differently (see ttl_core.tokenizer_json)."""

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from tokenizer_helpers import HARD, assert_same_ids, make_ttl_style_dir, write_llama_dir

import ttl_core
from ttl_core.errors import TokenizerError
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

SAMPLE_TEXTS = [line for f in sorted((Path(ttl_core.__file__).parent / "sample_data").glob("*.txt"))
                for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
SNOWMAN = "\u2603"  # a character none of these vocabularies has: byte fallback, so it never merges with a neighbour


@pytest.fixture(scope="module")
def both_files(tmp_path_factory):
    """A TeenyTinyLlama-like directory: a sentencepiece tokenizer.model, the tokenizer.json transformers converts
    from it, and ttl's LlamaTokenizer config."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("both")
    train_tokenizer(SAMPLE_TEXTS, None, vocab_size=600).save_pretrained(path / "spm")
    AutoTokenizer.from_pretrained(path / "spm").save_pretrained(path / "both")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(path / "spm" / name, path / "both" / name)
    return path / "both"


def edited_copy(source, target, edit):
    """A copy of the tokenizer directory `source` whose tokenizer.json and tokenizer_config.json are changed by
    `edit(spec, config)`."""
    shutil.copytree(source, target)
    files = [target / "tokenizer.json", target / "tokenizer_config.json"]
    spec, config = (json.loads(f.read_text(encoding="utf-8")) for f in files)
    edit(spec, config)
    for f, document in zip(files, (spec, config)):
        f.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return target


def leaf_pieces(spec):
    """Pieces that no merge uses as a part, in the order of their first merge."""
    merges = [tuple(m) for m in spec["model"]["merges"]]
    parts = {part for merge in merges for part in merge}
    return list(dict.fromkeys("".join(m) for m in merges if "".join(m) not in parts))


def rename_piece(spec, config, index=0):
    """The leaf piece `index` renamed (its merges dropped with it): tokenizer.json loses a piece tokenizer.model has."""
    piece = leaf_pieces(spec)[index]
    spec["model"]["vocab"][piece + SNOWMAN] = spec["model"]["vocab"].pop(piece)
    drop_merges(spec, piece)


def drop_merges(spec, piece):
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) != piece]


def reverse_merges(spec, config):
    spec["model"]["merges"].reverse()


def add_token(spec, config):
    """A token in tokenizer.json's added_tokens only: transformers 5 ignores it when the config has an
    added_tokens_decoder (as TeenyTinyLlama's, and ttl's own save_pretrained, do)."""
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<|novo|>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})


def add_token_without_config_decoder(spec, config):
    """As `add_token`, with a config that has no added_tokens_decoder (as transformers 5 saves it): then
    transformers takes tokenizer.json's added_tokens."""
    add_token(spec, config)
    del config["added_tokens_decoder"]


@pytest.mark.parametrize("edit", [rename_piece, reverse_merges, add_token, add_token_without_config_decoder])
def test_beside_tokenizer_model_a_different_tokenizer_json_is_followed_as_autotokenizer(both_files, tmp_path, edit):
    """transformers 5 builds a Llama tokenizer from tokenizer.json's vocab and merges whenever the file exists, and
    takes its added tokens unless the config lists its own; ttl read tokenizer.model and added tokenizer.json's
    added tokens to it regardless, so its ids differed from transformers' after each edit below."""
    from transformers import AutoTokenizer

    texts = HARD + SAMPLE_TEXTS + ["a<|novo|>b <|novo|>"]
    path = edited_copy(both_files, tmp_path / "edited", edit)
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sentencepiece = Tokenizer(path / "tokenizer.model")
    changed = any(sentencepiece.encode(text) != hf(text)["input_ids"] for text in texts)
    assert changed == (edit is not add_token)  # what each edit does to transformers' ids
    assert ours.vocab_size == len(hf)
    assert_same_ids(ours, hf, texts)


def test_agreeing_files_load_tokenizer_model_itself(both_files):
    """When tokenizer.json splits every text as tokenizer.model does (the common case, TeenyTinyLlama's), the
    model read is tokenizer.model with its own scores, which save_pretrained then writes back unchanged."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(both_files)
    assert ours.proto.pieces == Tokenizer(both_files / "tokenizer.model").proto.pieces
    assert_same_ids(ours, AutoTokenizer.from_pretrained(both_files), HARD + SAMPLE_TEXTS)


def test_beside_tokenizer_model_merges_sentencepiece_cannot_follow_are_refused_naming_both_files(both_files, tmp_path):
    """tokenizer.json without the merges into one of its pieces: transformers leaves that piece's two parts apart
    (between characters that never merge), which no sentencepiece model with that piece can do. The refusal names
    both files and their first difference: the vocabulary's (a piece, or its length), else the merge."""
    from transformers import AutoTokenizer

    spec = json.loads((both_files / "tokenizer.json").read_text(encoding="utf-8"))
    piece = leaf_pieces(spec)[1]
    path = edited_copy(both_files, tmp_path / "dropped", lambda spec, config: drop_merges(spec, piece))
    witness = SNOWMAN + piece.replace("\u2581", " ") + SNOWMAN
    hf = AutoTokenizer.from_pretrained(path)
    assert hf(witness)["input_ids"] != Tokenizer.from_pretrained(path / "tokenizer.model").encode(witness)
    with pytest.raises(TokenizerError, match=rf"{re.escape(f'{path}/tokenizer.json and {path}/tokenizer.model')} "
                                             rf"disagree.*never merges .* into the piece {re.escape(repr(piece))}"):
        Tokenizer.from_pretrained(path)
    renamed = leaf_pieces(spec)[0]
    path = edited_copy(path, tmp_path / "renamed_too", rename_piece)
    difference = f"id {spec['model']['vocab'][renamed]} is {renamed!r} in tokenizer.model, " \
                 f"{renamed + SNOWMAN!r} in tokenizer.json"
    with pytest.raises(TokenizerError, match=rf"disagree.*: {re.escape(difference)}$"):
        Tokenizer.from_pretrained(path)
    longer = edited_copy(tmp_path / "dropped", tmp_path / "longer", lambda spec, config: None)
    model = Tokenizer(longer / "tokenizer.model").proto
    model.pieces.add(piece=SNOWMAN * 2, score=-1e9)  # the shared ids agree: the vocabularies differ in length
    (longer / "tokenizer.model").write_bytes(model.SerializeToString())
    with pytest.raises(TokenizerError, match=rf"disagree.*: tokenizer.model has {len(model.pieces)} pieces, "
                                             rf"tokenizer.json {len(model.pieces) - 1}$"):
        Tokenizer.from_pretrained(longer)


def hand_written_dir(path, pieces, merges, byte_fallback=True):
    """A Llama-style tokenizer.json written with the tokenizers library from the given pieces and merges (ranked in
    list order), with byte fallback (and its <0xNN> pieces) unless told, the pre-tokenizer transformers'
    LlamaTokenizer uses and a BOS post-processor."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)] if byte_fallback else []
    vocab = {t: i for i, t in enumerate(specials + byte_pieces + pieces)}
    t = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=byte_fallback,
                               fuse_unk=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.add_special_tokens(specials)
    write_llama_dir(path, json.loads(t.to_str()))
    return path


ABC = ["\u2581", "a", "b", "c", "x", "ab", "bc", "abc", "bcx"]


def test_merges_listing_one_split_of_a_piece_convert_exactly_when_the_other_splits_never_meet(tmp_path):
    """"abc" is made only by ab + c, but a + bc never meet: a + b outranks b + c, so every text splits as in
    transformers (all strings of a, b, c, x and spaces up to 5 characters, alone and between unmergeable ones)."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abc", ABC, [("a", "b"), ("ab", "c"), ("b", "c"), ("bc", "x")])
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    texts = ["".join(chars) for n in range(1, 6) for chars in itertools.product("abcx ", repeat=n)]
    assert_same_ids(ours, hf, texts + [SNOWMAN + text + SNOWMAN for text in texts])


@pytest.mark.parametrize("merges, tokens, problem", [
    ([("b", "c"), ("a", "b"), ("ab", "c")], ["a", "bc", "x"],
     r"tokenizers never merges 'a' \+ 'bc' .* into the piece 'abc'"),
    ([("b", "c"), ("a", "b"), ("ab", "c"), ("bc", "x"), ("a", "bc")], ["a", "bcx"],
     r"a merge into 'bcx' is ranked between two merges into 'abc'"),
])
def test_merges_sentencepiece_cannot_follow_are_refused(tmp_path, merges, tokens, problem):
    """b + c outranks a + b, so "abcx" reaches a + bc + x, where transformers never merges a + bc (no such merge)
    or first merges bc + x (ranked between the two merges into "abc"); sentencepiece, which merges any two parts
    forming a piece by the piece's one score, would make "abc". ttl used to convert these files silently."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abc", ABC, merges)
    assert AutoTokenizer.from_pretrained(path).tokenize("abcx") == ["\u2581", *tokens]
    with pytest.raises(TokenizerError, match=rf"tokenizer.json: sentencepiece cannot reproduce these merges exactly: "
                                             rf"{problem}"):
        Tokenizer.from_pretrained(path)


def test_merges_trained_by_tokenizers_convert_exactly(tmp_path):
    """The tokenizers trainer lists one merge per piece, made of parts that met in its own splitting, so the
    conversion is exact: ids equal transformers' on the sample texts and on words glued from random pieces."""
    from transformers import AutoTokenizer

    make_ttl_style_dir(tmp_path / "trained", SAMPLE_TEXTS, vocab_size=1200)
    ours, hf = Tokenizer.from_pretrained(tmp_path / "trained"), AutoTokenizer.from_pretrained(tmp_path / "trained")
    pieces = [p.replace("\u2581", " ") for p in hf.get_vocab() if not p.startswith("<")]
    rng = random.Random(0)
    glued = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(2000)]
    assert_same_ids(ours, hf, HARD + SAMPLE_TEXTS + glued)


def add_token_with_empty_config_decoder(spec, config):
    """As `add_token`, with an empty added_tokens_decoder: transformers 5 still ignores tokenizer.json's added_tokens
    (it asks whether the key is there, not whether it lists anything)."""
    add_token(spec, config)
    config["added_tokens_decoder"] = {}


@pytest.mark.parametrize("edit", [add_token, add_token_without_config_decoder, add_token_with_empty_config_decoder])
def test_added_tokens_come_from_the_config_decoder_if_present_else_tokenizer_json(both_files, tmp_path, edit):
    """Whether the directory or its tokenizer.model itself is read, the added tokens are tokenizer_config.json's
    added_tokens_decoder whenever the config has that key (even empty), else tokenizer.json's added_tokens, as
    transformers 5 reads the directory; and a tokenizer.json that splits as tokenizer.model does still loads
    tokenizer.model itself (its own scores), the added tokens appended."""
    from transformers import AutoTokenizer

    path = edited_copy(both_files, tmp_path / "edited", edit)
    hf = AutoTokenizer.from_pretrained(path)
    assert ("<|novo|>" in hf.get_vocab()) == (edit is add_token_without_config_decoder)
    model = Tokenizer(path / "tokenizer.model").proto.pieces
    for where in (path, path / "tokenizer.model"):
        ours = Tokenizer.from_pretrained(where)
        assert ours.vocab_size == len(hf), where
        assert ours.proto.pieces[:len(model)] == model, where
        assert_same_ids(ours, hf, HARD[:4] + ["a<|novo|>b <|novo|>"])


def model_beside(path, edit):
    """Write beside the hand-written tokenizer.json in `path` the tokenizer.model it converts to, changed by
    `edit(pieces)`, a dict piece -> SentencePiece message."""
    proto = Tokenizer.from_pretrained(path).proto
    edit({p.piece: p for p in proto.pieces})
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())


def tie_ab_with_bc(pieces):
    pieces["ab"].score = pieces["bc"].score  # a tie: sentencepiece then merges the leftmost pair first


def make_ab_user_defined(pieces):
    pieces["ab"].type = pieces["ab"].USER_DEFINED  # matched whole, before the BPE


@pytest.mark.parametrize("edit", [tie_ab_with_bc, make_ab_user_defined])
def test_tokenizer_model_that_splits_differently_only_by_scores_or_types_is_ignored(tmp_path, edit):
    """tokenizer.model with tokenizer.json's pieces, but a tie between the scores of two merged pieces or another
    piece type, splits "abc" as a + bc no longer: ttl follows tokenizer.json, as transformers does."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abc", ["\u2581", "a", "b", "c", "ab", "bc"], [("b", "c"), ("a", "b")])
    model_beside(path, edit)
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.tokenize("abc") == ["\u2581", "a", "bc"]
    assert Tokenizer(path / "tokenizer.model").encode("abc") != hf("abc")["input_ids"]  # the file disagrees
    texts = ["".join(chars) for n in range(1, 5) for chars in itertools.product("abc ", repeat=n)]
    assert_same_ids(Tokenizer.from_pretrained(path), hf, texts)


def test_a_merge_listed_twice_keeps_its_last_rank_as_in_tokenizers(tmp_path):
    """"a b" listed first and last: transformers ranks it after "b c" (the later duplicate wins), so "abc" is
    a + bc. (The tokenizers library drops duplicates when it writes a file, so this one is written by hand.)"""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "written", ["\u2581", "a", "b", "c", "ab", "bc"], [("a", "b"), ("b", "c")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = [["a", "b"], ["b", "c"], ["a", "b"]]
    shutil.rmtree(path)
    write_llama_dir(path, spec)
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.tokenize("abc") == ["\u2581", "a", "bc"]
    texts = ["".join(chars) for n in range(1, 5) for chars in itertools.product("abc ", repeat=n)]
    assert_same_ids(Tokenizer.from_pretrained(path), hf, texts)


def test_a_piece_no_merge_can_make_is_accepted(tmp_path):
    """"abcd" is in the vocabulary, but "abcd" always splits into a + bc + d (b + c outranks a + b and c + d), no
    two of which form a piece, in either library: the piece is never made, and the file converts exactly."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abcd", ["\u2581", "a", "b", "c", "d", "ab", "bc", "cd", "abcd"],
                            [("b", "c"), ("a", "b"), ("c", "d")])
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.tokenize("abcd") == ["\u2581", "a", "bc", "d"]
    texts = ["".join(chars) for n in range(1, 6) for chars in itertools.product("abcd ", repeat=n)]
    assert_same_ids(Tokenizer.from_pretrained(path), hf, texts)


def test_a_piece_starting_with_a_character_the_vocabulary_lacks_is_refused(tmp_path):
    """"☃a" with no "☃" in the vocabulary: transformers writes ☃ as its bytes, then "a"; sentencepiece would merge
    ☃ + a into the piece, so the file is refused."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "snow", ["\u2581", "a", "b", "ab", SNOWMAN + "a"], [("a", "b")])
    assert AutoTokenizer.from_pretrained(path).tokenize(SNOWMAN + "a") == ["\u2581", "<0xE2>", "<0x98>", "<0x83>", "a"]
    with pytest.raises(TokenizerError, match=rf"never merges '{SNOWMAN}' \+ 'a' .* into the piece '{SNOWMAN}a'"):
        Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("unk", ["<unk>", "[UNK]"])
def test_a_tokenizer_json_without_byte_fallback_converts_unknown_characters_to_unk(tmp_path, unk):
    """Without byte fallback (and no <0xNN> pieces), a character the vocabulary lacks is the file's unknown token
    (model.unk_token, whatever its name), consecutive ones one, as the tokenizers library encodes the file.
    (transformers 5's LlamaTokenizer differs: it rebuilds the BPE with byte fallback on and drops such characters.)"""
    from tokenizers import Tokenizer as HFTokenizer

    path = hand_written_dir(tmp_path / "no_bytes", ["\u2581", "a", "b", "ab"], [("a", "b")], byte_fallback=False)
    text = (path / "tokenizer.json").read_text(encoding="utf-8")
    (path / "tokenizer.json").write_text(text.replace('"<unk>"', json.dumps(unk)), encoding="utf-8")
    reference = HFTokenizer.from_file(str(path / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(path)
    assert ours.encode(f"ab{SNOWMAN}{SNOWMAN}b") == [1, 4, 7, 0, 6]  # <s> ▁ ab <unk> b
    for text in ["".join(chars) for n in range(1, 5) for chars in itertools.product(f"abx {SNOWMAN}", repeat=n)]:
        assert ours.encode(text) == reference.encode(text).ids, text


def test_an_unreadable_tokenizer_model_beside_tokenizer_json_is_ignored_as_by_transformers(both_files, tmp_path):
    """transformers 5 reads tokenizer.json and never opens tokenizer.model: a tokenizer.model that is no
    sentencepiece model (a Git LFS pointer, a cut download) does not stop the directory from loading."""
    from transformers import AutoTokenizer

    path = edited_copy(both_files, tmp_path / "pointer", lambda spec, config: None)
    (path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    assert_same_ids(Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path), HARD[:4] + SAMPLE_TEXTS[:5])


def test_an_added_token_the_vocabulary_has_keeps_its_vocabulary_id(tmp_path):
    """tokenizer.json's added_tokens lists "ab", a piece of model.vocab, under a new id: transformers keeps the
    vocabulary's id (and no new one), and matches "ab" whole as an added token."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abc", ["\u2581", "a", "b", "ab"], [("a", "b")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "ab", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(hf) == len(spec["model"]["vocab"])
    assert_same_ids(ours, hf, ["xab", "aab b", "ba"])


@pytest.mark.parametrize("special", [True, False])
def test_a_piece_listed_as_an_added_token_is_still_made_by_merges_where_not_matched_whole(tmp_path, special):
    """tokenizer.json's added_tokens list the model's pieces "ab" (whole word only) and "▁a": where the text
    does not match them whole ("bab", or any text with split_special_tokens for a special token), transformers'
    BPE still merges them from their letters; ttl did not, spelling them out."""
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "abc", ["▁", "a", "b", "▁a", "ab"], [("▁", "a"), ("a", "b")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] += [{"id": spec["model"]["vocab"][t], "content": t, "single_word": t == "ab", "lstrip": False,
                              "rstrip": False, "normalized": False, "special": special} for t in ("ab", "▁a")]
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert hf.convert_ids_to_tokens(hf("bab", add_special_tokens=False)["input_ids"]) == ["▁", "b", "ab"]
    assert_same_ids(ours, hf, ["bab", "ab", "b ab", "a b", "▁a", "bab▁a"])
    for text in ("bab", "ab", " a ab", "▁ab"):
        assert ours.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], text


def test_byte_pieces_listed_among_the_added_tokens_still_serve_byte_fallback(tmp_path):
    """The tokenizers trainer, given the <0xNN> pieces as special tokens (as TeenyTinyLlama-style files are trained),
    also lists them among the added tokens: they stay byte pieces (ttl refused the file: sentencepiece found no 256
    byte pieces), matched whole where written in the text, as transformers does."""
    from transformers import AutoTokenizer

    spec = make_ttl_style_dir(tmp_path / "base", [t.lower() for t in SAMPLE_TEXTS])
    spec["added_tokens"] += [{"id": spec["model"]["vocab"][f"<0x{i:02X}>"], "content": f"<0x{i:02X}>",
                              "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                              "special": True} for i in range(256)]
    write_llama_dir(tmp_path / "bytes", spec)
    ours, hf = Tokenizer.from_pretrained(tmp_path / "bytes"), AutoTokenizer.from_pretrained(tmp_path / "bytes")
    texts = HARD + ["a<0x0A>b 😀", "<0x41>"]
    assert_same_ids(ours, hf, texts)
    for text in texts:
        assert ours.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], text


TEMPLATES = {"none": None, "text only": "$A", "<s> first": "<s> $A", "both": "<s> $A </s>", "</s> last": "$A </s>"}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("config_adds_bos", [True, False])
def test_bos_and_eos_around_a_text_follow_the_post_processor_as_in_transformers(tmp_path, template, config_adds_bos):
    """With tokenizer.json, transformers 5 puts <s> / </s> around a text as the file's post-processor says
    (nothing without one) and ignores tokenizer_config.json's add_bos_token / add_eos_token; encode's explicit
    add_bos / add_eos still decide when given, and save_pretrained keeps the setting."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = hand_written_dir(tmp_path / "t", ["\u2581", "a", "b", "ab"], [("a", "b")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    single = TEMPLATES[template]
    spec["post_processor"] = single and json.loads(processors.TemplateProcessing(
        single=single, special_tokens=[(t, i) for t, i in (("<s>", 1), ("</s>", 2)) if t in single]).__getstate__())
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": config_adds_bos}))
    ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert (ours.add_bos_token, ours.add_eos_token) == ("<s> $A" in str(single), "$A </s>" in str(single))
    assert_same_ids(ours, hf, ["ab ba", "b", ""])
    assert ours.encode("ab", add_bos=True, add_eos=True) == [1, 260, 263, 2]  # <s> ▁ ab </s>
    ours.save_pretrained(tmp_path / "saved")
    saved = Tokenizer.from_pretrained(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved.encode("ab") == ours.encode("ab") == theirs("ab")["input_ids"]


@pytest.mark.parametrize("processor, problem", [
    ({"type": "ByteLevel", "trim_offsets": True}, "unsupported post_processor 'ByteLevel'"),
    ({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                               {"SpecialToken": {"id": "<pad>", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                         "<pad>": {"id": "<pad>", "ids": [3], "tokens": ["<pad>"]}}},
     r"unsupported post_processor template \(ids around the text \$A: \[\(1,\), \(3,\), '\$A'\]\)"),
    ({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                               {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}},
     r"unsupported post_processor template \(ids around the text \$A: \['\$A', '\$A'\]\)"),
    ([], "unsupported post_processor 'list'")])
def test_a_post_processor_adding_more_than_a_token_on_a_side_is_refused(tmp_path, processor, problem):
    path = hand_written_dir(tmp_path / "t", ["\u2581", "a", "b", "ab"], [("a", "b")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    (path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": processor}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"tokenizer.json: {problem}"):
        Tokenizer.from_pretrained(path)


def test_a_post_processor_adding_a_token_outside_the_vocabulary_is_refused(tmp_path):
    path = hand_written_dir(tmp_path / "t", ["\u2581", "a", "b", "ab"], [("a", "b")])
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"]["special_tokens"]["<s>"]["ids"] = [len(spec["model"]["vocab"])]
    (path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: the post-processor adds token id 264, outside the "
                                             r"vocabulary \(ids 0..263\)"):
        Tokenizer.from_pretrained(path)


def test_tokenizer_model_given_itself_beside_a_tokenizer_json_without_added_tokens(both_files, tmp_path):
    """A tokenizer.json may leave out `added_tokens`: the tokenizer.model beside it, given itself, still loads
    (its ids, and <s> as that tokenizer.json's post-processor says)."""
    path = edited_copy(both_files, tmp_path / "no_added", lambda spec, config: (spec.pop("added_tokens"),
                                                                                config.pop("added_tokens_decoder")))
    ours = Tokenizer.from_pretrained(path / "tokenizer.model")
    assert ours.encode("a casa") == Tokenizer.from_pretrained(both_files).encode("a casa")
