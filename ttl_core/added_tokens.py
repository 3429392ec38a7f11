"""Finding the special and added tokens written in a text, as transformers 5 does (the `tokenizers` library's
AddedVocabulary, which its LlamaTokenizer runs before the model sees the text).

The tokens marked `normalized: false` are found first, in the whole text; then those marked `normalized: true`, in
the text between (the LlamaTokenizer has no normalizer, so that text is unchanged). In each pass the tokens are
found leftmost-longest, one after another, before their flags are read: a match that is not a whole word where the
token must be one (`single_word`), or a special token's match with `split_special_tokens`, stays text as it is
found, and no shorter token inside it is looked for. `lstrip` / `rstrip` then take the whitespace before / after a
match, though not whitespace the previous match already took. Words and whitespace are those of the library's
regexes: Unicode `\\w` and White_Space, which are not Python's `\\w` and `\\s`. Known difference: a character
that Python's Unicode database (`unicodedata.unidata_version`, 14.0 in Python 3.11) does not yet know but the
`tokenizers` library's does (letters assigned since, e.g. CJK extensions H and I) is no word character for ttl, so a
`single_word` token beside one is matched where transformers leaves it.
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


def is_word_character(c: str) -> bool:
    """Whether the character `c` is in Unicode `\\w` (the `tokenizers` library's): letters, marks, decimal digits,
    letter numbers, connector punctuation, the zero-width joiner and non-joiner, and the other alphabetic
    characters. Python's `\\w` differs: it has other numbers ("①", "²") and lacks marks and most of the rest."""
    category = unicodedata.category(c)
    return (category[0] in "LM" or category in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"
            or any(a <= ord(c) <= b for a, b in _ALPHABETIC_SYMBOLS))


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
