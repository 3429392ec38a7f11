"""tokenizer.json as transformers reads it: merges that no sentencepiece model can follow are refused instead of
converted into a tokenizer that splits some texts differently (see ttl_core.tokenizer_json)."""

import itertools
import json
import random
from pathlib import Path

import pytest
from tokenizer_helpers import HARD, assert_same_ids, make_ttl_style_dir, write_llama_dir

import ttl_core
from ttl_core.errors import TokenizerError
from ttl_core.tokenizer import Tokenizer

SAMPLE_TEXTS = [line for f in sorted((Path(ttl_core.__file__).parent / "sample_data").glob("*.txt"))
                for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
SNOWMAN = "\u2603"  # a character none of these vocabularies has: byte fallback, so it never merges with a neighbour


def hand_written_dir(path, pieces, merges):
    """A Llama-style tokenizer.json written with the tokenizers library from the given pieces and merges (ranked in
    list order), with byte fallback, the pre-tokenizer transformers' LlamaTokenizer uses and a BOS post-processor."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{i:02X}>" for i in range(256)] + pieces)}
    t = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
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
