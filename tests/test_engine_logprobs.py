"""Log-probabilities recorded by the engine (``Request.logprobs`` / ``prompt_logprobs``, what the
server's OpenAI ``logprobs`` and ``echo`` report): the log-softmax of the raw logits that a plain
``Model.forward`` gives for the same tokens, per generated token and per prompt token, across
prefill chunks, in a batch, and not taken from the prompt cache."""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.engine import Engine, Request
from rwkvkit.engine.sequence import PROMPT_LOGPROBS_CHUNK
from rwkvkit.errors import InputError
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import GreedySampler, NucleusSampler
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.resolve import resolve_tokenizer

# The engine's logprobs come from the same forward calls, chunked differently (prefill chunks,
# batched decode rows): float32 summation-order differences only, ~1e-6 on logits of size ~10.
ATOL = 1e-4


@pytest.fixture(scope="module")
def demo():
    return RWKV("pkg://rwkvkit.demo/demo.pth", "cpu fp32", backend="torch"), resolve_tokenizer("pkg://rwkvkit.demo/tokenizer.json")


def reference(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log-softmax rows predicting prompt[1:] + tokens, from one full-output forward."""
    logits, _ = model.forward(prompt + tokens, None, full_output=True)
    return torch.log_softmax(logits[:-1], dim=-1)


def prompt_of(model, n: int, seed: int = 0) -> list[int]:
    return torch.randint(model.spec.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check(entries, targets: list[int], ref: torch.Tensor, top: int) -> None:
    assert [e.token for e in entries] == targets
    for e, row in zip(entries, ref):
        assert e.logprob == pytest.approx(row[e.token].item(), abs=ATOL)
        values, ids = row.topk(top)
        assert [t for t, _ in e.top] == ids.tolist()
        assert [v for _, v in e.top] == pytest.approx(values.tolist(), abs=ATOL)


def test_generated_and_prompt_logprobs_match_a_plain_forward(demo):
    model, tok = demo
    prompt = prompt_of(model, PROMPT_LOGPROBS_CHUNK + 40)  # two prefill chunks
    engine = Engine(model, tok, prefill_tokens_per_step=None)
    # penalties and temperature change the sampling, not the reported (raw) distribution
    request = Request(prompt, 12, NucleusSampler(temperature=0.7, top_p=0.5), Penalties(0.5, 0.5, 0.99), seed=3, logprobs=3, prompt_logprobs=True)
    (result,) = engine.generate([request])
    ref = reference(model, prompt, result.tokens)
    check(result.prompt_logprobs, prompt[1:], ref[: len(prompt) - 1], 3)
    check(result.logprobs, result.tokens, ref[len(prompt) - 1 :], 3)


def test_batched_rows_record_their_own_logprobs_and_greedy_takes_the_top(demo):
    model, tok = demo
    prompts = [prompt_of(model, n, seed=n) for n in (5, 30, 9)]
    requests = [Request(p, 8, GreedySampler(), logprobs=1 if i else None) for i, p in enumerate(prompts)]
    results = Engine(model, tok).generate(requests)
    assert results[0].logprobs is None and results[0].prompt_logprobs is None
    for p, r in zip(prompts[1:], results[1:]):
        check(r.logprobs, r.tokens, reference(model, p, r.tokens)[len(p) - 1 :], 1)
        assert all(e.top[0][0] == e.token for e in r.logprobs)
        assert r.prompt_logprobs is None


def test_prompt_logprobs_bypass_the_prompt_cache(demo):
    model, tok = demo
    prompt = prompt_of(model, 20)
    cache = PromptCache(1 << 28)
    engine = Engine(model, tok, cache=cache)
    engine.generate([Request(prompt, 1, GreedySampler())])  # stored
    (result,) = engine.generate([Request(prompt, 0, GreedySampler(), prompt_logprobs=True)])
    check(result.prompt_logprobs, prompt[1:], reference(model, prompt, []), 0)
    assert cache.stats().hits == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_logprobs_are_refused(demo, bad):
    model, tok = demo
    with pytest.raises(InputError, match="logprobs="):
        Engine(model, tok).submit(Request([1, 2], 3, GreedySampler(), logprobs=bad))
