"""The text of generated tokens on the host: `TextStreamer` turns the tokens `ttl_core.generate` produces into
text pieces as they arrive, `StopStrings` finds where a stop string ends a row, and `HostWatch` feeds both, and
transformers' `stopping_criteria`, from a generation's decoding state."""

from __future__ import annotations

import queue
from typing import Any, Callable, Iterator

import torch

from .errors import GenerationError
from .tokenizer import BYTE_PIECE, piece_bytes


def vocabulary_end(tokenizer: object) -> int | None:
    """The first id past `tokenizer`'s tokens (ttl's `Tokenizer` or a transformers tokenizer), added ones included
    (None when it does not say)."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)


def piece_lookup(tokenizer: object) -> Callable[[int], str] | None:
    """`tokenizer`'s id -> piece function: ttl's `Tokenizer.id_to_token` or a transformers tokenizer's
    `convert_ids_to_tokens` (None when it has neither)."""
    return getattr(tokenizer, "id_to_token", None) or getattr(tokenizer, "convert_ids_to_tokens", None)


def in_vocabulary(token: int, end: int | None) -> bool:
    """Whether `token` is below `end` (see `vocabulary_end`): ids past it, rows of a model's larger embedding
    table, decode to no text and have no piece."""
    return end is None or token < end


class TextStreamer:
    """Turns the tokens `generate(..., streamer=...)` produces into text pieces as they arrive.

    It follows transformers' streamer protocol (`BaseStreamer`), which ttl's `generate` and transformers'
    `generate()` both speak: `put(LongTensor)` with the prompt, (1, prompt_len), first, then with each
    step's new token(s), then `end()`. Like transformers' streamers with `skip_prompt=True`, it skips the
    first tensor of each generation (the prompt) and hands out the text of the new tokens only; one row
    only. A list of ints (ttl's earlier protocol, e.g. put by hand) is new token ids, never a prompt: code
    written for that protocol puts no prompt, and would otherwise lose its first tokens without a word.

    The new tokens are decoded as a whole each time, and only the text after what was already emitted is
    handed out, once it decodes stably: while the newest token that shows in the text (skipped special
    tokens do not end a run) is a byte-fallback piece (whose run a later byte may still complete, or make
    invalid UTF-8, which decodes to one U+FFFD a byte as in transformers; ids past the tokenizer's vocabulary
    show no text either), or while the text ends in U+FFFD, it waits for the next token. ttl's `Tokenizer` and
    transformers tokenizers both work. Pieces go to `on_text` when given (e.g. `print(piece, end="",
    flush=True)`) and can also be read by iterating the streamer, typically from another thread while
    `generate` runs; the iteration ends when that generation does, even when it fails. The streamer can be
    reused for the next `generate` call."""

    def __init__(self, tokenizer: object, skip_special_tokens: bool = True,
                 on_text: Callable[[str], None] | None = None, timeout: float | None = None):
        self.tokenizer, self.skip_special_tokens, self.on_text, self.timeout = (
            tokenizer, skip_special_tokens, on_text, timeout)
        self._piece = piece_lookup(tokenizer)
        skipped = getattr(tokenizer, "special_ids", None) or getattr(tokenizer, "all_special_ids", ())
        self._skipped = frozenset(skipped) if skip_special_tokens else frozenset()
        self._vocab_end = vocabulary_end(tokenizer)
        self.pieces: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.emitted = 0
        self._prompt_next = True  # whether a tensor put now is a generation's prompt

    def put(self, value: torch.Tensor | list[int]) -> None:
        """Take a generation's prompt (skipped) or new tokens (see the class docstring); emit whatever text
        the new tokens complete."""
        prompt, self._prompt_next = self._prompt_next, False
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 and value.shape[0] > 1:
                raise GenerationError(f"TextStreamer follows one row; got tokens for {value.shape[0]} rows")
            if prompt:
                return
            value = value.reshape(-1).tolist()
        self.tokens.extend(value)
        # a run of byte-fallback pieces is final only once a token that shows and is no byte ends it
        shown = next((t for t in reversed(self.tokens) if self._shows_text(t)), None)
        if shown is not None and self._piece is not None and BYTE_PIECE.fullmatch(self._piece(shown)):
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def _shows_text(self, token: int) -> bool:
        return token not in self._skipped and in_vocabulary(token, self._vocab_end)

    def end(self) -> None:
        """Emit what is left (even an incomplete character) and close this generation's iteration."""
        try:
            self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens))
        finally:  # a reader waits for the end mark, whatever went wrong before it
            self.pieces.put(None)
            self.tokens, self.emitted, self._prompt_next = [], 0, True

    def _emit(self, text: str) -> None:
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        if piece:
            if self.on_text is not None:
                self.on_text(piece)
            self.pieces.put(piece)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.pieces.get(timeout=self.timeout)) is not None:
            yield piece


class StopStrings:
    """transformers' `StopStringCriteria` on the host: a row stops once one of `strings` occurs in the UTF-8
    bytes of its tokens, the prompt's included, and that occurrence ends within the newest token.

    A token's bytes are what it adds to a text, read from its sentencepiece piece as transformers' "clean"
    vocabulary reads them: a `<0xNN>` piece is that byte, `▁` is a space (also in a first token, where
    `decode` would drop it) and special and added tokens (`</s>`, `<|endofcompletion|>`) are their own text
    (which `decode` skips). The pieces come from `tokenizer.id_to_token` (ttl's `Tokenizer`) or
    `tokenizer.convert_ids_to_tokens` (a transformers tokenizer). An id past the tokenizer (a model's larger
    embedding table may sample one) has no piece: as in transformers, no stop string ends in it or spans it."""

    def __init__(self, strings: str | list[str], tokenizer: object):
        strings = [strings] if isinstance(strings, str) else strings
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            raise GenerationError(f"stop_strings must be a non-empty string or a list of them, got {strings!r}")
        if tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer to read the text of the generated tokens")
        self._piece = piece_lookup(tokenizer)
        if self._piece is None:
            raise GenerationError(f"stop_strings need a tokenizer with id_to_token (ttl's Tokenizer), got a "
                                  f"{type(tokenizer).__name__}")
        self._vocab_end = vocabulary_end(tokenizer)
        self.targets = [s.encode("utf-8") for s in strings]
        # transformers looks at this many last tokens; every piece adds at least one byte, so any match fits
        self.window = max(map(len, self.targets))
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes token `token` adds to a text (see the class docstring)."""
        if token not in self._bytes:
            self._bytes[token] = piece_bytes(self._piece(token))
        return self._bytes[token]

    def ends_in_last(self, tokens: list[int]) -> bool:
        """Whether a stop string ends within the last of `tokens` (a row's tokens, oldest first)."""
        window = tokens[-self.window:]
        for i in reversed(range(len(window))):  # a match can neither end in nor span an id past the tokenizer
            if not in_vocabulary(window[i], self._vocab_end):
                window = window[i + 1:]
                break
        if not window:
            return False
        parts = [self.token_bytes(t) for t in window]
        text = b"".join(parts)
        newest = len(text) - len(parts[-1])  # where the last token's bytes begin
        return any(target in text[max(0, newest + 1 - len(target)):] for target in self.targets)


def checked_criteria(stopping_criteria: Any) -> list[Callable] | None:
    """transformers' `stopping_criteria` (its StoppingCriteriaList, or a list of callables `(rows so far, scores)` ->
    a bool for all rows or one per row) as a list; None for none."""
    criteria = list(stopping_criteria) if isinstance(stopping_criteria, (list, tuple)) else (
        [] if stopping_criteria is None else [stopping_criteria])
    wrong = next((criterion for criterion in criteria if not callable(criterion)), None)
    if wrong is not None:
        raise GenerationError(f"stopping_criteria must be callables (input_ids, scores) -> done, got a "
                              f"{type(wrong).__name__}")
    return criteria or None


def host_watch(state: Any, input_ids: torch.Tensor, streamer: Any, stops: StopStrings | None,
               criteria: list[Callable] | None) -> HostWatch | None:
    """The `HostWatch` of a generation, which puts the prompt to the `streamer` now (call it before the prefill, as
    transformers' streamer gets the prompt first); None where nothing needs the new tokens on the host."""
    wanted = streamer is not None or stops is not None or criteria
    return HostWatch(state, input_ids, streamer, stops, criteria) if wanted else None


class HostWatch:
    """Per-step host work of `ttl_core.generate` that needs the new tokens: feeding a streamer (as transformers'
    `generate()` does: the prompt first, then each step's new token, as CPU LongTensors), looking for stop
    strings and asking transformers' stopping `criteria`, which finish a row through the decoding `state` (its `out`
    tokens, `finished` rows and `finish_row`). It keeps each row's last tokens (from the prompt on) on the host, so a
    step reads only the newest column (criteria read the whole rows)."""

    def __init__(self, state: Any, input_ids: torch.Tensor, streamer: Any, stops: StopStrings | None,
                 criteria: list[Callable] | None = None):
        self.state, self.streamer, self.stops, self.criteria, self.prompt = state, streamer, stops, criteria, input_ids
        self.rows = [row[-stops.window:] for row in input_ids.tolist()] if stops is not None else []
        if streamer is not None:
            streamer.put(input_ids.cpu())  # (1, prompt_len), left padding included, as transformers puts it

    def __call__(self, produced: int, accepted: int | None = None) -> None:
        """After `produced` new tokens: the newest, or, from a prompt-lookup step, the `accepted` newest, which go to
        the streamer as one (1, accepted) tensor and are checked for stop strings at their end only, as
        transformers' assisted decoding does."""
        # a copy (the step's one read of the device): a view of `out`, which later calls overwrite, would
        # change under a streamer that keeps what it is given
        newest = self.state.out[:, produced - 1 if accepted is None else slice(produced - accepted, produced)]
        newest = newest.to("cpu", copy=True)
        if self.streamer is not None:
            self.streamer.put(newest)
        if self.criteria:
            self._ask_criteria(produced)
        if self.stops is None:
            return
        for row, (tokens, added, done) in enumerate(zip(self.rows, newest.view(len(self.rows), -1).tolist(),
                                                        self.state.finished.tolist())):
            tokens.extend(added)
            del tokens[:-self.stops.window]
            if not done and self.stops.ends_in_last(tokens):
                self.state.finish_row(row, produced)

    def _ask_criteria(self, produced: int) -> None:
        """As transformers' generate() does after each new token: each criterion sees the rows so far (prompt and
        padding included, finished rows padded) and a row any of them calls done finishes. The scores are None: ttl
        keeps no step's scores unless asked to return them."""
        rows = torch.cat([self.prompt, self.state.out[:, :produced]], dim=1)
        done = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for criterion in self.criteria:
            answer = criterion(rows, None)
            try:
                verdict = torch.as_tensor(answer, dtype=torch.bool, device=rows.device)
            except (TypeError, ValueError, RuntimeError):
                verdict = None
            if verdict is None or verdict.shape not in ((), (1,), (len(rows),)):
                got = f"a {type(answer).__name__}" if verdict is None else f"shape {tuple(verdict.shape)}"
                raise GenerationError(f"a stopping criterion must return one bool or one per row ({len(rows)}), got "
                                      f"{got} from {_criterion_name(criterion)}")
            done |= verdict
        for row in (done & ~self.state.finished).nonzero().flatten().tolist():
            self.state.finish_row(row, produced)


def _criterion_name(criterion: Callable) -> str:
    """A stopping criterion as its function or class name, for an error."""
    return getattr(criterion, "__name__", type(criterion).__name__)
