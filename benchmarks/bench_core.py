"""Decode and prefill speed of our ``cpu fp32`` (torch backend) against the `rwkv` package, same run.

Run: ``pytest benchmarks/bench_core.py --benchmark-enable``; tok/s are in each row's extra_info
(``--benchmark-json out.json`` keeps them). Model: random, 0.1B World shape (12 x 768, vocab 65,536).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.testing import make_checkpoint

os.environ["RWKV_V7_ON"] = "1"  # read by the oracle at import; benchmarks run in their own process
from rwkv.model import RWKV as OracleRWKV  # noqa: E402

DECODE_STEPS, PREFILL_LEN = 128, 512


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(2)
    path = make_checkpoint(tmp_path_factory.mktemp("bench") / "world01b.pth", n_layer=12, n_embd=768, vocab_size=65536)
    return {"rwkvkit": RWKV(path, "cpu fp32"), "oracle": OracleRWKV(str(path.with_suffix("")), "cpu fp32")}


def _prompt(n: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("impl", ["rwkvkit", "oracle"])
def test_decode(benchmark, models, impl):
    model = models[impl]
    _, start = model.forward(_prompt(16), None)

    def run():
        state = copy.deepcopy(start)  # the oracle updates its state list in place
        for token in range(DECODE_STEPS):
            _, state = model.forward([token], state)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tok_per_s"] = DECODE_STEPS / benchmark.stats.stats.median


@pytest.mark.parametrize("impl", ["rwkvkit", "oracle"])
def test_prefill(benchmark, models, impl):
    model, prompt = models[impl], _prompt(PREFILL_LEN)
    benchmark.pedantic(lambda: model.forward(prompt, None), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tok_per_s"] = PREFILL_LEN / benchmark.stats.stats.median
