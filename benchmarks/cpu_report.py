"""Runs benchmarks/bench_cpu.py and prints one table: tok/s per implementation, the ratio to the
oracle's ``cpu fp32`` measured in the same run, and for our decode the bandwidth achieved (bytes of
weights read per token x tok/s) and its fraction of this machine's read bandwidth, measured in the
same run (the decode's limit: every weight is read once per token). Then the resident and peak
memory of each strategy (benchmarks/bench_memory.py; ``--no-memory`` skips it).

With ``RWKVKIT_LLAMA_CPP`` set to a built llama.cpp source tree (see benchmarks/llamacpp_peer.py),
llama.cpp runs the same 0.1B checkpoint in F16, Q8_0 and Q4_0 in the same run, each next to our
strategy of its precision, against the targets of issue 21 (bf16 faster than F16; int8 and int4
at least 1.3x Q8_0 and Q4_0).

Usage: ``python benchmarks/cpu_report.py [--no-memory] [extra pytest args, e.g. -k 0.1B]``
"""

from __future__ import annotations

import json
import os
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


PEERS = {"F16": (("cpu bf16",), 1.0), "Q8_0": (("cpu fp32i8", "cpu bf16i8"), 1.3), "Q4_0": (("cpu fp32i4", "cpu bf16i4"), 1.3)}  # ours, target ratio


def print_llama_cpp(table: dict[tuple[str, str], dict[str, dict]], llama_src: str) -> None:
    """llama.cpp's decode and 512-token prefill per format on the 0.1B checkpoint, next to our
    strategies of the same precision measured in this run (ratios: ours / llama.cpp's)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu import checkpoint
    from llamacpp_peer import bench, prepare

    files = prepare(Path(checkpoint("0.1B")), Path(llama_src), Path(checkpoint("0.1B")).parent / "llama-cpp")
    threads = int(os.environ.get("RWKVKIT_BENCH_THREADS", "2"))
    decode, prefill = table.get(("0.1B", "decode"), {}), table.get(("0.1B", "prefill/512"), {})
    print(f"\nllama.cpp, same run ({threads} threads, 0.1B): decode and prefill/512 tok/s; ours / llama.cpp's, and the target")
    for fmt, (ours, target) in PEERS.items():
        peer = bench(Path(llama_src), files[fmt], threads)
        print(f"llama.cpp {fmt:5} {peer['decode']:8.1f} {peer['prefill']:8.1f}")
        for impl in ours:
            if impl in decode:
                ratio = decode[impl]["tok_per_s"] / peer["decode"]
                pre = prefill.get(impl, {}).get("tok_per_s")
                pre_text = f"prefill {pre:8.1f} ({pre / peer['prefill']:.2f}x)" if pre else ""
                met = ratio > target if target == 1.0 else ratio >= target  # bf16: faster than F16; int8, int4: at least 1.3x
                print(f"  {impl:12} decode {decode[impl]['tok_per_s']:8.1f} ({ratio:.2f}x, target {'>' if target == 1.0 else '>='} {target}x: {'met' if met else 'not met'})  {pre_text}")


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
    if os.environ.get("RWKVKIT_LLAMA_CPP"):
        print_llama_cpp(table, os.environ["RWKVKIT_LLAMA_CPP"])
    if memory:
        print_memory()


if __name__ == "__main__":
    main(sys.argv[1:])
