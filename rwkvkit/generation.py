"""The generation loop: prefill the prompt in chunks, then sample, stream and feed back tokens.

Callbacks are called directly from a list (not through pluggy's hook relay, ~1.6 us per call).
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from rwkvkit.errors import InputError
from rwkvkit.interfaces import Callback, SampleContext, Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.penalties import Penalties
from rwkvkit.state import State

@dataclass
class RunInfo:
    """What ``Callback.on_start`` learns about a generation."""

    prompt_tokens: int
    token_count: int
    sampler: str
    seed: int


@dataclass
class GenerationResult:
    text: str  # == tokenizer.decode(tokens, errors="replace")
    tokens: list[int]  # generated ids (a stop token is not included)
    state: State  # after the prompt and every generated token
    stop_reason: str  # "length" or "stop_token"
    metrics: dict[str, float] = field(default_factory=dict)


def _chunks(tokens: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    return (tokens[i : i + size] for i in range(0, len(tokens), size))


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    token_count: int,
    sampler: Sampler,
    penalties: Penalties | None = None,
    stop_tokens: Sequence[int] = (),
    chunk_len: int = 256,
    state: State | None = None,
    seed: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> GenerationResult:
    """Generate up to ``token_count`` tokens after ``prompt`` (text or ids), continuing ``state``.

    ``seed`` seeds the sampler's generator (a random seed when None; ``RunInfo.seed`` reports it).
    """
    if isinstance(token_count, bool) or not isinstance(token_count, int) or token_count < 0:
        raise InputError(f"token_count={token_count!r}: expected an integer >= 0")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise InputError(f"chunk_len={chunk_len!r}: expected an integer >= 1")
    penalties = penalties or Penalties()
    penalties.check(model.spec.vocab_size)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InputError("the prompt is empty: generation needs at least one prompt token")
    seed = random.SystemRandom().randrange(2**63) if seed is None else seed
    ctx = SampleContext(generator=torch.Generator().manual_seed(seed), occurrence=penalties.counts)
    for cb in callbacks:
        cb.on_start(RunInfo(len(ids), token_count, getattr(sampler, "name", type(sampler).__name__), seed))

    for chunk in _chunks(ids, chunk_len):
        logits, state = model.forward(chunk, state)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    stop_reason = "length"
    for _ in range(token_count):
        scores = penalties.apply(logits)
        if not torch.isfinite(scores).any():
            raise InputError("every token is banned: nothing left to sample")
        token = sampler.sample(scores, ctx)
        if token in stop_tokens:
            stop_reason = "stop_token"
            break
        ctx.tokens.append(token)
        raw = tokenizer.decode_bytes([token])
        penalties.update(token, raw.decode("utf-8", errors="replace"))
        for cb in callbacks:
            cb.on_token(token)
        piece = decoder.decode(raw)
        if piece:
            pieces.append(piece)
            for cb in callbacks:
                cb.on_text(piece)
        logits, state = model.forward([token], state)
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        for cb in callbacks:
            cb.on_text(tail)
    result = GenerationResult("".join(pieces), ctx.tokens, state, stop_reason)
    for cb in callbacks:
        cb.on_end(result)
    return result
