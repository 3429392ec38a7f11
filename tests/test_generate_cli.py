"""scripts/generate.py on a tiny random model saved with ttl_core.save_pretrained and a small trained tokenizer
with Aira's special tokens: the streamed text, the prompt formats and the interactive loop."""

import io
import sys
import warnings

import pytest
import sentencepiece as spm
import torch
from generation_helpers import CONTEXT, WORDS, chat_checkpoint, tiny_model
from helpers import load_script, run_script

import ttl_core
import ttl_core.cli
from ttl_core.errors import ConfigError, GenerationError
from ttl_core.chat_format import chat_prompt
from ttl_core.lora import apply_lora
from ttl_core.lora_files import save_adapter
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("chat"))


def save_with_generation_config(model, tok, path, **settings) -> None:
    """Save the shared `model` with `settings` added to its generation_config.json (the model keeps its own)."""
    saved = model.generation_config
    model.generation_config = {**(saved or {}), **settings}
    try:
        ttl_core.save_pretrained(model, path, tokenizer=tok)
    finally:
        model.generation_config = saved


def expected_answer(model, tok, ids, **kwargs):
    out = ttl_core.generate(model, torch.tensor([ids]), **kwargs)
    return tok.decode(out[0, len(ids):].tolist())


def test_prompt_streams_the_text_generate_returns(checkpoint):
    path, tok, model = checkpoint
    run = run_script("generate", "--model", path, "--prompt", "o menino foi para a escola?", "--chat", "aira",
                     "--greedy", "--max-new-tokens", "12", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    ids = tok.encode(chat_prompt("aira", "o menino foi para a escola?"))
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<|startofinstruction|>")]  # as fine-tuning encodes it
    eos = [tok.eos_id, tok.token_to_id("<|endofcompletion|>")]
    answer = expected_answer(model, tok, ids, max_new_tokens=12, repetition_penalty=1.2, eos_token_id=eos,
                             pad_token_id=tok.pad_id)
    assert answer.strip() and run.stdout == answer + "\n"


def test_interactive_chat_keeps_the_conversation_until_the_context_is_full(checkpoint, capsys, monkeypatch):
    path, tok, _ = checkpoint
    script = load_script("generate")
    prompts = []
    real_generate = script.generate

    def recording_generate(model, ids, *args, **kwargs):
        prompts.append(ids[0].tolist())
        return real_generate(model, ids, *args, **kwargs)

    monkeypatch.setattr(script, "generate", recording_generate)
    questions = ["a casa", "o cachorro", "a escola", "a noite", "a chuva"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions[1:]) + "\n"))
    assert script.main(["--model", str(path), "--prompt", questions[0], "--input", "de noite", "--chat", "aira",
                        "--interactive", "--max-new-tokens", "10", "--seed", "1", "--device", "cpu"]) == 0
    assert f"The context is full ({CONTEXT} tokens)" in capsys.readouterr().out
    assert len(prompts) >= 2 and prompts[0] == tok.encode(chat_prompt("aira", questions[0], "de noite"))
    ends = {tok.eos_id, tok.token_to_id("<|endofcompletion|>")}
    for before, after, question in zip(prompts, prompts[1:], questions[1:]):
        assert after[:len(before)] == before  # each turn continues the whole conversation
        user = tok.encode(chat_prompt("aira", question), add_bos=False)
        assert after[len(after) - len(user):] == user
        answer = after[len(before):len(after) - len(user)]
        assert answer[-1] in ends and not ends & set(answer[:-1])  # each answer is closed exactly once
    assert len(prompts[-1]) < CONTEXT


def test_a_padding_token_in_a_turn_is_a_token(checkpoint, monkeypatch, capsys):
    """A conversation is one row with no padding, so the padding id in it (a typed "<pad>", or one the model
    sampled in an earlier answer) is a token: generate() took it for padding, as it does when given no mask, and
    ended the conversation with "must be left-padded" about a mask the user never gave."""
    path, tok, model = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("o que é <pad>?\n"))
    assert load_script("generate").main(["--model", str(path), "--chat", "aira", "--interactive", "--greedy",
                                         "--max-new-tokens", "8", "--device", "cpu"]) == 0
    ids = tok.encode(chat_prompt("aira", "o que é <pad>?"))
    assert tok.pad_id in ids
    answer = expected_answer(model, tok, ids, attention_mask=torch.ones(1, len(ids)), max_new_tokens=8,
                             repetition_penalty=1.2, eos_token_id=[tok.eos_id, tok.token_to_id("<|endofcompletion|>")])
    assert answer.strip() and capsys.readouterr().out == f"> {answer}\n> "


def test_aira_needs_its_special_tokens(checkpoint, tmp_path):
    path, _, model = checkpoint
    plain = train_tokenizer(["a casa de o menino foi para escola"] * 50, None, vocab_size=290)
    ttl_core.save_pretrained(model, tmp_path, tokenizer=plain)
    run = run_script("generate", "--model", tmp_path, "--prompt", "oi", "--chat", "aira", "--device", "cpu")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --chat aira needs a tokenizer with Aira's special tokens; <|endofcompletion|> is missing (a model "
        "fine-tuned with finetune_instruct.py --format aira has them; for another, try --chat alpaca)"]


def test_prompt_mode_shrinks_the_answer_to_the_context(checkpoint, capsys):
    """Without --interactive too, --max-new-tokens beyond the context's room is cut to what fits, and a prompt
    that fills the context is a one-line error."""
    path, tok, model = checkpoint
    script = load_script("generate")
    question = "o menino foi para a escola com seu cachorro ontem"
    assert script.main(["--model", str(path), "--prompt", question, "--chat", "aira", "--greedy",
                        "--max-new-tokens", "150", "--device", "cpu"]) == 0
    ids = tok.encode(chat_prompt("aira", question))
    eos = [tok.eos_id, tok.token_to_id("<|endofcompletion|>")]
    answer = expected_answer(model, tok, ids, max_new_tokens=CONTEXT - len(ids), repetition_penalty=1.2,
                             eos_token_id=eos, pad_token_id=tok.pad_id)
    assert capsys.readouterr().out == answer + "\n"
    long_prompt = " ".join(WORDS * 3)
    with pytest.raises(GenerationError, match=rf"^the context is full \({CONTEXT} tokens\): the prompt takes "):
        script.main(["--model", str(path), "--prompt", long_prompt, "--greedy", "--device", "cpu"])


def test_tokenizer_without_padding_piece(tmp_path, capsys):
    """A Llama-style tokenizer.model without `<pad>` (its pad id is -1): generation pads with the EOS id."""
    texts = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4 + i % 9)) for i in range(200)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model_file, model_type="bpe",
                                   vocab_size=290, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   minloglevel=2)
    model = tiny_model(290)
    ttl_core.save_pretrained(model, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(model_file.getvalue())
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.pad_id == -1
    assert load_script("generate").main(["--model", str(tmp_path), "--prompt", "o menino", "--greedy",
                                         "--max-new-tokens", "8", "--device", "cpu"]) == 0
    answer = expected_answer(model, tok, tok.encode("o menino"), max_new_tokens=8, repetition_penalty=1.2,
                             eos_token_id=[tok.eos_id])
    assert capsys.readouterr().out == answer + "\n"


def test_a_bad_device_or_a_classifier_is_a_one_line_error(checkpoint, tmp_path):
    path, tok, model = checkpoint
    run = run_script("generate", "--model", path, "--prompt", "oi", "--device", "foo")
    assert run.returncode == 2 and run.stderr.startswith("error: unknown device 'foo'")
    assert len(run.stderr.strip().splitlines()) == 1
    classifier = ttl_core.LlamaForSequenceClassification(model.config)
    ttl_core.save_pretrained(classifier, tmp_path, tokenizer=tok)
    run = run_script("generate", "--model", tmp_path, "--prompt", "oi", "--device", "cpu")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds a LlamaForSequenceClassification; generation needs a LlamaForCausalLM"]


def test_a_tokenizer_with_more_tokens_than_the_model_is_named(checkpoint, tmp_path):
    """--tokenizer of another model: its ids past the embedding table were refused only as an eos_token_id or
    input_ids out of range, which named neither the tokenizer nor the model."""
    path, tok, model = checkpoint
    ttl_core.save_pretrained(tiny_model(tok.vocab_size - 3), tmp_path)
    with pytest.raises(ConfigError, match=rf"^{path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                                          rf"vocab_size is {tok.vocab_size - 3}; use the tokenizer"):
        load_script("generate").main(["--model", str(tmp_path), "--tokenizer", str(path), "--prompt", "oi",
                                      "--chat", "aira", "--device", "cpu"])


def test_a_prompt_that_is_not_utf8_is_named(checkpoint):
    """A byte that is not UTF-8 in the prompt (a Latin-1 terminal's "olá") reaches Python as a lone surrogate
    (surrogateescape), which sentencepiece refused with a pybind11 cast error traceback."""
    run = run_script("generate", "--model", checkpoint[0], "--prompt", "ol\udce1", "--device", "cpu")
    assert run.returncode == 2 and run.stderr == ("error: the text is not valid Unicode: character 2 is a lone "
                                                  "surrogate '\\udce1' (a byte that is not UTF-8, as from a terminal "
                                                  "in another encoding)\n"), run.stderr


def test_base_is_only_for_an_adapter_model(checkpoint):
    """--base names the base model of a PEFT adapter --model; beside a full checkpoint it would be ignored."""
    path = checkpoint[0]
    with pytest.raises(GenerationError, match=rf"^--base is for an adapter --model; {path} holds no adapter_config"):
        load_script("generate").main(["--model", str(path), "--base", str(path), "--prompt", "oi", "--device", "cpu"])


def test_input_without_a_chat_format_is_a_usage_error(checkpoint, capsys):
    """--input is context for --prompt inside a chat format; without one it used to be dropped silently."""
    script = load_script("generate")
    for extra in (["--prompt", "oi"], ["--chat", "alpaca", "--interactive"]):
        with pytest.raises(SystemExit) as excinfo:
            script.main(["--model", str(checkpoint[0]), "--input", "contexto", *extra])
        assert excinfo.value.code == 2
        assert "--input adds context to --prompt in a --chat format" in capsys.readouterr().err


def test_input_joins_the_prompt_in_its_chat_format(checkpoint, monkeypatch):
    """--input with --prompt (no --interactive) is the prompt's context in the format's own place (Alpaca's
    `### Entrada:`)."""
    path, tok, _ = checkpoint
    script, fake, _ = scripted(monkeypatch, [5, 6], context=1000)  # room for Alpaca's long header
    assert script.main(["--model", str(path), "--prompt", "a casa", "--input", "de noite", "--chat", "alpaca",
                        "--device", "cpu"]) == 0
    assert [ids for ids, _ in fake.calls] == [tok.encode(chat_prompt("alpaca", "a casa", "de noite"))]


class FakeGenerate:
    """Stands in for ttl_core.generate in the script: records each call's prompt and options and answers with
    `answer` (token ids), so the test sees exactly what the options turned into."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, model, ids, attention_mask, **kwargs):
        assert torch.equal(attention_mask, torch.ones_like(ids))  # one row: no padding
        self.calls.append((ids[0].tolist(), kwargs))
        return torch.cat([ids, torch.tensor([self.answer])], dim=1)


def scripted(monkeypatch, answer, context=None):
    """The script with generate() faked and, when `context` is given, the loaded model's context set to it."""
    script = load_script("generate")
    fake = FakeGenerate(answer)
    monkeypatch.setattr(script, "generate", fake)
    loads = []

    def load(path, **kwargs):
        loads.append(kwargs)
        model = ttl_core.load_pretrained(path, **kwargs)
        if context is not None:
            model.config.max_position_embeddings = context
        return model

    monkeypatch.setattr(ttl_core.cli, "load_pretrained", load)
    return script, fake, loads


def test_sampling_defaults_and_options_reach_generate(checkpoint, monkeypatch, capsys):
    """The model card's defaults (temperature 0.2, top-k 20, top-p 0.2, repetition penalty 1.2, 150 new
    tokens, float32 on CPU) and each sampling option, --seed and --dtype reach generate() and the loader;
    --greedy drops the sampling options, and refuses them (and --seed) given with it."""
    path, tok, _ = checkpoint
    script, fake, loads = scripted(monkeypatch, [5, 6], context=1000)
    assert script.main(["--model", str(path), "--prompt", "o menino", "--device", "cpu"]) == 0
    streamer, tokenizer = (fake.calls[-1][1].pop(name) for name in ("streamer", "tokenizer"))
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == tok.vocab_size
    assert fake.calls[-1] == (tok.encode("o menino"), dict(
        max_new_tokens=150, repetition_penalty=1.2, eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id,
        num_return_sequences=1, num_beams=1, return_dict_in_generate=False, cuda_graph=True, do_sample=True,
        temperature=0.2, top_k=20, top_p=0.2, min_p=0.0, seed=None))
    assert streamer is not None and loads[-1] == dict(dtype="float32", device=torch.device("cpu"))
    assert script.main(["--model", str(path), "--prompt", "o menino", "--device", "cpu", "--temperature", "0.7",
                        "--top-k", "5", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.1",
                        "--seed", "3", "--max-new-tokens", "9", "--no-cuda-graph", "--dtype", "bfloat16"]) == 0
    fake.calls[-1][1].pop("streamer"), fake.calls[-1][1].pop("tokenizer")
    assert fake.calls[-1][1] == dict(
        max_new_tokens=9, repetition_penalty=1.1, eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id,
        num_return_sequences=1, num_beams=1, return_dict_in_generate=False, cuda_graph=False, do_sample=True,
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3)
    assert loads[-1]["dtype"] == "bfloat16"
    for option, value in (("--temperature", "0.7"), ("--top-k", "5"), ("--top-p", "0.9"), ("--min-p", "0.1"),
                          ("--seed", "3")):  # each would be ignored: refused, naming both
        with pytest.raises(SystemExit) as exit_:
            script.main(["--model", str(path), "--prompt", "o menino", "--greedy", option, value])
        assert exit_.value.code == 2 and f"error: {option} has no effect with --greedy\n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # greedy decoding as other tools ask for it: pointed to --greedy
        script.main(["--model", str(path), "--prompt", "o menino", "--temperature", "0"])
    assert exit_.value.code == 2 and "error: --temperature 0 does not sample; use --greedy" in capsys.readouterr().err
    assert script.main(["--model", str(path), "--prompt", "o menino", "--device", "cpu", "--greedy"]) == 0
    fake.calls[-1][1].pop("streamer"), fake.calls[-1][1].pop("tokenizer")
    assert fake.calls[-1][1] == dict(max_new_tokens=150, repetition_penalty=1.2, eos_token_id=[tok.eos_id],
                                     pad_token_id=tok.pad_id, num_return_sequences=1, num_beams=1,
                                     return_dict_in_generate=False, cuda_graph=True,
                                     do_sample=False)  # greedy: no sampling options


def test_the_default_device_is_cuda_in_bfloat16_where_there_is_one(checkpoint, monkeypatch):
    """--device auto and --dtype auto on a machine with a GPU, faked here: the model loads in bfloat16 on CUDA."""
    path = checkpoint[0]
    script, fake, _ = scripted(monkeypatch, [5])
    loads = []
    monkeypatch.setattr(script.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ttl_core.cli, "checked_device", lambda name: torch.device(name))  # no CUDA here to check
    monkeypatch.setattr(ttl_core.cli, "load_pretrained", lambda where, **kwargs: loads.append(kwargs) or checkpoint[2])
    assert script.main(["--model", str(path), "--prompt", "o menino"]) == 0
    assert loads == [dict(dtype="bfloat16", device=torch.device("cuda"))] and len(fake.calls) == 1


def test_greedy_is_greedy_when_the_checkpoint_samples(checkpoint, tmp_path, capsys):
    """--greedy decodes greedily even where the checkpoint's generation_config.json says do_sample (which
    generate() applies when the call leaves do_sample unset) and num_beams (a streamed answer is one sequence)."""
    _, tok, model = checkpoint
    save_with_generation_config(model, tok, tmp_path, do_sample=True, temperature=5.0, num_beams=4)
    ids = tok.encode("o menino")
    answer = expected_answer(model, tok, ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.2,
                             eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id)
    for _ in range(2):
        assert load_script("generate").main(["--model", str(tmp_path), "--prompt", "o menino", "--greedy",
                                   "--max-new-tokens", "12", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == answer + "\n"


def test_the_checkpoint_stop_strings_end_the_answer(checkpoint, tmp_path, capsys):
    """A generation_config.json's stop_strings end an answer, as transformers' generate() ends it given the
    tokenizer (the script warned and ran on past them)."""
    _, tok, model = checkpoint
    ids = tok.encode("o menino")
    settings = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.2, eos_token_id=[tok.eos_id],
                    pad_token_id=tok.pad_id)
    free = expected_answer(model, tok, ids, **settings)
    new = ttl_core.generate(model, torch.tensor([ids]), **settings)[0, len(ids):].tolist()
    stop = next(tok.decode([t]) for t in new[3:] if tok.id_to_token(t).strip("▁").isalpha())  # a word piece
    save_with_generation_config(model, tok, tmp_path, stop_strings=[stop])
    answer = expected_answer(model, tok, ids, stop_strings=[stop], tokenizer=tok, **settings)
    assert stop in answer and len(answer) < len(free)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_script("generate").main(["--model", str(tmp_path), "--prompt", "o menino", "--greedy",
                                   "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == answer + "\n"


def test_tokenizer_option_loads_the_tokenizer_from_its_own_directory(checkpoint, tmp_path, capsys):
    """--tokenizer DIR for a checkpoint saved without one."""
    _, tok, model = checkpoint
    ttl_core.save_pretrained(model, tmp_path / "weights")
    tok.save_pretrained(tmp_path / "tokenizer")
    assert load_script("generate").main(["--model", str(tmp_path / "weights"),
                                         "--tokenizer", str(tmp_path / "tokenizer"), "--prompt", "o menino",
                                         "--greedy", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    answer = expected_answer(model, tok, tok.encode("o menino"), max_new_tokens=6, repetition_penalty=1.2,
                             eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id)
    assert capsys.readouterr().out == answer + "\n"


def test_an_adapter_saved_without_a_tokenizer_uses_its_bases(checkpoint, tmp_path, capsys):
    """PEFT saves an adapter without the tokenizer (its users load the base's); --model on such a directory
    stopped at 'no tokenizer.model or tokenizer.json' instead of using the base's tokenizer."""
    path, tok, _ = checkpoint
    adapted = apply_lora(ttl_core.load_pretrained(path), r=4, dropout=0.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(path))
    assert load_script("generate").main(["--model", str(tmp_path / "adapter"), "--prompt", "o menino", "--greedy",
                               "--max-new-tokens", "6", "--device", "cpu"]) == 0
    answer = expected_answer(adapted.eval(), tok, tok.encode("o menino"), max_new_tokens=6, repetition_penalty=1.2,
                             eos_token_id=[tok.eos_id], pad_token_id=tok.pad_id)
    assert answer.strip() and capsys.readouterr().out == answer + "\n"
    # a base that has moved since is given as --base: its tokenizer too is read from there
    save_adapter(adapted, tmp_path / "moved", base_model_name_or_path=str(tmp_path / "moved_away"))
    assert load_script("generate").main(["--model", str(tmp_path / "moved"), "--base", str(path), "--prompt",
                                         "o menino", "--greedy", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == answer + "\n"


def test_a_prompt_one_token_short_of_the_context_gets_one_token(checkpoint, monkeypatch, capsys):
    """The boundary of the context check: a prompt filling the context exactly is refused (in the interactive
    loop: the conversation ends), one a token shorter still gets a one-token answer."""
    path, tok, _ = checkpoint
    ids = tok.encode("o menino foi para a escola")
    script, fake, _ = scripted(monkeypatch, [7], context=len(ids) + 1)
    assert script.main(["--model", str(path), "--prompt", "o menino foi para a escola", "--device", "cpu"]) == 0
    assert fake.calls[-1][0] == ids and fake.calls[-1][1]["max_new_tokens"] == 1
    script, fake, _ = scripted(monkeypatch, [7], context=len(ids))
    with pytest.raises(GenerationError, match=rf"^the context is full \({len(ids)} tokens\): the prompt takes"):
        script.main(["--model", str(path), "--prompt", "o menino foi para a escola", "--device", "cpu"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("mais\n"))
    assert script.main(["--model", str(path), "--prompt", "o menino foi para a escola", "--interactive",
                        "--device", "cpu"]) == 0
    assert fake.calls == [] and f"The context is full ({len(ids)} tokens)" in capsys.readouterr().out
    script, fake, _ = scripted(monkeypatch, [7], context=len(ids) + 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert script.main(["--model", str(path), "--prompt", "o menino foi para a escola", "--interactive",
                        "--device", "cpu"]) == 0
    assert [(prompt, kwargs["max_new_tokens"]) for prompt, kwargs in fake.calls] == [(ids, 1)]


def test_interactive_turns_a_blank_line_and_how_answers_are_closed(checkpoint, monkeypatch, capsys):
    """Without --prompt the first turn is read from stdin and a blank line quits; a line may end in Windows'
    \\r\\n (a file of turns piped in), which is no part of the turn. In a chat format an answer that ran out of
    tokens is closed with the format's end token (Aira: <|endofcompletion|>, as fine-tuning ends every response);
    a plain continuation is continued as is, with no </s> between the turns."""
    path, tok, _ = checkpoint
    end = tok.token_to_id("<|endofcompletion|>")
    script, fake, _ = scripted(monkeypatch, [5, 6])
    monkeypatch.setattr(sys, "stdin", io.StringIO("a casa\r\no cachorro\n\r\na escola\n"))
    assert script.main(["--model", str(path), "--chat", "aira", "--interactive", "--max-new-tokens", "4",
                        "--device", "cpu"]) == 0
    first = tok.encode(chat_prompt("aira", "a casa"))
    assert [kwargs["max_new_tokens"] for _, kwargs in fake.calls] == [4, 4]
    assert [ids for ids, _ in fake.calls] == [
        first, first + [5, 6, end] + tok.encode(chat_prompt("aira", "o cachorro"), add_bos=False)]
    script, fake, _ = scripted(monkeypatch, [5, 6])
    monkeypatch.setattr(sys, "stdin", io.StringIO(" o cachorro \n"))  # the trailing space is a token of its own
    capsys.readouterr()
    assert script.main(["--model", str(path), "--prompt", "a casa", "--interactive", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("> a casa\n")  # --prompt's turn is shown as a typed one would be
    assert [ids for ids, _ in fake.calls] == [
        tok.encode("a casa"), tok.encode("a casa") + [5, 6] + tok.encode(" o cachorro ", add_bos=False)]


def test_an_interactive_line_the_tokenizer_refuses_is_asked_again(checkpoint, monkeypatch, capsys):
    """A line holding a byte that is not UTF-8 (a Latin-1 terminal's "olá") is refused, not the session."""
    path, tok, _ = checkpoint
    script, fake, _ = scripted(monkeypatch, [5, 6])
    monkeypatch.setattr(sys, "stdin", io.StringIO("ol\udce1\na casa\n\n"))
    assert script.main(["--model", str(path), "--interactive", "--device", "cpu"]) == 0
    assert "is a lone surrogate" in capsys.readouterr().err and [ids for ids, _ in fake.calls] == [tok.encode("a casa")]


def test_a_conversation_opens_with_bos_only_when_the_tokenizer_adds_it(checkpoint):
    """The first turn is encoded as the tokenizer encodes a text (here: without <s>), never with a </s> after the
    prompt even where the tokenizer appends one; later turns get neither."""
    _, tok, _ = checkpoint
    plain = Tokenizer(tok.proto.SerializeToString())
    plain.add_bos_token, plain.add_eos_token = False, True
    chat = load_script("generate").Chat(plain, "aira")
    chat.add_user("a casa")
    chat.add_model([5, 6])
    chat.add_user("o cachorro")
    prompts = [plain.encode(chat_prompt("aira", text), add_eos=False) for text in ("a casa", "o cachorro")]
    assert chat.ids == prompts[0] + [5, 6, tok.token_to_id("<|endofcompletion|>")] + prompts[1]
    assert tok.bos_id not in chat.ids and tok.eos_id not in chat.ids


def test_an_empty_prompt_without_bos_is_named(checkpoint, tmp_path):
    """`--prompt ""` where the tokenizer adds no <s> leaves no token to continue: the prompt's empty id list became
    a float tensor, refused as "input_ids must be an integer tensor", which named neither the prompt nor its length."""
    _, tok, model = checkpoint
    plain = Tokenizer(tok.proto.SerializeToString())
    plain.add_bos_token = False
    ttl_core.save_pretrained(model, tmp_path, tokenizer=plain)
    with pytest.raises(GenerationError, match=r"^empty prompt: input_ids has shape \(1, 0\)"):
        load_script("generate").main(["--model", str(tmp_path), "--prompt", "", "--device", "cpu"])


def test_an_answer_is_closed_by_its_formats_end_unless_an_eos_ended_it(checkpoint):
    """An answer that ran out of tokens is closed as fine-tuning ends each format's responses (Aira:
    <|endofcompletion|>, Alpaca: </s>); one that stopped at any EOS id (the tokenizer's, the checkpoint's) is not
    closed a second time."""
    _, tok, _ = checkpoint
    aira_end, checkpoint_eos = tok.token_to_id("<|endofcompletion|>"), 7
    chat_class = load_script("generate").Chat
    for fmt, end in (("aira", aira_end), ("alpaca", tok.eos_id)):
        for answer, closed in (([5, 6], [5, 6, end]), ([5, end], [5, end]), ([5, tok.eos_id], [5, tok.eos_id]),
                               ([5, checkpoint_eos], [5, checkpoint_eos])):
            chat = chat_class(tok, fmt, [checkpoint_eos])
            chat.add_model(answer)
            assert chat.ids == closed, (fmt, answer)


def test_the_checkpoints_eos_ids_end_the_answer_too(checkpoint, tmp_path, capsys):
    """A checkpoint whose generation_config.json lists more EOS ids (a merged Aira model adds
    <|endofcompletion|>) stops there, as generate() and transformers' generate() do; the CLI stopped only at the
    tokenizer's </s> (and, with --chat aira, <|endofcompletion|>) and streamed on past the checkpoint's end."""
    _, tok, model = checkpoint
    ids = tok.encode("o menino")
    settings = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_id)
    free = ttl_core.generate(model, torch.tensor([ids]), eos_token_id=[tok.eos_id], **settings)[0, len(ids):]
    stop = int(free[3])
    assert stop not in free[:3].tolist() and stop != tok.eos_id and len(free) == 12
    save_with_generation_config(model, tok, tmp_path, eos_token_id=[tok.eos_id, stop])
    assert load_script("generate").main(["--model", str(tmp_path), "--prompt", "o menino", "--greedy",
                                         "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tok.decode(free[:4].tolist()) + "\n"


def test_a_model_larger_than_its_tokenizer_streams_what_transformers_decodes(checkpoint, tmp_path):
    """A model with more embedding rows than its tokenizer has tokens (check_tokenizer_fits lets it through)
    samples ids the tokenizer lacks now and then: they print nothing, as transformers' decode gives nothing for
    them, rather than stop the stream with an error."""
    _, tok, _ = checkpoint
    model = tiny_model(4 * tok.vocab_size)
    ttl_core.save_pretrained(model, tmp_path, tokenizer=tok)
    ids = tok.encode("o menino foi", add_eos=False)
    out = ttl_core.generate(model, torch.tensor([ids]), max_new_tokens=12, repetition_penalty=1.0, do_sample=False)
    assert (out[0, len(ids):] >= tok.vocab_size).any()  # the case at hand
    run = run_script("generate", "--model", tmp_path, "--prompt", "o menino foi", "--greedy",
                     "--repetition-penalty", "1.0", "--max-new-tokens", "12", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stdout == tok.decode(out[0, len(ids):].tolist()) + "\n"


@pytest.mark.parametrize("greedy", [True, False])
def test_a_checkpoint_asking_for_several_sequences_still_gets_one_answer(checkpoint, tmp_path, capsys, greedy):
    """The CLI streams and prints one answer: a generation_config.json with num_return_sequences 2 (which generate()
    now applies when the call leaves it unset) made greedy decoding refuse it and sampling two rows the streamer
    refuses."""
    _, tok, model = checkpoint
    save_with_generation_config(model, tok, tmp_path, do_sample=True, num_return_sequences=2)
    options = ["--greedy"] if greedy else ["--seed", "0"]
    assert load_script("generate").main(["--model", str(tmp_path), "--prompt", "o menino", "--max-new-tokens", "6",
                               "--device", "cpu", *options]) == 0
    assert capsys.readouterr().out.strip()
