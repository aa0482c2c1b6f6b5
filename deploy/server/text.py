"""Generated ids to text, as they stream: UTF-8 that splits across tokens, and stop strings.

A stop string can only be known to match once all of it has been generated, so the last
(longest stop - 1) characters are held back until they cannot be the start of one.
"""

from __future__ import annotations

import codecs

from model_shards.tokenizer import tokenizer


def token_bytes(token_id: int) -> bytes:
    return tokenizer().decode_single_token_bytes(token_id)


def token_text(token_id: int) -> str:
    """One token as text (a token holding part of a UTF-8 character shows as U+FFFD)."""
    return token_bytes(token_id).decode("utf-8", errors="replace")


class StopFilter:
    """Text deltas in, visible text deltas out; `stopped` once a stop string appeared."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        hits = [(self._pending.find(s), s) for s in self.stops if s in self._pending]
        if hits:
            at = min(index for index, _ in hits)
            visible, self._pending, self.stopped = self._pending[:at], "", True
            return visible
        cut = len(self._pending) - self._hold if self._hold else len(self._pending)
        visible, self._pending = self._pending[:max(cut, 0)], self._pending[max(cut, 0):]
        return visible

    def flush(self) -> str:
        """The held-back tail, once generation ended without a match."""
        visible, self._pending = ("" if self.stopped else self._pending), ""
        return visible


class Detokenizer:
    """Token ids in, text deltas out (bytes of an unfinished character wait for the next token)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
