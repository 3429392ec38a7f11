"""Differential fuzzing: ttl's Tokenizer and transformers' AutoTokenizer read the same directory, for each kind of
directory ttl reads (tokenizer.model with ttl's config, as legacy, without word prefix, with or without <s> / </s>,
splitting special tokens; tokenizer.json as transformers saves it; both files; TeenyTinyLlama-style tokenizer.json;
Aira's chat tokens; tokens added by transformers with every flag, overlapping one another), and must give the same
ids for seeded random texts (Portuguese accents composed and decomposed, emoji and other astral characters, CJK,
bytes the vocabulary lacks, control characters, runs of spaces, zero-width and non-breaking spaces, "▁", special
tokens whole and cut, very long words), with and without <s> / </s> and with split_special_tokens, and the same text
for their decoding and for random ids (byte-fallback runs that are not UTF-8, special tokens skipped or kept)."""

import json
import random
import shutil
import unicodedata

import pytest
from tokenizer_helpers import corpus, make_ttl_style_dir

from ttl_core.chat_format import AIRA_SPECIAL_TOKENS
from ttl_core.tokenizer import Tokenizer, train_tokenizer

TEXTS, ID_SEQUENCES = 1000, 500  # per directory

FRAGMENTS = [
    "a", "casa", "não", "ação", "coração", "pão", "é", "É", "ç", "olá", "você", "à", "ü", "1", "2024", ".", ",", "!",
    "?", "-", "_", "'", " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\x00", "\x07", "\x1b", "\x1c", "\x1f", "\x7f",
    "\x85", "\u200b", "\u200d", "\u00a0", "\u202f", "\u3000", "\u2028", "\u2029", "\u1680", "\ufeff", "\u2581",
    "\u2581\u2581", "😀", "👍🏽", "👨‍👩‍👧", "𝔸", "中文", "日本語", "한국어", "\U00031638", "\u0301", "\u0327", "ﬁ",
    "Ⅻ", "①", "²", "Ⓐ", "‿", "\ue000", "\U0010fffd", "<s>", "</s>", "<unk>", "<pad>", "<s", "</s >", "< s>", "s>",
    "</", "<|", "|>", *AIRA_SPECIAL_TOKENS, "<|startofinstruction", "<nsp>", "foo", "a b", "<|x|>", "<|y|>", "ab",
    "bc", "xbc", "|x", " ca", "sa", "x" * 60, "ação" * 20]


def random_text(rng: random.Random) -> str:
    """Fragments and random characters (ASCII, Latin, CJK, emoji, controls, any code point), sometimes in NFD or
    NFKC form."""
    def character():
        low, high = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0x1F),
                                (0, 0x10FFFF)])
        c = rng.randint(low, high)
        return "?" if 0xD800 <= c < 0xE000 else chr(c)

    text = "".join(rng.choice(FRAGMENTS) if rng.random() < 0.7 else "".join(character() for _ in range(3))
                   for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 15])))
    form = rng.random()
    return unicodedata.normalize("NFD", text) if form < 0.15 else unicodedata.normalize("NFKC", text) \
        if form < 0.2 else text


def edit_config(path, **settings):
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))


def build_directories(root):
    """The directories compared, by name."""
    from transformers import AddedToken, AutoTokenizer

    base = train_tokenizer(corpus(), None, vocab_size=320)
    for name, settings, special, plain in [
            ("spm", {}, [], []), ("spm-legacy", {"legacy": True}, AIRA_SPECIAL_TOKENS, []),
            ("spm-no-prefix", {"add_prefix_space": False}, [], []),
            ("spm-bos-eos", {"add_bos_token": True, "add_eos_token": True}, AIRA_SPECIAL_TOKENS, []),
            ("spm-no-bos", {"add_bos_token": False}, [], []),
            ("spm-aira", {}, AIRA_SPECIAL_TOKENS, ["<nsp>", "foo", "a b"]),
            ("spm-split", {"split_special_tokens": True}, AIRA_SPECIAL_TOKENS, ["<nsp>", "foo", "a b"])]:
        tok = Tokenizer(base.proto.SerializeToString())
        tok.add_special_tokens(special)
        tok.add_tokens(plain)
        tok.save_pretrained(root / name)
        edit_config(root / name, **settings)
    for name in ("spm-legacy", "spm-no-prefix", "spm-bos-eos", "spm-no-bos", "spm-aira", "spm-split"):  # hf's save
        AutoTokenizer.from_pretrained(root / name).save_pretrained(root / f"{name}-json")
    shutil.copytree(root / "spm-aira-json", root / "both-files")
    shutil.copy(root / "spm-aira" / "tokenizer.model", root / "both-files")
    hf = AutoTokenizer.from_pretrained(root / "spm")
    hf.add_tokens([AddedToken("ab", normalized=True, special=False), AddedToken("bc", normalized=False, special=False),
                   AddedToken("|x", normalized=False, special=False),
                   AddedToken(" ca", normalized=True, special=False, rstrip=True),
                   AddedToken("xbc", normalized=False, special=False, single_word=True)])
    hf.add_special_tokens({"additional_special_tokens": [
        AddedToken("<|x|>", lstrip=True, rstrip=True), AddedToken("<|y|>", lstrip=True, single_word=True),
        AddedToken("sa", normalized=True, single_word=True)]})
    hf.save_pretrained(root / "flags")
    for name, settings in (("flags-legacy", {"legacy": True}), ("flags-no-prefix", {"add_prefix_space": False})):
        shutil.copytree(root / "flags", root / name)
        edit_config(root / name, **settings)
    texts = [t.lower() for t in corpus(300, seed=2)]
    make_ttl_style_dir(root / "ttl", texts)
    make_ttl_style_dir(root / "ttl-aira-base", texts)
    hf = AutoTokenizer.from_pretrained(root / "ttl-aira-base")
    hf.add_special_tokens({"additional_special_tokens": AIRA_SPECIAL_TOKENS})
    hf.save_pretrained(root / "ttl-aira")
    return {path.name: path for path in root.iterdir() if not path.name.endswith("-base")}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    return build_directories(tmp_path_factory.mktemp("fuzz"))


NAMES = ["spm", "spm-legacy", "spm-no-prefix", "spm-bos-eos", "spm-no-bos", "spm-aira", "spm-split",
         "spm-legacy-json", "spm-no-prefix-json", "spm-bos-eos-json", "spm-no-bos-json", "spm-aira-json",
         "spm-split-json", "both-files", "flags", "flags-legacy", "flags-no-prefix", "ttl", "ttl-aira"]


def test_the_fuzzed_directories_are_all_there(directories):
    assert sorted(directories) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_random_texts_encode_and_decode_as_in_transformers(directories, name):
    from transformers import AutoTokenizer

    ours, hf = Tokenizer.from_pretrained(directories[name]), AutoTokenizer.from_pretrained(directories[name])
    assert ours.vocab_size == len(hf)
    rng = random.Random(name)
    texts = [random_text(rng) for _ in range(TEXTS)]
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_bos=False, add_eos=False) == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.encode_batch(texts[:20]) == hf(texts[:20])["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_random_ids_decode_as_in_transformers(directories, name):
    """Sequences mixing byte-fallback pieces (runs that are not UTF-8), special and added tokens, and any piece."""
    from transformers import AutoTokenizer

    ours, hf = Tokenizer.from_pretrained(directories[name]), AutoTokenizer.from_pretrained(directories[name])
    byte_ids = [i for i in range(ours.vocab_size) if ours.id_to_token(i).startswith("<0x")]
    special = sorted(ours.special_ids) + list(range(320, ours.vocab_size))
    rng = random.Random(name)
    for _ in range(ID_SEQUENCES):
        ids = [rng.choice(byte_ids) if r < 0.35 else rng.choice(special) if r < 0.55
               else rng.randrange(ours.vocab_size) for r in (rng.random() for _ in range(rng.randint(0, 12)))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    batch = [[1, 2], byte_ids[:3]]
    assert ours.decode_batch(batch) == hf.batch_decode(batch, skip_special_tokens=True)
