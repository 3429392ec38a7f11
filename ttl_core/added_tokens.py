"""Finding the special and added tokens written in a text, as transformers 5 does (the `tokenizers` library's
AddedVocabulary, which its LlamaTokenizer runs before the model sees the text).

The tokens marked `normalized: false` are found first, in the whole text; then those marked `normalized: true`, in
the text between (the LlamaTokenizer has no normalizer, so that text is unchanged). In each pass the tokens are
found leftmost-longest, one after another, before their flags are read: a match that is not a whole word where the
token must be one (`single_word`), or a special token's match with `split_special_tokens`, stays text as it is
found, and no shorter token inside it is looked for. `lstrip` / `rstrip` then take the whitespace before / after a
match, though not whitespace the previous match already took. Words and whitespace are those of the library's
regexes: Unicode `\\w` and White_Space (of Unicode 16.0), which are not Python's `\\w` and `\\s`.
"""

from __future__ import annotations

import re
import unicodedata

from .tokenizer_config import TokenFlags

# Unicode's White_Space property (the `\s` of tokenizers' regexes); Python's `\s` also has U+001C..U+001F
WHITE_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                        "\u200a\u2028\u2029\u202f\u205f\u3000")
# symbols (category So) that Unicode calls alphabetic, so `\w`: circled and squared Latin letters
_ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))
# the `\w` characters Unicode 15.0 to 16.0 assigned (the tokenizers library's tables, as transformers 5 uses it),
# for a Python whose database predates them (3.11 has Unicode 14.0): there they are unassigned, category Cn
_NEWER_WORD_CHARACTERS = (
    (0x897, 0x897), (0xCF3, 0xCF3), (0xECE, 0xECE), (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC),
    (0x105C0, 0x105F3), (0x10D40, 0x10D65), (0x10D69, 0x10D6D), (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4),
    (0x10EFC, 0x10EFF), (0x1123F, 0x11241), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113C0), (0x113C2, 0x113C2), (0x113C5, 0x113C5), (0x113C7, 0x113CA),
    (0x113CC, 0x113D3), (0x113E1, 0x113E2), (0x116D0, 0x116E3), (0x11BC0, 0x11BE0), (0x11BF0, 0x11BF9),
    (0x11F00, 0x11F10), (0x11F12, 0x11F3A), (0x11F3E, 0x11F42), (0x11F50, 0x11F5A), (0x1342F, 0x1342F),
    (0x13440, 0x13455), (0x13460, 0x143FA), (0x16100, 0x16139), (0x16D40, 0x16D6C), (0x16D70, 0x16D79),
    (0x18CFF, 0x18CFF), (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1CCF0, 0x1CCF9), (0x1DF25, 0x1DF2A),
    (0x1E030, 0x1E06D), (0x1E08F, 0x1E08F), (0x1E4D0, 0x1E4F9), (0x1E5D0, 0x1E5FA), (0x2B739, 0x2B739),
    (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF))


def is_word_character(c: str) -> bool:
    """Whether the character `c` is in Unicode `\\w` (the `tokenizers` library's): letters, marks, decimal digits,
    letter numbers, connector punctuation, the zero-width joiner and non-joiner, and the other alphabetic
    characters. Python's `\\w` differs: it has other numbers ("①", "²") and lacks marks and most of the rest."""
    category = unicodedata.category(c)
    ranges = _NEWER_WORD_CHARACTERS if category == "Cn" else _ALPHABETIC_SYMBOLS
    return (category[0] in "LM" or category in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"
            or any(a <= ord(c) <= b for a, b in ranges))


class AddedTokenSplitter:
    """Splits a text at the added and special tokens written in it, as transformers does (see the module
    docstring). `flags` gives each token's flags; `special` the tokens that `split_special_tokens` reads as text."""

    def __init__(self, flags: dict[str, TokenFlags], special: set[str]):
        self._flags, self._special = flags, special
        # of two tokens starting at one place the longer is found (an alternation tries its branches in order)
        self._passes = [re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
                        for tokens in ([t for t, f in flags.items() if not f.normalized],
                                       [t for t, f in flags.items() if f.normalized]) if tokens]

    def split(self, text: str, split_special_tokens: bool = False) -> list[str]:
        """`text` as [text, token, text, ..., text]: the tokens found in it and the text between them (possibly
        empty), less the whitespace a token's flags take."""
        parts = [text]
        for pattern in self._passes:
            parts = [part for k, text in enumerate(parts)
                     for part in ([text] if k % 2 else self._split_once(pattern, text, split_special_tokens))]
        return parts

    def _split_once(self, pattern: re.Pattern, text: str, split_special_tokens: bool) -> list[str]:
        parts, end = [], 0  # end: where the text after the last token kept starts
        for match in pattern.finditer(text):
            token, (start, stop) = match.group(), match.span()
            flags = self._flags[token]
            if split_special_tokens and token in self._special:
                continue
            if flags.single_word and (start > 0 and is_word_character(text[start - 1])
                                      or stop < len(text) and is_word_character(text[stop])):
                continue
            if flags.lstrip:
                while start > end and text[start - 1] in WHITE_SPACE:
                    start -= 1
            if flags.rstrip:
                while stop < len(text) and text[stop] in WHITE_SPACE:
                    stop += 1
            parts += [text[end:start], token]
            end = stop
        return parts + [text[end:]]
