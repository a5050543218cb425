"""Runs benchmarks/bench_cpu.py and prints one table: tok/s per implementation, the ratio to the
oracle's ``cpu fp32`` measured in the same run, and for our decode the bandwidth achieved (bytes of
weights read per token x tok/s) and its fraction of this machine's read bandwidth, measured in the
same run (the decode's limit: every weight is read once per token). Then the resident and peak
memory of each strategy (benchmarks/bench_memory.py; ``--no-memory`` skips it).

Usage: ``python benchmarks/cpu_report.py [--no-memory] [extra pytest args, e.g. -k 0.1B]``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def copy_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` copies of a ``size_mb`` buffer, counting bytes read + written."""
    src = torch.ones(size_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def read_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` full reads (a sum) of a ``size_mb`` buffer: the decode's bound."""
    src = torch.ones(size_mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def print_memory() -> None:
    """bench_memory's table: a fresh process per strategy (and cold/warm quantization cache)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_memory import CASES, measure

    print(f"\n{'strategy':12} {'cache':6} {'resident MB':>12} {'peak MB':>9} {'weights MB':>11}")
    for strategy, state in CASES:
        r = measure(strategy, state)
        print(f"{strategy:12} {state:6} {r['rss_end']:12.0f} {r['peak_end']:9.0f} {r['weights']:11.0f}")


def main(args: list[str]) -> None:
    memory = "--no-memory" not in args
    args = [a for a in args if a != "--no-memory"]
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "pytest", str(here / "bench_cpu.py"), "-q", "--benchmark-enable", f"--benchmark-json={out}", "-p", "no:cacheprovider", *args], check=True)
        results = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    torch.set_num_threads(2)
    copy_bw, read_bw = copy_bandwidth_gbs(), read_bandwidth_gbs()
    table: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in results:
        table[(r["shape"], r["kind"])][r["impl"]] = r
    print(f"\nmachine copy bandwidth: {copy_bw:.1f} GB/s (read + write, 2 threads); read bandwidth: {read_bw:.1f} GB/s\n")
    print(f"{'shape':6} {'benchmark':13} {'implementation':18} {'tok/s':>8} {'x oracle fp32':>14} {'GB/s read':>10} {'of limit':>9}")
    for (shape, kind), impls in sorted(table.items()):
        base = impls.get("oracle cpu fp32", {}).get("tok_per_s")
        for impl, r in sorted(impls.items(), key=lambda kv: -kv[1]["tok_per_s"]):
            ratio = f"{r['tok_per_s'] / base:.2f}" if base else "-"
            read = r["bytes_per_token"] * r["tok_per_s"] / 1e9 if "bytes_per_token" in r else None
            bw, limit = ("", "") if read is None else (f"{read:.1f}", f"{read / read_bw:.0%}")
            print(f"{shape:6} {kind:13} {impl:18} {r['tok_per_s']:8.1f} {ratio:>14} {bw:>10} {limit:>9}")
    if memory:
        print_memory()


if __name__ == "__main__":
    main(sys.argv[1:])
