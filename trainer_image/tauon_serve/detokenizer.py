"""Incremental detokenization and stop strings for generated sequences (no torch, no FastAPI).

Decoding a sequence's whole output again on every new token costs O(n) per token, O(n²) per sequence,
and a long answer spends more time in the tokenizer than in the model. :class:`IncrementalDetokenizer`
decodes only a short window of the newest tokens instead, the way vLLM's and Hugging Face's incremental
detokenizers do (``prefix_offset`` / ``read_offset``):

* tokens ``[prefix_offset, read_offset)`` have been turned into text already; they stay in the window as
  context, because a token's text can depend on its neighbours (the space a SentencePiece or WordPiece
  token gets or loses at the start of a decode, bytes that only form a character together);
* tokens ``[read_offset, end)`` are new; their text is ``decode(ids[prefix:])`` minus the length of
  ``decode(ids[prefix:read])``.

When the window's text ends in U+FFFD, its last character is a UTF-8 character whose bytes are split
across byte tokens and have not all arrived: the complete characters before it are returned, the offsets
stay, and the next token is decoded together with the held bytes. :meth:`IncrementalDetokenizer.flush`
returns whatever is still held when the sequence ends. The concatenation of every returned piece is the
decode of the whole sequence (tests check it on random token streams of a real tokenizer).

A window whose text keeps ending in U+FFFD (a stream of bytes that never form a character) is not held
for ever: after :data:`MAX_HELD_TOKENS` tokens it is released as it decodes (each invalid byte a U+FFFD, as
the full decode gives them), so a step never decodes more than a bounded window.

The stop-string helpers look only at the end of the text: a stop string that was not in the text before
a step can only end in the text that step added, and the text that may still start one is at most the
longest stop string less one character. Stop strings are bounded (:func:`stop_error`: at most
:data:`MAX_STOP_STRINGS` of at most :data:`MAX_STOP_CHARS` characters each), so a step costs
O(new text x longest stop), whatever the length of the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole UTF-8 character
MAX_HELD_TOKENS = 16  # a UTF-8 character is at most 4 bytes: a longer incomplete window is garbage
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


class IncrementalDetokenizer:
    """Turns one sequence's tokens into text, a few tokens at a time.

    ``decode`` is the tokenizer's decode of a list of ids (special tokens skipped); the caller passes the
    sequence's whole token list, with the newest token last, to :meth:`step` after each append.
    """

    __slots__ = ("_decode", "_prefix_text", "_sent", "prefix_offset", "read_offset")

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text: str | None = ""  # decode(ids[prefix:read]); None = not computed yet
        self._sent = 0  # characters of the current window's new text already returned

    def _new_text(self, ids: Sequence[int]) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        window = self._decode(ids[self.prefix_offset :])
        return window[len(self._prefix_text) :]

    def _advance(self, ids: Sequence[int]) -> None:
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self._prefix_text = None
        self._sent = 0

    def step(self, ids: Sequence[int]) -> str:
        """The text that ``ids[-1]`` completes ("" while a character is incomplete)."""
        new = self._new_text(ids)
        if new and not new.endswith(REPLACEMENT):
            out = new[self._sent :]
            self._advance(ids)
            return out
        if len(ids) - self.read_offset > MAX_HELD_TOKENS:  # bytes that never form a character
            out = new[self._sent :]
            self._advance(ids)
            return out
        complete = len(new.rstrip(REPLACEMENT))
        if complete <= self._sent:
            return ""
        out = new[self._sent : complete]
        self._sent = complete
        return out

    def flush(self, ids: Sequence[int]) -> str:
        """The sequence has ended: the text still held back (an incomplete character decodes as U+FFFD)."""
        if self.read_offset >= len(ids):
            return ""
        out = self._new_text(ids)[self._sent :]
        self._advance(ids)
        return out


def stop_error(stops: Sequence[str]) -> str | None:
    """Why these stop strings are refused, or None: at most MAX_STOP_STRINGS, each 1..MAX_STOP_CHARS."""
    if len(stops) > MAX_STOP_STRINGS:
        return f"stop has {len(stops)} entries; at most {MAX_STOP_STRINGS} are allowed"
    for s in stops:
        if not s:
            return "stop strings must not be empty"
        if len(s) > MAX_STOP_CHARS:
            return f"a stop string has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed"
    return None


def find_stop(text: str, stops: Sequence[str], new_from: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` that ends at or after ``new_from`` (the start of the
    text added by this step; earlier text was checked before), or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not sent yet).

    Only ends of a stop's prefixes that equal the last character of ``text`` are tried, each compared
    over at most the stop's length: O(occurrences x stop length), independent of ``len(text)``."""
    if not text:
        return 0
    last = text[-1]
    keep = 0
    for s in stops:
        # k - 1 = the index in s of a character equal to text[-1], for k from the longest down
        end = min(len(s) - 1, len(text))
        i = s.rfind(last, 0, end)
        while i >= 0 and i + 1 > keep:
            k = i + 1
            if text.endswith(s[:k]):
                keep = k
                break
            i = s.rfind(last, 0, i)
    return keep
