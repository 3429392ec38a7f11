"""Added tokens that are special and added tokens that are not (transformers' `add_special_tokens` / `add_tokens`):
both are matched whole in a text, only special ones are dropped by decode(skip_special_tokens=True) and listed in
`all_special_tokens`; ttl reads, adds and saves them as transformers does."""

import array
import json
import shutil

import pytest
from tokenizer_helpers import assert_same_ids, corpus, make_ttl_style_dir

import ttl_core.data as data
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

PLAIN = ["<nsp>", "foo", "a b"]  # added with add_tokens: not special
SPECIAL = ["<sp>"]
TEXTS = ["a foo b<sp> c", "afoob", "foo", " foo", "a  foo ", "x <nsp> y<nsp>z", "<sp>foo<nsp>", "a b c", "xa b",
         "vida ida", " <sp> foo <nsp> ", "a\u2581foo"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), None, vocab_size=320)


def added_by_transformers(tok, path, layout, normalized):
    """A directory with PLAIN and SPECIAL added by transformers to ttl's save of `tok`, in `layout`: tokenizer.json
    as transformers 5 saves it, or tokenizer.model with a transformers 4 config (added_tokens_decoder with the
    flags, additional_special_tokens), which also lists the vocabulary's piece "ida" as a non-special added token.
    Returns that transformers tokenizer."""
    from transformers import AddedToken, AutoTokenizer

    tok.save_pretrained(path.with_name(path.name + "-spm"))
    hf = AutoTokenizer.from_pretrained(path.with_name(path.name + "-spm"))
    hf.add_tokens([AddedToken(t, normalized=normalized, special=False) for t in PLAIN])
    hf.add_special_tokens({"additional_special_tokens": SPECIAL})
    if layout == "tokenizer.json":
        hf.save_pretrained(path)
        return hf
    shutil.copytree(path.with_name(path.name + "-spm"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word,
                        "normalized": t.normalized, "special": t.special} for i, t in hf.added_tokens_decoder.items()}
    decoder[str(tok.token_to_id("ida"))] = {"content": "ida", "normalized": normalized, "special": False}
    config.update(added_tokens_decoder=decoder, additional_special_tokens=SPECIAL)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("layout", ["tokenizer.model", "tokenizer.json"])
def test_added_tokens_read_and_saved_special_or_not_as_in_transformers(tok, tmp_path, layout, normalized):
    """Directories where transformers added non-special tokens (normalized or not: transformers 5's LlamaTokenizer
    has no normalizer, so both match the raw text, the normalized ones after the others) and a special one: ttl
    encodes and decodes as AutoTokenizer, keeping the non-special ones when skipping special tokens; its save reads
    back in transformers with the same special tokens, ids and decoded text."""
    from transformers import AutoTokenizer

    hf = added_by_transformers(tok, tmp_path / "base", layout, normalized)
    ours = Tokenizer.from_pretrained(tmp_path / "base")
    assert_same_ids(ours, hf, TEXTS)
    ids = ours.encode("x <nsp> y<sp>foo")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "x <nsp> yfoo"
    ours.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved.all_special_tokens == hf.all_special_tokens
    assert saved.added_tokens_decoder == hf.added_tokens_decoder
    assert_same_ids(Tokenizer.from_pretrained(tmp_path / "saved"), saved, TEXTS)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert saved(text)["input_ids"] == ids, text
        assert saved.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


def test_tokens_added_by_ttl_save_as_transformers_adds_them(tok, tmp_path):
    """ttl's add_tokens / add_special_tokens give the ids, decoded text and special tokens that transformers'
    add_tokens / add_special_tokens give, in ttl and, after ttl saves them, in transformers."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    hf.add_tokens(PLAIN)
    hf.add_special_tokens({"additional_special_tokens": SPECIAL})
    ours = Tokenizer.from_pretrained(tmp_path / "base")
    assert ours.add_tokens(PLAIN + ["foo"]) == [320, 321, 322, 321]
    assert ours.add_special_tokens(SPECIAL + ["foo"]) == [323, 321]  # "foo" stays as it was added
    assert_same_ids(ours, hf, TEXTS)
    ours.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved.all_special_tokens == hf.all_special_tokens
    assert saved.added_tokens_decoder == hf.added_tokens_decoder
    assert_same_ids(ours, saved, TEXTS)
    assert_same_ids(Tokenizer.from_pretrained(tmp_path / "saved"), saved, TEXTS)


def test_a_tokenizers_normalizer_does_not_change_how_added_tokens_match_as_in_transformers(tmp_path):
    """A tokenizer.json trained with the tokenizers library (Llama-2 normalizer: "▁" prepended, spaces replaced by
    "▁") with normalized and unnormalized non-special added tokens: transformers 5's LlamaTokenizer drops the
    file's normalizer, so "foo" in "a foo" matches either way (as it would not after normalization for " foo"),
    and ttl encodes and decodes alike."""
    from transformers import AutoTokenizer

    spec = make_ttl_style_dir(tmp_path / "base", corpus())
    size = len(spec["model"]["vocab"])
    tokens = [(" foo", True, False), ("<nsp>", False, False), ("a b", True, False), ("<sp>", False, True)]
    spec["added_tokens"] += [{"id": size + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": normalized, "special": special}
                             for k, (t, normalized, special) in enumerate(tokens)]
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": SPECIAL}))
    hf, ours = AutoTokenizer.from_pretrained(tmp_path / "base"), Tokenizer.from_pretrained(tmp_path / "base")
    assert hf.convert_ids_to_tokens(hf("a foo")["input_ids"]) == ["<s>", "▁a", " foo"]
    assert_same_ids(ours, hf, TEXTS)


@pytest.fixture(scope="module")
def overlapping(tok, tmp_path_factory):
    """(ttl, transformers) on a directory where transformers added tokens that overlap one another and the special
    ones: "ab" normalized, "bc", "|x" and the whole-word "xbc" not; special "<|x|>" taking the whitespace after it,
    "<|y|>" the whitespace before it, as a whole word only."""
    from transformers import AddedToken, AutoTokenizer

    path = tmp_path_factory.mktemp("overlapping")
    tok.save_pretrained(path / "base")
    hf = AutoTokenizer.from_pretrained(path / "base")
    hf.add_tokens([AddedToken("ab", normalized=True, special=False), AddedToken("bc", normalized=False, special=False),
                   AddedToken("|x", normalized=False, special=False),
                   AddedToken("xbc", normalized=False, special=False, single_word=True)])
    hf.add_special_tokens({"additional_special_tokens": [AddedToken("<|x|>", rstrip=True),
                                                         AddedToken("<|y|>", lstrip=True, single_word=True)]})
    hf.save_pretrained(path / "added")
    return Tokenizer.from_pretrained(path / "added"), AutoTokenizer.from_pretrained(path / "added")


def test_split_special_tokens_still_matches_the_tokens_that_are_not_special_as_in_transformers(overlapping):
    """With split_special_tokens, transformers reads special tokens written in the text as text, but still matches
    the non-special added tokens, except inside a special token's text (it finds the special token, then drops it)."""
    ours, hf = overlapping
    bar_x = hf.convert_tokens_to_ids("|x")
    assert bar_x in hf("a|xb", split_special_tokens=True)["input_ids"]
    assert bar_x not in hf("<|x|>", split_special_tokens=True)["input_ids"]
    for text in ["a|xb", "<|x|>", "<|x|> |x", "bc<|y|>ab", " <|y|> xbc", "foo"]:
        assert ours.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], text


def test_normalized_added_tokens_are_matched_after_the_others_as_in_transformers(overlapping):
    """transformers matches the added tokens marked `normalized: false` first, then the normalized ones in the text
    between them: in "abc" the unnormalized "bc" wins over the normalized "ab" though "ab" starts first."""
    ours, hf = overlapping
    assert hf.convert_ids_to_tokens(hf("abc", add_special_tokens=False)["input_ids"]) == ["▁a", "bc"]
    for text in ["abc", "xabcx", "ab bc abc", "abab<|x|>bc"]:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_whole_words_and_whitespace_around_added_tokens_are_unicodes_as_in_transformers(overlapping):
    """`single_word` and `lstrip` / `rstrip` read letters and whitespace as the tokenizers library's regexes do
    (Unicode `\\w`: letters, marks, decimal digits, letter numbers, connector punctuation, the joiners; Unicode
    White_Space), not as Python's `re` does; and a whole-word token found where it is not a whole word leaves that
    text unmatched, though a shorter token inside it could match ("axbc": no "bc")."""
    ours, hf = overlapping
    before = ["①", "²", "Ⓐ", "ⓩ", "\U0001f130", "e\u0301", "‿", "\u200d", "\u0663", "Ⅻ", "\x1c", "\u2029", "\u3000",
              "\u00a0", "\u200b", " ", "a", "_", ".", "😀",
              "\U00031638", "\u1c89", "\u1c8a"]  # letters of Unicode 15.0 and 16.0, which Python 3.11's database lacks
    texts = [c + "<|y|>" for c in before] + ["<|y|>" + c for c in before] + ["x" + c + "<|y|>" for c in before]
    texts += ["<|x|>" + c + "z" for c in before] + ["axbc", "a xbc", "xbc", "xbca", "xbc.", "a\x1f<|y|>"]
    for text in texts:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_adding_a_piece_the_model_has_makes_it_an_added_token_as_in_transformers(tok, tmp_path):
    """transformers' add_tokens / add_special_tokens of a piece the model already has keep its id but make it an
    added token: matched whole in a text (no longer merged into a longer piece), and, when special, dropped by
    decode(skip_special_tokens=True); ttl's do the same, and its save reads back alike in transformers."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    pieces = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    plain, special = "ida", next(p for p in pieces if p.startswith("\u2581") and len(p) > 3)
    hf.add_tokens([plain])
    hf.add_special_tokens({"additional_special_tokens": [special]})
    assert len(hf) == tok.vocab_size and {plain, special} <= {t.content for t in hf.added_tokens_decoder.values()}
    ours = Tokenizer.from_pretrained(tmp_path / "base")
    assert ours.add_tokens([plain]) == [tok.token_to_id(plain)]
    assert ours.add_special_tokens([special]) == [tok.token_to_id(special)]
    texts = ["vida ida", "vidas", "a" + special.replace("\u2581", " ") + "s", special.replace("\u2581", " "), "idade"]
    assert any(hf(t)["input_ids"] != tok.encode(t) for t in texts)
    assert_same_ids(ours, hf, texts)
    ours.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in texts:
        assert saved(text)["input_ids"] == hf(text)["input_ids"], text
    assert_same_ids(Tokenizer.from_pretrained(tmp_path / "saved"), saved, texts)


def test_added_token_entries_without_flags_take_transformers_defaults(tok, tmp_path):
    """An added_tokens_decoder entry without "special" is not special, and one without "normalized" is normalized
    unless special (transformers' AddedToken defaults): "ab" is kept when decoding and matched after "bc"."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update({"320": {"content": "ab"}, "321": {"content": "bc", "normalized": False}})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.convert_ids_to_tokens(hf("abc")["input_ids"]) == ["<s>", "▁a", "bc"]
    assert_same_ids(Tokenizer.from_pretrained(tmp_path), hf, ["abc", "x ab bc", "abab"])


@pytest.mark.parametrize("token, plain, special, divided", [
    ("foo", {"lstrip": True}, {}, True), ("foo", {"rstrip": True}, {}, True), (" foo", {"single_word": True}, {}, True),
    ("bom dia", {}, {}, True), ("foo ", {}, {}, True),
    (" foo", {}, {"lstrip": True, "rstrip": True}, False), ("foo", {"single_word": True}, {}, False)])
def test_a_corpus_is_cut_into_pieces_only_where_no_token_it_matches_spans_a_cut(tok, tmp_path, monkeypatch, token,
                                                                               plain, special, divided):
    """prepare_data encodes a long document in pieces cut before the spaces after a word; an added token that matches
    in a corpus (one not special: special ones are text there) and takes the whitespace beside it would take other
    whitespace in a piece than in the whole text ("foo| bar" with rstrip, "a\\n| foo" with lstrip), as would a
    whole-word token that starts with a space (in "bar| foo" the piece hides the word before it) and one holding a
    space after a word ("bom| dia", "foo| "), so its tokenizer encodes documents whole."""
    from transformers import AddedToken, AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    hf.add_tokens([AddedToken(token, normalized=False, special=False, **plain)])
    hf.add_special_tokens({"additional_special_tokens": [AddedToken("<|x|>", normalized=False, **special)]})
    hf.save_pretrained(tmp_path / "added")
    ours = Tokenizer.from_pretrained(tmp_path / "added")
    for name in ("_worker_tokenizer", "_worker_cuts"):  # set by _init_worker; restored after the test
        monkeypatch.setattr(data, name, getattr(data, name))
    data._init_worker(tmp_path / "added")
    assert data._worker_cuts != divided
    text = "a\n foo bar foo  casa\tfoo <|x|> foo\n\n foo bom dia"
    monkeypatch.setattr(data, "_PIECE_CHARS", 1)  # a cut wherever the text allows one
    data._encode_document(text, ids := array.array("I"))
    assert ids.tolist() == ours.encode(text, add_bos=True, add_eos=True, split_special_tokens=True)


def test_a_role_token_listed_as_not_special_is_saved_special_as_in_transformers(tok, tmp_path):
    """A token playing <s> stays special whatever its added_tokens_decoder entry says; ttl's save writes it special,
    as transformers holds it (and writes it), not the flag it was read with."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(tok.bos_id)]["special"] = False
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    Tokenizer.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): entry["special"] for i, entry in saved.items()} == {
        i: t.special for i, t in hf.added_tokens_decoder.items()}
    assert saved[str(tok.bos_id)]["special"]
