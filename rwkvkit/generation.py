"""The generation loop: prefill the prompt in chunks, then sample, stream and feed back tokens.

Callbacks are called directly from a list (not through pluggy's hook relay, ~1.6 us per call).
Every callback that started gets ``on_end`` on every way out (stop, error, Ctrl-C), so files
they opened are closed.
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from rwkvkit.errors import InputError, PluginError
from rwkvkit.interfaces import Callback, SampleContext, Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.nonfinite import check_logits
from rwkvkit.penalties import Penalties, is_int
from rwkvkit.state import State
from rwkvkit.stops import StopText, split_stops

@dataclass
class RunInfo:
    """What ``Callback.on_start`` learns about a generation."""

    prompt_tokens: int
    token_count: int
    sampler: str
    seed: int


@dataclass
class GenerationResult:
    text: str  # what was streamed to on_text: decode(tokens), cut before a stop string
    tokens: list[int]  # generated ids (a stop token is not included; the token completing a stop string is)
    state: State  # after the prompt and every token in ``tokens``
    stop_reason: str  # "length", "stop_token", "stop_string", "interrupted" (Ctrl-C), "terminated", "error"
    metrics: dict[str, float] = field(default_factory=dict)
    stop: int | str | None = None  # the stop token id or stop string that ended generation


def check_chunk_len(chunk_len: int | None) -> None:
    if chunk_len is not None and (not is_int(chunk_len) or chunk_len < 1):
        raise InputError(f"chunk_len={chunk_len!r}: expected an integer >= 1, or None to choose it for speed")


# The prefill chunk when the caller gives none (benchmarks/bench_prefill_chunk.py). Speed grows with
# the chunk up to ~1-4k tokens (per-call overhead amortised, bigger GEMMs), then flattens, while
# activation memory grows linearly: peak RSS growth measured ~5-7 x (C + dim_ffn) x dtype bytes
# per token (0.1B fp32, 4,096 tokens: 329 MiB), so 8x is a safe bound.
PREFILL_BUDGET_BYTES = 512 * 2**20  # activations one chunk may hold
ACTIVATION_FACTOR = 8
AUTO_CHUNK_RANGE = (256, 4096)


def auto_chunk_len(model: Model) -> int:
    """The largest multiple of 256 (within AUTO_CHUNK_RANGE) whose activations fit
    PREFILL_BUDGET_BYTES: 4,096 for the demo and 0.1B in fp32, 1,536 for a 7B in fp16."""
    spec = model.spec
    dtype_bytes = max(stage.ops.placement.dtype.itemsize for stage in model.stages)
    per_token = ACTIVATION_FACTOR * (spec.n_embd + spec.dim_ffn) * dtype_bytes
    low, high = AUTO_CHUNK_RANGE
    return max(low, min(high, PREFILL_BUDGET_BYTES // per_token // 256 * 256))


def _chunks(tokens: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    return (tokens[i : i + size] for i in range(0, len(tokens), size))


class _Stream:
    """Decoded text on its way to the callbacks: whole UTF-8 characters only, and nothing that
    could still turn out to be (the beginning of) a stop string."""

    def __init__(self, callbacks: Sequence[Callback], stop_strings: Sequence[str]) -> None:
        self.callbacks = callbacks
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopText(stop_strings)
        self.pieces: list[str] = []

    def add(self, raw: bytes, final: bool = False) -> str | None:
        """Stream a token's bytes; returns the stop string they completed, if any."""
        piece = self.stops.feed(self.decoder.decode(raw, final=final))
        if final and self.stops.matched is None:
            piece += self.stops.flush()
        if piece:
            self.pieces.append(piece)
            for cb in self.callbacks:
                cb.on_text(piece)
        return self.stops.matched


def _stop_reason(exc: BaseException) -> str:
    """``interrupted`` for Ctrl-C; a KeyboardInterrupt subclass may name its own (``terminated``)."""
    return getattr(exc, "stop_reason", "interrupted") if isinstance(exc, KeyboardInterrupt) else "error"


def _end(callbacks: Sequence[Callback], result: GenerationResult, error: BaseException | None = None) -> None:
    """``on_end`` for every callback even if one fails; a failure is raised afterwards, unless
    ``error`` is already on its way out (it must not be masked: the failure becomes a note on it)."""
    failure = None
    for cb in callbacks:
        try:
            cb.on_end(result)
        except Exception as exc:  # noqa: BLE001 - the others still need their end
            failure = failure or exc
            if error is not None:
                error.add_note(f"(callback {type(cb).__name__}.on_end also failed: {exc!r})")
    if failure is not None and error is None:
        raise failure


def _checked_id(token: Any, sampler: Sampler, vocab_size: int) -> int:
    if not is_int(token) or not 0 <= token < vocab_size:
        name = getattr(sampler, "name", "") or "?"
        raise PluginError(
            f"sampler {name!r} ({type(sampler).__module__}.{type(sampler).__qualname__}) returned {token!r:.80}: "
            f"expected a token id, an int in 0..{vocab_size - 1}"
        )
    return int(token)


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
) -> GenerationResult:
    """Generate up to ``token_count`` tokens after ``prompt`` (text or ids), continuing ``state``.

    ``stop_tokens``: token ids (stop before emitting that token, as ChatRWKV) and stop strings
    (stop when the text contains one; it is not emitted). ``chunk_len``: prompt tokens per forward
    call; None picks one for speed within a memory bound (:func:`auto_chunk_len`).
    ``seed`` seeds the sampler's generator (a random seed when None; ``RunInfo.seed`` reports it).
    """
    if isinstance(token_count, bool) or not isinstance(token_count, int) or token_count < 0:
        raise InputError(f"token_count={token_count!r}: expected an integer >= 0")
    check_chunk_len(chunk_len)
    stop_ids, stop_strings = split_stops(stop_tokens)
    penalties = penalties or Penalties()
    penalties.check(model.spec.vocab_size)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InputError("the prompt is empty: generation needs at least one prompt token")
    chunk_len = chunk_len or auto_chunk_len(model)
    seed = random.SystemRandom().randrange(2**63) if seed is None else seed
    ctx = SampleContext(generator=torch.Generator().manual_seed(seed), occurrence=penalties.counts)
    stream = _Stream(callbacks, stop_strings)
    started: list[Callback] = []
    stop_reason, stop = "length", None
    try:
        for cb in callbacks:
            cb.on_start(RunInfo(len(ids), token_count, getattr(sampler, "name", type(sampler).__name__), seed))
            started.append(cb)
        done = 0
        for chunk in _chunks(ids, chunk_len):
            before = state
            logits, state = model.forward(chunk, state)
            done += len(chunk)
            for cb in callbacks:
                cb.on_prefill(done, len(ids))
        check_logits(logits, model, chunk, before, f"after the prompt's {len(ids)} tokens")
        for i in range(token_count):
            scores = penalties.apply(logits)
            if not torch.isfinite(scores).any():
                raise InputError("every token is banned: nothing left to sample")
            token = _checked_id(sampler.sample(scores, ctx), sampler, model.spec.vocab_size)
            if token in stop_ids:
                stop_reason, stop = "stop_token", token
                break
            ctx.tokens.append(token)
            raw = tokenizer.decode_bytes([token])
            penalties.update(token, raw.decode("utf-8", errors="replace"))
            for cb in callbacks:
                cb.on_token(token)
            matched = stream.add(raw)
            before = state
            logits, state = model.forward([token], state)
            if matched is not None:
                stop_reason, stop = "stop_string", matched
                break
            check_logits(logits, model, [token], before, f"at generated token {i + 1}")
        if stop_reason != "stop_string":
            stream.add(b"", final=True)
    except BaseException as exc:
        _end(started, GenerationResult("".join(stream.pieces), ctx.tokens, state, _stop_reason(exc)), exc)
        raise
    result = GenerationResult("".join(stream.pieces), ctx.tokens, state, stop_reason, stop=stop)
    _end(started, result)
    return result
