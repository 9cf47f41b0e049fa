"""Generated token ids -> text as it grows: stream-safe deltas and stop strings.

Streaming cannot print ``decode(token)`` per token. Gemma's decoder maps ``▁`` to a space, then turns each
run of byte-fallback pieces (``<0x..>``) into text *as a whole* — a run that is not valid UTF-8 yet decodes to
one U+FFFD per byte, and becomes a character when its last byte arrives — then fuses the pieces. So text is
final up to the last ordinary piece: a sequence decodes as the concatenation of its parts cut after such a
piece. Each step decodes only the tokens since the last cut (usually just the new one); byte pieces and
special tokens (which are skipped, and would join the byte runs on both sides) wait for the next ordinary
piece. For tokenizers without byte fallback a trailing U+FFFD also waits.

Stop strings (OpenAI's ``stop``) are found in the decoded text; the answer is cut before the first one, and
streaming holds back the last ``len(longest stop) - 1`` characters until it is clear they do not begin one.
They are looked for after byte pieces too (the text the tokens would decode to, were the answer to end there),
so a stop string whose last character comes in bytes ends the answer at its last byte.
The final text is always ``decode(all tokens)`` (cut at a stop string), which is what ``gemma3vl generate``
prints for the same tokens.

With ``min_tokens`` (vLLM's ``min_tokens``, transformers' ``min_new_tokens``), a stop string counts only where it
ends after the text of the first ``min_tokens`` tokens, as vLLM looks for stop strings only in the text of the
tokens past the minimum (one may begin before it). With ``include_stop`` (vLLM's ``include_stop_str_in_output``) the
text is cut after the stop string instead of before it. With ``skip_special=False`` (vLLM's
``skip_special_tokens: false``) special tokens are text like any other (``<start_of_image>``); only byte pieces
then hold the text back.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

REPLACEMENT = "\ufffd"


_TOKEN_CLASSES_CACHE: dict[int, tuple[weakref.ref, tuple[frozenset[int], frozenset[int]]]] = {}
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _token_classes(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """(byte-fallback piece ids, every id after which the text is not final yet), cached per tokenizer (the hub
    vocabulary has 262k pieces)."""
    cached = _TOKEN_CLASSES_CACHE.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer:
        return cached[1]
    byte_ids = frozenset(index for piece, index in tokenizer.get_vocab().items() if BYTE_PIECE.match(piece))
    ids = set(byte_ids)
    ids.update(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(index for index, token in added.items() if getattr(token, "special", False))
    result = (byte_ids, frozenset(ids))
    try:
        _TOKEN_CLASSES_CACHE[id(tokenizer)] = (weakref.ref(tokenizer), result)
    except TypeError:  # not weak-referenceable: compute again next time
        pass
    return result


def unsettled_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids after which the text is not final yet: byte-fallback pieces and special tokens.

    Special tokens are every id ``decode(skip_special_tokens=True)`` skips: the added tokens marked special
    (``added_tokens_decoder``), not only ``all_special_ids``, which leaves out ``<start_of_turn>`` and
    ``<end_of_turn>``: a byte run on both sides of a skipped token decodes as one run, so the text before such a
    token is not final either."""
    return _token_classes(tokenizer)[1]


class IncrementalText:
    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...] = (), min_tokens: int = 0,
                 include_stop: bool = False, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self._stop_cut: int | None = None  # where the text ends at its stop string (after it with include_stop)
        # where the text of the first min_tokens tokens ends: a stop string must end past it (None: not known yet)
        self._minimum_end: int | None = 0 if min_tokens == 0 else None
        self.token_ids: list[int] = []
        self.text = ""  # the final part of the decoded text: token_ids[:_settled] decode to it
        self.stop_index: int | None = None  # where the first stop string starts in ``text``
        self._settled = 0
        self.skip_special = skip_special
        self._byte_ids, self._unsettled_ids = _token_classes(tokenizer)
        if not skip_special:  # (a special token is text then: it no longer joins the byte runs on its two sides)
            self._unsettled_ids = self._byte_ids
        self._emitted = ""
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> bool:
        """Append one generated token; True once a stop string has appeared in the text.

        A byte piece leaves the text unsettled (a later byte may still turn a character of its run into U+FFFD),
        but a stop string is looked for at once in the text the tokens decode to now: should the answer end here,
        that is its text, so a stop string in it ends the answer with this token, as ``stop`` (not at the next
        ordinary piece, tokens past the stop, nor, at the token limit, as ``length``). A special token adds no
        text, so it cannot complete a stop string."""
        self.token_ids.append(token_id)
        if self.stop_index is not None:
            return True
        if self._minimum_end is None and len(self.token_ids) == self.min_tokens and self.stop_strings:
            self._minimum_end = len(self._decode(self.token_ids))
        unsettled = token_id in self._unsettled_ids
        if unsettled and not (self.stop_strings and token_id in self._byte_ids):
            return False
        tail = self._decode(self.token_ids[self._settled:])
        if tail.endswith(REPLACEMENT):
            return False
        searched_from = max(0, len(self.text) - self._hold)
        if unsettled and self._find_stop(self.text[searched_from:] + tail, offset=searched_from) is None:
            return False  # (the text stays unsettled)
        self.text += tail
        self._settled = len(self.token_ids)
        found = self._find_stop(self.text, searched_from)
        if found is not None:
            self.stop_index, self._stop_cut = found[0], found[1 if self.include_stop else 0]
        return self.stop_index is not None

    def _find_stop(self, text: str, start: int = 0, offset: int = 0) -> tuple[int, int] | None:
        """Where the first stop string in ``text[start:]`` begins and ends, of those ending past the minimum's text
        (``text`` being the answer's text from its character ``offset`` on); two beginning at one place: the
        shorter."""
        if self._minimum_end is None:
            return None
        found = [(i, i + len(s)) for s in self.stop_strings
                 if (i := text.find(s, max(start, self._minimum_end - offset - len(s) + 1))) >= 0]
        return min(found) if found else None

    def final_text(self) -> str:
        """``decode(all tokens)``, cut before the first stop string (after it with ``include_stop``)."""
        text = self._decode(self.token_ids)
        found = self._find_stop(text)
        return text if found is None else text[:found[1 if self.include_stop else 0]]

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet that can no longer change (everything left when ``final``)."""
        if final:
            text = self.final_text()
            if not text.startswith(self._emitted):
                return ""  # the decoder rewrote already-streamed text (never seen with Gemma tokenizers)
        elif self._stop_cut is not None:
            text = self.text[: self._stop_cut]
        else:
            text = self.text[: max(len(self._emitted), len(self.text) - self._hold)]
        out = text[len(self._emitted):]
        self._emitted += out
        return out
