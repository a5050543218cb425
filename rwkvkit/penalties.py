"""ChatRWKV's logit processing before sampling: banned tokens, then presence and frequency
penalties over occurrence counts that decay with every generated token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Sequence

import torch

from rwkvkit.errors import InputError

# ChatRWKV counts a token whose text is a substring of this with weight 0 (spaces, tabs, digits,
# and the empty string): they still get the presence penalty, but no frequency build-up.
_FREE_TEXT = " \t0123456789"


def _number(name: str, value: float, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and low <= value <= high):
        bound = f" in [{low:g}, {high:g}]" if math.isfinite(low) else ""
        raise InputError(f"{name}={value!r}: expected a finite number{bound}")
    return float(value)


def is_int(value: object) -> bool:
    """An integer (numpy ints too); ``True``/``False`` are not ids, counts or sizes."""
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass
class Penalties:
    """Checked on construction; ``check`` adds what needs the model (ids within the vocabulary)."""

    presence: float = 0.0  # subtracted once a token has occurred
    frequency: float = 0.0  # subtracted per (decayed) occurrence
    decay: float = 1.0  # every count is multiplied by this after each generated token
    ban: Sequence[int] = ()
    counts: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.presence = _number("alpha_presence", self.presence)
        self.frequency = _number("alpha_frequency", self.frequency)
        self.decay = _number("alpha_decay", self.decay, 0.0, 1.0)
        if isinstance(self.ban, (str, bytes)) or not isinstance(self.ban, Sequence):
            raise InputError(f"token_ban={self.ban!r:.80}: expected a list of token ids")
        bad = [t for t in self.ban if not is_int(t)]
        if bad:
            raise InputError(f"token_ban has non-integer value(s) {bad[:5]!r}: expected token ids")
        self.ban = [int(t) for t in self.ban]

    def check(self, vocab_size: int) -> None:
        bad = [t for t in self.ban if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"token_ban has id(s) {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A penalised copy of ``logits``."""
        out = logits.clone()
        if self.ban:
            out[list(self.ban)] = -float("inf")
        if self.counts:
            ids = torch.tensor(list(self.counts), device=out.device)
            # computed in double, rounded once to the logits' dtype, as ChatRWKV's Python floats are
            amounts = [self.presence + c * self.frequency for c in self.counts.values()]
            out[ids] -= torch.tensor(amounts, dtype=torch.float64).to(out.dtype)
        return out

    def update(self, token: int, text: str) -> None:
        """Record a generated token whose decoded text is ``text``."""
        for t in self.counts:
            self.counts[t] *= self.decay
        self.counts[token] = self.counts.get(token, 0.0) + (0.0 if text in _FREE_TEXT else 1.0)
