"""Per-token cost of structured output against unconstrained decode, on the World 0.1B shape
(12 x 768, vocab 65,536, random weights) with ``cpu fp32i8``, batch 1 and 16, in one run.

``test_decode`` times B unconstrained sequences of ``TOKENS`` engine steps (prefill, then forward
+ penalties + greedy sampling per step); ``test_constrained`` the same B sequences, each under a
constraint of each type. Greedy, because its cost does not depend on the mask: the nucleus
sampler's does (a peaked row, as a masked one is, costs it a small top-k instead of a sort of the
whole vocabulary), which made constrained steps of a random model faster than unconstrained ones. The constraints are long versions of the test cases (an array of at
least 8 nested objects, 16 or more dates, 16-32 grammar pairs) and end-of-text is banned in both
runs, so every constrained sequence also runs exactly ``TOKENS`` steps: the wall time per step is
comparable, and its excess is the overhead, including whatever the mask worker thread takes from
the forward's cores. Compiling the source and building each sequence's constraint (with its
first mask) happen before generation and are not timed. Each constraint call is also timed: on
the engine's thread (``mask``, ``advance``, ``is_finished``, ``is_accepting``) and in the worker
(``prepare_masks``, overlapping the forward).

Run: ``pytest benchmarks/bench_constraints.py --benchmark-enable -s`` (``RWKVKIT_BENCH_THREADS``,
default 2); ``test_summary`` prints the table.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.constraints import Constraint, constraint_maker
from rwkvkit.engine import Engine, Request
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.testing import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from constraint_cases import GRAMMAR, REGEXES, SCHEMAS  # noqa: E402

MODEL_DIR = os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models")
BATCHES = (1, 16)
TOKENS = 32  # decode steps of every sequence
ROUNDS = 3  # the minimum of 3 rounds: the least disturbed by other jobs
LONG_GRAMMAR = GRAMMAR.replace("~0..2", "~16..32")
assert LONG_GRAMMAR != GRAMMAR, "constraint_cases.GRAMMAR changed: update LONG_GRAMMAR"
CASES = {
    "json_schema": {"type": "array", "items": SCHEMAS["nested"], "minItems": 8},
    "regex": f"(?:{REGEXES['date']};){{16,}}",
    "grammar": LONG_GRAMMAR,
}
STEP_MS: dict[tuple[str, int], float] = {}  # (case or "none", batch) -> wall ms per step
CALL_MS: dict[tuple[str, int], tuple[float, float]] = {}  # -> (engine-thread, worker) ms per step, all rows


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    path = os.path.join(MODEL_DIR, "random-0.1B.pth")  # shared with bench_cpu.py
    if not os.path.exists(path):
        os.makedirs(MODEL_DIR, exist_ok=True)
        make_checkpoint(path, n_layer=12, n_embd=768, vocab_size=65536)
    return RWKV(path, "cpu fp32i8"), resolve_tokenizer("rwkv_vocab_v20230424")


class Timed(Constraint):
    """Delegates to a constraint, adding the time of its calls on the engine's thread to
    ``seconds`` and of ``prepare_masks`` (in the engine's worker) to ``worker_seconds``."""

    def __init__(self, inner: Constraint) -> None:
        self.inner, self.end_tokens, self.seconds, self.worker_seconds = inner, inner.end_tokens, 0.0, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def mask(self, logits: torch.Tensor) -> None:
        self._timed(self.inner.mask, logits)

    def advance(self, token: int) -> None:
        self._timed(self.inner.advance, token)

    def is_finished(self) -> bool:
        return self._timed(self.inner.is_finished)

    def is_accepting(self) -> bool:
        return self._timed(self.inner.is_accepting)

    @classmethod
    def prepare_masks(cls, constraints: Sequence[Timed]) -> None:
        t0 = time.perf_counter()
        type(constraints[0].inner).prepare_masks([c.inner for c in constraints])  # one kind per run
        for c in constraints:
            c.worker_seconds += (time.perf_counter() - t0) / len(constraints)


def requests(batch: int, constraints: Sequence[Constraint | None]) -> list[Request]:
    """End-of-text (0) is banned: a sequence ends only after ``TOKENS`` steps."""
    return [
        Request("Here it is:", TOKENS, GreedySampler(), Penalties(0.2, 0.2, 0.996, ban=[0]), seed=i, constraint=c)
        for i, c in zip(range(batch), constraints)
    ]


def timed_run(benchmark, model, tok, batch: int, make) -> list[list[Timed | None]]:
    """``ROUNDS`` timed generations of ``batch`` sequences, constraints from ``make`` built
    untimed before each; the constraints of every round."""
    rounds: list[list[Timed | None]] = []

    def setup():
        rounds.append([make() for _ in range(batch)])
        return (requests(batch, rounds[-1]),), {}

    def run(reqs):
        results = Engine(model, tok, max_batch=batch).generate(reqs)
        assert all(len(r.tokens) == TOKENS for r in results), [(r.stop_reason, r.text) for r in results]

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=0)
    return rounds


@pytest.mark.parametrize("batch", BATCHES)
def test_decode(benchmark, setup, batch):
    timed_run(benchmark, *setup, batch, lambda: None)
    if benchmark.stats:
        STEP_MS["none", batch] = benchmark.extra_info["step_ms"] = benchmark.stats.stats.min / TOKENS * 1e3


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", CASES)
def test_constrained(benchmark, setup, case, batch):
    model, tok = setup
    make = constraint_maker({case: CASES[case]}, tok)
    rounds = timed_run(benchmark, model, tok, batch, lambda: Timed(make()))
    if benchmark.stats:
        STEP_MS[case, batch] = benchmark.extra_info["step_ms"] = benchmark.stats.stats.min / TOKENS * 1e3
        last = rounds[-1]  # the calls' time per step, summed over the batch's rows
        CALL_MS[case, batch] = tuple(sum(getattr(t, f) for t in last) / TOKENS * 1e3 for f in ("seconds", "worker_seconds"))
        benchmark.extra_info["engine_thread_ms"], benchmark.extra_info["worker_ms"] = CALL_MS[case, batch]


def test_summary():
    if not STEP_MS:
        pytest.skip("run with --benchmark-enable")
    print(f"\nper-step wall time, 0.1B cpu fp32i8, {TOKENS} steps, min of {ROUNDS} rounds (ms; overhead vs unconstrained)")
    for batch in (b for b in BATCHES if ("none", b) in STEP_MS):  # -k may have deselected one
        base = STEP_MS["none", batch]
        print(f"batch {batch:2}: unconstrained {base:8.2f} ms")
        for case in (c for c in CASES if (c, batch) in STEP_MS):
            ms, (own, worker) = STEP_MS[case, batch], CALL_MS[case, batch]
            print(f"    {case:12} {ms:8.2f} ms  {100 * (ms / base - 1):+6.2f}%   constraint calls: engine thread {own:6.3f} ms, worker {worker:6.3f} ms")
