"""Per-token cost of structured output against unconstrained decode, on the World 0.1B shape
(12 x 768, vocab 65,536, random weights) with ``cpu fp32i8``, batch 1 and 16.

``test_decode`` times unconstrained engine steps (forward + penalties + nucleus sampling) for B
sequences. ``test_constrained`` generates B constrained sequences and times, inside the engine, every
call the engine makes on their constraints (``mask`` after the penalties, ``advance`` after the
sampler, ``is_finished`` / ``is_accepting``): that time per step, over the unconstrained step
time, is the overhead. The constraint time is measured directly because constrained sequences end
when complete, so their wall time is not comparable step for step. The first mask of a sequence
(where llguidance builds its lexer) is included; compiling the source is not (it happens before
generation).

Run: ``pytest benchmarks/bench_constraints.py --benchmark-enable -s`` (``RWKVKIT_BENCH_THREADS``,
default 2); ``test_summary`` prints the table.

Measured at batch 1 on a heavily shared 2-core machine (load average ~16, so every time is
inflated; the ratio is what to read): unconstrained step 1,241 ms; json_schema (nested) +5.2 ms
(0.42%), regex (date) +3.1 ms (0.25%), grammar +5.2 ms (0.42%). Batch 16 not yet measured.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.constraints import Constraint, constraint_maker
from rwkvkit.engine import Engine, Request
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import NucleusSampler
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.testing import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from constraint_cases import GRAMMAR, REGEXES, SCHEMAS  # noqa: E402

MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")
BATCHES = (1, 16)
TOKENS = 32  # decode steps of the unconstrained run
CASES = {"json_schema": SCHEMAS["nested"], "regex": REGEXES["date"], "grammar": GRAMMAR}
STEP_MS: dict[int, float] = {}
CONSTRAINT_MS: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    path = os.path.join(MODEL_DIR, "random-0.1B.pth")  # shared with bench_cpu.py
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    return RWKV(path, "cpu fp32i8"), resolve_tokenizer("rwkv_vocab_v20230424")


class Timed(Constraint):
    """Delegates to a constraint and adds the time of every call to ``seconds``."""

    def __init__(self, inner: Constraint) -> None:
        self.inner, self.end_tokens, self.seconds, self.steps = inner, inner.end_tokens, 0.0, 0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def mask(self, logits: torch.Tensor) -> None:
        self.steps += 1
        self._timed(self.inner.mask, logits)

    def advance(self, token: int) -> None:
        self._timed(self.inner.advance, token)

    def is_finished(self) -> bool:
        return self._timed(self.inner.is_finished)

    def is_accepting(self) -> bool:
        return self._timed(self.inner.is_accepting)


def requests(batch: int, token_count: int, constraints: list[Constraint | None]) -> list[Request]:
    return [
        Request("Here it is:", token_count, NucleusSampler(temperature=1.0, top_p=0.9), Penalties(0.2, 0.2, 0.996), seed=i, constraint=c)
        for i, c in zip(range(batch), constraints)
    ]


@pytest.mark.parametrize("batch", BATCHES)
def test_decode(benchmark, setup, batch):
    model, tok = setup

    def run():
        return Engine(model, tok, max_batch=batch).generate(requests(batch, TOKENS, [None] * batch))

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    if benchmark.stats:
        STEP_MS[batch] = benchmark.extra_info["step_ms"] = benchmark.stats.stats.min / TOKENS * 1e3


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_constrained(benchmark, setup, case, batch):
    model, tok = setup
    make = constraint_maker({case: CASES[case]}, tok)
    timed: list[Timed] = []

    def run():
        timed[:] = [Timed(make()) for _ in range(batch)]
        return Engine(model, tok, max_batch=batch).generate(requests(batch, 4 * TOKENS, list(timed)))

    results = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    assert all(r.stop_reason == "constraint" for r in results), [(r.stop_reason, r.text) for r in results]
    if benchmark.stats:
        # per step with all B sequences constrained: each sequence's mean cost per step, summed
        CONSTRAINT_MS[case, batch] = benchmark.extra_info["constraint_ms_per_step"] = sum(t.seconds / t.steps for t in timed) * 1e3


def test_summary():
    if not STEP_MS:
        pytest.skip("run with --benchmark-enable")
    print("\nconstraint cost per engine step, 0.1B cpu fp32i8 (ms; % of an unconstrained step)")
    for batch in (b for b in BATCHES if b in STEP_MS):  # -k may have deselected one
        print(f"batch {batch:2}: unconstrained step {STEP_MS[batch]:7.2f} ms")
        for case in CASES:
            ms = CONSTRAINT_MS.get((case, batch))
            if ms is not None:
                print(f"    {case:12} +{ms:6.3f} ms  ({100 * ms / STEP_MS[batch]:5.2f}%)")
