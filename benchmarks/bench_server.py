"""``rwkvkit serve`` under concurrent streaming clients: aggregate generated tokens per second and
the p50/p99 time to first token at 1, 8 and 32 clients, for the demo model and a random model of
the World 0.1B shape (12 x 768, vocab 65,536), ``cpu fp32``, all in one run:

    pytest benchmarks/bench_server.py --benchmark-enable

Each client streams one completion (a distinct 16-token prompt, ``TOKENS`` tokens, sampling on)
over its own keep-alive connection, all started together; the server batches them
(``max_batch=32``). The connections are opened by a warm-up round, as a client library or a
load balancer keeps them open, so the numbers are the server's and not TCP set-up in the
benchmark's own client process (which shares the machine's cores with the server). Each count
of clients runs ``ROUNDS`` times; the table shows the median round (tok/s) and the TTFT
percentiles over all rounds.
``RWKVKIT_BENCH_THREADS`` sets the server's threads (default 2), ``RWKVKIT_BENCH_BACKEND`` its
backend (default ``auto``). Results are in each benchmark's ``extra_info`` and printed as a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import pytest

from rwkvkit.testing import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_helpers import serving  # noqa: E402

MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")
CLIENTS = (1, 8, 32)
TOKENS = {"demo": 64, "0.1b": 32}
ROUNDS = int(os.environ.get("RWKVKIT_BENCH_ROUNDS", "5"))
RESULTS: dict[tuple[str, int], dict[str, float]] = {}


def model_overrides(name: str) -> list[str]:
    if name == "demo":
        return ["model=demo"]
    path = Path(MODEL_DIR) / "random-0.1B.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    return ["model=world_0.1b", f"model.path={path}"]


@pytest.fixture(scope="module", params=sorted(TOKENS))
def server(request):
    threads = os.environ.get("RWKVKIT_BENCH_THREADS", "2")
    backend = os.environ.get("RWKVKIT_BENCH_BACKEND", "auto")
    overrides = [*model_overrides(request.param), f"strategy.threads={threads}", f"strategy.backend={backend}", "server.max_batch=32", "server.model_name=bench"]
    with serving(*overrides) as s:
        yield request.param, s


async def one_client(http: httpx.AsyncClient, index: int, tokens: int) -> tuple[float, int]:
    """(seconds to the first generated text, tokens generated)."""
    body = {"model": "bench", "prompt": f"\nStory {index}: once upon a time, in a land far away, there", "max_tokens": tokens, "seed": index, "stream": True, "stream_options": {"include_usage": True}}
    start, first, generated = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():  # parsed only where needed: the client shares the cores
            if not line.startswith("data: {") or (first is not None and '"usage"' not in line):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, generated


async def rounds(url: str, clients: int, tokens: int) -> dict[str, float]:
    """A warm-up round on ``clients`` fresh connections, then ``ROUNDS`` measured ones on them."""
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await load(http, clients, 4)
        measured = [await load(http, clients, tokens) for _ in range(ROUNDS)]
    ttfts = sorted(t for m in measured for t in m["ttfts"])
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    rates = [m["tok_per_s"] for m in measured]
    return {"tok_per_s": statistics.median(rates), "tok_per_s_rounds": rates, "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": p99}


async def load(http: httpx.AsyncClient, clients: int, tokens: int) -> dict:
    start = time.perf_counter()
    done = await asyncio.gather(*(one_client(http, i, tokens) for i in range(clients)))
    wall = time.perf_counter() - start
    total = sum(n for _, n in done)
    assert total == clients * tokens, "a client got fewer tokens than asked"
    return {"tok_per_s": total / wall, "ttfts": [t for t, _ in done]}


@pytest.mark.parametrize("clients", CLIENTS)
def test_concurrent_clients(benchmark, server, clients):
    name, s = server
    stats = benchmark.pedantic(lambda: asyncio.run(rounds(s.url, clients, TOKENS[name])), rounds=1, iterations=1)
    RESULTS[name, clients] = stats
    single = RESULTS.get((name, 1))
    extra = {"speedup_vs_1": stats["tok_per_s"] / single["tok_per_s"]} if single else {}
    benchmark.extra_info.update(model=name, clients=clients, tokens_per_client=TOKENS[name], **stats, **extra)
    spread = "/".join(f"{r:.0f}" for r in stats["tok_per_s_rounds"])
    print(f"\n{name:>5} {clients:>3} clients: {stats['tok_per_s']:8.1f} tok/s ({spread}), TTFT p50 {stats['ttft_p50_s'] * 1000:7.1f} ms, p99 {stats['ttft_p99_s'] * 1000:7.1f} ms" + (f", {extra['speedup_vs_1']:.1f}x one client" if extra else ""))
