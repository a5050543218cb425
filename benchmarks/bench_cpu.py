"""CPU decode and prefill speed: our ``cpu``/``int8``/``int4`` backends against the `rwkv` package, same run.

Also the plain ``torch`` backend (``cpu fp32 torch-backend``), the reference the others improve on.
Random models of the World 0.1B shape (12 x 768) and 0.4B shape (24 x 1024), vocab 65,536.
Decode: 128 single-token steps after warm-up. Prefill: 512 tokens in chunks of 64/256/512.
Run ``python benchmarks/cpu_report.py`` for the comparison table (tok/s, ratio to the oracle's
fp32, bandwidth achieved), or ``pytest benchmarks/bench_cpu.py --benchmark-enable`` directly.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.testing import make_checkpoint

os.environ["RWKV_V7_ON"] = "1"  # read by the oracle at import; benchmarks run in their own process
from rwkv.model import RWKV as OracleRWKV  # noqa: E402

SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024)}
OURS = ("cpu fp32", "cpu bf16", "cpu fp32i8", "cpu bf16i8", "cpu fp32i4", "cpu bf16i4", "cpu fp32 torch-backend")
ORACLE = ("oracle cpu fp32", "oracle cpu bf16")
DECODE_STEPS, PREFILL_LEN = 128, 512
MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")


@functools.cache
def checkpoint(shape: str):
    n_layer, n_embd = SHAPES[shape]
    path = os.path.join(MODEL_DIR, f"random-{shape}.pth")
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=n_layer, n_embd=n_embd, vocab_size=65536)
    return path


@functools.cache
def model(shape: str, impl: str):
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    path = checkpoint(shape)
    if impl.startswith("oracle "):
        return OracleRWKV(path.removesuffix(".pth"), impl.removeprefix("oracle "))
    strategy, torch_backend, _ = impl.partition(" torch-backend")
    return RWKV(path, strategy, backend="torch" if torch_backend else "auto")


def _tokens(n: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", OURS + ORACLE)
def test_decode(benchmark, shape, impl):
    m = model(shape, impl)
    _, start = m.forward(_tokens(16), None)

    def run():
        state = copy.deepcopy(start)  # the oracle updates its state list in place
        for token in range(DECODE_STEPS):
            _, state = m.forward([token], state)

    benchmark.pedantic(run, rounds=1, warmup_rounds=1)
    benchmark.extra_info.update(kind="decode", shape=shape, impl=impl, tok_per_s=DECODE_STEPS / benchmark.stats.stats.median)
    if not impl.startswith("oracle"):
        benchmark.extra_info["bytes_per_token"] = m.weight_bytes() - m.emb.nbytes * (1 - 1 / m.spec.vocab_size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [64, 256, 512])
@pytest.mark.parametrize("impl", OURS + ORACLE)
def test_prefill(benchmark, shape, chunk, impl):
    m, prompt = model(shape, impl), _tokens(PREFILL_LEN)

    def run():
        state = None
        for i in range(0, PREFILL_LEN, chunk):
            _, state = m.forward(prompt[i : i + chunk], state)

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    benchmark.extra_info.update(kind=f"prefill/{chunk}", shape=shape, impl=impl, tok_per_s=PREFILL_LEN / benchmark.stats.stats.median)
