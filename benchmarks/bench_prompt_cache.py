"""Time to first token with the prompt-state cache (:class:`rwkvkit.prompt_cache.PromptCache`).

A 2,000-token prompt that shares its first 1,900 tokens with a cached one (a long system prompt or
chat history, then a new turn) against the same prompt uncached, on a random model of the World
0.1B shape (12 x 768, vocab 65,536) in ``cpu fp32``; and the cost of a lookup itself in a cache of
64 entries of different lengths. Run ``pytest benchmarks/bench_prompt_cache.py --benchmark-enable``;
``RWKVKIT_BENCH_BACKEND`` picks the backend (default ``auto``), ``RWKVKIT_BENCH_THREADS`` the
threads (default 2).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.generation import auto_chunk_len
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.testing import make_checkpoint

PROMPT_LEN, SHARED = 2000, 1900
MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")


@functools.cache
def model() -> RWKV:
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    path = os.path.join(MODEL_DIR, "random-0.1B.pth")
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    return RWKV(path, "cpu fp32", backend=os.environ.get("RWKVKIT_BENCH_BACKEND", "auto"))


def prompts(m: RWKV) -> tuple[list[int], list[int]]:
    """(the cached prompt, a new prompt sharing its first SHARED tokens)."""
    ids = torch.randint(0, m.spec.vocab_size, (2 * PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    return ids[:PROMPT_LEN], ids[:SHARED] + ids[PROMPT_LEN : 2 * PROMPT_LEN - SHARED]


def prefill(m: RWKV, ids: list[int], state=None) -> torch.Tensor:
    """Logits after ``ids``, prefilled in ``generate``'s automatic chunks."""
    size = auto_chunk_len(m)
    for i in range(0, len(ids), size):
        logits, state = m.forward(ids[i : i + size], state)
    return logits


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_time_to_first_token(benchmark, cached):
    m = model()
    old, new = prompts(m)
    cache = PromptCache(1 << 30)
    if cached:  # the earlier prompt's state at the end of the shared prefix, as the engine keeps it
        logits, state = m.forward(old[:SHARED], None)
        cache.store(old[:SHARED], state, logits)

    def first_token() -> int:
        hit = cache.lookup(new)
        logits = prefill(m, new) if hit is None else prefill(m, new[hit.length :], hit.state)
        return int(logits.argmax())

    benchmark.pedantic(first_token, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(prompt=PROMPT_LEN, prefilled=PROMPT_LEN - SHARED if cached else PROMPT_LEN, backend=m.stages[0].ops.name)


def test_lookup(benchmark):
    """A hit's whole cost (prefix hashes, one probe per stored length, the ids compare, the state
    copy) with 64 entries of lengths 30, 60, ..., 1920 (the last a prefix of the prompt)."""
    m = model()
    _, new = prompts(m)
    logits, state = m.forward(new[:8], None)  # the states' values do not matter to the lookup
    cache = PromptCache(1 << 30)
    for length in range(30, SHARED + 30, 30):
        cache.store(new[:length - 1] + [new[length - 1] ^ 1], state, logits)  # misses but the longest
    cache.store(new[:1920], state, logits)
    assert cache.lookup(new).length == 1920
    benchmark(cache.lookup, new)
    benchmark.extra_info.update(entries=cache.stats().entries, bytes=cache.stats().bytes)
