"""Prefill speed against the chunk length, the measurement behind ``generate``'s automatic chunk
(``chunk_len=None``: :func:`rwkvkit.generation.auto_chunk_len`).

The demo model and a random model of the World 0.1B shape (12 x 768, vocab 65,536), 8,192 prompt
tokens on the CPU in fp32. Run ``pytest benchmarks/bench_prefill_chunk.py --benchmark-enable``;
``extra_info`` holds tok/s and the chunk actually used.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.generation import auto_chunk_len
from rwkvkit.testing import make_checkpoint

PROMPT_LEN = 8192
MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")


@functools.cache
def model(name: str) -> RWKV:
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    if name == "demo":
        return RWKV(Path(str(resources.files("rwkvkit.demo") / "demo.pth")), "cpu fp32")
    path = os.path.join(MODEL_DIR, "random-0.1B.pth")
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    return RWKV(path, "cpu fp32")


@pytest.mark.parametrize("name", ["demo", "0.1B"])
@pytest.mark.parametrize("chunk", [64, 256, 1024, 2048, 4096, None])
def test_prefill_chunk(benchmark, name, chunk):
    m = model(name)
    size = chunk or auto_chunk_len(m)
    prompt = torch.randint(0, m.spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()

    def run():
        state = None
        for i in range(0, PROMPT_LEN, size):
            _, state = m.forward(prompt[i : i + size], state)

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    benchmark.extra_info.update(chunk=size, tok_per_s=PROMPT_LEN / benchmark.stats.stats.median)
