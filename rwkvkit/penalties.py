"""ChatRWKV's logit processing before sampling: banned tokens, then presence and frequency
penalties over occurrence counts that decay with every generated token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from numbers import Integral, Real
from typing import Collection, Sequence

import numpy as np
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


def _host_index(per_row: Sequence[Collection[int]], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) arrays of row i's ids ``per_row[i]``, filled from the id collections without a
    Python loop over the ids, and checked here: an out-of-range index on a GPU is a device-side
    assert, not an error."""
    sizes = [len(row_ids) for row_ids in per_row]
    ids = np.fromiter(chain.from_iterable(per_row), dtype=np.int64, count=sum(sizes))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"penalised token id(s) {ids[(ids < 0) | (ids >= vocab)][:5].tolist()} outside the vocabulary 0..{vocab - 1}")
    return np.repeat(np.arange(len(sizes)), sizes), ids


def _device_index(rows: np.ndarray, ids: np.ndarray, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``like[rows, ids]``'s index on ``like``'s device, both arrays in one host-to-device copy."""
    return tuple(torch.from_numpy(np.stack([rows, ids])).to(like.device))


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
        """A penalised copy of ``logits [V]``."""
        return Penalties.apply_batch(logits[None], [self])[0]

    @staticmethod
    def apply_batch(logits: torch.Tensor, penalties: Sequence[Penalties]) -> torch.Tensor:
        """A penalised copy of ``logits [B, V]``, row i by ``penalties[i]`` (bit for bit what
        ``penalties[i].apply(logits[i])`` gives): every row's bans are one indexed write and every
        row's counts one indexed subtraction, so a step costs the same few ops at any batch size."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(penalties):
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"apply_batch takes logits [B, V] and B penalties, got {got} and {len(penalties)}")
        out = logits.clone()
        rows, ids = _host_index([p.ban for p in penalties], out.shape[-1])
        if ids.size:
            out[_device_index(rows, ids, out)] = -float("inf")
        rows, ids = _host_index([p.counts for p in penalties], out.shape[-1])
        if ids.size:
            counts = np.fromiter(chain.from_iterable(p.counts.values() for p in penalties), dtype=np.float64, count=ids.size)
            presence, frequency = np.array([[p.presence, p.frequency] for p in penalties])[rows].T
            # presence + count * frequency in double, rounded once to the logits' dtype, as
            # ChatRWKV's Python floats are (two separate ops: no fused multiply-add)
            amounts = torch.from_numpy(counts * frequency + presence).to(out.device, out.dtype)
            out[_device_index(rows, ids, out)] -= amounts
        return out

    def update(self, token: int, text: str) -> None:
        """Record a generated token whose decoded text is ``text``."""
        for t in self.counts:
            self.counts[t] *= self.decay
        self.counts[token] = self.counts.get(token, 0.0) + (0.0 if text in _FREE_TEXT else 1.0)
