"""Turning a growing list of token ids into text deltas, and ending at stop strings.

Byte-level tokenizers split characters across tokens, so decoding one token at a time gives broken
characters. Like TGI and vLLM we decode a short window: the text of tokens [prefix, read) is already
emitted; the text of [prefix, now) minus it is new, unless it ends in an incomplete character (U+FFFD),
in which case we wait for the next token.

Stop strings are matched on the text: the output is cut before the first occurrence, and text that could
still become the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence

INCOMPLETE = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self._prefix, self._read = 0, 0
        self._text = ""      # all text decoded so far
        self._emitted = 0    # characters of _text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text that became final (possibly ''). Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The text still held back, at the end of the generation."""
        return "" if self.stopped else self._release(final=True)

    def _release(self, final: bool = False) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        if self.stop:
            search_from = max(0, self._emitted - max(map(len, self.stop)) + 1)
            hits = [i for i in (self._text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end, self.stopped = min(hits), True
            elif not final:
                end -= self._partial_stop_suffix()
        delta = self._text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @property
    def text(self) -> str:
        return self._text[:self._emitted]
