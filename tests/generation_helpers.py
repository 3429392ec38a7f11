"""Shared pieces of the generation tests: a transformers reference model, left-padded prompts, a
character tokenizer with byte-fallback pieces, and a tiny checkpoint saved with a trained tokenizer."""

from pathlib import Path

import pytest
import torch
from hf_reference import hf_causal_lm

import ttl_core
from ttl_core.chat_format import AIRA_SPECIAL_TOKENS
from ttl_core.tokenizer_train import train_tokenizer
from ttl_core.errors import GenerationError

PAD = 3


def hf_generation_model(seed: int = 0, **overrides):
    """A random transformers model whose logit for the padding token is always 0. transformers up to 5.17
    applies repetition_penalty to the left-padding tokens of the prompt, later releases (and ttl) do not;
    a penalty leaves a zero logit at zero, so greedy comparisons hold under both."""
    hf = hf_causal_lm(seed=seed, **overrides)
    with torch.no_grad():
        hf.lm_head.weight[PAD] = 0.0
    return hf


def saved_models(path: Path):
    """(transformers model, ttl model loaded from its saved checkpoint)."""
    hf = hf_generation_model()
    hf.save_pretrained(path)
    return hf, ttl_core.load_pretrained(path)


def left_padded(vocab: int, seed: int = 1, batch: int = 3, seq: int = 9, pads=(0, 3, 5)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads[:batch]):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def assert_refused(model, message: str, **kwargs) -> None:
    """generate(**kwargs) over the `left_padded` prompts raises a one-line GenerationError matching `message`."""
    ids, mask = left_padded(model.config.vocab_size)
    with pytest.raises(GenerationError, match=message) as info:
        ttl_core.generate(model, ids, mask, **kwargs)
    assert "\n" not in str(info.value)


def cuda_models(path: Path):
    """(transformers model, ttl model loaded from its saved checkpoint), both float32 on the GPU, context 512."""
    hf = hf_generation_model(max_position_embeddings=512)
    hf.save_pretrained(path)
    return hf.cuda(), ttl_core.load_pretrained(path, device="cuda")


def cuda_batch(vocab: int):
    """Three left-padded prompts of 40 tokens on the GPU, one of them only 9 tokens long."""
    ids, mask = left_padded(vocab, batch=3, seq=40, pads=(0, 7, 31))
    return ids.cuda(), mask.cuda()


def hf_greedy(hf, ids, mask, **kwargs):
    return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


class CharTokenizer:
    """Token i is the letter "a" + i mod 26, except ids 120..124, which are the UTF-8 bytes of 'é' and '€'
    (byte-fallback pieces `<0xNN>`); decoding joins the bytes, so a split character decodes to U+FFFD like
    a byte-fallback tokenizer."""

    SPECIAL = {120: b"\xc3", 121: b"\xa9", 122: b"\xe2", 123: b"\x82", 124: b"\xac"}

    def token_bytes(self, i):
        return self.SPECIAL.get(i, bytes([97 + i % 26]))

    def id_to_token(self, i):
        return f"<0x{self.SPECIAL[i][0]:02X}>" if i in self.SPECIAL else self.token_bytes(i).decode()

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")


WORDS = "a casa de o menino foi para escola com seu cachorro ontem à noite e não voltou mais porque choveu".split()
CONTEXT = 64


def tiny_model(vocab_size: int) -> ttl_core.LlamaForCausalLM:
    config = ttl_core.LlamaConfig.from_preset("tiny", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    model = ttl_core.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy decoding does not just repeat a token
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else None
    return model


def chat_checkpoint(path: Path):
    """(path, tokenizer, model loaded back) of a tiny model saved at `path` with a small trained tokenizer that has
    Aira's special tokens: what scripts/generate.py runs on."""
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 20)) + "." for i in range(200)]
    tok = train_tokenizer(texts, None, vocab_size=320)
    tok.add_special_tokens(AIRA_SPECIAL_TOKENS)
    ttl_core.save_pretrained(tiny_model(tok.vocab_size), path, tokenizer=tok)
    return path, tok, ttl_core.load_pretrained(path)


class RecordingStreamer:
    """A streamer (transformers' BaseStreamer protocol) that keeps the value of every `put`, as given, then "end"."""

    def __init__(self):
        self.calls = []

    def put(self, value: torch.Tensor) -> None:
        self.calls.append(value)

    def end(self) -> None:
        self.calls.append("end")

    def as_lists(self) -> list:
        return [call if isinstance(call, str) else call.tolist() for call in self.calls]
