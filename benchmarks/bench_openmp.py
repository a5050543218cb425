"""What rwkvkit's default wait policy costs an idle machine and gives a shared one (issue 13).

The native CPU kernels run ~85 short parallel jobs per decoded token. Configurations, each run in a
fresh process that imports ``rwkvkit`` before torch (as every ``rwkvkit`` command does):

- ``default``: nothing set. rwkvkit sets ``GOMP_SPINCOUNT=3000`` (libgomp's threads spin ~75 us,
  then sleep) and decode runs on the kernels' own pool (spin ~5 us, yield up to 2 ms, then
  sleep); see ``rwkvkit/omp_wait.py``.
- ``asleep``: ``GOMP_SPINCOUNT=0``, the default before: libgomp's threads sleep at once (decode on
  the pool as in ``default``); each of a prefill's ~280 regions then wakes a sleeping thread.
- ``spinning``: ``GOMP_SPINCOUNT=300000``, libgomp's own default (what a process that imported torch
  first gets): decode on OpenMP regions whose threads spin for milliseconds after each region.
- ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE``: every waiting thread, the pool's too, sleeps at once.

``test_idle``: on an idle machine, ``default``, ``asleep`` and ``spinning`` alternate ``ROUNDS``
times per strategy (one noisy stretch of the machine hits all three), each process timing decode
(median of 5 x 48 tokens after warm-up) and prefill (median of 3 prompts of 512 tokens); it prints
every round and the median ratios default / spinning and asleep / spinning. ``test_contended``: the same next to one busy Python loop
pinned to CPU 0 (a shared machine), every configuration once. ``test_job_latency``: one job of
almost no work (relu² of 512 floats) on 2 threads, back to back: wall and CPU microseconds per call,
ctypes included. Random model of the World 0.1B shape, 2 threads. Run it alone, on an idle machine:
``pytest benchmarks/bench_openmp.py --benchmark-enable -p no:cacheprovider -s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROUNDS, CALLS = 5, 20000
STRATEGIES = ("cpu fp32", "cpu bf16")
CONFIGS = {"default": {}, "asleep": {"GOMP_SPINCOUNT": "0"}, "spinning": {"GOMP_SPINCOUNT": "300000"}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
IDLE = ("default", "asleep", "spinning")  # compared on an idle machine, each against the last

SPEED = """
import json, statistics, sys, time
import rwkvkit
import torch
sys.path.insert(0, sys.argv[1])
from bench_cpu import checkpoint
torch.set_num_threads(2)
model = rwkvkit.RWKV(checkpoint("0.1B"), sys.argv[2])
_, state = model.forward(list(range(16)), None)
for token in range(8):
    _, state = model.forward([token], state)
decode = []
for _ in range(5):
    start, s = time.perf_counter(), state
    for token in range(48):
        _, s = model.forward([token], s)
    decode.append(48 / (time.perf_counter() - start))
prefill = []
for r in range(3):
    start = time.perf_counter()
    model.forward([(7 * i + r) % 65536 for i in range(512)], None)
    prefill.append(512 / (time.perf_counter() - start))
print(json.dumps({"decode": statistics.median(decode), "prefill": statistics.median(prefill)}))
"""

JOB = """
import json, sys, time
import rwkvkit
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


def in_fresh_process(code: str, config: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RWKVKIT_CPU_POOL")}
    out = subprocess.run([sys.executable, "-c", code, *args], env={**env, **CONFIGS[config]}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_idle(benchmark, strategy):
    def measure() -> list[dict[str, dict]]:
        return [{config: in_fresh_process(SPEED, config, str(HERE), strategy) for config in IDLE} for _ in range(ROUNDS)]

    runs = benchmark.pedantic(measure, rounds=1)
    base = IDLE[-1]
    print(f"\nidle {strategy}, tok/s per round ({' / '.join(IDLE)}):")
    summary = {}
    for kind in ("decode", "prefill"):
        print(f"  {kind}: " + ", ".join("/".join(f"{run[c][kind]:.1f}" for c in IDLE) for run in runs))
        summary[kind] = {c: statistics.median(run[c][kind] for run in runs) for c in IDLE}
        for config in IDLE[:-1]:
            ratio = statistics.median(run[config][kind] / run[base][kind] for run in runs)
            summary[kind][f"{config}/{base}"] = ratio
            print(f"  {kind}: median {config} {summary[kind][config]:.1f}, {base} {summary[kind][base]:.1f}, median ratio {ratio:.3f}")
    benchmark.extra_info.update(kind="idle", strategy=strategy, **summary)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_contended(benchmark, strategy, config):
    with busy_cpu0():
        result = benchmark.pedantic(in_fresh_process, args=(SPEED, config, str(HERE), strategy), rounds=1)
    print(f"\ncontended {strategy} {config}: decode {result['decode']:.1f} tok/s, prefill {result['prefill']:.1f} tok/s")
    benchmark.extra_info.update(kind="contended", strategy=strategy, config=config, **result)


@pytest.mark.parametrize("config", CONFIGS)
def test_job_latency(benchmark, config):
    result = benchmark.pedantic(in_fresh_process, args=(JOB, config, str(CALLS)), rounds=1)
    print(f"\njob {config}: {result['wall_us']:.1f} us wall, {result['cpu_us']:.1f} us CPU per call")
    benchmark.extra_info.update(kind="job", config=config, **result)
