"""A cache of prompt states: start a new prompt from the state after its longest cached prefix.

An RWKV model's whole context is its fixed-size :class:`~rwkvkit.state.State` (about 2.4 MB for a
0.1B model, 12 MB for 1.5B), so the state after a shared prefix (a system prompt, a few-shot
header, a chat history) can be kept and reused: only the rest of the prompt is prefilled.

    cache = PromptCache(max_bytes=1 << 30)
    logits, state = model.forward(system_prompt, None)
    cache.store(system_prompt, state, logits)
    hit = cache.lookup(prompt)            # None, or the longest stored prefix of prompt
    if hit is None:
        logits, state = model.forward(prompt, None)
    elif hit.length < len(prompt):
        logits, state = model.forward(prompt[hit.length :], hit.state)
    else:
        logits, state = hit.logits, hit.state

A cache belongs to one model (its fingerprint, given or taken from the first stored state): it
never hands one model's state to another.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rwkvkit.errors import InputError, StateError
from rwkvkit.state import State

Ids = Sequence[int] | np.ndarray | torch.Tensor
Device = str | torch.device

# Prefix hashes: a polynomial hash modulo 2**64 with an odd (so invertible) multiplier.
_MULT = 0x9E3779B97F4A7C15
_MULT_INV = pow(_MULT, -1, 1 << 64)


@dataclass(frozen=True)
class CacheHit:
    """The longest cached prefix of a prompt: its ``length`` in tokens, the state after it (the
    caller's own copy) and the float32 logits ``[V]`` of its last token."""

    length: int
    state: State
    logits: torch.Tensor


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int
    peak_bytes: int = 0  # the most ``bytes`` has been (never above ``max_bytes``)


@dataclass(eq=False)  # entries compare by identity (their tensors have no truth value)
class _Entry:
    key: bytes  # the token ids as int64 bytes: what a lookup compares, never only a hash
    length: int
    prefix_hash: int
    state: State
    logits: torch.Tensor
    nbytes: int


def _as_ids(ids: Ids) -> np.ndarray:
    """Token ids as a 1-D int64 array (from a list, tuple, numpy array or tensor)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, (str, bytes)):
        raise InputError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"ids must be a sequence of token ids, got {ids!r:.80}") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InputError(f"ids must be a 1-D sequence of integer token ids, got {arr.dtype} of shape {list(arr.shape)}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(f"token id {int(arr.max())} is out of range")
    return arr.astype(np.int64)


def _prefix_hashes(ids: np.ndarray) -> np.ndarray:
    """``hashes[L - 1]`` is the hash of ``ids[:L]`` (sum of ``ids[j] * MULT**(L-1-j)`` mod 2**64),
    all prefixes in one vectorised pass, so a lookup probes each stored length in O(1)."""

    def powers(base: int) -> np.ndarray:  # base**0 .. base**(n-1)
        p = np.full(len(ids), base, dtype=np.uint64)
        p[0] = 1
        return np.cumprod(p, dtype=np.uint64)  # uint64 arithmetic wraps: modulo 2**64

    return powers(_MULT) * np.cumsum(ids.astype(np.uint64) * powers(_MULT_INV), dtype=np.uint64)


def _copy_state(state: State, device: torch.device | None) -> State:
    """A contiguous copy on ``device`` (None: where it is); a model's output stays marked as such,
    so ``Model.adopt_state`` skips its finite-value scan of the copy too."""
    copy = State(
        [layer.map(lambda t: t.to(device, copy=True, memory_format=torch.contiguous_format)) for layer in state.layers],
        state.fingerprint,
    )
    if state.is_produced():
        copy.mark_produced()
    return copy


class PromptCache:
    """An LRU of prompt states bounded in bytes, for one model.

    ``max_bytes`` bounds the sum over entries of their state tensors, logits and token ids, counted
    from the tensors themselves; an entry larger than that is not stored. Entries are kept on
    ``device`` (default: CPU RAM; the model's GPU keeps lookups free of host-to-device copies).
    ``fingerprint`` binds the cache to a model (``model.fingerprint``); without it the first stored
    state binds it, and a state of any other model is refused.

    :meth:`lookup` returns copies, so the caller may use and even edit them freely; a copy costs a
    memcpy of the state (milliseconds for 12 MB in CPU RAM, microseconds on a GPU), negligible next to
    the prefill a hit saves, and with ``device`` it is the same copy that moves the state.

    Thread-safe: one lock guards the index and the LRU order; copies are made outside it.
    """

    def __init__(self, max_bytes: int, device: Device | None = None, fingerprint: str | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r}: expected an integer >= 0")
        self.max_bytes = max_bytes
        self.device = torch.device(device if device is not None else "cpu")
        self.fingerprint = fingerprint
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._buckets: dict[tuple[int, int], list[_Entry]] = {}  # (length, prefix hash) -> entries
        self._lengths: list[int] = []  # the distinct stored lengths, sorted
        self._length_counts: dict[int, int] = {}
        self._bytes = self._peak_bytes = self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def store(self, ids: Ids, state: State, logits: torch.Tensor) -> None:
        """Keep a copy of ``state`` and ``logits`` ([V] float32), both after exactly the tokens
        ``ids``. Storing ids that are already cached only marks them most recently used: the same
        tokens through the same model give the same state."""
        x = _as_ids(ids)
        if not x.size:
            raise InputError("ids is empty: the cache keeps states after at least one token")
        if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.dim() != 1:
            what = f"a {logits.dtype} tensor of shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"logits must be the float32 [V] logits of the last token, got {what}")
        self._check_state(state)
        key = x.tobytes()
        nbytes = sum(t.nbytes for layer in state.layers for t in layer.tensors()) + logits.nbytes + len(key)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        if nbytes > self.max_bytes:
            return
        entry = _Entry(key, len(x), int(_prefix_hashes(x)[-1]), _copy_state(state, self.device), logits.detach().to(self.device, copy=True), nbytes)
        with self._lock:
            if key in self._entries:  # stored by another thread meanwhile
                return
            while self._bytes + nbytes > self.max_bytes:
                self._evict(next(iter(self._entries.values())))
            self._insert(entry)

    def lookup(self, ids: Ids, device: Device | None = None) -> CacheHit | None:
        """The longest stored prefix of ``ids`` (all of ``ids`` included), marked most recently
        used, with copies of its state and logits on ``device`` (None: the cache's device; leave it
        None for a model split over devices, whose ``adopt_state`` puts each layer on its own)."""
        x = _as_ids(ids)
        hashes = _prefix_hashes(x) if x.size else None
        key = x.tobytes()
        with self._lock:
            entry = self._longest(key, hashes)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(entry.key)
        target = torch.device(device) if device is not None else None
        return CacheHit(entry.length, _copy_state(entry.state, target), entry.logits.to(target, copy=True))

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._bytes, self._evictions, self._peak_bytes)

    def clear(self) -> None:
        """Drop every entry (the counters and the model binding stay)."""
        with self._lock:
            self._entries.clear()
            self._buckets.clear()
            self._lengths.clear()
            self._length_counts.clear()
            self._bytes = 0

    def _check_state(self, state: State) -> None:
        if not isinstance(state, State):
            raise StateError(f"state must be an rwkvkit State, got {type(state).__name__}")
        if not state.layers:
            raise StateError("state has no layers")
        if state.batch_size != 1:
            raise StateError(f"the cache keeps one sequence's state, got batch size {state.batch_size}: store state[i] for row i")
        with self._lock:
            if self.fingerprint is None:
                self.fingerprint = state.fingerprint
        if state.fingerprint != self.fingerprint:
            raise StateError(f"state belongs to another model (fingerprint {state.fingerprint!r}; this cache holds states of {self.fingerprint!r})")

    def _longest(self, key: bytes, hashes: np.ndarray | None) -> _Entry | None:
        """Probe the stored lengths that fit, longest first: one dict lookup each, then a compare
        of the real ids for a hash match."""
        if hashes is None:
            return None
        for i in range(bisect.bisect_right(self._lengths, len(hashes)) - 1, -1, -1):
            length = self._lengths[i]
            for entry in self._buckets.get((length, int(hashes[length - 1])), ()):
                if entry.key == key[: len(entry.key)]:
                    return entry
        return None

    def _insert(self, entry: _Entry) -> None:
        self._entries[entry.key] = entry
        self._buckets.setdefault((entry.length, entry.prefix_hash), []).append(entry)
        count = self._length_counts.get(entry.length, 0)
        if not count:
            bisect.insort(self._lengths, entry.length)
        self._length_counts[entry.length] = count + 1
        self._bytes += entry.nbytes
        self._peak_bytes = max(self._peak_bytes, self._bytes)

    def _evict(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        bucket = self._buckets[(entry.length, entry.prefix_hash)]
        bucket.remove(entry)
        if not bucket:
            del self._buckets[(entry.length, entry.prefix_hash)]
        self._length_counts[entry.length] -= 1
        if not self._length_counts[entry.length]:
            del self._length_counts[entry.length]
            self._lengths.remove(entry.length)
        self._bytes -= entry.nbytes
        self._evictions += 1
