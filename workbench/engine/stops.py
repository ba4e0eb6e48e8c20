"""Stop strings that end a reply and never appear in it, even when split across tokens."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` once a stop string is seen."""
        if self.stopped:
            return ""
        self._pending += text
        # The stop that completes first wins (as generation would halt there); of two that
        # complete together, the one that started earlier. Token boundaries cannot change this.
        hits = [(at + len(s), at) for s in self.stops if (at := self._pending.find(s)) >= 0]
        if hits:
            self.stopped = True
            safe, self._pending = self._pending[: min(hits)[1]], ""
            return safe
        keep = self._partial_stop_length()
        safe = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return safe

    def flush(self) -> str:
        held, self._pending = self._pending, ""
        return "" if self.stopped else held

    def _partial_stop_length(self) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
