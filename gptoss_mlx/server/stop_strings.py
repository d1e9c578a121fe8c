"""Chat Completions `stop` sequences, matched on the visible text as it streams.

OpenAI's rule: generation stops where a stop sequence appears, and the returned text ends before
it. With harmony the visible text is the answer (and commentary preambles); the chain of thought
is not matched, so a stop word the model merely thinks about does not cut its answer. Text that
might be the start of a stop sequence is held back until the next delta decides.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed visible text pieces; get back what may be shown now, and whether a stop was hit."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit; after a stop, the text before it and nothing more."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of the stream (or of a message: stops do not span
        messages)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
