"""Batched decoding (issue 16): aggregate decode tok/s against the batch size, per backend, and a
list of prompts through ``PIPELINE.generate(list)`` against a loop of single calls, in one run.

Random model of the World 0.1B shape (12 x 768, vocab 65,536), cached in ``RWKVKIT_BENCH_MODELS``
(default /tmp/rwkvkit-bench-models). ``test_decode``: ``DECODE_STEPS`` batched ``Model.forward``
steps of ``[B, 1]`` tokens, B = 1, 4, 16, 64, for ``cpu fp32``, ``cpu bf16``, ``cpu fp32i8`` (the
fastest backend for each) and ``torch`` (the reference backend, ``cpu fp32``). ``test_generate``:
``RWKVKIT_BENCH_PROMPTS`` prompts (default 64) x ``RWKVKIT_BENCH_TOKENS`` tokens (default 128) with
ChatRWKV's default sampling, as one list call (the engine, one batch) and as one call per prompt.
``test_summary`` prints the table and the ratios (B=16 / B=1; list / loop).

Run: ``pytest benchmarks/bench_batch.py --benchmark-enable -s`` (``RWKVKIT_BENCH_THREADS``,
default 2); restrict with ``-k``, e.g. ``-k "fp32i8 or summary"``, ``-k "decode and not torch or
summary"``, and shrink the generate test with ``RWKVKIT_BENCH_PROMPTS=16 RWKVKIT_BENCH_TOKENS=32``.
"""

from __future__ import annotations

import functools
import os

import rwkvkit  # noqa: F401, I001 - before torch: the OpenMP wait policy rwkvkit's commands get (rwkvkit.omp_wait)
import pytest
import torch

from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.state import State
from rwkvkit.testing import make_checkpoint

BACKENDS = {"cpu fp32": ("cpu fp32", "auto"), "cpu bf16": ("cpu bf16", "auto"), "cpu fp32i8": ("cpu fp32i8", "auto"), "torch": ("cpu fp32", "torch")}
BATCHES = (1, 4, 16, 64)
DECODE_STEPS = 8
PROMPTS = int(os.environ.get("RWKVKIT_BENCH_PROMPTS", "64"))
TOKENS = int(os.environ.get("RWKVKIT_BENCH_TOKENS", "128"))
MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")
TOK_PER_S: dict[tuple[str, str], float] = {}  # (backend, "B=4" or "list"/"loop") -> tokens/s


@functools.cache
def model(backend: str) -> RWKV:
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    path = os.path.join(MODEL_DIR, "random-0.1B.pth")
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    strategy, name = BACKENDS[backend]
    return RWKV(path, strategy, backend=name)


def record(benchmark, key: tuple[str, str], tokens: int) -> None:
    """tokens/s of the fastest round (the least disturbed by other load on a shared machine)."""
    if benchmark.stats:  # None under --benchmark-disable
        TOK_PER_S[key] = benchmark.extra_info["tok_per_s"] = tokens / benchmark.stats.stats.min


@pytest.mark.parametrize("batch", BATCHES, ids=[f"B={b}" for b in BATCHES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(benchmark, backend, batch):
    m = model(backend)
    _, one = m.forward(list(range(1, 17)), None)
    start = State.cat([one] * batch)
    tokens = torch.randint(0, m.spec.vocab_size, (DECODE_STEPS, batch, 1), generator=torch.Generator().manual_seed(batch))

    def decode() -> None:
        state = start
        for step in tokens:
            _, state = m.forward(step, state)

    benchmark.pedantic(decode, rounds=3, warmup_rounds=1)
    record(benchmark, (backend, f"B={batch}"), batch * DECODE_STEPS)


@pytest.mark.parametrize("form", ["list", "loop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate(benchmark, backend, form):
    """Each prompt gets the same seed in both forms, so both generate the same tokens."""
    pipeline = PIPELINE(model(backend), "rwkv_vocab_v20230424")
    texts = [f"Prompt {i}: once upon a time" for i in range(PROMPTS)]
    seeds = list(range(PROMPTS))
    args = PIPELINE_ARGS()

    def run() -> int:
        if form == "list":
            results = pipeline.generate(texts, TOKENS, args, seed=seeds, return_result=True)
        else:
            results = [pipeline.generate(t, TOKENS, args, seed=s, return_result=True) for t, s in zip(texts, seeds)]
        return sum(len(r.tokens) for r in results)

    generated = benchmark.pedantic(run, rounds=1)
    record(benchmark, (backend, form), generated)


def test_summary():
    if not TOK_PER_S:
        pytest.skip("needs the benchmarks above, with --benchmark-enable")
    columns = [f"B={b}" for b in BATCHES] + ["B=16/B=1", "list", "loop", "list/loop"]
    print(f"\naggregate tok/s, 0.1B shape, {torch.get_num_threads()} threads; generate: {PROMPTS} prompts x {TOKENS} tokens")
    print(f"{'':12}" + "".join(f"{c:>11}" for c in columns))
    for backend in dict.fromkeys(b for b, _ in TOK_PER_S):
        got = {k: v for (b, k), v in TOK_PER_S.items() if b == backend}
        ratios = {"B=16/B=1": ("B=16", "B=1"), "list/loop": ("list", "loop")}
        cells = []
        for c in columns:
            if c in ratios:
                top, bottom = (got.get(k) for k in ratios[c])
                cells.append(f"{top / bottom:.2f}x" if top and bottom else "-")
            else:
                cells.append(f"{got[c]:.1f}" if c in got else "-")
        print(f"{backend:12}" + "".join(f"{c:>11}" for c in cells))
