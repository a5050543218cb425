"""Decode speed with the kernels' own thread pool against OpenMP regions, on an idle machine and
next to a busy process; and what one parallel job costs.

The native CPU kernels run ~85 short parallel jobs per decoded token (7 per layer): by default as
OpenMP regions in the libgomp that ``import torch`` loads, whose policy is read once, when it
loads; with ``RWKVKIT_CPU_POOL=pool`` decode runs them on the kernels' own pool
(``kernels/cpu_pool.h``: spin ~5 us, yield up to 2 ms, then sleep; shares claimed by whichever
thread comes first):

- ``pool`` / ``omp``: the kernels' pool / OpenMP regions;
- ``default``: nothing set (libgomp spins ~300,000 iterations before a thread sleeps);
- ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE`` (the pool sleeps at once; so does libgomp).

``contended`` runs one busy Python loop pinned to CPU 0 meanwhile (a shared machine). Each case is
a fresh process. Random model of the World 0.1B shape, ``cpu fp32``, 2 threads, median of 5 x 64
decoded tokens after warm-up; also the process's CPU time per token (what the waiting costs).
``test_job_latency``: one job of almost no work (relu² of 512 floats) on 2 threads, back to back:
wall and CPU microseconds per call, ctypes included. Run it alone:
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
ROUNDS, TOKENS, CALLS = 5, 64, 20000

DECODE = """
import json, statistics, sys, time
import rwkvkit
import torch
sys.path.insert(0, sys.argv[1])
from bench_cpu import checkpoint
torch.set_num_threads(2)
model = rwkvkit.RWKV(checkpoint("0.1B"), "cpu fp32")
_, state = model.forward(list(range(16)), None)
for token in range(8):
    _, state = model.forward([token], state)
speeds, cpu = [], []
for _ in range(int(sys.argv[2])):
    start, used, s = time.perf_counter(), time.process_time(), state
    for token in range(int(sys.argv[3])):
        _, s = model.forward([token], s)
    speeds.append(int(sys.argv[3]) / (time.perf_counter() - start))
    cpu.append((time.process_time() - used) / int(sys.argv[3]) * 1e3)
print(json.dumps({"tok_per_s": statistics.median(speeds), "cpu_ms_per_token": statistics.median(cpu), "all": speeds}))
"""

JOB = """
import json, sys, time
import torch
from rwkvkit.native import cpu
torch.set_num_threads(2)
h, calls = torch.randn(512), int(sys.argv[1])
for _ in range(1000):
    cpu.relu_square_(h)
start, used = time.perf_counter(), time.process_time()
for _ in range(calls):
    cpu.relu_square_(h)
print(json.dumps({"wall_us": (time.perf_counter() - start) / calls * 1e6, "cpu_us": (time.process_time() - used) / calls * 1e6}))
"""


@contextlib.contextmanager
def busy_cpu0():
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while 1: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def in_fresh_process(code: str, kernels: str, policy: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RWKVKIT_CPU_POOL")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["RWKVKIT_CPU_POOL"] = kernels
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("load", ["idle", "contended"])
@pytest.mark.parametrize("policy", ["default", "PASSIVE"])
@pytest.mark.parametrize("kernels", ["pool", "omp"])
def test_decode_under_wait_policy(benchmark, kernels, policy, load):
    with busy_cpu0() if load == "contended" else contextlib.nullcontext():
        result = benchmark.pedantic(in_fresh_process, args=(DECODE, kernels, policy, str(HERE), str(ROUNDS), str(TOKENS)), rounds=1)
    rounds = ", ".join(f"{v:.1f}" for v in result["all"])
    print(f"\n{load} {kernels} {policy}: {result['tok_per_s']:.1f} tok/s, {result['cpu_ms_per_token']:.1f} ms CPU per token (rounds {rounds})")
    benchmark.extra_info.update(kind="decode", kernels=kernels, policy=policy, load=load, **result)


@pytest.mark.parametrize("policy", ["default", "PASSIVE"])
@pytest.mark.parametrize("kernels", ["pool", "omp"])
def test_job_latency(benchmark, kernels, policy):
    result = benchmark.pedantic(in_fresh_process, args=(JOB, kernels, policy, str(CALLS)), rounds=1)
    print(f"\njob {kernels} {policy}: {result['wall_us']:.1f} us wall, {result['cpu_us']:.1f} us CPU per call")
    benchmark.extra_info.update(kind="job", kernels=kernels, policy=policy, **result)
