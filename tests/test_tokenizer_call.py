"""`tokenizer(texts, padding=..., truncation=..., return_tensors=...)` and `batch_decode`, as transformers' calls,
against transformers' AutoTokenizer on TeenyTinyLlama-style tokenizer directories built here, and the result fed to
`generate` as transformers code feeds it."""

import itertools
import json
import random
import warnings

import numpy as np
import pytest
import torch
from generation_helpers import PAD, hf_generation_model
from tokenizer_helpers import HARD, corpus, make_ttl_style_dir, random_text

import ttl_core
from ttl_core import Tokenizer
from ttl_core.errors import GenerationError, TokenizerError
from ttl_core.tokenizer_call import MAX_LENGTH_IGNORED

PADDINGS = [False, True, "longest", "max_length", "do_not_pad"]
TRUNCATIONS = [None, False, True, "longest_first", "do_not_truncate"]
SIDES = [None, "left", "right"]
TENSORS = [None, "pt", "np"]
NO_LIMIT = int(1e30)  # transformers' "very large integer", its model_max_length where none is named


def tokenizer_dir(path, with_eos: bool, **config):
    """A TeenyTinyLlama-style directory (tokenizer.json, `<s>` before each text, or also `</s>` after it), its
    tokenizer_config.json updated with `config`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    spec = make_ttl_style_dir(path, corpus(200, seed=1), vocab_size=300)
    if with_eos:
        backend = HFTokenizer.from_str(json.dumps(spec))
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                               special_tokens=[("<s>", 1), ("</s>", 2)])
        (path / "tokenizer.json").write_text(backend.to_str())
    settings = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, **config}))
    return path


def both(path):
    from transformers import AutoTokenizer
    return Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def outcome(tokenizer, texts, **kwargs):
    """(what the call returns or raises, the warnings it gives)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = dict(tokenizer(texts, **kwargs))
        except ValueError as e:  # TokenizerError is one
            result = e
    return result, [str(w.message) for w in caught]


def assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        have = ours[key]
        if isinstance(want, torch.Tensor):
            assert have.dtype == want.dtype and torch.equal(have, want), key
        elif isinstance(want, np.ndarray):
            assert isinstance(have, np.ndarray) and have.dtype == want.dtype and np.array_equal(have, want), key
        else:
            assert have == want, key


def texts_for(rng: random.Random):
    """One text or a batch of 1 to 4 (a list, or a tuple as transformers also takes): Portuguese sentences, the hard
    cases (empty, emoji, whitespace runs), random Unicode full of special-token look-alikes."""
    pick = lambda: rng.choice([rng.choice(HARD), random_text(rng), rng.choice(corpus(20, seed=rng.randrange(99)))])
    if rng.random() < 0.25:
        return pick()
    return rng.choice([list, tuple])(pick() for _ in range(rng.randint(1, 4)))


@pytest.mark.parametrize("with_eos,config", [
    (False, {}),  # TeenyTinyLlama's: <s> only; LlamaTokenizer's sides (pad left, cut right), no length limit
    (True, {"padding_side": "right", "truncation_side": "left", "model_max_length": 9}),
], ids=["bos_only", "bos_eos_right_padded_left_cut"])
def test_call_matches_transformers_over_every_setting(with_eos, config, tmp_path):
    """Every padding x truncation x max_length x padding_side x return_tensors combination, each over fresh random
    texts, with add_special_tokens, return_attention_mask, split_special_tokens and verbose drawn: the same ids,
    masks, dtypes and warnings as AutoTokenizer, and where it raises a ValueError, a one-line TokenizerError."""
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos, **config))
    assert (ours.padding_side, ours.truncation_side) == (theirs.padding_side, theirs.truncation_side)
    rng = random.Random(len(config))
    compared = refused = 0
    for padding, truncation, max_length, side, tensors in itertools.product(
            PADDINGS, TRUNCATIONS, [None, 0, 1, 2, 5, 12], SIDES, TENSORS):
        texts = texts_for(rng)
        kwargs = dict(padding=padding, truncation=truncation, max_length=max_length, padding_side=side,
                      return_tensors=tensors, add_special_tokens=rng.random() < 0.7,
                      return_attention_mask=rng.choice([None, True, False]),
                      split_special_tokens=rng.choice([None, True, False]), verbose=rng.random() < 0.8)
        (want, their_warnings), (have, our_warnings) = outcome(theirs, texts, **kwargs), outcome(ours, texts, **kwargs)
        # the same warnings, each in ttl's words: transformers' one is that padding=True ignores max_length
        assert our_warnings == [MAX_LENGTH_IGNORED] * len(their_warnings), kwargs
        assert all("max_length" in w and "padding" in w for w in their_warnings), kwargs
        rows, _ = outcome(theirs, texts, **{**kwargs, "return_tensors": None})
        if isinstance(have, TokenizerError):
            assert "\n" not in str(have)
            # where ttl alone refuses (see the next test): tensors of rows of different lengths, and no room left
            # for the special tokens
            if "needs rows of one length" in str(have):
                assert tensors and len({len(row) for row in rows["input_ids"]}) > 1, (kwargs, texts)
            else:
                assert isinstance(want, ValueError) or "leaves no room" in str(have), (kwargs, texts, have)
            refused += 1
        else:
            assert not isinstance(want, Exception), (kwargs, texts, want)
            assert_same(have, want)
            compared += 1
    assert compared > 1000 and refused > 100


def test_refusals_where_transformers_gives_something_else(tmp_path):
    """max_length shorter than the special tokens while truncating (transformers then does not truncate at all) and
    rows of different lengths as "np" (an array of arrays there) or as "pt" with the first row empty (an empty float
    tensor there) are refused in one line."""
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=True))
    assert theirs("casa de menino", max_length=1, truncation=True)["input_ids"] == theirs("casa de menino")["input_ids"]
    with pytest.raises(TokenizerError, match="max_length=1 leaves no room for the 2 special token"):
        ours("casa de menino", max_length=1, truncation=True)
    assert ours("casa de menino", max_length=1, truncation=True, add_special_tokens=False)["input_ids"] == \
        theirs("casa de menino", max_length=1, truncation=True, add_special_tokens=False)["input_ids"]
    assert theirs(["a casa", "a"], return_tensors="np")["input_ids"].dtype == object
    with pytest.raises(TokenizerError, match="return_tensors='np' needs rows of one length, and these have 3 to 6"):
        ours(["a casa", "a"], return_tensors="np")
    assert theirs(["", "a casa"], add_special_tokens=False, return_tensors="pt")["input_ids"].shape == (2, 0)
    with pytest.raises(TokenizerError, match="return_tensors='pt' needs rows of one length, and these have 0 to"):
        ours(["", "a casa"], add_special_tokens=False, return_tensors="pt")


def test_the_max_length_warning_points_at_the_callers_line(tmp_path):
    """The warning that padding=True ignores max_length names the line that called the tokenizer, where the setting
    is to be changed (and where `warnings` filters by module look), not a line inside ttl."""
    ours, _ = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(["a casa", "a"], padding=True, max_length=3)
    assert [(str(w.message), w.filename) for w in caught] == [(MAX_LENGTH_IGNORED, __file__)]


# what transformers does and ttl refuses: text pairs, the other outputs, overflowing windows, pre-split words
UNSUPPORTED = [
    (("a", "b"), {}, "text_pair='b' is not supported"),
    ((["a"],), {"text_pair": ["b"]}, "text_pair=\\['b'\\] is not supported"),
    (([["a", "b"]],), {}, "got a list among the texts"),
    (("a",), {"truncation": "only_second", "max_length": 2}, "only_second.*ttl takes no pairs"),
    (("a",), {"return_offsets_mapping": True}, "return_offsets_mapping=True is not supported"),
    (("a",), {"return_token_type_ids": True}, "return_token_type_ids=True is not supported"),
    (("a",), {"stride": 2}, "stride=2 is not supported"),
    ((["a", "casa"],), {"is_split_into_words": True}, "is_split_into_words=True is not supported"),
    (("a",), {"truncation_side": "left"}, "unknown argument\\(s\\) truncation_side"),  # transformers ignores it
]
# what transformers refuses too (ttl checks padding_side even where nothing is padded)
INVALID = [
    (("a",), {"truncation": "xx"}, "truncation must be True, False, 'longest_first' or 'do_not_truncate'"),
    (("a",), {"padding": "middle"}, "padding must be True, False, 'longest', 'max_length' or 'do_not_pad'"),
    (("a",), {"padding": 1}, "padding must be"),
    (("a",), {"padding": True, "padding_side": "middle"}, "padding_side must be 'left' or 'right', got 'middle'"),
    (("a",), {"return_tensors": "tf"}, "return_tensors must be 'pt', 'np' or None, got 'tf'"),
    (("a",), {"max_length": -1, "truncation": True}, "max_length must be a non-negative integer"),
    (("a",), {"max_length": 2.5, "truncation": True}, "max_length must be a non-negative integer"),
    ((3,), {}, "takes a str or a non-empty list of str, got a int$"),
    ((["a", 3],), {}, "got a int among the texts"),
    (([],), {}, "got an empty list"),
    ((["a casa", "a"],), {"return_tensors": "pt"}, "return_tensors='pt' needs rows of one length.*padding=True"),
]


@pytest.mark.parametrize("args,kwargs,message", UNSUPPORTED + INVALID)
def test_bad_calls_are_refused_in_one_line(args, kwargs, message, tmp_path):
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    with pytest.raises(TokenizerError, match=message) as info:
        ours(*args, **kwargs)
    assert "\n" not in str(info.value)
    if (args, kwargs, message) in INVALID:
        with pytest.raises(Exception):
            theirs(*args, **kwargs)
    else:
        theirs(*args, **kwargs)
    for value in ("yes", None):  # transformers reads any value as true or false
        with pytest.raises(TokenizerError, match="add_special_tokens must be True or False"):
            ours("a", add_special_tokens=value)


def test_max_length_may_be_a_numpy_integer_or_a_0d_tensor_as_in_transformers(tmp_path):
    """A length computed with NumPy or torch (`np.max(lengths)`) is a length, not "not an integer"."""
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=True))
    texts = ["a casa de pão", "não", "o menino foi para a escola"]
    for length in (np.int64(4), np.int32(6), torch.tensor(5)):
        for kwargs in ({"truncation": True}, {"padding": "max_length", "truncation": True, "return_tensors": "pt"}):
            assert_same(ours(texts, max_length=length, **kwargs), dict(theirs(texts, max_length=length, **kwargs)))
    for length in (np.float64(4.0), torch.tensor([4])):
        with pytest.raises(TokenizerError, match="max_length must be a non-negative integer or None"):
            ours(texts, max_length=length, truncation=True)


def test_padding_without_a_pad_token_is_refused_as_transformers_refuses_it(tmp_path):
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False, pad_token=None))
    assert ours.pad_id == -1 and theirs.pad_token is None
    for texts in ("a casa", ["a casa", "a"]):
        with pytest.raises(ValueError, match="Asking to pad"):
            theirs(texts, padding=True)
        with pytest.raises(TokenizerError, match="padding needs a padding token and this tokenizer has none"):
            ours(texts, padding=True)
    assert ours(["a casa", "a"])["input_ids"] == theirs(["a casa", "a"])["input_ids"]  # no padding asked: fine


def test_options_asking_for_nothing_pass_and_the_sides_are_settable(tmp_path):
    """transformers' other options at their "nothing" value change nothing; `padding_side` and `truncation_side`
    are attributes as there, read from tokenizer_config.json, written back by save_pretrained, and checked."""
    from transformers import AutoTokenizer
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    texts = ["a casa de pão", "não"]
    plain = ours(texts, padding=True)
    assert ours(texts, text_pair=None, stride=0, return_token_type_ids=False, return_offsets_mapping=None,
                pad_to_multiple_of=None, is_split_into_words=False, padding=True) == plain
    for tokenizer in (ours, theirs):
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    assert_same(ours(texts, padding=True, truncation=True, max_length=3),
                theirs(texts, padding=True, truncation=True, max_length=3))
    ours.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.padding_side, again.truncation_side) == ("right", "left")
    assert Tokenizer.from_pretrained(tmp_path / "saved").model_max_length == again.model_max_length == NO_LIMIT
    ours.truncation_side = "middle"
    with pytest.raises(TokenizerError, match="truncation_side must be 'left' or 'right', got 'middle'"):
        ours(texts)
    ours.truncation_side, ours.model_max_length = "right", None  # None: ttl's "no limit" before it took int(1e30)
    with pytest.raises(TokenizerError, match=r"^tokenizer.model_max_length must be a non-negative integer \(int\(1e30\)"
                                             r": no limit, as in transformers\), got None$"):
        ours(texts, truncation=True)
    tokenizer_dir(tmp_path / "odd", with_eos=False, padding_side="center")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: padding_side and truncation_side must be"):
        Tokenizer.from_pretrained(tmp_path / "odd")
    tokenizer_dir(tmp_path / "short", with_eos=False, model_max_length=-1)
    with pytest.raises(TokenizerError, match="tokenizer_config.json: model_max_length must be a non-negative integer"):
        Tokenizer.from_pretrained(tmp_path / "short")


def test_the_encoding_reads_as_attributes_and_moves_its_tensors(tmp_path):
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    enc = ours(["a casa", "a"], padding=True, return_tensors="pt")
    assert enc.input_ids is enc["input_ids"] and enc.attention_mask is enc["attention_mask"]
    moved = enc.to("cpu")
    assert torch.equal(moved.input_ids, enc.input_ids) and moved.attention_mask.device.type == "cpu"
    with pytest.raises(AttributeError, match="the encoding has no 'labels' \\(it holds input_ids, attention_mask\\)"):
        enc.labels
    # as transformers' `.to`, lists and NumPy arrays stay as they are
    for tensors in (None, "np"):
        texts = ["a casa", "a"]
        assert_same(ours(texts, padding=True, return_tensors=tensors).to("cpu"),
                    dict(theirs(texts, padding=True, return_tensors=tensors).to("cpu")))


def saved_length(tokenizer, directory):
    """The model_max_length `tokenizer.save_pretrained(directory)` writes."""
    tokenizer.save_pretrained(directory)
    return json.loads((directory / "tokenizer_config.json").read_text())["model_max_length"]


@pytest.mark.parametrize("limit", ["absent", None, 12, 10**20 + 1, 10**25, NO_LIMIT, 1e30])
def test_model_max_length_is_transformers_and_saved_as_transformers_saves_it(limit, tmp_path):
    """A directory's model_max_length, absent or null (transformers' int(1e30) then), a length, or one past 10**20
    (which transformers reads as no limit): ttl's is transformers' value, of its type, so `min(tok.model_max_length,
    512)` works in both; padding="max_length" and truncation without max_length use it alike (past 10**20: neither
    pads nor cuts), and save_pretrained writes it back as transformers' does."""
    config = {} if limit == "absent" else {"model_max_length": limit}
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False, **config))
    assert ours.model_max_length == theirs.model_max_length
    assert type(ours.model_max_length) is type(theirs.model_max_length)
    assert min(ours.model_max_length, 512) == min(theirs.model_max_length, 512)
    rng = random.Random(str(limit))
    texts = [" ".join(corpus(3, seed=rng.randrange(99))), rng.choice(HARD), random_text(rng)]
    for kwargs in ({"padding": "max_length"}, {"truncation": True}, {"padding": "max_length", "truncation": True}):
        assert_same(ours(texts, **kwargs), dict(theirs(texts, **kwargs)))
    assert saved_length(ours, tmp_path / "ours") == saved_length(theirs, tmp_path / "theirs")
    assert Tokenizer.from_pretrained(tmp_path / "ours").model_max_length == ours.model_max_length


def test_a_model_file_alone_has_transformers_model_max_length(tmp_path):
    """A sentencepiece model file read alone (or a directory holding only tokenizer.model) names no length:
    transformers' LlamaTokenizer then has int(1e30), and ttl the same, saved back alike."""
    from transformers import LlamaTokenizer

    model_file = tmp_path / "alone" / "tokenizer.model"
    model_file.parent.mkdir()
    Tokenizer.from_pretrained(tokenizer_dir(tmp_path / "tok", with_eos=False)).save(model_file)
    theirs = LlamaTokenizer.from_pretrained(model_file)
    for ours in (Tokenizer(model_file), Tokenizer.from_pretrained(model_file.parent)):
        assert ours.model_max_length == theirs.model_max_length == NO_LIMIT
    assert saved_length(ours, tmp_path / "ours") == saved_length(theirs, tmp_path / "theirs") == NO_LIMIT


def test_padding_to_a_length_too_long_for_memory_is_one_line(tmp_path):
    """A model_max_length just under transformers' "no limit" (or a max_length as large): padding="max_length" to it
    is refused in one line, where transformers (and ttl before) ended in a MemoryError or an OverflowError."""
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir(tmp_path / "tok", with_eos=False, model_max_length=10**15))
    assert tokenizer.model_max_length == 10**15
    for kwargs in ({}, {"max_length": 10**19}):
        with pytest.raises(TokenizerError, match=r"^padding to max_length=10+ does not fit in memory: pass a "):
            tokenizer(["a casa", "não"], padding="max_length", **kwargs)
    assert [len(row) for row in tokenizer(["a casa", "não"], padding="max_length", max_length=9)["input_ids"]] == [9, 9]


def test_generate_on_the_call_equals_transformers_generate_and_batch_decode(tmp_path):
    """`generate(model, **tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left"))`, greedy, is
    transformers' `model.generate(**tokenizer(...))` on the same weights token for token, and `batch_decode` gives
    transformers' text (skipping special tokens, which ttl does by default)."""
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    hf = hf_generation_model(vocab_size=ours.vocab_size)
    hf.save_pretrained(tmp_path / "model")
    model = ttl_core.load_pretrained(tmp_path / "model")
    prompts = ["A casa de pão", "O menino foi para a escola com seu cachorro ontem", "😀 não"]
    inputs = ours(prompts, return_tensors="pt", padding=True, padding_side="left")
    reference = theirs(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert_same(inputs, dict(reference))
    assert (inputs.attention_mask == 0).any()  # the prompts differ in length: left padding is exercised
    out = ttl_core.generate(model, **inputs, max_new_tokens=12, do_sample=False)
    want = hf.generate(**reference, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(out, want)
    assert ours.batch_decode(out) == theirs.batch_decode(want, skip_special_tokens=True)
    assert ours.batch_decode(out, skip_special_tokens=False) == theirs.batch_decode(want)
    right = ours(prompts, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(GenerationError, match="must be left-padded .* tokenize with padding_side=\"left\""):
        ttl_core.generate(model, **right, max_new_tokens=2)


@pytest.mark.parametrize("clean_up", [True, False, None])
def test_clean_up_tokenization_spaces_decodes_as_transformers_5(clean_up, tmp_path):
    """transformers 5 takes `clean_up_tokenization_spaces` and, for Llama's BPE tokenizer, ignores it: spaces before
    punctuation and contractions stay (transformers 4 removed them)."""
    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=False))
    ids = theirs("Olá , mundo . Tudo bem ? Sim ! Don 't , it 's ; we 've n't a ' b")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns that it ignores True
        expected = theirs.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up)
        expected_batch = theirs.batch_decode([ids, ids[:5]], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=clean_up)
    assert " ." in expected and ours.decode(ids, clean_up_tokenization_spaces=clean_up) == expected
    assert ours.batch_decode([ids, ids[:5]], clean_up_tokenization_spaces=clean_up) == expected_batch


def test_pad_and_transformers_data_collators_pad_as_transformers(tmp_path):
    """`tokenizer.pad(features)`, which DataCollatorWithPadding and DataCollatorForLanguageModeling(mlm=False) call:
    a list of encodings (lists or tensors), a dict of rows, one row; to the longest, to max_length, to a multiple;
    either side; the attention mask made where missing; other keys kept; as lists, tensors or arrays."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    ours, theirs = both(tokenizer_dir(tmp_path / "tok", with_eos=True))
    texts = ["Olá , mundo .", "a casa de o menino foi para a escola", "sim"]
    features = [dict(theirs(t)) for t in texts]
    bare = [{"input_ids": f["input_ids"], "label": i} for i, f in enumerate(features)]
    tensors = [{k: torch.tensor(v) for k, v in f.items()} for f in features]
    calls = [(features, {}), (features, dict(return_tensors="pt")), (bare, dict(return_tensors="np")),
             (tensors, dict(return_tensors="pt", pad_to_multiple_of=8, padding_side="right")),
             (features, dict(padding="max_length", max_length=40, return_tensors="pt")),
             (bare, dict(return_attention_mask=False, padding_side="left")), (features, dict(padding=False)),
             ({"input_ids": [f["input_ids"] for f in features]}, dict(return_tensors="pt")), (features[1], {})]
    for encoded, kwargs in calls:
        assert_same(ours.pad(encoded, **kwargs), dict(theirs.pad(encoded, **kwargs)))
    collators = (lambda tok: DataCollatorForLanguageModeling(tok, mlm=False),
                 lambda tok: DataCollatorWithPadding(tok, pad_to_multiple_of=4))
    for collator in collators:
        assert_same(dict(collator(ours)(features)), dict(collator(theirs)(features)))
    # run_clm-style features carry a special-tokens mask (and BERT-style ones segment ids), padded too
    marked = [dict(theirs(t, return_special_tokens_mask=True), token_type_ids=[0] * len(f["input_ids"]))
              for t, f in zip(texts, features)]
    for side in ("left", "right"):
        assert_same(ours.pad(marked, padding_side=side), dict(theirs.pad(marked, padding_side=side)))
    assert_same(dict(collators[0](ours)(marked)), dict(collators[0](theirs)(marked)))
    with pytest.raises(TokenizerError, match="^return_tensors must be 'pt', 'np' or None, got 'tf'$"):
        ours.pad(features, return_tensors="tf")
