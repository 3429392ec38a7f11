"""scripts/generate.py run in-process on a tiny random model, with a character-level tokenizer standing in for
ttl_core.tokenizer (same interface), so prompts, chat formats and the interactive loop can be checked exactly."""

import importlib.util
import io
import re
import sys
import types

import pytest
import torch
from helpers import ROOT
from hf_reference import hf_causal_lm

import ttl_core

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|startofinstruction|>", "<|endofinstruction|>", "<|endofcompletion|>"]


class CharTokenizer:
    """ids 0..6 are the special tokens above, 7 + (code point mod 124) the characters (vocab 131)."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 3, 131

    @classmethod
    def from_pretrained(cls, path):
        return cls()

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [self.bos_id] if add_bos else []
        for piece in re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text):
            ids += [SPECIAL.index(piece)] if piece in SPECIAL else [7 + ord(c) % 124 for c in piece]
        return ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i < 7 and skip_special_tokens else SPECIAL[i] if i < 7 else chr(i - 7 + 32)
                       for i in ids)

    def token_to_id(self, token):
        return SPECIAL.index(token) if token in SPECIAL else None


def chat_prompt(fmt, instruction, input=""):
    assert fmt == "aira"
    return f"<|startofinstruction|>{instruction}<|endofinstruction|>"


@pytest.fixture
def cli(monkeypatch, tmp_path):
    fake = types.ModuleType("ttl_core.tokenizer")
    fake.Tokenizer, fake.chat_prompt = CharTokenizer, chat_prompt
    monkeypatch.setitem(sys.modules, "ttl_core.tokenizer", fake)
    hf_causal_lm(max_position_embeddings=48).save_pretrained(tmp_path)
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script, str(tmp_path)


def test_prompt_streams_the_same_text_generate_returns(cli, capsys):
    script, path = cli
    assert script.main(["--model", path, "--prompt", "Olá, tudo bem?", "--chat", "aira", "--greedy",
                        "--max-new-tokens", "12", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    tok = CharTokenizer()
    ids = tok.encode(chat_prompt("aira", "Olá, tudo bem?"), add_bos=False)
    model = ttl_core.load_pretrained(path)
    out = ttl_core.generate(model, torch.tensor([ids]), max_new_tokens=12, repetition_penalty=1.2,
                            eos_token_id=[2, 6], pad_token_id=3)
    assert printed == tok.decode(out[0, len(ids):].tolist()) + "\n"


def test_interactive_chat_keeps_the_conversation_until_the_context_is_full(cli, capsys, monkeypatch):
    script, path = cli
    prompts = []
    real_generate = script.generate

    def recording_generate(model, ids, **kwargs):
        prompts.append(ids[0].tolist())
        return real_generate(model, ids, **kwargs)

    monkeypatch.setattr(script, "generate", recording_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("segunda\nterceira\nquarta\n"))
    assert script.main(["--model", path, "--prompt", "primeira", "--chat", "aira", "--interactive",
                        "--max-new-tokens", "10", "--seed", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "The context is full (48 tokens)" in out
    tok = CharTokenizer()
    assert prompts[0] == tok.encode(chat_prompt("aira", "primeira"), add_bos=False)
    questions = ["primeira", "segunda", "terceira"]
    for before, after, question in zip(prompts, prompts[1:], questions[1:]):
        assert after[:len(before)] == before  # each turn continues the whole conversation
        user = tok.encode(chat_prompt("aira", question), add_bos=False)
        answer = after[len(before):len(after) - len(user)]
        assert after[len(after) - len(user):] == user
        assert answer[-1] in (2, 6) and not {2, 6} & set(answer[:-1])  # the answer is closed exactly once
    assert len(prompts[-1]) <= 48
