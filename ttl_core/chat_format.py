"""The chat formats ttl fine-tunes and prompts in, as TeenyTinyLlama's chat models were trained: Aira-2's special
tokens around the instruction and the completion, and Alpaca-PTBR's Portuguese header and sections."""

from __future__ import annotations

from .errors import ConfigError

AIRA_SPECIAL_TOKENS = ["<|startofinstruction|>", "<|endofinstruction|>", "<|endofcompletion|>", "<|pad|>"]
CHAT_FORMATS = ("aira", "alpaca")
# The Aira format's end-of-answer token: fine-tuned answers end there, not with `</s>`.
AIRA_END = "<|endofcompletion|>"
_ALPACA_HEADER = "Abaixo está uma instrução que descreve uma tarefa"
_ALPACA_TAIL = "Escreva uma resposta que conclua adequadamente a solicitação."


def check_chat_format(format: str) -> None:
    """Refuse a chat format ttl does not know, naming the ones it does."""
    if format not in CHAT_FORMATS:
        raise ConfigError(f"unknown chat format {format!r}; choose one of {', '.join(CHAT_FORMATS)}")


def chat_prompt(format: str, instruction: str, input: str = "") -> str:
    """The text of a chat prompt up to where the response starts, in `aira` or `alpaca` (Alpaca-PTBR) form."""
    check_chat_format(format)
    if format == "aira":
        return f"<|startofinstruction|>{instruction}" + (f"\n{input}" if input else "") + "<|endofinstruction|>"
    if input:
        return (f"{_ALPACA_HEADER}, emparelhada com uma entrada que fornece mais contexto. {_ALPACA_TAIL}\n\n"
                f"### Instruções:\n{instruction}\n\n### Entrada:\n{input}\n\n### Resposta:\n")
    return f"{_ALPACA_HEADER}. {_ALPACA_TAIL}\n\n### Instruções:\n{instruction}\n\n### Resposta:\n"


def chat_response(format: str, response: str) -> str:
    """The response text that follows `chat_prompt`; Aira closes it with `<|endofcompletion|>` (Alpaca's EOS is
    added as a token id by the caller)."""
    check_chat_format(format)
    return response + AIRA_END if format == "aira" else response
