"""One decode step's sampling at the World vocabulary (65,536 tokens) on the CPU: each built-in
sampler's ``sample_batch`` over B rows against a loop of B ``sample`` calls, B = 1, 16, 64, in the
same run; and ``Penalties.apply_batch`` against a loop of ``apply``.

Logits are ``peaked`` (a confident model: the top-p cutoff lies within the top 64 tokens) or
``flat`` (randn: at top_p 0.85 the cutoff is ~34,000 tokens down, so nucleus sorts whole rows). Every
draw is one uniform from the row's own generator and a search of the row's running sum (what
keeps a sequence's tokens exactly those it draws alone).

Run: ``pytest benchmarks/bench_sampling.py --benchmark-enable -s`` (``RWKVKIT_BENCH_THREADS``,
default 2); ``test_summary`` prints microseconds per row (the fastest round: the least disturbed by other
load).
"""

from __future__ import annotations

import os

import pytest
import torch

from rwkvkit.interfaces import SampleContext
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import GreedySampler, MinPSampler, NucleusSampler, TypicalSampler

VOCAB = 65536
BATCHES = (1, 16, 64)
SAMPLERS = {
    "nucleus peaked": (NucleusSampler(), "peaked"),
    "nucleus flat": (NucleusSampler(), "flat"),
    "nucleus T=0.7 top_k=40": (NucleusSampler(temperature=0.7, top_k=40), "peaked"),
    "greedy": (GreedySampler(), "peaked"),
    "min_p": (MinPSampler(), "peaked"),
    "typical": (TypicalSampler(), "peaked"),
}
US_PER_ROW: dict[tuple[str, int, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)


def logits(kind: str, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    out = torch.randn(batch, VOCAB, generator=gen)
    if kind == "peaked":  # six likely tokens hold 96%, a long tail the rest
        out[:, torch.randperm(VOCAB, generator=gen)[:6]] += torch.tensor([14.0, 13.5, 13.0, 12.0, 11.0, 10.0])
    return out


def record(benchmark, key: tuple[str, int, str]) -> None:
    if benchmark.stats:  # None under --benchmark-disable
        US_PER_ROW[key] = benchmark.extra_info["us_per_row"] = benchmark.stats.stats.min / key[1] * 1e6


@pytest.mark.parametrize("form", ["sample_batch", "sample loop"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling(benchmark, name, batch, form):
    sampler, kind = SAMPLERS[name]
    rows = logits(kind, batch)
    ctxs = [SampleContext(torch.Generator().manual_seed(i)) for i in range(batch)]
    if form == "sample_batch":
        benchmark.pedantic(sampler.sample_batch, args=(rows, ctxs), rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [sampler.sample(row, ctx) for row, ctx in zip(rows, ctxs)], rounds=5, warmup_rounds=1)
    record(benchmark, (name, batch, form))


@pytest.mark.parametrize("form", ["apply_batch", "apply loop"])
@pytest.mark.parametrize("batch", BATCHES)
def test_penalties(benchmark, batch, form):
    """ChatRWKV's chat settings; 200 generated tokens per sequence so far."""
    gen = torch.Generator().manual_seed(0)
    rows = logits("peaked", batch)
    penalties = [Penalties(presence=0.4, frequency=0.4, decay=0.996, ban=[0]) for _ in range(batch)]
    for p in penalties:
        for token in torch.randint(0, VOCAB, (200,), generator=gen).tolist():
            p.update(token, "x")
    if form == "apply_batch":
        benchmark.pedantic(Penalties.apply_batch, args=(rows, penalties), rounds=20, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: [p.apply(row) for row, p in zip(rows, penalties)], rounds=20, warmup_rounds=1)
    record(benchmark, ("penalties", batch, form))


def test_summary():
    if not US_PER_ROW:
        pytest.skip("needs the benchmarks above, with --benchmark-enable")
    print(f"\nus per row, batched / loop (threads {torch.get_num_threads()})")
    print(f"{'':24}" + "".join(f"{f'B={b}':>24}" for b in BATCHES))
    for name in dict.fromkeys(name for name, _, _ in US_PER_ROW):
        forms = ("apply_batch", "apply loop") if name == "penalties" else ("sample_batch", "sample loop")
        cells = []
        for b in BATCHES:
            batched, loop = (US_PER_ROW.get((name, b, form), 0.0) for form in forms)
            cells.append(f"{batched:.0f} / {loop:.0f} ({loop / batched:.1f}x)" if batched and loop else "-")
        print(f"{name:24}" + "".join(f"{c:>24}" for c in cells))
