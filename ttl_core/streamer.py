"""Streaming generated text: `TextStreamer` turns the tokens `ttl_core.generate` produces into text pieces."""

from __future__ import annotations

import queue


class TextStreamer:
    """Turns the tokens `generate(..., streamer=...)` produces into text pieces as they arrive.

    The new tokens are decoded as a whole each time, and only the text after what was already emitted is
    handed out, once it decodes stably: text ending in U+FFFD (a multi-byte character whose remaining
    byte-fallback tokens have not arrived yet) waits for the next token. Pieces go to `on_text` when given
    (e.g. `print(piece, end="", flush=True)`) and can also be read by iterating the streamer, typically
    from another thread while `generate` runs; the iteration ends when that generation does. The streamer
    can be reused for the next `generate` call."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, on_text=None, timeout: float | None = None):
        self.tokenizer, self.skip_special_tokens, self.on_text, self.timeout = (
            tokenizer, skip_special_tokens, on_text, timeout)
        self.pieces: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.emitted = 0

    def put(self, token_ids: list[int]) -> None:
        """Take new token ids; emit whatever text they complete."""
        self.tokens.extend(token_ids)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        """Emit what is left (even an incomplete character) and close this generation's iteration."""
        self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens))
        self.pieces.put(None)
        self.tokens, self.emitted = [], 0

    def _emit(self, text: str) -> None:
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        if piece:
            if self.on_text is not None:
                self.on_text(piece)
            self.pieces.put(piece)

    def __iter__(self):
        while (piece := self.pieces.get(timeout=self.timeout)) is not None:
            yield piece
