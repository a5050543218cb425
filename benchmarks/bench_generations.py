"""Decode and prefill speed per RWKV generation (4, 5.2, 6) against the `rwkv` package, same run.

Random models of the World 0.1B shape (12 x 768, vocab 65,536) in ``cpu fp32`` (and ``cpu
fp32i8``). The oracle runs RWKV-4/5/6 in its generic class, which its RWKV-7 mode (set by
bench_cpu.py at import) replaces, so it is timed in a subprocess of its own with the same thread
count. Decode: DECODE_STEPS single-token steps after a 16-token prompt; prefill: PREFILL_LEN tokens
in one call. ``pytest benchmarks/bench_generations.py --benchmark-enable -s`` prints both speeds
and their ratio per case (extra_info holds them too).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.testing import make_checkpoint

GENERATIONS = ("rwkv6", "rwkv5", "rwkv4")
SHAPE = (12, 768, 65536)  # the World 0.1B shape
STRATEGIES = ("cpu fp32", "cpu fp32i8")
DECODE_STEPS, PREFILL_LEN = 64, 256
MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")
THREADS = int(os.environ.get("RWKVKIT_BENCH_THREADS", "2"))

# Times the oracle the way the benchmarks below time rwkvkit; prints {"decode": tok/s, "prefill": tok/s}.
ORACLE = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from rwkv.model import RWKV
m = RWKV(sys.argv[1], sys.argv[2], verbose=False)
decode, prefill = int(sys.argv[4]), int(sys.argv[5])
prompt = torch.randint(0, 65536, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
best = {}
for _ in range(2):  # the first round warms up
    _, state = m.forward(prompt[:16], None)
    t = time.perf_counter()
    for token in range(decode):
        _, state = m.forward([token], state)
    best["decode"] = decode / (time.perf_counter() - t)
    t = time.perf_counter()
    m.forward(prompt, None)
    best["prefill"] = prefill / (time.perf_counter() - t)
print(json.dumps(best))
"""


@functools.cache
def checkpoint(gen: str) -> str:
    path = os.path.join(MODEL_DIR, f"random-0.1B-{gen}.pth")
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, *SHAPE, architecture=gen)
    return path


@functools.cache
def oracle_speed(gen: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    args = [checkpoint(gen).removesuffix(".pth"), "cpu fp32", str(THREADS), str(DECODE_STEPS), str(PREFILL_LEN)]
    done = subprocess.run([sys.executable, "-c", ORACLE, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the oracle failed on {gen}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


@functools.cache
def model(gen: str, strategy: str) -> RWKV:
    torch.set_num_threads(THREADS)
    return RWKV(checkpoint(gen), strategy)


def _prompt(n: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _report(benchmark, gen: str, strategy: str, kind: str, n: int) -> None:
    ours = n / benchmark.stats.stats.median
    theirs = oracle_speed(gen)[kind]
    benchmark.extra_info.update(kind=kind, generation=gen, strategy=strategy, tok_per_s=ours, oracle_fp32_tok_per_s=theirs, ratio=ours / theirs)
    print(f"\n{gen} {strategy} {kind}: {ours:.1f} tok/s, oracle cpu fp32 {theirs:.1f} tok/s, ratio {ours / theirs:.2f}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_decode(benchmark, gen, strategy):
    m = model(gen, strategy)
    _, start = m.forward(_prompt(16), None)

    def run():
        state = start
        for token in range(DECODE_STEPS):
            _, state = m.forward([token], state)

    benchmark.pedantic(run, rounds=1, warmup_rounds=1)
    _report(benchmark, gen, strategy, "decode", DECODE_STEPS)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_prefill(benchmark, gen, strategy):
    m, prompt = model(gen, strategy), _prompt(PREFILL_LEN)
    benchmark.pedantic(lambda: m.forward(prompt, None), rounds=1, warmup_rounds=1)
    _report(benchmark, gen, strategy, "prefill", PREFILL_LEN)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-enable", "-s", "-q", "-p", "no:cacheprovider"]))
