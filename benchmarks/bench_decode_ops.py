"""Batched CPU decode, step and op by op: where a decode step of B sequences spends its time.

- ``test_step``: one decode step (``Model.forward`` of ``[B, 1]`` tokens: the fused stage and the
  head) for ``cpu fp32``, ``cpu bf16`` and ``cpu fp32i8`` at B = 1, 4, 16; ``extra_info`` holds the
  aggregate tok/s (B / step time).
- ``test_op``: one layer's ops as ``rwkv7.block`` calls them (the R/K/V ``project``, the four
  ``lora`` pairs, ``time_mix_core``, ``ln_mix``, the FFN pair) and the head, at B = 1 and 16.

Random model of the World 0.1B shape (12 x 768, vocab 65,536; shared with bench_cpu.py), 2 threads
(``RWKVKIT_BENCH_THREADS``). The machine this was written on is shared: on a busy one, compare runs
taken back to back and use CPU time rather than wall time (``--benchmark-timer time.process_time``
with ``RWKVKIT_BENCH_THREADS=1``). Run:
``pytest benchmarks/bench_decode_ops.py --benchmark-enable -p no:cacheprovider``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.backend import Epilogue
from rwkvkit.models import rwkv7

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import checkpoint  # noqa: E402

STRATEGIES = ("cpu fp32", "cpu bf16", "cpu fp32i8")


@functools.cache
def model(strategy: str) -> RWKV:
    torch.set_num_threads(int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")))
    return RWKV(checkpoint("0.1B"), strategy)


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, 65536, (B, T), generator=torch.Generator().manual_seed(B))


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_step(benchmark, strategy, B):
    m = model(strategy)
    _, state = m.forward(_tokens(B, 4), None)
    tokens = _tokens(B, 1)
    benchmark.pedantic(m.forward, (tokens, state), rounds=12, warmup_rounds=2)
    benchmark.extra_info.update(strategy=strategy, B=B)
    if benchmark.stats:  # None with --benchmark-disable (a smoke run)
        benchmark.extra_info["agg_tok_per_s"] = B / benchmark.stats.stats.median


def _layer_ops(m: RWKV, B: int) -> dict[str, tuple]:
    """Each op of layer 1 with inputs of its real shapes, as ``(fn, args)``."""
    ops, w = m.stages[0].ops, m.stages[0].blocks[1]
    att, dtype, C = w.att, ops.placement.dtype, m.spec.n_embd
    g = torch.Generator().manual_seed(0)
    x, prev = (torch.randn(B, 1, C, generator=g).to(dtype) for _ in range(2))
    _, state = m.forward(_tokens(B, 4), None)
    s = state.layers[1]
    pairs = [(att.w1, att.w2, Epilogue.TANH), (att.a1, att.a2, Epilogue.NONE), (att.g1, att.g2, Epilogue.SIGMOID), (att.v1, att.v2, Epilogue.NONE)]
    mixes = [getattr(att, name) for name in rwkv7.ATT_MIXES]
    c = rwkv7.constants()
    return {
        "ln_mix": (ops.ln_mix, (x, w.ln1_weight, w.ln1_bias, prev[:, 0], mixes, c.ln_eps)),
        "project rkv": (ops.project, ([x, x, x], [att.receptance, att.key, att.value])),
        "lora": (ops.lora, ([x] * 4, pairs)),
        "time_mix_core": (ops.time_mix_core, (att, s.att_kv, x, x, x, x, x, x, x, x, c)),
        "project ffn": (lambda: ops.project(ops.project([x], [w.ffn.key], [Epilogue.RELU_SQUARE]), [w.ffn.value], residual=x), ()),
        "head": (functools.partial(rwkv7.head, ops, m.head), (x[:, 0],)),
    }


@pytest.mark.parametrize("op", ["ln_mix", "project rkv", "lora", "time_mix_core", "project ffn", "head"])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_op(benchmark, strategy, B, op):
    fn, args = _layer_ops(model(strategy), B)[op]
    with torch.inference_mode():
        benchmark.pedantic(fn, args, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(strategy=strategy, B=B, op=op)
