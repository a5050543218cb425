"""ChatRWKV's logit processing before sampling: banned tokens, then presence and frequency
penalties over occurrence counts that decay with every generated token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Iterator, Mapping, Sequence

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


def _host_index(per_row: Sequence[Sequence[int] | np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) arrays of row i's ids ``per_row[i]`` (lists or arrays), joined without a Python
    loop over the ids, and checked here: an out-of-range index on a GPU is a device-side assert,
    not an error."""
    sizes = [len(row_ids) for row_ids in per_row]
    ids = np.concatenate([np.asarray(row_ids, dtype=np.int64) for row_ids in per_row]) if per_row else np.empty(0, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"penalised token id(s) {ids[(ids < 0) | (ids >= vocab)][:5].tolist()} outside the vocabulary 0..{vocab - 1}")
    return np.repeat(np.arange(len(sizes)), sizes), ids


def _device_index(flat: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``like`` on its device."""
    return torch.from_numpy(flat).to(like.device)


def is_int(value: object) -> bool:
    """An integer (numpy ints too); ``True``/``False`` are not ids, counts or sizes."""
    return isinstance(value, Integral) and not isinstance(value, bool)


class OccurrenceCounts(Mapping[int, float]):
    """Token id -> decayed occurrence count, kept in arrays so that the per-token decay of every
    count is one vectorised multiply instead of a Python loop over the ids seen so far (~0.1-0.3 ms
    per token after ~800 distinct ids: more than a GPU decode step). Each count gets exactly the
    IEEE double operations ChatRWKV's dict does (one multiply per token, one add per occurrence),
    so penalised logits stay bit-identical. Read-only as a Mapping (what samplers see)."""

    def __init__(self, counts: Mapping[int, float] | None = None) -> None:
        self._index: dict[int, int] = {}
        self._ids = np.empty(16, dtype=np.int64)
        self._values = np.empty(16, dtype=np.float64)
        for token, count in (counts or {}).items():
            self.add(token, count)

    def decay(self, factor: float) -> None:
        """Multiply every count by ``factor``."""
        if factor != 1.0:  # x * 1.0 == x: skipping it changes nothing
            self._values[: len(self._index)] *= factor

    def add(self, token: int, amount: float) -> None:
        """Count one more occurrence of ``token`` with weight ``amount``."""
        i = self._index.get(token)
        if i is not None:
            self._values[i] += amount
            return
        i = len(self._index)
        if i == self._ids.size:
            self._ids, self._values = np.resize(self._ids, 2 * i), np.resize(self._values, 2 * i)
        self._index[token], self._ids[i], self._values[i] = i, token, 0.0 + amount

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)``, views in insertion order (valid until the next ``add``)."""
        n = len(self._index)
        return self._ids[:n], self._values[:n]

    def __getitem__(self, token: int) -> float:
        return float(self._values[self._index[token]])

    def __iter__(self) -> Iterator[int]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"OccurrenceCounts({dict(self)!r})"


@dataclass
class Penalties:
    """Checked on construction; ``check`` adds what needs the model (ids within the vocabulary)."""

    presence: float = 0.0  # subtracted once a token has occurred
    frequency: float = 0.0  # subtracted per (decayed) occurrence
    decay: float = 1.0  # every count is multiplied by this after each generated token
    ban: Sequence[int] = ()
    counts: Mapping[int, float] = field(default_factory=OccurrenceCounts)  # kept as OccurrenceCounts

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
        if not isinstance(self.counts, OccurrenceCounts):
            if not isinstance(self.counts, Mapping):
                raise InputError(f"counts={self.counts!r:.80}: expected a mapping of token id to count")
            bad = [(t, c) for t, c in self.counts.items() if not is_int(t) or isinstance(c, bool) or not isinstance(c, Real) or not math.isfinite(c)]
            if bad:
                raise InputError(f"counts has entries {bad[:5]!r}: expected integer token ids and finite counts")
            self.counts = OccurrenceCounts(self.counts)

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
        out = logits.clone(memory_format=torch.contiguous_format)
        flat, vocab = out.view(-1), out.shape[-1]  # flat index ops: ~10x cheaper than out[rows, ids]
        rows, ids = _host_index([p.ban for p in penalties], vocab)
        if ids.size:
            flat.index_fill_(0, _device_index(rows * vocab + ids, out), -float("inf"))
        per_row = [p.counts.arrays() for p in penalties]
        rows, ids = _host_index([row_ids for row_ids, _ in per_row], vocab)
        if ids.size:
            counts = np.concatenate([values for _, values in per_row])
            presence, frequency = np.array([[p.presence, p.frequency] for p in penalties])[rows].T
            # presence + count * frequency in double, rounded once to the logits' dtype, as
            # ChatRWKV's Python floats are (two separate ops: no fused multiply-add); a row's ids
            # are distinct, so adding the negated amount is the subtraction, bit for bit
            amounts = torch.from_numpy(-(counts * frequency + presence)).to(out.device, out.dtype)
            flat.index_add_(0, _device_index(rows * vocab + ids, out), amounts)
        return out

    def update(self, token: int, text: str) -> None:
        """Record a generated token whose decoded text is ``text``."""
        self.counts.decay(self.decay)
        self.counts.add(token, 0.0 if text in _FREE_TEXT else 1.0)
