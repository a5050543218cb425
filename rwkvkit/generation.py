"""``generate``: one request through the batched engine (:mod:`rwkvkit.engine`), which holds the
one generation loop. The result types and prefill-chunk helpers live there; they are also
importable from here, where callbacks' documentation names them."""

from __future__ import annotations

from typing import Sequence

from rwkvkit.constraints import Constraint
from rwkvkit.engine import AUTO_CHUNK_RANGE, Engine, GenerationResult, Request, RunInfo, auto_chunk_len, check_chunk_len
from rwkvkit.interfaces import Callback, Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.penalties import Penalties
from rwkvkit.state import State

__all__ = ["AUTO_CHUNK_RANGE", "GenerationResult", "RunInfo", "auto_chunk_len", "check_chunk_len", "generate", "generate_request"]


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    token_count: int,
    sampler: Sampler,
    penalties: Penalties | None = None,
    stop_tokens: Sequence[int | str] = (),
    chunk_len: int | None = None,
    state: State | None = None,
    seed: int | None = None,
    callbacks: Sequence[Callback] = (),
    constraint: Constraint | None = None,
) -> GenerationResult:
    """Generate up to ``token_count`` tokens after ``prompt`` (text or ids), continuing ``state``.

    ``stop_tokens``: token ids (stop before emitting that token, as ChatRWKV) and stop strings
    (stop when the text contains one; it is not emitted). ``chunk_len``: prompt tokens per forward
    call; None picks one for speed within a memory bound (:func:`auto_chunk_len`).
    ``seed`` seeds the sampler's generator (a random seed when None; ``RunInfo.seed`` reports it).
    ``constraint`` restricts the output to a JSON schema, regex or grammar (:mod:`rwkvkit.constraints`).
    An error ends the callbacks (``on_end``) and is raised.
    """
    return generate_request(model, tokenizer, Request(prompt, token_count, sampler, penalties, stop_tokens, chunk_len, state, seed, callbacks, constraint=constraint))


def generate_request(model: Model, tokenizer: Tokenizer, request: Request) -> GenerationResult:
    """One request by itself: batch 1, its prompt prefilled in its own chunks (no step budget)."""
    return Engine(model, tokenizer, max_batch=1, prefill_tokens_per_step=None).generate([request])[0]
