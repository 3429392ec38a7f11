"""Differential fuzzing: ttl's Tokenizer and transformers' AutoTokenizer read the same directory, for each kind of
directory ttl reads (tokenizer.model with ttl's config, as legacy, without word prefix, with or without <s> / </s>,
splitting special tokens; tokenizer.json as transformers saves it; both files; TeenyTinyLlama-style tokenizer.json;
Aira's chat tokens; tokens added by transformers with every flag, overlapping one another, or pieces of the model),
and must give the same ids for seeded random texts (Portuguese accents composed and decomposed, emoji and other
astral characters, CJK, bytes the vocabulary lacks, control characters, runs of spaces, zero-width and non-breaking
spaces, "▁", special tokens whole and cut, very long words), with and without <s> / </s> and with
split_special_tokens, and the same text for their decoding and for random ids (byte-fallback runs that are not
UTF-8, special tokens skipped or kept)."""

import json
import random
import shutil

import pytest
from tokenizer_helpers import corpus, make_ttl_style_dir, random_text

from ttl_core.chat_format import AIRA_SPECIAL_TOKENS
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

TEXTS, ID_SEQUENCES = 1000, 500  # per directory


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
    hf = AutoTokenizer.from_pretrained(root / "spm")  # pieces of the model ("▁a", "é") and whitespace added
    hf.add_tokens([AddedToken("\n", normalized=False, special=False), AddedToken("  ", normalized=True, special=False),
                   AddedToken("\u2581a", normalized=False, special=False),
                   AddedToken(" x", normalized=False, special=False, lstrip=True),
                   AddedToken("é", normalized=True, special=False, single_word=True)])
    hf.add_special_tokens({"additional_special_tokens": [AddedToken("<|x|>", rstrip=True, lstrip=True),
                                                         AddedToken("\t<s>", rstrip=True)]})
    hf.save_pretrained(root / "pieces-and-spaces")
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
         "spm-split-json", "both-files", "flags", "flags-legacy", "flags-no-prefix", "pieces-and-spaces", "ttl",
         "ttl-aira"]


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
