"""Stop strings over streamed text: the output ends before the first stop string, which is never emitted.

    tokens --DecodeStream--> text pieces --StopStrings.add--> text safe to emit (maybe "") + stopped?

A stop string can span tokens ("END" from "EN" + "D"), so it is matched on text, not on ids. Text
that could still become the start of a stop string is held back until the next piece decides it:
the longest suffix of the pending text that is a prefix of some stop string. Invariant: no stop
string starts before `sent` (any such start would have been held back), so each search starts there
and the work per piece is bounded by the held-back text plus the piece, not by the whole output.
"""
from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...]):
        assert all(stops), "stop strings are non-empty (validated at the edge)"
        self.stops = stops
        self.pending = ""  # decoded text not yet emitted
        self.stopped = False

    def add(self, text: str, final: bool = False) -> str:
        """Append decoded text; return what may be emitted now. After a stop string is found the
        rest of the output is dropped and `stopped` is set; final=True releases what was held."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = 0 if final else self._held_back()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of `pending` that starts some stop string (shorter than it)."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:k]):
                    best = k
                    break
        return best
