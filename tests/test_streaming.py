"""Streaming text and stop strings: TextStreamer against the final text, stop strings against transformers'
StopStringCriteria and generate(stop_strings=...) on a trained sentencepiece tokenizer."""

import json
import threading

import pytest
import torch
from generation_helpers import PAD, CharTokenizer, RecordingStreamer, left_padded, saved_models
from hf_reference import hf_causal_lm

import ttl_core
from ttl_core.errors import GenerationError, TokenizerError
from ttl_core.streamer import TextStreamer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return saved_models(tmp_path_factory.mktemp("gen"))


def test_streamer_emits_stable_text():
    """A run of byte pieces is handed out once a token that is no byte ends it: until then a later byte may
    still turn the run into replacement characters (the second run here: 'é' cut by a lone 0xE2)."""
    tok = CharTokenizer()
    pieces = []
    streamer = TextStreamer(tok, on_text=pieces.append)
    tokens = [0, 1, 122, 123, 124, 120, 121, 2, 120, 121, 122, 3]
    for token in tokens:
        streamer.put([token])
    assert pieces == ["a", "b", "€éc", "é\ufffdd"]
    streamer.end()
    assert list(streamer) == pieces and "".join(pieces) == tok.decode(tokens)


def test_streamer_follows_generation_from_a_thread(models):
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=1)
    streamer = TextStreamer(CharTokenizer(), timeout=60)
    out = {}
    worker = threading.Thread(target=lambda: out.update(ids=ttl_core.generate(
        ours, ids, mask, max_new_tokens=12, eos_token_id=[], streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == CharTokenizer().decode(out["ids"][0, 9:].tolist())
    assert len(text) > 0


def test_streamer_ends_when_generation_fails(models):
    """A thread reading the streamer must not wait forever when generate() fails: midway (here the
    streamer's own consumer fails after three tokens) or before the first token (a bad argument)."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=1)

    class FailingStreamer(TextStreamer):
        def put(self, token_ids):
            super().put(token_ids)
            if len(self.tokens) == 3:
                raise RuntimeError("the consumer went away")

    streamer = FailingStreamer(CharTokenizer(), timeout=10)
    failure = {}

    def run():
        try:
            ttl_core.generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[], streamer=streamer)
        except RuntimeError as e:
            failure["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    text = "".join(streamer)  # before the fix: queue.Empty after the timeout
    worker.join()
    assert "error" in failure
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=3, eos_token_id=[])
    assert text == CharTokenizer().decode(free[0, 9:].tolist())

    plain = TextStreamer(CharTokenizer(), timeout=10)
    with pytest.raises(GenerationError, match="top_p"):
        ttl_core.generate(ours, ids, mask, do_sample=True, top_p=2.0, streamer=plain)
    assert list(plain) == []


def stop_step(tokens: list[int], prompt_len: int, stop: bytes, token_bytes) -> int | None:
    """The first new token (counting from 1) after which the row's bytes hold more occurrences of `stop` than
    before it, i.e. with an occurrence ending within that token; None if there is none."""
    def occurrences(n):
        text = b"".join(map(token_bytes, tokens[:n]))
        return sum(text.startswith(stop, i) for i in range(len(text)))

    return next((n - prompt_len for n in range(prompt_len + 1, len(tokens) + 1)
                 if occurrences(n) > occurrences(n - 1)), None)


def test_stop_strings_finish_rows(models):
    _, ours = models
    tok = CharTokenizer()
    ids, mask = left_padded(ours.config.vocab_size, seed=4)
    free = ttl_core.generate(ours, ids, mask, max_new_tokens=20, eos_token_id=[])
    row1 = free[1].tolist()
    assert not set(row1[7:11]) & set(tok.SPECIAL)  # letters only, so the stop string is plain text
    stop = tok.decode(row1[7:11])  # begins in row 1's prompt, ends with its 2nd new token
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=20, eos_token_id=[], stop_strings=stop, tokenizer=tok)
    cuts = [stop_step(row, 9, stop.encode(), tok.token_bytes) for row in free.tolist()]
    assert cuts[1] == 2
    for row, cut in enumerate(cuts):
        if cut is None:
            assert torch.equal(got[row, 9:], free[row, 9:got.shape[1]])
        else:
            assert torch.equal(got[row, :9 + cut], free[row, :9 + cut])
            assert (got[row, 9 + cut:] == PAD).all()
    assert got.shape[1] - 9 == max(20 if cut is None else cut for cut in cuts)


WORDS = ("a casa de o menino foi para escola com seu cachorro ontem à noite e não voltou mais porque "
         "choveu").split()


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """A small trained sentencepiece tokenizer with Aira's special tokens (as ttl's Tokenizer and as
    transformers' AutoTokenizer), and a transformers model and its ttl copy over that vocabulary, whose
    greedy continuations emit `<|endofcompletion|>` now and then."""
    from hf_reference import randomize_
    from transformers import AutoTokenizer

    from ttl_core.chat_format import AIRA_SPECIAL_TOKENS
    from ttl_core.tokenizer_train import train_tokenizer

    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 20)) + "." for i in range(300)]
    tok = train_tokenizer(texts, None, vocab_size=300)
    tok.add_special_tokens(AIRA_SPECIAL_TOKENS)
    path = tmp_path_factory.mktemp("spm")
    tok.save_pretrained(path / "tokenizer")
    hf = hf_causal_lm(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
    randomize_(hf, seed=0, scale=0.4)  # varied continuations, not one token repeated
    with torch.no_grad():
        hf.lm_head.weight[4:260] *= 0.3  # fewer byte-fallback tokens
        hf.lm_head.weight[tok.token_to_id("<|endofcompletion|>")] = 2 * hf.lm_head.weight[tok.token_to_id("▁p")]
    hf.save_pretrained(path / "model")
    return tok, AutoTokenizer.from_pretrained(path / "tokenizer"), hf, ttl_core.load_pretrained(path / "model")


def test_streamed_text_is_the_decoded_text_around_skipped_special_tokens(spm_models):
    """A skipped special token inside a run of byte pieces does not end the run (decode joins the bytes on
    both sides, and an invalid whole becomes U+FFFD a byte), so the streamer must not emit the run before it;
    the same holds with a transformers tokenizer, whose pieces come from convert_ids_to_tokens."""
    ours, theirs, _, _ = spm_models
    byte = lambda value: ours.token_to_id(f"<0x{value:02X}>")  # noqa: E731
    special, word = ours.token_to_id("<|endofcompletion|>"), ours.encode("casa", add_bos=False)[0]
    cases = ([byte(0xC3), byte(0xA9), special, byte(0xC3), word], [byte(0x41), special, byte(0xC3), word],
             [byte(0xC3), ours.bos_id, byte(0xA9), word], [word, special, byte(0xE2), byte(0x82), byte(0xAC)])
    for tokenizer in (ours, theirs):
        for ids in cases:
            for skip in (True, False):
                pieces = []
                streamer = TextStreamer(tokenizer, skip_special_tokens=skip, on_text=pieces.append)
                for token in ids:
                    streamer.put([token])
                streamer.end()
                assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip), (tokenizer, ids, skip)


def test_ids_past_the_tokenizer_decode_and_stream_to_nothing_as_in_transformers(spm_models):
    """A model may have more embedding rows than its tokenizer has tokens (a padded vocabulary, or a config's
    vocab_size above the data's tokenizer), and may sample those ids: transformers' decode drops them, without
    ending a run of byte pieces, and so must ttl's decode and the streamer, rather than fail mid-generation."""
    ours, theirs, _, _ = spm_models
    past, word = ours.vocab_size, ours.encode("casa", add_bos=False)[0]
    byte = lambda value: ours.token_to_id(f"<0x{value:02X}>")  # noqa: E731
    for ids in ([word, past, word], [past + 1000], [byte(0xC3), past, byte(0xA9), word]):
        assert ours.decode(ids) == theirs.decode(ids) == ours.decode([i for i in ids if i < past])
        for tokenizer in (ours, theirs):
            pieces = []
            streamer = TextStreamer(tokenizer, on_text=pieces.append)
            for token in ids:
                streamer.put([token])
            streamer.end()
            assert "".join(pieces) == theirs.decode(ids), (tokenizer, ids)
    with pytest.raises(TokenizerError, match="token id -1 is outside the vocabulary"):
        ours.decode([word, -1])  # transformers fails too (an OverflowError)


STOP_CASES = [  # (prompt, stop string): the prompt's greedy continuation is "▁ca t ▁e te <|endofcompletion|> a"
    ("o menino foi para", "ra ca"),  # begins in the prompt, ends within the first new token
    ("o menino foi para", " ca"),  # a leading space, completed by the first new token
    ("o menino foi para", "<|endofcompletion|>"),  # an added token's text, which decoding skips
    ("o menino foi para", "t ete"),  # over three new tokens
    ("seu", "</s>"),  # a special token's text (not an EOS here)
    ("porque", "ã à"),  # multi-byte characters
]


def hf_stop_greedy(spm_models, ids, mask, stop, max_new_tokens):
    tok, hf_tok, hf, _ = spm_models
    return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[],
                       pad_token_id=tok.pad_id, stop_strings=stop, tokenizer=hf_tok)


@pytest.mark.parametrize("prompt, stop", STOP_CASES)
def test_stop_strings_match_transformers(spm_models, prompt, stop):
    tok, _, _, ours = spm_models
    ids = torch.tensor([tok.encode(prompt)])
    ref = hf_stop_greedy(spm_models, ids, torch.ones_like(ids), stop, 12)
    pieces = []
    got = ttl_core.generate(ours, ids, max_new_tokens=12, eos_token_id=[], stop_strings=stop, tokenizer=tok,
                            streamer=TextStreamer(tok, on_text=pieces.append))
    assert ref.shape[1] < ids.shape[1] + 12  # the stop string ended the generation
    assert torch.equal(got, ref)
    assert "".join(pieces) == tok.decode(got[0, ids.shape[1]:].tolist())  # the stream stops where the text does


@pytest.mark.parametrize("prompt, stop", [("o menino foi para ca t ete o menino foi para", "ra ca"),
                                          ("seu cachorro seu", " ca")])
def test_prompt_lookup_looks_for_stop_strings_where_transformers_does(spm_models, prompt, stop):
    """transformers' assisted decoding checks stop strings after each step's accepted tokens, at their end only: one
    that ends inside them goes unseen (here the generation stops later than plain decoding's, or not at all)."""
    tok, hf_tok, hf, ours = spm_models
    ids = torch.tensor([tok.encode(prompt)])
    common = dict(max_new_tokens=16, eos_token_id=[], pad_token_id=tok.pad_id, stop_strings=stop)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, tokenizer=hf_tok,
                      prompt_lookup_num_tokens=5, **common)
    pieces = []
    got = ttl_core.generate(ours, ids, tokenizer=tok, prompt_lookup_num_tokens=5, **common,
                            streamer=TextStreamer(tok, on_text=pieces.append))
    assert torch.equal(got, ref) and got.shape != ttl_core.generate(ours, ids, tokenizer=tok, **common).shape
    assert "".join(pieces) == tok.decode(got[0, ids.shape[1]:].tolist())


def test_stop_strings_in_a_left_padded_batch_match_transformers(spm_models):
    tok, _, _, ours = spm_models
    rows = [tok.encode(p) for p in ("o menino foi para", "seu", "porque", "a casa")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    stops = [stop for _, stop in STOP_CASES if stop != " ca"]
    ref = hf_stop_greedy(spm_models, ids, mask, stops, 16)
    got = ttl_core.generate(ours, ids, mask, max_new_tokens=16, eos_token_id=[], pad_token_id=tok.pad_id,
                            stop_strings=stops, tokenizer=tok)
    assert torch.equal(got, ref) and (ref[:, width:] == tok.pad_id).any()  # some rows stopped early


def test_a_checkpoint_stop_strings_apply_as_in_transformers(spm_models, tmp_path):
    """A generation_config.json's stop_strings end rows as in transformers' generate() given a tokenizer; the
    call's own stop_strings win, `[]` for none. Without a tokenizer (transformers then
    raises) they are left out with a warning that says how to apply them."""
    from transformers import LlamaForCausalLM

    tok, hf_tok, hf, ours = spm_models
    hf.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "generation_config.json").read_text())
    stops = [stop for _, stop in STOP_CASES if stop != " ca"]
    (tmp_path / "generation_config.json").write_text(json.dumps({**settings, "stop_strings": stops}))
    theirs, saved = LlamaForCausalLM.from_pretrained(tmp_path), ttl_core.load_pretrained(tmp_path)
    rows = [tok.encode(p) for p in ("o menino foi para", "seu", "porque", "a casa")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width) >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    common = dict(attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=[], pad_token_id=tok.pad_id)
    ref = theirs.generate(ids, tokenizer=hf_tok, **common)
    assert ref.shape[1] < width + 16 and (ref[:, width:] == tok.pad_id).any()  # the saved stop strings stopped rows
    assert torch.equal(ttl_core.generate(saved, ids, tokenizer=tok, **common), ref)
    assert torch.equal(ttl_core.generate(saved, ids, tokenizer=hf_tok, **common), ref)
    given = theirs.generate(ids, tokenizer=hf_tok, stop_strings="t ete", **common)
    assert not torch.equal(given, ref)
    assert torch.equal(ttl_core.generate(saved, ids, tokenizer=tok, stop_strings="t ete", **common), given)
    free = ttl_core.generate(ours, ids, **common)  # the same weights without the checkpoint's stop strings
    assert torch.equal(ttl_core.generate(saved, ids, tokenizer=tok, stop_strings=[], **common), free)
    with pytest.warns(UserWarning, match=r"stop_strings=\['ra ca', .*\] \(pass tokenizer= to apply them\)"):
        assert torch.equal(ttl_core.generate(saved, ids, **common), free)
    (tmp_path / "generation_config.json").write_text(json.dumps({**settings, "stop_strings": [5]}))
    with pytest.raises(GenerationError, match=r"^generation_config.json: stop_strings must be a non-empty string"):
        ttl_core.generate(ttl_core.load_pretrained(tmp_path), ids, tokenizer=tok, **common)


def test_stop_string_matcher_agrees_with_transformers_criteria(spm_models):
    """StopStrings against transformers' StopStringCriteria on random token sequences (byte-fallback pieces
    that split characters included) and stop strings cut from their text."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from ttl_core.streamer import StopStrings

    tok, hf_tok, _, _ = spm_models
    gen = torch.Generator().manual_seed(0)
    reader, matches = StopStrings("x", tok), 0
    for trial in range(150):
        tokens = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 10, (), generator=gen)),), generator=gen)
        text = b"".join(map(reader.token_bytes, tokens.tolist()))
        start, end = sorted(torch.randint(0, len(text) + 1, (2,), generator=gen).tolist())
        stops = [text[start:end].decode("utf-8", errors="ignore") or "</s>"] + ["<s>"] * (trial % 3 == 0)
        expected = bool(StopStringCriteria(hf_tok, stops)(tokens[None], None)[0])
        assert StopStrings(stops, tok).ends_in_last(tokens.tolist()) == expected, (tokens.tolist(), stops)
        matches += expected
    assert matches > 20


def test_streamer_reused_for_a_second_generation_starts_afresh():
    """After `end()` the next generation's text is decoded from its own tokens alone: a character the first
    one left split must not swallow the second one's bytes."""
    tok = CharTokenizer()
    pieces = []
    streamer = TextStreamer(tok, on_text=pieces.append)
    for tokens in ([0, 122], [123, 124, 1]):
        pieces.clear()
        for token in tokens:
            streamer.put([token])
        streamer.end()
        assert "".join(pieces) == tok.decode(tokens) and list(streamer) == pieces


def test_streamer_without_pieces_waits_for_complete_characters():
    """A tokenizer that has no id_to_token: the streamer still holds text that ends in U+FFFD back."""
    class DecodeOnly:
        decode = CharTokenizer().decode

    pieces = []
    streamer = TextStreamer(DecodeOnly(), on_text=pieces.append)
    for token in [0, 122, 123, 124, 1]:
        streamer.put([token])
    assert pieces == ["a", "€", "b"]


def test_shown_special_tokens_end_a_run_of_bytes(spm_models):
    """With skip_special_tokens=False a special token is text, so it ends a run of byte pieces and the text is
    out before end(); when skipped, the run goes on and waits."""
    ours, _, _, _ = spm_models
    ids = [ours.token_to_id("<0xC3>"), ours.token_to_id("<0xA9>"), ours.token_to_id("<|endofcompletion|>")]
    for skip in (False, True):
        pieces = []
        streamer = TextStreamer(ours, skip_special_tokens=skip, on_text=pieces.append)
        for token in ids:
            streamer.put([token])
        assert "".join(pieces) == ("" if skip else ours.decode(ids, skip_special_tokens=False))
        streamer.end()
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)


def test_stop_strings_of_different_lengths_each_match_over_their_whole_length():
    from ttl_core.streamer import StopStrings

    tok = CharTokenizer()
    stops = StopStrings(["zz", "cdef"], tok)  # "cdef" spans four one-byte tokens, "zz" two
    assert stops.ends_in_last([0, 1, 2, 3, 4, 5])
    assert not stops.ends_in_last([0, 1, 2, 3, 4, 5, 6])


def streamed_by(generate, streamer_class, capsys, **kwargs) -> list[str]:
    """The pieces a transformers streamer of `streamer_class` hands out while `generate(streamer)` runs: what
    TextStreamer prints, or what a thread reads from TextIteratorStreamer."""
    import transformers

    if streamer_class is transformers.TextStreamer:
        capsys.readouterr()
        generate(streamer_class(**kwargs))
        return [capsys.readouterr().out]
    streamer, pieces = streamer_class(timeout=60, **kwargs), []
    reader = threading.Thread(target=lambda: pieces.extend(streamer))
    reader.start()
    generate(streamer)
    reader.join()
    return pieces


@pytest.mark.parametrize("streamer_class", ["TextStreamer", "TextIteratorStreamer"])
@pytest.mark.parametrize("skip_prompt", [True, False])
@pytest.mark.parametrize("finish", ["length", "eos", "stop_string"])
def test_transformers_streamers_stream_what_transformers_generate_streams(spm_models, capsys, streamer_class,
                                                                         skip_prompt, finish):
    """transformers' streamers take ttl's generate() as a drop-in for transformers' own: the prompt as a
    (1, len) LongTensor first, then each new token as a 1-element one, then end(), all on the host; the
    stream ends with the token that ends the generation (an EOS, a stop string's last), as there."""
    import transformers

    tok, hf_tok, hf, ours = spm_models
    ids = torch.tensor([tok.encode("o menino foi para")])  # greedy: "▁ca t ▁e te <|endofcompletion|> a ..."
    settings = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=tok.pad_id)
    if finish == "eos":
        settings["eos_token_id"] = [tok.token_to_id("<|endofcompletion|>")]
    elif finish == "stop_string":
        settings.update(stop_strings="t ete", tokenizer=hf_tok)
    kwargs = dict(tokenizer=hf_tok, skip_prompt=skip_prompt, skip_special_tokens=True)
    cls = getattr(transformers, streamer_class)
    ref = streamed_by(lambda s: hf.generate(ids, do_sample=False, streamer=s, **settings), cls, capsys, **kwargs)
    got = streamed_by(lambda s: ttl_core.generate(ours, ids, streamer=s, **settings), cls, capsys, **kwargs)
    assert got == ref and "".join(ref).strip()


def test_ttl_streamer_skips_the_prompt_of_each_generation(spm_models):
    """ttl's TextStreamer follows the same protocol (as transformers' with skip_prompt=True), so it also
    streams transformers' generate(); a (batch > 1, len) tensor is refused, lists are new token ids."""
    tok, _, hf, ours = spm_models
    ids = torch.tensor([tok.encode("o menino foi para")])
    for generate in (lambda s: hf.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=[], streamer=s),
                     lambda s: ttl_core.generate(ours, ids, max_new_tokens=8, eos_token_id=[], streamer=s)):
        pieces = []
        streamer = TextStreamer(tok, on_text=pieces.append)
        for _ in range(2):  # reused: each generation's first put is its prompt
            pieces.clear()
            out = generate(streamer)
            assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:].tolist()) and pieces
    with pytest.raises(GenerationError, match="one row"):
        TextStreamer(tok).put(ids.repeat(2, 1))


def test_generate_puts_the_prompt_then_each_new_token_as_cpu_long_tensors(models):
    """The exact calls a `BaseStreamer` gets. The per-step tensors are the streamer's own: one that keeps them
    must not see a later generation overwrite them."""
    _, ours = models
    ids, mask = left_padded(ours.config.vocab_size, batch=1)

    recorder = RecordingStreamer()
    out = ttl_core.generate(ours, ids, mask, max_new_tokens=6, eos_token_id=[], streamer=recorder)
    ttl_core.generate(ours, ids + 1, mask, max_new_tokens=6, eos_token_id=[])  # reuses the output buffer
    prompt, *steps, end = recorder.calls
    assert end == "end" and torch.equal(prompt, ids) and len(steps) == 6
    for value in (prompt, *steps):
        assert isinstance(value, torch.Tensor) and value.dtype == torch.long and value.device.type == "cpu"
    assert all(step.shape == (1,) for step in steps) and torch.equal(torch.cat([prompt[0], *steps]), out[0])


def test_stop_strings_see_ids_past_the_tokenizer_as_transformers_does(spm_models):
    """A sampled id past the tokenizer (a larger embedding table) adds no text, and transformers' criterion
    lets no stop string end in it or reach across it; ttl's matcher read its piece and failed."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from ttl_core.streamer import StopStrings

    tok, hf_tok, _, _ = spm_models
    past, gen, matches = tok.vocab_size, torch.Generator().manual_seed(1), 0
    reader = StopStrings("x", tok)
    for trial in range(200):
        tokens = torch.randint(0, past, (int(torch.randint(2, 10, (), generator=gen)),), generator=gen).tolist()
        text = b"".join(map(reader.token_bytes, tokens))
        start, end = sorted(torch.randint(0, len(text) + 1, (2,), generator=gen).tolist())
        stops = [text[start:end].decode("utf-8", errors="ignore") or "</s>"]
        for _ in range(1 + trial % 2):  # two such ids: the match may only follow the later one
            where = int(torch.randint(0, len(tokens) + 1, (), generator=gen))
            tokens.insert(where, past + int(torch.randint(0, 50, (), generator=gen)))
        expected = bool(StopStringCriteria(hf_tok, stops)(torch.tensor([tokens]), None)[0])
        assert StopStrings(stops, tok).ends_in_last(tokens) == expected, (tokens, stops)
        matches += expected
    assert matches > 10
