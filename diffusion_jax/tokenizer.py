"""Word-level tokenizer over a closed caption vocabulary.

Why word-level rather than bytes: the captions the project trains on (the glyphs dataset)
come from six templates over 68 words, so a caption is at most 15 tokens instead of ~80 bytes
(self- and cross-attention cost on the 2-core CPU falls with the square and the length),
each attribute is one token the model can attend to directly instead of a spelling it must
learn, and a word the model never saw can be reported as such, with the nearest known
words, instead of being silently spelled out.

Words are maximal runs of ASCII letters and digits (``words``): punctuation separates
words and is dropped. Case matters ("a" is the article, "A" the letter). Ids: 0 = padding
(``PAD_ID``; the text encoder's mask is ``ids != 0``), 1 = unknown (``UNK_ID``), then the
vocabulary in its stored order. A caption of n words becomes n ids followed by padding up
to ``max_length``; the empty caption is all padding, the null condition of
classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = ("<pad>", "<unk>")
_WORD = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> list[str]:
    """The words of ``text``: maximal runs of ASCII letters and digits, case kept."""
    return _WORD.findall(text)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Maps captions to int32 ids [max_length] and back (picklable, for grain workers)."""

    vocabulary: tuple[str, ...]
    max_length: int

    def __post_init__(self):
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("the vocabulary has repeated words")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the text encoder's table size."""
        return len(self.vocabulary) + len(SPECIAL_TOKENS)

    @property
    def _ids(self) -> dict[str, int]:
        return {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(self.vocabulary)}

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary, in order."""
        ids = self._ids
        return [w for w in words(text) if w not in ids]

    def explain_unknown(self, text: str) -> str:
        """One line per unknown word with its closest known words, or "" if none."""
        lines = []
        for word in dict.fromkeys(self.unknown_words(text)):
            close = difflib.get_close_matches(word, self.vocabulary, n=3, cutoff=0.5)
            if not close:  # case slips ("a" for "A") are the commonest miss
                close = [w for w in self.vocabulary if w.lower() == word.lower()]
            hint = f"closest known: {', '.join(close)}" if close else "no close known word"
            lines.append(f"unknown word {word!r} ({hint})")
        if not lines:
            return ""
        return (
            f"caption {text!r} has words outside the {len(self.vocabulary)}-word vocabulary "
            f"the model was trained on:\n  " + "\n  ".join(lines)
        )

    def encode(self, text: str, strict: bool = True) -> np.ndarray:
        """Ids [max_length], int32. ``strict``: unknown words and captions longer than
        max_length raise ValueError (with the closest known words); else unknown words
        become ``UNK_ID`` and long captions are cut."""
        if strict and self.unknown_words(text):
            raise ValueError(self.explain_unknown(text))
        ids = self._ids
        tokens = [ids.get(w, UNK_ID) for w in words(text)]
        if len(tokens) > self.max_length:
            if strict:
                raise ValueError(
                    f"caption {text!r} has {len(tokens)} words but the model reads at most "
                    f"max_length={self.max_length}; shorten it"
                )
            tokens = tokens[: self.max_length]
        out = np.full((self.max_length,), PAD_ID, np.int32)
        out[: len(tokens)] = tokens
        return out

    def encode_batch(self, texts: Iterable[str], strict: bool = True) -> np.ndarray:
        """Ids [N, max_length] of several captions."""
        rows = [self.encode(t, strict) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, self.max_length), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces; padding dropped, unknown as <unk>."""
        table = SPECIAL_TOKENS + self.vocabulary
        return " ".join(table[int(i)] for i in ids if int(i) != PAD_ID)


__all__ = ("Tokenizer", "words", "PAD_ID", "UNK_ID", "SPECIAL_TOKENS")
