"""From token pieces to the text a caller sees: UTF-8 joined, stop strings held back.

A token's piece may end in the middle of a UTF-8 character (byte-level
vocabularies split emoji and most non-Latin scripts), so pieces go through
one incremental decoder per generation. Text that might be the start of a
stop string is held until the next piece says whether it is (then the
answer ends before it) or is not (then it goes out), the way llama.cpp's
server and llama-cpp-python do: a caller never sees part of a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """One generation's text; :meth:`feed` returns what may be sent now."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        #: set once a stop string appeared: the text is complete
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can no longer be part of a stop string."""
        self._held += self._decoder.decode(piece)
        return self._release()

    def finish(self) -> str:
        """The generation ended (not by a stop string): everything still held."""
        self._held += self._decoder.decode(b"", final=True)
        text = self._release()
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _release(self) -> str:
        held = self._held
        if not self._stop:
            self._held = ""
            return held
        first = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            self._held = ""
            return held[:first]
        keep = self._partial_stop(held)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
