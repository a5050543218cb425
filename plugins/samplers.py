"""Built-in samplers: ChatRWKV's nucleus sampling (exactly), greedy, min-p and typical.

All draw from the run's seeded ``torch.Generator``, so the same seed gives the same text. Each
filters a whole batch of logits ``[B, V]`` at once, on the logits' device; only the draw is per
row, with that sequence's own generator, so a sequence's tokens do not depend on its batch.
"""

from __future__ import annotations

import functools
import math
import os
from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from numbers import Real
from typing import Sequence

import numpy as np
import torch

from rwkvkit.errors import InputError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import SampleContext, Sampler, check_sample_batch
from rwkvkit.native import cpu as native_cpu
from rwkvkit.penalties import is_int


def _check(name: str, value: float, low: float, high: float = math.inf) -> float:
    """A finite real in [low, high] (bools refused: ``True`` is not a temperature)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and low <= value <= high):
        expected = f"a number in [{low}, {high}]" if high != math.inf else f"a finite number >= {low}"
        raise InputError(f"sampling option {name}={value!r}: expected {expected}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    """A non-negative integer; ``1.7`` is refused rather than silently truncated."""
    if not is_int(value) or value < 0:
        raise InputError(f"sampling option {name}={value!r}: expected an integer >= 0 (0 = no limit)")
    return int(value)


def nucleus_keep(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """ChatRWKV's cutoff on float32 probabilities ``[B, V]``, row by row: keep every token whose
    probability is at least that of the token where the descending cumulative sum first reaches
    ``top_p`` (ties at the cutoff stay), then keep only the ``top_k`` most probable (0 = no limit).
    Returns a copy with the rest zeroed.

    Two deliberate differences: if rounding keeps the float32 cumulative sum below ``top_p`` (e.g.
    ``top_p=1.0``), ChatRWKV's ``argmax`` of an all-False array silently turns sampling into
    greedy decoding; here every token stays allowed. And tokens tied at the ``top_k``-th place are
    kept lowest id first, where ChatRWKV keeps whichever numpy's unstable argsort puts last.
    """
    kept = torch.where(probs >= _nucleus_cutoff(probs, top_p), probs, 0.0)
    if 0 < top_k < probs.shape[-1]:
        kept = torch.where(_top_k_mask(probs, top_k), kept, 0.0)
    return kept


def nucleus_probs(probs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """:func:`nucleus_keep` of one numpy row (the form ChatRWKV's own code works in)."""
    return nucleus_keep(torch.from_numpy(probs)[None], top_p, top_k)[0].numpy()


def _nucleus_cutoff(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[B, 1]``: the probability where each row's descending cumulative sum first reaches
    ``top_p``, or 0 where it never does.

    The sum is numpy's float32 running sum, as ChatRWKV's is (torch's CPU cumsum accumulates in
    double, which can move the cutoff). Only a sorted prefix holding the cutoff is summed: the top
    64 probabilities, then, for the rows not reached yet, whole rows on the CPU (sorted by radix in
    the native kernels, ~3x faster than numpy's sort; :func:`rwkvkit.native.cpu.nucleus_cutoffs`),
    elsewhere the top 1,024 and then whole rows. So a peaked row costs a small top-k; a batch of
    flat rows (64 times each row's largest probability below ``top_p``) skips the top 64, which
    cannot reach it. Every width sums the same sorted prefix: where a cutoff is found never changes it.
    """
    batch, vocab = probs.shape
    cutoff = np.zeros(batch, dtype=np.float32)
    rows = np.arange(batch)
    widths = (64, 1024, vocab) if bool((probs.amax(dim=-1) * 64 >= top_p).any()) else (1024, vocab)
    for width in widths:
        candidates = probs if len(rows) == batch else probs[torch.from_numpy(rows).to(probs.device)]
        exact = native_cpu.nucleus_cutoffs(candidates, top_p) if width > 64 and candidates.is_cpu else None
        if exact is not None:
            cutoff[rows] = exact.numpy()
            break
        top = _largest(candidates, min(width, vocab))
        reached = np.cumsum(top, axis=-1) >= top_p
        hit = reached.any(axis=-1)
        cutoff[rows[hit]] = top[hit, reached[hit].argmax(axis=-1)]
        rows = rows[~hit]
        if not len(rows) or width >= vocab:
            break
    return torch.from_numpy(cutoff).to(probs.device)[:, None]


def _largest(probs: torch.Tensor, width: int) -> np.ndarray:
    """The ``width`` largest values of each row, descending, as numpy (whole rows on the CPU by
    numpy's values-only sort, ~3x faster than torch's sort, which also orders the indices)."""
    if width < probs.shape[-1]:
        return probs.topk(width, dim=-1).values.cpu().numpy()
    if probs.device.type == "cpu":
        return np.sort(probs.numpy(), axis=-1)[:, ::-1]
    return probs.sort(dim=-1, descending=True).values.cpu().numpy()


def _top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most probable tokens of each row; of tokens tied at the ``k``-th place, the lowest
    ids, so the set is the same on every machine and device."""
    kth = probs.topk(k, dim=-1).values[:, -1:]
    above, tied = probs > kth, probs == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def _draw(weights: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
    """One draw per row of non-negative ``weights`` by inverse CDF, as numpy's ``random.choice``
    (what ChatRWKV's CPU path calls) does: a uniform double from the row's own generator, then
    one batched search of the rows' running sums. A sequence's tokens therefore do not depend on
    its batch (a row's running sum is the same bits alone or in a batch); and a draw costs one
    random number, where ``torch.multinomial`` draws an exponential per token (~2 ms a row at
    65,536 tokens).

    A draw lands on a zero weight never: the search returns the first running sum above
    ``u x total``, which is below the total for every ``u < 1``."""
    uniform = [torch.rand(1, dtype=torch.float64, generator=c.generator, device=c.generator.device) for c in ctxs]
    running = weights.double().cumsum(-1)
    total = running[:, -1:]
    if not bool(((total > 0) & (total < math.inf)).all()):
        raise ValueError("invalid distribution to sample from: a row's weights sum to 0, inf or NaN")
    target = torch.cat(uniform).to(running.device)[:, None] * total
    return torch.searchsorted(running, target, right=True).flatten().tolist()


@functools.cache
def _pass_threads(threads: int, pid: int) -> ThreadPoolExecutor:
    """The threads CPU passes run on, one pool per thread count and process (a forked child has
    none of its parent's threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="rwkvkit-sample")


# Rows per CPU pass hold at most this many bytes of double weights: whole [64, 65536] batches
# (32 MB a tensor) spill the caches, and the allocator maps and page-faults every such tensor
# afresh, which made a batch slower than a loop over its rows.
CPU_PASS_BYTES = 1 << 21


class _BatchSampler(Sampler):
    """A built-in sampler: ``sample_batch`` does the work, vectorised over the rows, and ``sample``
    is that on one row, so a sequence draws the same tokens alone and in any batch."""

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        return self.sample_batch(logits[None], [ctx])[0]

    def sample_batch(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        """All rows in one pass on an accelerator (one launch per op); on the CPU, passes of
        ``CPU_PASS_BYTES``, run side by side on torch's thread count (a pass is mostly a sort and
        the draws' exponentials, one thread each, with the GIL released). Rows never interact, so
        the split changes no token; rows that share a generator keep their order (one thread)."""
        check_sample_batch(logits, ctxs)
        step = max(1, len(ctxs) if logits.device.type != "cpu" else CPU_PASS_BYTES // (8 * logits.shape[-1]))
        passes = [(logits[i : i + step], ctxs[i : i + step]) for i in range(0, len(ctxs), step)]
        threads = torch.get_num_threads()
        if len(passes) == 1 or threads == 1 or len({id(c.generator) for c in ctxs}) < len(ctxs):
            return [token for rows, row_ctxs in passes for token in self._sample_rows(rows, row_ctxs)]
        return [token for tokens in _pass_threads(threads, os.getpid()).map(lambda p: self._sample_rows(*p), passes) for token in tokens]

    @abstractmethod
    def _sample_rows(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        """``sample_batch`` once its arguments are checked."""


class NucleusSampler(_BatchSampler):
    """ChatRWKV's ``sample_logits``: top-p cutoff, top-k, then temperature applied to the kept
    probabilities; ``temperature=0`` means greedy (as ChatRWKV: top_p becomes 0)."""

    name = "nucleus"

    def __init__(self, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0) -> None:
        self.temperature = _check("temperature", temperature, 0.0)
        self.top_p = _check("top_p", top_p, 0.0, 1.0)
        self.top_k = _check_count("top_k", top_k)

    def _sample_rows(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        temperature, top_p = (1.0, 0.0) if self.temperature == 0 else (self.temperature, self.top_p)
        kept = nucleus_keep(torch.softmax(logits.float(), dim=-1), top_p, self.top_k).double()
        if temperature != 1.0:
            kept = sharpen(kept, temperature)
        return _draw(kept, ctxs)


def sharpen(kept: torch.Tensor, temperature: float) -> torch.Tensor:
    """ChatRWKV's ``kept ** (1 / temperature)`` (unnormalised, zeros stay zero), along the last dim.

    At very low temperatures that power underflows (for 65,536 tokens every weight does below
    T ~ 0.015) and the draw would refuse an all-zero distribution; then that row's
    weights are computed in log space relative to its most probable token, which stays at 1.
    Ordinary temperatures take the plain power, so their draws are exactly as before.
    """
    powered = kept ** (1.0 / temperature)
    underflowed = powered.amax(-1, keepdim=True) < torch.finfo(powered.dtype).tiny
    if not underflowed.any():  # normal doubles: full precision kept
        return powered
    relative = torch.exp((kept.log() - kept.amax(-1, keepdim=True).log()) / temperature)
    return torch.where(underflowed, relative, powered)


class GreedySampler(_BatchSampler):
    """The most probable token (lowest id on ties)."""

    name = "greedy"

    def _sample_rows(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        return logits.argmax(-1).tolist()


class _FilteredSampler(_BatchSampler):
    """Temperature, then a filter that keeps part of the distribution; temperature 0 is greedy."""

    def __init__(self, temperature: float) -> None:
        self.temperature = _check("temperature", temperature, 0.0)

    def _sample_rows(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        if self.temperature == 0:
            return logits.argmax(-1).tolist()
        return _draw(self._keep(torch.log_softmax(logits.double() / self.temperature, dim=-1)), ctxs)

    @abstractmethod
    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        """Unnormalised probabilities of the kept tokens (zero elsewhere), from log-probabilities
        ``[B, V]``."""


class MinPSampler(_FilteredSampler):
    """Keep tokens with probability >= ``min_p`` x the top probability (Nguyen et al., 2024)."""

    name = "min_p"

    def __init__(self, min_p: float = 0.05, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.min_p = _check("min_p", min_p, 0.0, 1.0)

    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        probs = logp.exp()
        return torch.where(probs >= self.min_p * probs.amax(-1, keepdim=True), probs, 0.0)


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` sums of the rows of ``x``, the same bits for a row alone or in any batch: a
    running sum's last entry, where ``sum()`` splits a lone long row across threads (and so
    rounds differently than that row in a batch, or with another thread count)."""
    return x.cumsum(-1)[:, -1:]


class TypicalSampler(_FilteredSampler):
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest
    to the distribution's entropy, up to cumulative probability ``typical_p``."""

    name = "typical"

    def __init__(self, typical_p: float = 0.95, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.typical_p = _check("typical_p", typical_p, 0.0, 1.0)

    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        probs = logp.exp()
        entropy = -row_sum(probs * torch.nan_to_num(logp, neginf=0.0))
        order = torch.argsort((-logp - entropy).abs(), dim=-1, stable=True)
        cum = probs.gather(-1, order).cumsum(-1)
        n_keep = (cum < self.typical_p).sum(-1, keepdim=True) + 1  # the smallest set reaching typical_p
        in_order = torch.arange(probs.shape[-1], device=probs.device) < n_keep
        return torch.where(torch.zeros_like(in_order).scatter(-1, order, in_order), probs, 0.0)


@hookimpl
def register_samplers(register) -> None:
    for cls in (NucleusSampler, GreedySampler, MinPSampler, TypicalSampler):
        register(cls)
