"""Tokenizer: training, Unicode round trips, ids identical to transformers' AutoTokenizer on exported files and on a
TeenyTinyLlama-style `tokenizer.json`, chat templates."""

import io
import json
import random

import pytest
import sentencepiece as spm
from tokenizer_helpers import HARD, assert_same_ids, corpus, make_ttl_style_dir

from ttl_core.errors import ConfigError, TokenizerError
from ttl_core.chat_format import AIRA_SPECIAL_TOKENS, chat_prompt, chat_response
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_json import tokenizer_json_to_sentencepiece
from ttl_core.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), None, vocab_size=320)


def test_trained_tokenizer_layout(tok, tmp_path):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 3, 320)
    assert [tok.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.token_to_id("<0x41>") is not None and tok.token_to_id("no-such-piece") is None
    ids = tok.encode("a casa")
    assert ids[0] == tok.bos_id and tok.encode("a casa", add_bos=False, add_eos=True) == ids[1:] + [tok.eos_id]
    digits = train_tokenizer(corpus() + ["ano 2024 e 1999, 2024 de novo 2024 2024"] * 50, None, vocab_size=320)
    pieces = [digits.id_to_token(i) for i in range(320)]
    assert not any(sum(c.isdigit() for c in p) > 1 for p in pieces if not p.startswith("<0x"))  # digits split
    assert digits.token_to_id("2") is not None  # digits are learned, but only one at a time
    # the dummy prefix: a document's first word is learned as "▁sol", as encode (which adds the "▁") asks for it,
    # not as a piece "sol" that encode never produces
    opening = train_tokenizer(["sol de verão"] * 300 + ["a lua e o mar"] * 300, None, vocab_size=300)
    assert [opening.id_to_token(i) for i in opening.encode("sol", add_bos=False)] == ["\u2581sol"]
    train_tokenizer(corpus(), tmp_path / "m", vocab_size=300)
    train_tokenizer(corpus(), tmp_path / "n.model", vocab_size=300)  # ".model" is added only where missing
    # and never replaces the part after a dot in the name given: "pt.v2" would otherwise be written as "pt.model"
    train_tokenizer(corpus(), tmp_path / "pt.v2", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "n.model", "pt.v2.model"]
    assert Tokenizer(tmp_path / "m.model").encode("a casa") == train_tokenizer(corpus(), None, 300).encode("a casa")


def test_unicode_round_trip_never_unknown(tok):
    rng = random.Random(1)
    texts = [t for t in HARD if not t.startswith(" ")]
    texts += ["".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(30)).replace("\ud800", "") for _ in range(20)]
    texts = [t.encode("utf-8", "ignore").decode("utf-8") for t in texts]
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
    assert tok.decode(tok.encode("oi", add_eos=True), skip_special_tokens=False) == "<s> oi</s>"  # as transformers


def test_save_pretrained_matches_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"tokenizer.model", "tokenizer_config.json",
                                                           "special_tokens_map.json"}
    assert_same_ids(tok, AutoTokenizer.from_pretrained(tmp_path / "a"), HARD + corpus(30, seed=5))
    again = Tokenizer.from_pretrained(tmp_path / "a")
    ids = again.add_special_tokens(AIRA_SPECIAL_TOKENS)
    assert ids == list(range(320, 324)) and again.add_special_tokens(AIRA_SPECIAL_TOKENS[:1]) == [320]
    chat = chat_prompt("aira", "Qual é a capital?") + chat_response("aira", "Brasília.")
    assert again.encode(chat)[:2] == [1, 320] and again.encode(chat)[-1] == 322
    again.save_pretrained(tmp_path / "b")
    hf = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert_same_ids(again, hf, HARD + [chat, "x<|pad|> y <|endofinstruction|>\nz", "<|endofcompletion|>"])
    assert Tokenizer.from_pretrained(tmp_path / "b").vocab_size == 324


def test_save_pretrained_replaces_an_older_tokenizer_json(tok, tmp_path):
    """transformers (and from_pretrained) read tokenizer.json first: one left in the directory would win."""
    make_ttl_style_dir(tmp_path / "out", corpus(200, seed=1))
    tok.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    again = Tokenizer.from_pretrained(tmp_path / "out")
    assert again.vocab_size == tok.vocab_size and again.encode("o menino foi") == tok.encode("o menino foi")


def test_a_checkpoint_tells_transformers_its_models_context(tok, tmp_path):
    """Saved with a model, the tokenizer's model_max_length (where transformers truncates) is that model's
    context, not TeenyTinyLlama's 2048."""
    from transformers import AutoTokenizer

    from ttl_core import LlamaConfig, LlamaForCausalLM, save_pretrained

    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=96)
    save_pretrained(LlamaForCausalLM(config), tmp_path / "ckpt", tokenizer=tok)
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").model_max_length == 96


def test_a_tokenizer_without_a_pad_piece_saves_for_transformers(tmp_path):
    """Llama-2 style models have no `<pad>` (pad id -1); saving one used to raise IndexError."""
    from transformers import AutoTokenizer

    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(200)), model_writer=model_file, model_type="bpe",
                                   vocab_size=300, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (tmp_path / "spm" / "tokenizer.model").parent.mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(model_file.getvalue())
    ours = Tokenizer.from_pretrained(tmp_path / "spm")
    assert ours.pad_id == -1
    ours.save_pretrained(tmp_path / "out")
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf.pad_token is None and (hf.bos_token, hf.eos_token) == ("<s>", "</s>")
    for text in HARD + corpus(10, seed=7):
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert Tokenizer.from_pretrained(tmp_path / "out").pad_id == -1


def test_a_sentencepiece_model_with_its_own_normalizer_encodes_as_autotokenizer(tmp_path):
    """A tokenizer.model trained with sentencepiece's defaults (NFKC, extra whitespace removed): transformers reads
    its pieces and merges and ignores that normalizer, but ttl ran it, which also stripped the space that stands for
    the word prefix, so the first word lost its "▁" in every text ("▁o" read as "o")."""
    from transformers import AutoTokenizer

    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(200)), model_writer=model_file, model_type="bpe",
                                   vocab_size=300, unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
                                   minloglevel=2)
    Tokenizer(model_file.getvalue()).save_pretrained(tmp_path)
    assert_same_ids(Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path),
                    HARD + ["ﬁm Ａ ①", "a\tb"] + corpus(10, seed=7))


def test_tokenizer_json_only_dir_matches_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = [t.lower() for t in corpus(300, seed=2)]  # no capitals in training
    spec = make_ttl_style_dir(tmp_path / "ttl", texts)
    assert len(spec["model"]["merges"]) > 100
    ours = Tokenizer.from_pretrained(tmp_path / "ttl")
    hf = AutoTokenizer.from_pretrained(tmp_path / "ttl")
    assert ours.vocab_size == len(hf)
    assert_same_ids(ours, hf, HARD + corpus(40, seed=3) + ["A CASA DE PEDRO. Ontem, à Noite!"])
    ours.save_pretrained(tmp_path / "out")  # and the converted model exports faithfully
    assert_same_ids(ours, AutoTokenizer.from_pretrained(tmp_path / "out"), HARD)


def test_unsupported_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match="unsupported tokenizer type 'WordPiece'"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({  # byte-level, though "▁" replaces spaces first
        "model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"},
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}}))
    with pytest.raises(TokenizerError, match="unsupported tokenizer type: BPE without sentencepiece-style"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        (tmp_path / "x.json").write_text("{")
        tokenizer_json_to_sentencepiece(tmp_path / "x.json")


def test_encoding_a_text_with_a_lone_surrogate_names_it_in_one_line(tok):
    """Half a UTF-16 pair (a byte read in another encoding) anywhere in a non-ASCII text: a TokenizerError naming
    its position, not the RuntimeError sentencepiece's binding raises ('Unable to cast Python instance')."""
    rng = random.Random(7)
    for _ in range(5):
        words = [rng.choice(["casa", "ação", "são", "x"]) for _ in range(rng.randint(1, 6))]
        at = rng.randint(0, len(" ".join(words)))
        text = " ".join(words)[:at] + rng.choice(["\ud800", "\udfff"]) + " ".join(words)[at:]
        with pytest.raises(TokenizerError, match=rf"^the text is not valid Unicode: character {at} is a lone "):
            tok.encode(text)


def test_chat_templates():
    assert chat_prompt("aira", "Oi?") == "<|startofinstruction|>Oi?<|endofinstruction|>"
    assert chat_response("aira", "Olá.") == "Olá.<|endofcompletion|>"
    assert chat_prompt("aira", "Traduza.", "cat") == "<|startofinstruction|>Traduza.\ncat<|endofinstruction|>"
    assert chat_prompt("alpaca", "Traduza.") == (
        "Abaixo está uma instrução que descreve uma tarefa. Escreva uma resposta que conclua adequadamente a "
        "solicitação.\n\n### Instruções:\nTraduza.\n\n### Resposta:\n")
    assert chat_prompt("alpaca", "Traduza.", "cat") == (
        "Abaixo está uma instrução que descreve uma tarefa, emparelhada com uma entrada que fornece mais contexto. "
        "Escreva uma resposta que conclua adequadamente a solicitação.\n\n### Instruções:\nTraduza.\n\n"
        "### Entrada:\ncat\n\n### Resposta:\n")
    assert chat_response("alpaca", "gato") == "gato"
    with pytest.raises(ConfigError, match="unknown chat format 'chatml'; choose one of aira, alpaca"):
        chat_prompt("chatml", "x")
    with pytest.raises(ConfigError, match="unknown chat format 'chatml'"):
        chat_response("chatml", "x")


@pytest.fixture(scope="module")
def hf_pairs(tok, tmp_path_factory):
    """(ours, transformers') tokenizers on the same directory: ours saved with Aira's tokens added, and a
    TeenyTinyLlama-style tokenizer.json."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("pairs")
    chat = Tokenizer(tok.proto.SerializeToString())  # a copy: `tok` is shared
    chat.add_special_tokens(AIRA_SPECIAL_TOKENS)
    chat.save_pretrained(path / "chat")
    make_ttl_style_dir(path / "ttl", [t.lower() for t in corpus(300, seed=2)])
    return [(Tokenizer.from_pretrained(path / name), AutoTokenizer.from_pretrained(path / name))
            for name in ("chat", "ttl")]


# pieces of text that meet special tokens (whole, cut, adjacent), "▁", spaces and multi-byte characters
FRAGMENTS = ["<s>", "</s>", "<unk>", "<pad>", "<|pad|>", "<|endofcompletion|>", "<|startofinstruction|>", " ", "  ",
             "▁", "▁▁", "\n", "a", "casa", "é", "😀", "<", ">", "s>", "</", "<|", "|>", "x"]


def test_special_tokens_and_leading_u2581_in_text_match_autotokenizer(hf_pairs):
    """Special tokens written in the text are matched whole, as transformers does (or kept as text with
    split_special_tokens); a text that starts with "▁" gets no extra "▁" prefix."""
    rng = random.Random(7)
    texts = ["fim do texto </s> outro", "<s>", "a <unk> b", "<pad>", "<s>casa", "x<s>▁casa", "▁casa", " ▁casa",
             "▁", "<|startofinstruction|>oi</s><|endofinstruction|>"]
    texts += ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    for ours, hf in hf_pairs:
        assert ours.encode("a </s>")[-1] == ours.eos_id and ours.encode("▁casa") == hf("▁casa")["input_ids"]
        for text in texts:
            assert ours.encode(text) == hf(text)["input_ids"], text
            split = hf(text, split_special_tokens=True)["input_ids"]
            assert ours.encode(text, split_special_tokens=True) == split, text
        assert ours.eos_id not in ours.encode("a </s> <|endofcompletion|>", split_special_tokens=True)


def test_decode_of_byte_runs_matches_autotokenizer(hf_pairs):
    """Random byte-fallback sequences (valid and cut-off characters, stray bytes) between special and ordinary
    pieces: a run that is not valid UTF-8 as a whole is one U+FFFD per byte, as transformers decodes it."""
    rng = random.Random(3)
    for ours, hf in hf_pairs:
        byte_ids = [i for i in range(ours.vocab_size) if ours.id_to_token(i).startswith("<0x")]
        characters = [ours.encode(c, add_bos=False) for c in ("é", "😀", "中", "ã")]
        specials = [0, 1, 2, 3] + list(range(320, ours.vocab_size)) * (ours.vocab_size > 320)
        cut = ours.encode("oi 😀", add_bos=False)[:-1] + [ours.token_to_id("<0x41>")]
        assert ours.decode(cut) == hf.decode(cut) == "oi " + "\ufffd" * 4
        for _ in range(1500):
            ids = []
            for _ in range(rng.randint(0, 12)):
                r = rng.random()
                ids += ([rng.choice(byte_ids)] if r < 0.4 else rng.choice(characters)[:rng.randint(1, 4)] if r < 0.6
                        else [rng.choice(specials)] if r < 0.75 else [rng.randrange(ours.vocab_size)])
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(hf_pairs):
    """A model's embedding table may be larger than its tokenizer and sample such ids: from the first one past the
    last token on, they are no text and do not cut a run of byte pieces, as in transformers."""
    for ours, hf in hf_pairs:
        size, ids = ours.vocab_size, ours.encode("oi 😀", add_bos=False)
        first_byte = next(k for k, i in enumerate(ids) if ours.id_to_token(i).startswith("<0x"))
        ids = [size, *ids[:first_byte + 1], size, *ids[first_byte + 1:], size + 7]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip) == "oi 😀"


def test_from_pretrained_keeps_the_tokens_transformers_added(tok, tmp_path):
    """transformers' add_special_tokens + save_pretrained keeps the new tokens out of tokenizer.model: in
    tokenizer.json, tokenizer_config.json's added_tokens_decoder (transformers 4) or extra_special_tokens (5).
    Whether <s> comes first follows tokenizer.json's template, else the config, which transformers 5 saves without
    add_bos_token: that reads as no <s> (transformers 5 itself loses it when tokenizer.json is deleted)."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "base")
    hf = AutoTokenizer.from_pretrained(tmp_path / "base")
    hf.add_special_tokens({"additional_special_tokens": AIRA_SPECIAL_TOKENS})
    hf.save_pretrained(tmp_path / "chat")
    text = chat_prompt("aira", "Qual é a capital?") + chat_response("aira", "Brasília.")
    expected = hf(text)["input_ids"]
    assert expected[1] == 320
    (tmp_path / "chat" / "tokenizer.model").write_bytes((tmp_path / "base" / "tokenizer.model").read_bytes())
    for layout in ("tokenizer.json", "extra_special_tokens", "added_tokens_decoder"):
        if layout == "extra_special_tokens":
            (tmp_path / "chat" / "tokenizer.json").unlink()
        if layout == "added_tokens_decoder":  # transformers 4's config: ids, and the names in another key
            config = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
            config.pop("extra_special_tokens")
            config["added_tokens_decoder"] = {str(320 + k): {"content": t, "special": True}
                                              for k, t in enumerate(AIRA_SPECIAL_TOKENS)}
            config["add_bos_token"] = True
            (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(config))
        bos = [] if layout == "extra_special_tokens" else expected[:1]
        assert AutoTokenizer.from_pretrained(tmp_path / "chat")(text)["input_ids"] == bos + expected[1:], layout
        for where in (tmp_path / "chat", tmp_path / "chat" / "tokenizer.model"):
            ours = Tokenizer.from_pretrained(where)
            assert ours.vocab_size == len(hf) and ours.encode(text) == bos + expected[1:], layout
    config["added_tokens_decoder"] = {"321": {"content": "<|x|>"}}  # id 320 missing
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"added token ids \[321\] do not continue tokenizer.model's 320 pieces"):
        Tokenizer.from_pretrained(tmp_path / "chat")
    config["added_tokens_decoder"] = {"320": {"content": tok.id_to_token(300)}}  # a piece the model already has
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"added token '.*' \(id 320\) is already in tokenizer.model as id 300"):
        Tokenizer.from_pretrained(tmp_path / "chat")


@pytest.mark.parametrize("extra", [["<|c|>", "<|a|>"], {"image_token": "<|c|>"}, [], {}, None])
def test_config_extra_special_tokens_replace_additional_special_tokens_as_in_transformers_5(tok, tmp_path, extra):
    """A config with both keys (transformers 4.48+ writes extra_special_tokens beside additional_special_tokens):
    transformers 5 appends extra_special_tokens' tokens, in their order, and reads additional_special_tokens only
    when the other key is empty or null. ttl appended both lists, additional first: other ids, one token more."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(additional_special_tokens=["<|a|>", "<|b|>"], extra_special_tokens=extra)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    if not extra and len(hf) == 320:
        pytest.skip("this transformers release (5.17, the GPU image's) ignores additional_special_tokens beside an "
                    "empty extra_special_tokens; ttl follows 5.25, which reads them")
    added = [hf.convert_ids_to_tokens(i) for i in range(320, len(hf))]
    assert ours.vocab_size == len(hf) and ours.added_tokens == added
    assert_same_ids(ours, hf, ["x<|a|>y <|b|> <|c|>z", "<|c|><|a|>"])


def test_added_tokens_decoder_ids_are_read_in_any_key_order(tok, tmp_path):
    """added_tokens_decoder's ids are read whatever the order of its keys (json's sort_keys puts "1000" before
    "999"), as transformers does."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"321": {"content": "<|b|>", "special": True},
                                      "320": {"content": "<|a|>", "special": True}, **config["added_tokens_decoder"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(hf) == 322 and ours.added_tokens == ["<|a|>", "<|b|>"]
    assert_same_ids(ours, hf, ["x<|a|>y <|b|>"])


def test_tokenizer_files_under_other_names_are_read_alone(tok, tmp_path):
    """A sentencepiece model or tokenizer.json given under a name transformers does not save is read as what its
    suffix says, without the directory's tokenizer_config.json (whose added tokens belong to tokenizer.model)."""
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["320"] = {"content": "<|a|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).vocab_size == 321
    (tmp_path / "base.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    assert Tokenizer.from_pretrained(tmp_path / "base.model").vocab_size == 320
    make_ttl_style_dir(tmp_path / "ttl", [t.lower() for t in corpus(100, seed=2)], vocab_size=300)
    (tmp_path / "ttl" / "ttl.json").write_bytes((tmp_path / "ttl" / "tokenizer.json").read_bytes())
    converted = Tokenizer.from_pretrained(tmp_path / "ttl").proto
    assert Tokenizer.from_pretrained(tmp_path / "ttl" / "ttl.json").proto == converted


def test_added_tokens_that_extend_one_another_match_longest_first_as_autotokenizer(tok, tmp_path):
    """Added tokens where one starts another ("<|fim|>" and "<|fim|>!", "<s" and "<s>", "</s>" and "</s>x"):
    the longest one is matched, as transformers' added-token trie does."""
    from transformers import AutoTokenizer

    ours = Tokenizer(tok.proto.SerializeToString())  # a copy: `tok` is shared
    assert ours.add_special_tokens(["<|fim|>", "<|fim|>!", "</s>x", "<s"]) == [320, 321, 322, 323]
    ours.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a <|fim|>! b", "a <|fim|>!<|fim|>", "x</s>x</s>", "<s><s", "<s<s>"]
    for text in texts:
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert ours.encode("<|fim|>!", add_bos=False) == [321] and ours.encode("<s>", add_bos=False) == [1]


def test_add_special_tokens_keeps_ids_of_existing_and_repeated_tokens(tok):
    """A token named twice in one call is added once; pieces the model has, `<unk>` included, keep their id;
    an empty token is refused."""
    ours = Tokenizer(tok.proto.SerializeToString())
    assert ours.token_to_id("<unk>") == ours.unk_id == 0 and ours.token_to_id("<s>") == 1
    assert ours.add_special_tokens(["<|x|>", "<unk>", "<|x|>", "</s>"]) == [320, 0, 320, 2]
    assert ours.vocab_size == 321 and ours.id_to_token(320) == "<|x|>"
    with pytest.raises(TokenizerError, match="empty token"):
        ours.add_special_tokens(["<|y|>", ""])
    assert ours.vocab_size == 321


def test_first_different_id_finds_a_piece_spelled_otherwise_at_any_shared_id(tok):
    """Data is refused as another tokenizer's (`check_same_tokenizer`) by the first id whose piece differs, the last
    shared one included; a vocabulary that only goes on with more tokens differs at none."""
    rng = random.Random(5)
    normal = [i for i, piece in enumerate(tok.proto.pieces) if piece.type == piece.NORMAL]
    assert normal[-1] == tok.vocab_size - 1
    for i in (*rng.sample(normal[:-1], 3), normal[-1]):
        proto = Tokenizer(tok.proto.SerializeToString()).proto
        proto.pieces[i].piece = "\u2603" * 3  # a piece no vocabulary here has
        other = Tokenizer(proto.SerializeToString())
        assert tok.first_different_id(other) == i and other.first_different_id(tok) == i
    longer = Tokenizer(tok.proto.SerializeToString())
    longer.add_special_tokens(["<|fim|>"])
    assert tok.first_different_id(longer) is None and longer.first_different_id(tok) is None


def test_tokens_added_to_a_tokenizer_json_are_matched_whole_as_autotokenizer(tmp_path):
    """Aira's tokens added with the tokenizers library (in tokenizer.json's added_tokens only, after the BPE
    vocabulary) convert to added pieces: matched whole in the text, dropped by skip_special_tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    make_ttl_style_dir(tmp_path / "ttl", [t.lower() for t in corpus(300, seed=2)])
    t = HFTokenizer.from_file(str(tmp_path / "ttl" / "tokenizer.json"))
    t.add_special_tokens(AIRA_SPECIAL_TOKENS)
    t.save(str(tmp_path / "ttl" / "tokenizer.json"))
    ours, hf = Tokenizer.from_pretrained(tmp_path / "ttl"), AutoTokenizer.from_pretrained(tmp_path / "ttl")
    assert ours.vocab_size == len(hf) == 424 and ours.added_tokens == AIRA_SPECIAL_TOKENS
    chat = chat_prompt("aira", "qual é a capital?") + chat_response("aira", "brasília.")
    assert ours.encode(chat)[:2] == [1, 420] and ours.encode(chat)[-1] == 422
    assert_same_ids(ours, hf, [chat, "x<|pad|> y <|endofinstruction|>\nz", "a<|endofcompletion|>b"])


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("jinja_files", [False, True])
def test_chat_templates_are_kept_when_the_tokenizer_is_saved_again(tok, tmp_path, named, jinja_files):
    """A chat model's template (transformers 5's chat_template.jinja and additional_chat_templates/, or an older
    config's chat_template entry, several as a list) survives ttl's from_pretrained and save_pretrained, as in a
    conversion or a fine-tune: transformers' apply_chat_template still works on the directory ttl writes."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "src")
    hf = AutoTokenizer.from_pretrained(tmp_path / "src")
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    hf.chat_template = {"default": template, "tool_use": "{{ messages | length }}"} if named else template
    hf.save_pretrained(tmp_path / "src", save_jinja_files=jinja_files)
    Tokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "out")
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.chat_template == hf.chat_template == Tokenizer.from_pretrained(tmp_path / "out").chat_template
    messages = [{"role": "user", "content": "Olá, tudo bem?"}]
    assert again.apply_chat_template(messages) == hf.apply_chat_template(messages)
    for directory in ("out", "src"):  # a tokenizer without a template leaves none behind, nor transformers' files
        tok.save_pretrained(tmp_path / directory)
        assert AutoTokenizer.from_pretrained(tmp_path / directory).chat_template is None


def test_a_config_chat_template_given_as_a_dict_reads_as_in_transformers(tok, tmp_path):
    """transformers keeps a tokenizer_config.json `chat_template` written as {name: template} as it is (its own
    saves write a list); anything else there is refused with the file named."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    templates = {"default": "{{ messages[0]['content'] }}</s>", "tool_use": "{{ messages | length }}"}
    config_path.write_text(json.dumps({**config, "chat_template": templates}))
    assert Tokenizer.from_pretrained(tmp_path).chat_template == AutoTokenizer.from_pretrained(tmp_path).chat_template
    config_path.write_text(json.dumps({**config, "chat_template": {"default": 3}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template must be a template string, "):
        Tokenizer.from_pretrained(tmp_path)
