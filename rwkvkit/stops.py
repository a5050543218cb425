"""Stop conditions: token ids (as ChatRWKV's ``token_stop``) and stop strings matched on the text.

A stop string may arrive split over several tokens, so text that could be its beginning is held
back from the stream until the next tokens show whether it completes (then generation stops and it
is dropped) or not (then it is released).
"""

from __future__ import annotations

from typing import Any, Sequence

from rwkvkit.errors import InputError
from rwkvkit.penalties import is_int


def split_stops(stops: Sequence[Any], option: str = "token_stop") -> tuple[frozenset[int], tuple[str, ...]]:
    """``(ids, strings)`` from a list mixing token ids and non-empty strings; anything else
    (floats, bools, None) is refused naming ``option``."""
    if isinstance(stops, (str, bytes)) or not isinstance(stops, Sequence):
        raise InputError(f"{option}={stops!r:.80}: expected a list of token ids and/or stop strings, e.g. [0] or ['\\n\\n']")
    bad = [s for s in stops if not (is_int(s) or (isinstance(s, str) and s))]
    if bad:
        raise InputError(f"{option} has {bad[:5]!r}: expected token ids (integers) or non-empty stop strings")
    return frozenset(int(s) for s in stops if not isinstance(s, str)), tuple(s for s in stops if isinstance(s, str))


class StopText:
    """Text released for streaming, holding back any tail that could begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = stops
        self.held = ""
        self.matched: str | None = None  # the stop string found, once found

    def feed(self, piece: str) -> str:
        """The part of ``held + piece`` that is safe to emit now (up to a stop string, if one completed)."""
        text = self.held + piece
        found = [(text.find(s), -len(s), s) for s in self.stops if s in text]
        if found:
            at, _, self.matched = min(found)
            self.held = ""
            return text[:at]
        cut = len(text) - self._partial(text)
        self.held = text[cut:]
        return text[:cut]

    def _partial(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = min(len(text), max(map(len, self.stops), default=1) - 1)
        return next((k for k in range(longest, 0, -1) if any(s.startswith(text[-k:]) for s in self.stops)), 0)

    def flush(self) -> str:
        """What was held back, when generation ends without completing a stop string."""
        held, self.held = self.held, ""
        return held
