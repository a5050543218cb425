"""Runs benchmarks/bench_cpu.py and prints one table: tok/s per implementation, the ratio to the
oracle's ``cpu fp32`` measured in the same run, and for our decode the bandwidth achieved (bytes of
weights read per token x tok/s) next to this machine's measured copy bandwidth.

Usage: ``python benchmarks/cpu_report.py [extra pytest args, e.g. -k 0.1B]``
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


def main(args: list[str]) -> None:
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "pytest", str(here / "bench_cpu.py"), "-q", "--benchmark-enable", f"--benchmark-json={out}", "-p", "no:cacheprovider", *args], check=True)
        results = [b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]]
    torch.set_num_threads(2)
    copy_bw = copy_bandwidth_gbs()
    table: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in results:
        table[(r["shape"], r["kind"])][r["impl"]] = r
    print(f"\nmachine copy bandwidth: {copy_bw:.1f} GB/s (read + write, 2 threads)\n")
    print(f"{'shape':6} {'benchmark':13} {'implementation':18} {'tok/s':>8} {'x oracle fp32':>14} {'GB/s read':>10}")
    for (shape, kind), impls in sorted(table.items()):
        base = impls.get("oracle cpu fp32", {}).get("tok_per_s")
        for impl, r in sorted(impls.items(), key=lambda kv: -kv[1]["tok_per_s"]):
            ratio = f"{r['tok_per_s'] / base:.2f}" if base else "-"
            bw = f"{r['bytes_per_token'] * r['tok_per_s'] / 1e9:.1f}" if "bytes_per_token" in r else ""
            print(f"{shape:6} {kind:13} {impl:18} {r['tok_per_s']:8.1f} {ratio:>14} {bw:>10}")


if __name__ == "__main__":
    main(sys.argv[1:])
