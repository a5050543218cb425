"""How many threads the native decode uses: the configured count, or one when that is faster.

A decoded token runs ~110 short OpenMP parallel regions (row-parallel matrix-vector products), each
ending in a barrier. When another process shares a core, the thread on that core is descheduled
for whole time slices while the others wait at the barrier, and 2-thread decoding collapses from
~60 to 2-20 tok/s (measured here, ``benchmarks/bench_openmp.py``). A passive OpenMP wait policy
avoids the collapse but costs ~40% on an idle machine (each barrier then waits for a sleeping
thread to wake), and it can only be chosen before ``import torch`` loads libgomp.

So the choice is made by measurement instead: decode runs with the configured count and, every
``PROBE_EVERY`` tokens, once with the other choice (1, or the configured count); the next calls
use whichever was faster: the median of the current count's last few times against the probe's
time. On an idle machine the probes cost ~1% (one token in 32 at single-thread speed); next to a
busy process the single thread wins within a probe and decoding keeps a core's worth of speed.
"""

from __future__ import annotations

import statistics
from collections import deque

PROBE_EVERY = 32  # calls between probes of the other thread count
WINDOW = 5  # recent times kept per count (the median ignores one-off stalls)


class ThreadGovernor:
    """Chooses between ``threads`` and 1 for each call from measured call times."""

    def __init__(self) -> None:
        self._times: dict[int, deque[float]] = {}
        self._current: int | None = None
        self._calls = 0

    def choose(self, threads: int) -> int:
        """The thread count for the next call, when up to ``threads`` may be used."""
        if threads <= 1:
            return 1
        if self._current not in (1, threads):  # first call, or the configured count changed
            self._current, self._calls = threads, 0
            self._times.clear()
        self._calls += 1
        if self._calls % PROBE_EVERY == 0:
            return threads + 1 - self._current  # the other count: 1 <-> threads
        return self._current

    def record(self, threads: int, seconds: float) -> None:
        """Report how long a call with ``threads`` took; a probe that beat the current count's
        recent median makes its count the current one."""
        self._times.setdefault(threads, deque(maxlen=WINDOW)).append(seconds)
        current = self._times.get(self._current)
        if threads != self._current and current and seconds < statistics.median(current):
            self._current = threads
            self._times[threads] = deque([seconds], maxlen=WINDOW)
