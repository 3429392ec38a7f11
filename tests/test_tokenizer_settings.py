"""The settings of a Hugging Face tokenizer directory that transformers 5 reads (add_bos_token / add_eos_token,
tokens named for the <s> </s> <unk> <pad> roles in the config or in special_tokens_map.json, legacy /
add_prefix_space, post-processor templates, added tokens and their lstrip / rstrip / single_word / special
flags), read by ttl as by AutoTokenizer and kept by ttl's save: one setting at a time, then random mixes of them
compared on random texts full of special tokens, spaces and rare characters."""

import json
import random
import shutil

import pytest
from tokenizer_helpers import HARD, assert_same_ids, corpus, random_text

from ttl_core.errors import TokenizerError
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer

TOKENS = ["<|x|>", "<|y|>", "<|pad|>", "[PAD]", "<|end|>", "ida", "<s>", "</s>", "<pad>", "<unk>", "casa"]
TEXT_PARTS = ["a", " ", "  ", "\t", "\n", "casa", "vida", "ida", "é", "_", "x", "1", ".", "😀", "\u2581", "\u00a0"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), None, vocab_size=320)


@pytest.fixture(scope="module")
def layouts(tok, tmp_path_factory):
    """A ttl-saved directory (tokenizer.model and its config) and the one transformers 5 saves from it
    (tokenizer.json and its config)."""
    root = tmp_path_factory.mktemp("layouts")
    for layout in ("tokenizer.model", "tokenizer.json"):
        saved_in_layout(tok, root / layout, layout)
    return root


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": True}, None])
def test_bos_and_eos_around_a_text_follow_the_config_beside_tokenizer_model_as_in_transformers(tok, tmp_path, flags):
    """Without tokenizer.json, transformers 5 reads add_bos_token / add_eos_token from tokenizer_config.json, and an
    absent one as false; explicit add_bos / add_eos still decide. Without a config (no LlamaTokenizer for
    transformers, whose releases then split texts differently) ttl reads the model file as it reads it alone."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config = {k: v for k, v in json.loads((tmp_path / "tokenizer_config.json").read_text()).items()
              if k not in ("add_bos_token", "add_eos_token")}
    if flags is None:
        (tmp_path / "tokenizer_config.json").unlink()
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert (ours.add_bos_token, ours.add_eos_token) == ((True, False) if flags is None else (
        flags.get("add_bos_token", False), flags.get("add_eos_token", False)))
    if flags is not None:
        assert_same_ids(ours, AutoTokenizer.from_pretrained(tmp_path), HARD[:3] + [""])
    assert ours.encode("a casa", add_bos=True, add_eos=True) == tok.encode("a casa", add_eos=True)
    assert Tokenizer(tmp_path / "tokenizer.model").encode("a casa") == tok.encode("a casa")  # a model file: <s> only
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": "yes"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: add_bos_token and add_eos_token must be true or "
                                             "false, got 'yes' and False"):
        Tokenizer.from_pretrained(tmp_path)


def test_a_config_without_an_eos_token_adds_none_though_add_eos_token_says_so_as_in_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    config = saved_in_layout(tok, tmp_path, "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None, "add_eos_token": True}))
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.eos_id, hf.eos_token_id) == (-1, None)
    assert ours.encode("a casa", add_eos=True) == hf("a casa")["input_ids"] == tok.encode("a casa")


def saved_in_layout(tok, path, layout):
    """`tok` saved at `path` as ttl saves it (tokenizer.model and its config) or, for "tokenizer.json", as transformers
    5 saves that (tokenizer.json and its config only); returns the config."""
    from transformers import AutoTokenizer

    if layout == "tokenizer.json":
        tok.save_pretrained(path.with_name(path.name + "-spm"))
        AutoTokenizer.from_pretrained(path.with_name(path.name + "-spm")).save_pretrained(path)
    else:
        tok.save_pretrained(path)
    return json.loads((path / "tokenizer_config.json").read_text())


def assert_read_alike_and_saved(base, saved, texts):
    """ttl reads the tokenizer directory `base` as AutoTokenizer does, and its save of it (`saved`) too, with the
    same ids."""
    from transformers import AutoTokenizer

    for path in (base, saved):
        ours = Tokenizer.from_pretrained(path)
        assert_same_ids(ours, AutoTokenizer.from_pretrained(path), texts)
        if path == base:
            ids = [ours.encode(text) for text in texts]
            ours.save_pretrained(saved)
        assert [ours.encode(text) for text in texts] == ids


ROLE_EDITS = {"all renamed": {"bos_token": "<|bos|>", "eos_token": "<|end|>", "unk_token": "<|unk|>",
                               "pad_token": "<|pad|>", "extra_special_tokens": ["<|x|>"]},
              "pad as an object, also extra": {"pad_token": {"content": "<|pad|>", "__type": "AddedToken"},
                                               "extra_special_tokens": ["<|x|>", "<|pad|>"]},
              "eos an added token": {"eos_token": "<|x|>", "extra_special_tokens": ["<|x|>"]},
              "no pad": {"pad_token": None},
              "no bos, though added": {"bos_token": None, "add_bos_token": True},
              # an ordinary piece named for a role is matched whole, and dropped from decoded text, even where a
              # template's <s> or the model's own <unk> plays the role
              "pad an ordinary piece": {"pad_token": "ida"},
              "bos an ordinary piece": {"bos_token": "ida"},
              "unk an ordinary piece": {"unk_token": "ida"}}


@pytest.mark.parametrize("edit", sorted(ROLE_EDITS))
@pytest.mark.parametrize("layout", ["tokenizer.model", "tokenizer.json"])
def test_tokens_the_config_names_for_special_roles_as_in_transformers(tok, tmp_path, edit, layout):
    """tokenizer_config.json's bos/eos/unk/pad tokens: those the vocabulary lacks are appended in that order before
    the extra special tokens, are matched whole in a text, and give bos_id/eos_id/pad_id (-1 for a null pad) as
    transformers' *_token_id; with a tokenizer.json template, <s> / </s> are the tokens it puts around a text (here
    the model's own). Saved by ttl, the directory reads the same in transformers and in ttl."""
    from transformers import AutoTokenizer

    config = saved_in_layout(tok, tmp_path / "base", layout)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, **ROLE_EDITS[edit]}))
    text = "a casa<|x|> </s><|pad|><|end|> fim"
    for path in (tmp_path / "base", tmp_path / "saved"):
        ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert ours.vocab_size == len(hf) and [ours.id_to_token(i) for i in range(320, ours.vocab_size)] == \
            hf.convert_ids_to_tokens(list(range(320, len(hf))))
        assert_same_ids(ours, hf, [text, "vida idade ida"])
        assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, -1 if hf.pad_token_id is None else hf.pad_token_id)
        theirs = -1 if hf.bos_token_id is None else hf.bos_token_id
        assert ours.bos_id == (1 if layout == "tokenizer.json" and path.name == "base" else theirs)
        ours.save_pretrained(tmp_path / "saved")
    for bad in (5, ""):
        (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bad}))
        with pytest.raises(TokenizerError, match="tokenizer_config.json: bos_token must be a token string, an object "
                                                 f"with a string 'content', or null; got {bad!r}"):
            Tokenizer.from_pretrained(tmp_path / "base")


def test_a_piece_listed_among_the_added_tokens_is_special_as_in_transformers(tok, tmp_path):
    """A piece of tokenizer.model that tokenizer_config.json's added_tokens_decoder lists is, for transformers, a
    special token: matched whole (inside "vida" too) and dropped from decoded text; saved by ttl, it stays one."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["282"] = {"content": "ida", "special": True}
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    for path in (tmp_path / "base", tmp_path / "saved"):
        ours = Tokenizer.from_pretrained(path)
        assert_same_ids(ours, AutoTokenizer.from_pretrained(path), ["ida vida<|x|>ida", "idade"])
        assert ours.decode(ours.encode("vida")) == "v"
        ours.save_pretrained(tmp_path / "saved")


def test_special_tokens_map_names_the_roles_beside_tokenizer_json_only_as_in_transformers(tok, tmp_path):
    """transformers 5 lets special_tokens_map.json override the config's bos/eos/unk/pad tokens when it reads a
    tokenizer.json, and ignores that file beside a tokenizer.model alone."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model").save_pretrained(tmp_path / "json")
    for layout in ("model", "json"):
        (tmp_path / layout / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>",
                                                                             "pad_token": None}))
        ours, hf = Tokenizer.from_pretrained(tmp_path / layout), AutoTokenizer.from_pretrained(tmp_path / layout)
        assert (ours.eos_id, ours.pad_id) == ((320, -1) if layout == "json" else (2, 3))
        assert ours.vocab_size == len(hf) and (hf.eos_token_id, hf.pad_token_id) == (
            (320, None) if layout == "json" else (2, 3))
        assert_same_ids(ours, hf, ["a casa<|end|></s>"])


def test_role_tokens_of_the_config_and_the_special_tokens_map_are_appended_in_role_order_as_in_transformers(
        tok, tmp_path):
    """Where special_tokens_map.json names a role the config does not (here <s> </s> <unk> <pad>, in that order),
    transformers still appends the new role tokens in the order bos, eos, unk, pad."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model").save_pretrained(tmp_path / "json")
    config = json.loads((tmp_path / "json" / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (tmp_path / "json" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|pad|>"}))
    (tmp_path / "json" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    ours, hf = Tokenizer.from_pretrained(tmp_path / "json"), AutoTokenizer.from_pretrained(tmp_path / "json")
    assert hf.convert_ids_to_tokens([320, 321]) == ["<|end|>", "<|pad|>"]
    assert [ours.id_to_token(i) for i in range(ours.vocab_size)] == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (320, 321)
    assert_same_ids(ours, hf, ["a casa<|end|></s><|pad|>"])


@pytest.mark.parametrize("settings", [{"legacy": True}, {"add_prefix_space": False},
                                      {"legacy": True, "add_prefix_space": False},
                                      {"legacy": None, "add_prefix_space": True}])
@pytest.mark.parametrize("layout", ["tokenizer.model", "tokenizer.json"])
def test_word_prefix_follows_legacy_and_add_prefix_space_as_in_transformers(tok, tmp_path, settings, layout):
    """transformers 5's LlamaTokenizer puts "▁" at the start of the text only (legacy false), also after each
    special token in it (legacy true), or nowhere (add_prefix_space false, which also keeps the decoded text's
    first space); ttl encodes and decodes alike, and saves the setting."""
    config = saved_in_layout(tok, tmp_path / "base", layout)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    texts = HARD + ["</s>casa", "a</s> casa</s>\u2581b", "<s>"]
    assert_read_alike_and_saved(tmp_path / "base", tmp_path / "saved", texts)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": "no"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: legacy and add_prefix_space must be true, false "
                                             "or null, got 'no' and None"):
        Tokenizer.from_pretrained(tmp_path / "base")


@pytest.mark.parametrize("layout", ["tokenizer.model", "tokenizer.json"])
def test_split_special_tokens_in_the_config_is_the_default_of_encode_as_in_transformers(tok, tmp_path, layout):
    """A config's `split_special_tokens: true` makes transformers read special tokens written in a text as text
    unless a call says otherwise; ttl's encode does too, and its save keeps the setting."""
    from transformers import AutoTokenizer

    config = saved_in_layout(tok, tmp_path / "base", layout)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    text = "a </s> b<pad>"
    for path in (tmp_path / "base", tmp_path / "saved"):
        ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert tok.eos_id not in hf(text)["input_ids"]
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode_batch([text]) == hf([text])["input_ids"]
        assert ours.encode(text, split_special_tokens=False) == hf(text, split_special_tokens=False)["input_ids"]
        ours.save_pretrained(tmp_path / "saved")
    assert tok.encode(text) == Tokenizer.from_pretrained(tmp_path / "base").encode(text, split_special_tokens=False)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": "yes"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: split_special_tokens must be true or false, got "
                                             "'yes'"):
        Tokenizer.from_pretrained(tmp_path / "base")


@pytest.mark.parametrize("flags", [{"lstrip": True}, {"rstrip": True}, {"single_word": True},
                                   {"lstrip": True, "rstrip": True}, {"single_word": True, "lstrip": True}])
@pytest.mark.parametrize("layout", ["added_tokens_decoder", "tokenizer.json"])
def test_added_tokens_take_whitespace_or_match_whole_words_as_their_flags_say(tok, tmp_path, flags, layout):
    """An added token's lstrip / rstrip take the whitespace before / after it in a text, single_word matches it only
    where no letter, digit or "_" touches it, as transformers matches it; the flags come from where the token's id
    does (the config's added_tokens_decoder, else tokenizer.json's added_tokens), and ttl saves them."""
    entry = {"id": 320, "content": "<|x|>", "lstrip": False, "rstrip": False, "normalized": False,
             "single_word": False, "special": True, **flags}
    config = saved_in_layout(tok, tmp_path / "base", "tokenizer.model" if layout == "added_tokens_decoder" else layout)
    if layout == "tokenizer.json":  # as transformers 5 saves it: the flags in tokenizer.json only
        spec = json.loads((tmp_path / "base" / "tokenizer.json").read_text())
        spec["added_tokens"].append(entry)
        (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(spec))
        assert "added_tokens_decoder" not in config
    else:
        config["added_tokens_decoder"]["320"] = {k: v for k, v in entry.items() if k != "id"}
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": ["<|x|>"]}))
    texts = ["a \t\n <|x|> \n\t casa", "x<|x|>", "<|x|>x", "(<|x|>)", "é<|x|>", "_<|x|>", "a <|x|><|x|> b", "<|x|>",
             " <|x|> ", "1<|x|>", "casa <|x|>"]
    assert_read_alike_and_saved(tmp_path / "base", tmp_path / "saved", texts)
    config["added_tokens_decoder"] = {"320": {**entry, "rstrip": "yes"}}
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: added token '<\|x\|>': lstrip, rstrip, "
                                             r"single_word, normalized and special must be true or false, got"):
        Tokenizer.from_pretrained(tmp_path / "base")


def random_directory(rng, layouts, path):
    """A copy of one of `layouts` with random settings; returns a description of them."""
    layout = rng.choice(["tokenizer.model", "tokenizer.json"])
    shutil.copytree(layouts / layout, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    spec = json.loads((path / "tokenizer.json").read_text()) if layout == "tokenizer.json" else None
    settings = {"layout": layout}
    extra = rng.sample(["<|x|>", "<|y|>", "<|end|>"], rng.randint(0, 3))
    if extra:
        config["extra_special_tokens"] = settings["extra"] = extra
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if rng.random() < 0.25:
            config[role] = settings[role] = rng.choice(TOKENS + ([None] if role != "unk_token" else []))
        elif rng.random() < 0.1:
            settings[role] = f"{config.pop(role, None)} dropped"
    for key, values in (("add_bos_token", [True, False]), ("add_eos_token", [True, False]),
                        ("legacy", [True, False, None]), ("add_prefix_space", [True, False, None])):
        if rng.random() < 0.3:
            config[key] = settings[key] = rng.choice(values)
    if extra and rng.random() < 0.5:
        flags = settings["flags"] = {key: rng.random() < 0.4 for key in ("lstrip", "rstrip", "single_word", "special")}
        entries = [{"id": 320 + k, "content": t, "normalized": False, **flags}
                   for k, t in enumerate(extra)]
        if spec is None:
            config["added_tokens_decoder"].update({str(e.pop("id")): e for e in entries})
        else:
            spec["added_tokens"] += entries
    if rng.random() < 0.15:  # a piece of the model named an extra special token
        config["extra_special_tokens"] = settings["extra"] = extra + ["ida"]
    if spec is None and rng.random() < 0.2:  # a piece of the model listed as an added token
        config["added_tokens_decoder"]["282"] = settings["listed"] = {"content": "ida", "special": True}
    if spec is not None and rng.random() < 0.3:
        template = settings["template"] = rng.choice(["$A", "<s> $A", "$A </s>", "<s> $A </s>", None])
        spec["post_processor"] = template and {
            "type": "TemplateProcessing", "pair": [],
            "single": [{"Sequence": {"id": "A", "type_id": 0}} if t == "$A"
                       else {"SpecialToken": {"id": t, "type_id": 0}} for t in template.split()],
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in (("<s>", 1), ("</s>", 2))
                               if t in template}}
    if rng.random() < 0.1:
        config["split_special_tokens"] = settings["split_special_tokens"] = True
    if spec is not None and rng.random() < 0.2:
        special_map = settings["map"] = {r: rng.choice(TOKENS + [None]) for r in ("eos_token", "pad_token")
                                         if rng.random() < 0.6}
        (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if spec is not None:
        (path / "tokenizer.json").write_text(json.dumps(spec))
    return settings


@pytest.mark.parametrize("seed", range(8))
def test_random_settings_read_as_transformers_reads_them(layouts, tmp_path, seed):
    """Ids, decoded text (special tokens skipped and kept), vocabulary size and the <s> </s> <pad> ids agree with
    transformers, for the directory and for ttl's save of it, except where ttl documents otherwise: a template's
    <s> / </s> are ttl's bos_id / eos_id whatever the config names for those roles."""
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    for case in range(25):
        path = tmp_path / f"case{case}"
        settings = random_directory(rng, layouts, path)
        if rng.random() < 0.3:
            Tokenizer.from_pretrained(path).save_pretrained(tmp_path / f"saved{case}")
            path, settings["saved by ttl"] = tmp_path / f"saved{case}", True
        ours, hf = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert ours.vocab_size == len(hf), settings
        templated = settings["layout"] == "tokenizer.json" and "saved by ttl" not in settings
        for role, mine in (("bos", ours.bos_id), ("eos", ours.eos_id), ("pad", ours.pad_id)):
            theirs = getattr(hf, f"{role}_token_id")
            if not (templated and role != "pad" and getattr(ours, f"add_{role}_token")):
                assert mine == (-1 if theirs is None else theirs), (role, settings)
        for k in range(50):
            text = "".join(rng.choice(TEXT_PARTS + TOKENS) for _ in range(rng.randint(0, 10))) if k % 2 \
                else random_text(rng)
            ids = ours.encode(text)
            assert ids == hf(text)["input_ids"], (text, settings)
            assert ours.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], \
                (text, settings)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), (text, settings)
            assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), \
                (text, settings)
