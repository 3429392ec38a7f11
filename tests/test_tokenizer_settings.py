"""Tokenizer directories with random mixes of the settings transformers 5 reads (roles named in the config or in
special_tokens_map.json, add_bos_token / add_eos_token, legacy / add_prefix_space, post-processor templates, added
tokens and their lstrip / rstrip / single_word flags, ttl's own save of the result), each read by ttl and by
AutoTokenizer, compared on random texts full of special tokens, spaces and rare characters."""

import json
import random
import shutil

import pytest
from tokenizer_helpers import corpus

from ttl_core.tokenizer import Tokenizer, train_tokenizer

TOKENS = ["<|x|>", "<|y|>", "<|pad|>", "[PAD]", "<|end|>", "ida", "<s>", "</s>", "<pad>", "<unk>", "casa"]
TEXT_PARTS = ["a", " ", "  ", "\t", "\n", "casa", "vida", "ida", "é", "_", "x", "1", ".", "😀", "\u2581", "\u00a0"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A ttl-saved directory (tokenizer.model and its config) and the one transformers 5 saves from it
    (tokenizer.json and its config)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("layouts")
    train_tokenizer(corpus(), None, vocab_size=320).save_pretrained(root / "tokenizer.model")
    AutoTokenizer.from_pretrained(root / "tokenizer.model").save_pretrained(root / "tokenizer.json")
    return root


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
        flags = settings["flags"] = {key: rng.random() < 0.4 for key in ("lstrip", "rstrip", "single_word")}
        entries = [{"id": 320 + k, "content": t, "special": True, "normalized": False, **flags}
                   for k, t in enumerate(extra)]
        if spec is None:
            config["added_tokens_decoder"].update({str(e.pop("id")): e for e in entries})
        else:
            spec["added_tokens"] += entries
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
        for _ in range(25):
            text = "".join(rng.choice(TEXT_PARTS + TOKENS) for _ in range(rng.randint(0, 10)))
            ids = ours.encode(text)
            assert ids == hf(text)["input_ids"], (text, settings)
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), (text, settings)
            assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), \
                (text, settings)
