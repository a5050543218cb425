"""Resident memory per CPU strategy: peak and resident RSS of a load + 512-token prefill + 5 decode
steps, each case in a fresh process (:func:`rwkvkit.testing.measure_memory`), on a random model of
the World 0.1B shape (12 x 768, vocab 65,536). int8 and int4 strategies run with a cold
quantization cache (the load quantizes) and a warm one (it reads the cache). Native kernels are built once, before any case.

``python benchmarks/bench_memory.py`` prints the table (MB); ``pytest benchmarks/bench_memory.py
--benchmark-enable`` records the same numbers in each case's ``extra_info`` (the timing is of the
whole process: start-up, load and run).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from rwkvkit.testing import measure_memory

from bench_cpu import checkpoint

STRATEGIES = ("cpu fp32", "cpu bf16", "cpu fp32i8", "cpu bf16i8", "cpu fp32i4", "cpu bf16i4")
FIELDS = {"peak_end": "peak", "rss_end": "resident at the end", "peak_load": "peak during the load", "rss_load": "resident after the load", "weights": "prepared weights"}


@functools.cache
def cache() -> Path:
    """A cache folder for this session's processes, with the native kernels already built."""
    folder = Path(tempfile.mkdtemp(prefix="rwkvkit-bench-memory-"))
    atexit.register(shutil.rmtree, folder, True)
    measure_memory(checkpoint("0.1B"), "cpu fp32i8", folder, prefill=2, decode=1)
    return folder


def measure(strategy: str, int8_cache: str) -> dict[str, float]:
    """One fresh process; ``int8_cache`` 'cold' empties the quantization caches first, 'warm' fills them."""
    for folder in ("int8", "int4"):
        shutil.rmtree(cache() / folder, ignore_errors=True)
    if int8_cache == "warm":
        measure_memory(checkpoint("0.1B"), strategy, cache(), prefill=2, decode=1)
    return measure_memory(checkpoint("0.1B"), strategy, cache())


CASES = [(s, c) for s in STRATEGIES for c in (("cold", "warm") if s.endswith(("i8", "i4")) else ("-",))]


@pytest.mark.parametrize("strategy, int8_cache", CASES)
def test_memory(benchmark, strategy, int8_cache):
    result = {}
    benchmark.pedantic(lambda: result.update(measure(strategy, int8_cache)), rounds=1, iterations=1)
    benchmark.extra_info.update(kind="memory", shape="0.1B", strategy=strategy, int8_cache=int8_cache, **{f"{k}_mb": round(v, 1) for k, v in result.items()})


if __name__ == "__main__":
    print("| strategy | int8 cache | " + " | ".join(FIELDS.values()) + " |")
    print("|---|---|" + "---|" * len(FIELDS))
    for strategy, int8_cache in CASES:
        result = measure(strategy, int8_cache)
        print(f"| `{strategy}` | {int8_cache} | " + " | ".join(f"{result[k]:,.0f}" for k in FIELDS) + " |")
