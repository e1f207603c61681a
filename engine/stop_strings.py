"""Stop strings matched on decoded text across token boundaries.

Text that might be the start of a stop string is held back until the next piece decides it: either the
stop string completes (the text before it is released, the stop string never is) or it cannot (the held
text is released). So a client never sees a prefix of a stop string that later completes.
"""

from __future__ import annotations


class StopMatcher:
    """Feed decoded text with `push`; it returns (text safe to emit, matched stop string or None)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> tuple[str, str | None]:
        if not self.stops:
            return text, None
        buf = self._held + text
        # The first stop string to complete (reading left to right) wins, the longer one on a tie: the
        # result does not depend on how the text was split into tokens.
        match_at, match_end, matched = -1, -1, None
        for stop in self.stops:
            i = buf.find(stop)
            end = i + len(stop)
            if i >= 0 and (matched is None or end < match_end or (end == match_end and i < match_at)):
                match_at, match_end, matched = i, end, stop
        if matched is not None:
            self._held = ""
            return buf[:match_at], matched
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release held text (generation ended for another reason)."""
        text, self._held = self._held, ""
        return text

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[len(buf) - n :]
            if any(len(stop) > n and stop.startswith(tail) for stop in self.stops):
                return n
        return 0
