"""Tokenizer test material: Portuguese-like texts, hard Unicode cases, random texts full of them, a TeenyTinyLlama-style
tokenizer.json built with the `tokenizers` library, and the id comparison against transformers."""

import json
import random
import unicodedata

from ttl_core.chat_format import AIRA_SPECIAL_TOKENS

WORDS = ("a casa de o menino foi para escola com seu cachorro ontem à noite e não voltou mais porque choveu muito "
         "na cidade até amanhã café pão ação coração professora médico rio floresta").split()
# Capitals, emoji, CJK, tabs, repeated spaces, newlines, control characters, leading/trailing spaces.
HARD = ["Olá, mundo! Tudo bem?", "ÁRVORE Grande ÇÃO Ñ", "😀 emoji 👍🏽 família 👨‍👩‍👧", "中文字 日本語 한국어",
        "tab\tseparado\t\tduplo", "espaços   repetidos    aqui", "linha\nnova\n\nparágrafo\r\n",
        "\x00\x07\x1b controle", "123456 7.5 2024", "fim ", "", " começa com espaço", "  dois", "\u200bzero\u00a0nbsp",
        "x" * 50]

# What random texts are made of: words with composed accents, whitespace of every kind (Python's and Unicode's
# differ), controls, "▁", astral characters, marks, numbers and letters that are word characters for one regex
# dialect only, special and added tokens (Aira's, those of the tests) whole and cut.
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


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + rng.choice([".", "!\n", "?\nsim"])
            for _ in range(n)]


def assert_same_ids(ours, theirs, texts):
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_bos=False, add_eos=False) == \
            theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        ids = ids + [i for i in (ours.eos_id, ours.pad_id) if i >= 0]
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text


def make_ttl_style_dir(path, texts, vocab_size=420):
    """A tokenizer directory without tokenizer.model, built with `tokenizers` as TeenyTinyLlama's was: BPE with
    byte fallback and the `<0xNN>` byte pieces in the vocabulary, Llama-2 normalizer (prepend "▁", spaces to "▁"),
    BOS post-processor, and a LlamaTokenizer config with `legacy: false`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    t = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)  # training only
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_,
                                                     show_progress=False))
    t.pre_tokenizer = None
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    spec = json.loads(t.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in specials]  # bytes are plain vocab
    write_llama_dir(path, spec)
    return spec


def write_llama_dir(path, spec):
    """Write the tokenizer.json `spec` into a new directory `path`, with a LlamaTokenizer config (`legacy: false`)
    as TeenyTinyLlama's."""
    path.mkdir()
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
