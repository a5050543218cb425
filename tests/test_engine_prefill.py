"""Batched prefill (issue 17): the next chunks of several new prompts that have the same length
run in one ``[B, T]`` forward, while each prompt keeps the chunks it has alone, so a batch gives
each prompt's tokens alone; prompt logprobs, cache cut points, initial states and failures stay
per row. The forwards are counted, so the batching cannot silently regress to one per prompt."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.engine import Engine, Request
from rwkvkit.engine.sequence import PROMPT_LOGPROBS_CHUNK
from rwkvkit.errors import StateError
from rwkvkit.generation import generate
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.state import State
from test_engine import BACKENDS, assert_same, load, prompts, request  # noqa: F401 - load is a fixture
from test_engine_logprobs import check, reference

CHUNK = 32


def count_forwards(monkeypatch, model) -> list[tuple[int, ...]]:
    """The token shapes of every ``model.forward`` call from now on (prefill ``[B, T]`` with
    T > 1 in these tests, decode ``[B, 1]``)."""
    calls, forward = [], model.forward

    def counted(tokens, state, full_output=False):
        calls.append(tuple(torch.as_tensor(tokens).shape))
        return forward(tokens, state, full_output)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def prefills(calls) -> list[tuple[int, ...]]:
    return [shape for shape in calls if shape[-1] > 1]


def alone(model, tok, req: Request, state: State | None = None):
    fresh = request(req.prompt, "greedy" if isinstance(req.sampler, GreedySampler) else "nucleus", req.seed - 100, token_count=req.token_count)
    return generate(model, tok, fresh.prompt, token_count=fresh.token_count, sampler=fresh.sampler, penalties=fresh.penalties, chunk_len=CHUNK, seed=fresh.seed, state=state)


@pytest.mark.parametrize("mode", ["greedy", "nucleus"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prompts_of_equal_and_unequal_lengths_prefill_together_and_give_their_tokens_alone(load, monkeypatch, backend, mode):
    """70, 40, 70, 40, 70 tokens in chunks of 32: rounds of [5, 32], then [3, 32] and the 40s'
    tails [2, 8], then the 70s' tails [3, 6] — four prefill forwards for thirteen chunks."""
    model, tok = load("world", backend)
    reqs = [request(ids, mode, i, chunk_len=CHUNK) for i, ids in enumerate(prompts(model, (70, 40, 70, 40, 70), seed=11))]
    calls = count_forwards(monkeypatch, model)
    results = Engine(model, tok, prefill_tokens_per_step=None).generate(reqs)
    assert prefills(calls) == [(5, CHUNK), (3, CHUNK), (2, 8), (3, 6)]
    monkeypatch.undo()
    for req, got in zip(reqs, results):
        assert_same(got, alone(model, tok, req))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_prefill_logits_and_states_match_each_prompt_alone(load, backend):
    """A [5, T] forward against each row alone. Measured: int8 rows are bit-identical (its
    kernels compute each row's products alone); fp32 rows differ by at most ~8e-7 of the largest
    value, the summation order of a blocked matrix product over B*T rows instead of T; 1e-5 of
    the scale is ~13x that and far below the gaps between the top logits that decide tokens."""
    model, _ = load("world", backend)
    tolerance = 0.0 if backend == "int8" else 1e-5
    for n in (7, 40):
        ids = torch.tensor(prompts(model, (n,) * 5, seed=n))
        logits, state = model.forward(ids, None)
        for i in range(5):
            single, single_state = model.forward(ids[i].tolist(), None)
            assert (logits[i] - single).abs().max() <= tolerance * single.abs().max()
            for batched_layer, layer in zip(state.layers, single_state.layers):
                for b, s in zip(batched_layer.tensors(), layer.tensors()):
                    assert (b[i] - s[0]).abs().max() <= tolerance * s.abs().max()


def test_prompt_logprob_rows_prefill_apart_from_the_others(load, monkeypatch):
    """Rows recording their prompt's logprobs need every position's logits: they share a
    full-output forward with each other (up to PROMPT_LOGPROBS_CHUNK positions' logits in all, the
    memory bound of one such row alone), not with rows that need only the last position."""
    model, tok = load("demo")
    ids = prompts(model, (PROMPT_LOGPROBS_CHUNK + 10,) * 2 + (10, 10), seed=12)
    reqs = [request(p, "greedy", i, token_count=4, prompt_logprobs=i < 2, logprobs=2 if i < 2 else None) for i, p in enumerate(ids)]
    calls = count_forwards(monkeypatch, model)
    results = Engine(model, tok, prefill_tokens_per_step=None).generate(reqs)
    assert prefills(calls) == [(1, PROMPT_LOGPROBS_CHUNK), (1, PROMPT_LOGPROBS_CHUNK), (2, 10), (2, 10)]
    monkeypatch.undo()
    for p, r, req in zip(ids[:2], results[:2], reqs[:2]):
        check(r.prompt_logprobs, p[1:], reference(model, p, [])[: len(p) - 1], 2)
        assert r.tokens == alone(model, tok, req).tokens
    assert all(r.prompt_logprobs is None for r in results[2:])


def test_cache_cut_points_and_stores_in_a_batched_prefill(load, monkeypatch):
    """Two prompts with one 64-token header, prefilled together, stop at their cut point and
    store the header once (the same key) and each whole prompt; a third prompt with that header
    then starts from it, and all give their uncached tokens."""
    model, tok = load("world", "cpu")
    header, tail_a, tail_b, tail_c = prompts(model, (64, 20, 20, 9), seed=13)
    cache = PromptCache(1 << 28)
    engine = Engine(model, tok, prefill_tokens_per_step=None, cache=cache)
    reqs = [request(header + tail, "nucleus", i, chunk_len=CHUNK, cache_prefix_len=64) for i, tail in enumerate((tail_a, tail_b))]
    calls = count_forwards(monkeypatch, model)
    first = engine.generate(reqs)
    assert prefills(calls) == [(2, CHUNK), (2, CHUNK), (2, 20)]
    assert cache.stats().entries == 3  # the header, and the two whole prompts
    third = engine.generate([request(header + tail_c, "nucleus", 2, chunk_len=CHUNK)])[0]
    assert prefills(calls)[3:] == [(1, 9)] and cache.stats().hits == 1
    monkeypatch.undo()
    for req, got in zip(reqs, first):
        assert_same(got, alone(model, tok, req))
    assert_same(third, alone(model, tok, request(header + tail_c, "nucleus", 2)))


def test_requests_with_their_own_states_are_stacked_and_a_bad_one_ends_alone(load, monkeypatch):
    model, tok = load("world", "cpu")
    starts = [model.forward(p, None)[1] for p in prompts(model, (5, 17), seed=14)]
    before = [t.clone() for layer in starts[0].layers for t in layer.tensors()]
    other = State(starts[0].layers, "another model")
    ids = prompts(model, (12, 12, 12, 12), seed=15)
    states = [starts[0], None, starts[1], other]
    reqs = [request(p, "greedy", i, state=s) for i, (p, s) in enumerate(zip(ids, states))]
    calls = count_forwards(monkeypatch, model)
    engine = Engine(model, tok, prefill_tokens_per_step=None)
    handles = [engine.submit(r) for r in reqs]
    engine.run()
    assert prefills(calls) == [(3, 12)]  # the refused state's row never joined
    monkeypatch.undo()
    assert isinstance(handles[3].error, StateError) and "another model" in str(handles[3].error)
    for h, s in zip(handles[:3], states):
        assert_same(h.result, alone(model, tok, h.request, state=s))
    assert all(torch.equal(a, b) for a, b in zip(before, (t for layer in starts[0].layers for t in layer.tensors())))  # the caller's state is untouched


def test_a_failing_batched_forward_ends_only_the_rows_it_belongs_to(load, monkeypatch):
    """A forward that fails whenever one prompt's chunk is in it (as a plugin backend might on
    an input it cannot handle): the batch is retried row by row, so only that request ends."""
    model, tok = load("world")
    ids = prompts(model, (9, 9, 9), seed=16)
    poison, forward, calls = ids[1][0], model.forward, []

    def failing(tokens, state, full_output=False):
        tokens = torch.as_tensor(tokens)
        calls.append(tuple(tokens.shape))
        if tokens.shape[-1] > 1 and bool((tokens[..., 0] == poison).any()):
            raise RuntimeError("backend cannot run this chunk")
        return forward(tokens, state, full_output)

    monkeypatch.setattr(model, "forward", failing)
    reqs = [request(p, "greedy", i) for i, p in enumerate(ids)]
    engine = Engine(model, tok)
    handles = [engine.submit(r) for r in reqs]
    engine.run()
    monkeypatch.undo()
    assert prefills(calls) == [(3, 9), (1, 9), (1, 9), (1, 9)]
    assert isinstance(handles[1].error, RuntimeError) and handles[1].result.stop_reason == "error"
    for h in (handles[0], handles[2]):
        assert h.error is None
        assert_same(h.result, alone(model, tok, h.request))
