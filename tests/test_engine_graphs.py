"""The engine's CUDA-graph decoding (``BatchGraphs``): sequences' states in one preallocated pool,
a batch of n decoded by the graph of the smallest bucket >= n over the pool's first rows.

Everything but the capture itself is bookkeeping — which rows hold whom after sequences join and
leave, bucket padding, warm-up — and is checked here on any machine: ``capture=False`` runs the
very same step eagerly over the same buffers. The captured path is checked in
tests/test_cuda_backend.py (GPU only)."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.cuda_graphs import BatchGraphs, shared_graphs
from rwkvkit.engine import Engine
from rwkvkit.errors import InputError, StrategyError
from test_engine import BACKENDS, BUDGET, assert_same, load, prompts, request  # noqa: F401 - load is a fixture


def run(model, tok, reqs, graphs, max_batch=8, joins=()):
    """Generate ``reqs``, submitting those listed in ``joins`` (index, after n steps) mid-run."""
    engine = Engine(model, tok, max_batch=max_batch, prefill_tokens_per_step=BUDGET, cuda_graphs=graphs)
    late = dict(joins)
    handles = {i: engine.submit(r) for i, r in enumerate(reqs) if i not in late}
    steps = 0
    while engine.pending or len(handles) < len(reqs):
        for i, after in late.items():
            if after == steps and i not in handles:
                handles[i] = engine.submit(reqs[i])
        engine.step()
        steps += 1
    return [handles[i].result for i in range(len(reqs))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_decoding_gives_the_eager_tokens(load, backend):
    """Five sequences (bucket 8: three padding rows), two joining mid-run, different lengths so
    that they leave at different steps: every join and leave rewrites the pool; a row read from a
    stale or shifted slot would change its sequence's tokens."""
    model, tok = load("world", backend)
    ids = prompts(model, (1, 37, 5, 120, 3), seed=4)

    def reqs():
        return [request(p, "nucleus", i, token_count=6 + 5 * i) for i, p in enumerate(ids)]

    joins = ((3, 4), (4, 9))
    want = run(model, tok, reqs(), False, joins=joins)
    graphs = BatchGraphs(model, 8, capture=False)
    got = run(model, tok, reqs(), graphs, joins=joins)
    for a, b in zip(got, want):
        assert_same(a, b)
    assert len(graphs._decoders) >= 3 and not graphs.in_use  # buckets grew and shrank; released at the end


def test_pool_state_and_logits_match_forward(load):
    """The state a pool step leaves equals Model.forward's from the same rows, and so do logits
    (the same kernels on the same rows; the padding rows only enlarge the batch, which moves
    fp32 sums by the order bound of test_batched_decode_logits_match_alone)."""
    model, _ = load("world", "cpu")
    states, tokens = [], []
    for p in prompts(model, (4, 9, 2), seed=5):
        logits, state = model.forward(p, None)
        states.append(state)
        tokens.append(int(logits.argmax()))
    from rwkvkit.state import State

    batch = State.cat(states)
    graphs = BatchGraphs(model, 4, capture=False)
    want_logits, want_state = model.forward(torch.tensor(tokens)[:, None], batch)
    got_logits, got_state = graphs.decode(tokens, batch)
    scale = float(want_logits.abs().max())
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-4 * scale)
    for a, b in zip(got_state.layers, want_state.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    # the returned state is the pool: the next step takes it without a copy and continues it
    again, _ = graphs.decode(tokens, got_state)
    reference, _ = model.forward(torch.tensor(tokens)[:, None], want_state)
    assert torch.allclose(again, reference, rtol=0, atol=1e-4 * scale)


def test_buckets_and_bad_use(load):
    model, tok = load("tiny")
    graphs = BatchGraphs(model, 6, capture=False)
    assert graphs.buckets == [1, 2, 4, 6] and [graphs.bucket(n) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]
    with pytest.raises(InputError, match=r"7 sequences .* \(1\.\.6\)"):
        graphs.bucket(7)
    with pytest.raises(InputError, match="max_batch=8"):
        Engine(model, tok, max_batch=8, cuda_graphs=graphs)
    with pytest.raises(StrategyError, match="one CUDA device"):
        Engine(model, tok, cuda_graphs=True)
    with pytest.raises(StrategyError, match="one CUDA device"):
        BatchGraphs(model, 2)
    assert shared_graphs(model, 4) is None  # a CPU model: eager steps
