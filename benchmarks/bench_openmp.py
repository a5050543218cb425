"""Decode speed under each OpenMP wait policy, on an idle machine and next to a busy process.

The native CPU kernels run ~85 short OpenMP regions per decoded token (7 per layer), in the libgomp that
``import torch`` loads (our kernels share it), which reads its policy once, when it loads:

- ``default``: nothing set: libgomp spins ~300,000 iterations (a few ms) before a thread sleeps;
- ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep at once;
- ``ACTIVE``: ``OMP_WAIT_POLICY=ACTIVE``: idle threads only spin.

``contended`` runs one busy Python loop pinned to CPU 0 meanwhile (a shared machine). Each case is
a fresh process (the policy is fixed per process). Random model of the World 0.1B shape, ``cpu
fp32``, 2 threads, median of 5 x 64 decoded tokens after warm-up. Run it alone:
``pytest benchmarks/bench_openmp.py --benchmark-enable -p no:cacheprovider -s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROUNDS, TOKENS = 5, 64

CHILD = """
import json, os, statistics, sys, time
import rwkvkit
import torch
sys.path.insert(0, sys.argv[1])
from bench_cpu import checkpoint
torch.set_num_threads(2)
model = rwkvkit.RWKV(checkpoint("0.1B"), "cpu fp32")
_, state = model.forward(list(range(16)), None)
for token in range(8):
    _, state = model.forward([token], state)
speeds = []
for _ in range(int(sys.argv[2])):
    start, s = time.perf_counter(), state
    for token in range(int(sys.argv[3])):
        _, s = model.forward([token], s)
    speeds.append(int(sys.argv[3]) / (time.perf_counter() - start))
print(json.dumps({"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "tok_per_s": statistics.median(speeds), "all": speeds}))
"""


@contextlib.contextmanager
def busy_cpu0():
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while 1: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def decode_in_fresh_process(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(ROUNDS), str(TOKENS)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("load", ["idle", "contended"])
@pytest.mark.parametrize("policy", ["default", "PASSIVE", "ACTIVE"])
def test_decode_under_wait_policy(benchmark, policy, load):
    with busy_cpu0() if load == "contended" else contextlib.nullcontext():
        result = benchmark.pedantic(decode_in_fresh_process, args=(policy,), rounds=1)
    print(f"\n{load} {policy}: {result['tok_per_s']:.1f} tok/s (rounds {', '.join(f'{v:.1f}' for v in result['all'])})")
    benchmark.extra_info.update(kind="decode", policy=policy, load=load, **result)
