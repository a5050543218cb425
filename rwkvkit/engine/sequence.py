"""One sequence in the engine: its checked request, sampling context, penalties, stop conditions,
text stream and callbacks — everything about a generation that does not depend on the batch it
runs in. :mod:`rwkvkit.engine.core` moves these through prefill and batched decode.

Callbacks are called directly from a list (not through pluggy's hook relay, ~1.6 us per call).
Every callback that started gets ``on_end`` on every way out (stop, cancel, error, Ctrl-C), so
files they opened are closed.
"""

from __future__ import annotations

import codecs
import operator
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from rwkvkit.constraints import Constraint, check_constraint
from rwkvkit.errors import InputError, PluginError
from rwkvkit.interfaces import Callback, SampleContext, Sampler, Tokenizer
from rwkvkit.model import Model
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
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits: before
    penalties, temperature and sampler filtering, what OpenAI's ``logprobs`` reports) and the
    ``top`` most probable tokens there as (id, logprob), most probable first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """``tokens[i]``'s entry under ``logits[i]`` (``[T, V]``), with its ``top`` alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    values, ids = lp.topk(top, dim=-1) if top else (lp[:, :0], lp[:, :0].long())
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


# The prompt chunk of a request that records the prompt's logprobs: each chunk's [T, V] logits
# are kept whole (4,096 x 65,536 float32 would be 1 GiB; 256 rows are 64 MiB).
PROMPT_LOGPROBS_CHUNK = 256


@dataclass
class GenerationResult:
    text: str  # what was streamed to on_text: decode(tokens), cut before a stop string
    tokens: list[int]  # generated ids (a stop token is not included; the token completing a stop string is)
    # after the prompt and every token in ``tokens``; None only for a request that ended before
    # its first forward step without an initial state (cancelled or interrupted while waiting)
    state: State | None
    # "length", "stop_token", "stop_string", "constraint", "constraint_incomplete" (see
    # rwkvkit.constraints), "cancelled" (Handle.cancel), "interrupted" (Ctrl-C), "terminated", "error"
    stop_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    stop: int | str | None = None  # the stop token id or stop string that ended generation
    logprobs: list[TokenLogprob] | None = None  # one per token in ``tokens`` (Request.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 2.. (Request.prompt_logprobs)


@dataclass
class Request:
    """One generation for :class:`rwkvkit.engine.Engine`: up to ``token_count`` tokens after
    ``prompt`` (text or ids), continuing ``state``.

    ``stop_tokens``: token ids (stop before emitting that token, as ChatRWKV) and stop strings
    (stop when the text contains one; it is not emitted). ``chunk_len``: prompt tokens per forward
    call; None picks one for speed within a memory bound (:func:`auto_chunk_len`), capped by the
    engine's prefill budget. ``seed`` seeds the sampler's generator (None: a random seed, reported
    in ``RunInfo.seed``). ``penalties`` count this sequence's tokens: one object per request.
    ``logprobs``: record each generated token's :class:`TokenLogprob` with that many
    alternatives (None: none recorded); ``prompt_logprobs``: also every prompt token's after the
    first (what evaluation harnesses score; the prompt is then prefilled in chunks of at most
    PROMPT_LOGPROBS_CHUNK and never taken from the prompt cache).
    ``constraint`` (structured output, :mod:`rwkvkit.constraints`) masks each next token; it holds
    this sequence's state: one object per request.
    ``cache_prefix_len``: with an engine's prompt cache, also keep the state after the prompt's
    first so many tokens (a shared system prompt or few-shot header), so a later prompt that
    starts with them but goes on differently is prefilled from there; the whole prompt's state
    is kept in any case.
    """

    prompt: str | Sequence[int]
    token_count: int
    sampler: Sampler
    penalties: Penalties | None = None
    stop_tokens: Sequence[int | str] = ()
    chunk_len: int | None = None
    state: State | None = None
    seed: int | None = None
    callbacks: Sequence[Callback] = ()
    constraint: Constraint | None = None
    cache_prefix_len: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False


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


def stop_reason_of(exc: BaseException) -> str:
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


def _prompt_ids(prompt: str | Sequence[int], tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """The prompt's token ids, checked when the request is submitted (not when its turn comes)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = None if isinstance(prompt, bytes) else [operator.index(t) for t in prompt]
        except TypeError:
            ids = None
        if ids is None or any(isinstance(t, (bool, np.bool_)) for t in prompt):
            raise InputError(f"prompt={prompt!r:.80}: expected text or a sequence of integer token ids")
    if not ids:
        raise InputError("the prompt is empty: generation needs at least one prompt token")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise InputError(f"token id {bad} is out of range: the model's vocabulary has ids 0..{vocab_size - 1}")
    return ids


_FLUSHED = frozenset({"length", "stop_token", "cancelled", "constraint", "constraint_incomplete"})  # normal ends: held-back text is released


class Generation:
    """A checked request and what its sequence has produced so far.

    While prefilling it owns its batch-1 ``state``; once prefilled, ``logits`` hold the scores of
    its next token until the engine moves both into its batch (``row``)."""

    def __init__(self, request: Request, model: Model, tokenizer: Tokenizer, default_chunk: int) -> None:
        """Check everything that can be checked before the first forward step (InputError)."""
        r = request
        if not is_int(r.token_count) or r.token_count < 0:
            raise InputError(f"token_count={r.token_count!r}: expected an integer >= 0")
        check_chunk_len(r.chunk_len)
        self.stop_ids, stop_strings = split_stops(r.stop_tokens)
        self.penalties = r.penalties or Penalties()
        self.penalties.check(model.spec.vocab_size)
        if r.seed is not None and not is_int(r.seed):
            raise InputError(f"seed={r.seed!r:.80}: expected an integer, or None for a random seed")
        self.ids = _prompt_ids(r.prompt, tokenizer, model.spec.vocab_size)
        self.constraint = check_constraint(r.constraint)
        if r.cache_prefix_len is not None and (not is_int(r.cache_prefix_len) or not 1 <= r.cache_prefix_len <= len(self.ids)):
            raise InputError(f"cache_prefix_len={r.cache_prefix_len!r:.80}: expected an integer in 1..{len(self.ids)} (the prompt's tokens), or None")
        self.cut: int | None = None  # where prefill stops to store a state in the cache (set by the engine)
        if r.logprobs is not None and (not is_int(r.logprobs) or not 0 <= r.logprobs <= model.spec.vocab_size):
            raise InputError(f"logprobs={r.logprobs!r:.80}: expected None or an integer in 0..{model.spec.vocab_size}")
        self.top = r.logprobs or 0
        self.logprobs: list[TokenLogprob] | None = None if r.logprobs is None else []
        self.prompt_logprobs: list[TokenLogprob] | None = [] if r.prompt_logprobs else None
        self.request, self.tokenizer, self.vocab_size = r, tokenizer, model.spec.vocab_size
        self.chunk = r.chunk_len or default_chunk
        if r.prompt_logprobs:
            self.chunk = min(self.chunk, PROMPT_LOGPROBS_CHUNK)
        self.seed = random.SystemRandom().randrange(2**63) if r.seed is None else r.seed
        self.ctx = SampleContext(generator=torch.Generator().manual_seed(self.seed), occurrence=self.penalties.counts)
        self.stream = _Stream(r.callbacks, stop_strings)
        self.started: list[Callback] = []
        self.prefilled = 0  # prompt tokens in the state
        self.state: State | None = r.state
        self.logits: torch.Tensor | None = None
        self.row: int | None = None  # its row in the engine's batch, once there
        self.ending: tuple[str, int | str | None] | None = None  # how it ends once its last token is fed
        self.cancelled = False
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None

    @property
    def ended(self) -> bool:
        return self.result is not None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.ids)

    def next_chunk(self) -> list[int]:
        """The next chunk, ending at the cut point if it lies within."""
        end = self.prefilled + self.chunk
        if self.cut is not None and self.prefilled < self.cut:
            end = min(end, self.cut)
        return self.ids[self.prefilled : end]

    def start(self) -> None:
        r = self.request
        info = RunInfo(len(self.ids), r.token_count, getattr(r.sampler, "name", type(r.sampler).__name__), self.seed)
        for cb in r.callbacks:
            cb.on_start(info)
            self.started.append(cb)

    def record_prompt(self, logits: torch.Tensor) -> None:
        """Record the logprobs of the prompt tokens that the chunk's ``logits [T, V]`` predict
        (before ``advance_prefill`` for that chunk)."""
        targets = self.ids[self.prefilled + 1 : self.prefilled + 1 + len(logits)]
        if targets:
            self.prompt_logprobs.extend(token_logprobs(logits[: len(targets)], targets, self.top))

    def advance_prefill(self, tokens: int) -> None:
        """``tokens`` more prompt tokens are in the state."""
        self.prefilled += tokens
        for cb in self.request.callbacks:
            cb.on_prefill(self.prefilled, len(self.ids))

    def accept(self, token: Any, logits: torch.Tensor | None = None) -> bool:
        """Take a token sampled from ``logits [V]``: False if it is a stop token (the sequence ends
        without it), else record (with its logprobs, if asked for), count and stream it, and
        True: it must be fed to the model (``ending`` says whether that is the last step)."""
        token = _checked_id(token, self.request.sampler, self.vocab_size)
        if token in self.stop_ids:
            self.ending = ("stop_token", token)
            return False
        if self.constraint is not None:
            self.constraint.advance(token)
            if token in self.constraint.end_tokens:  # end-of-text where the text was complete
                self.ending = ("constraint", token)
                return False
        if self.logprobs is not None and logits is not None:
            self.logprobs.extend(token_logprobs(logits[None], [token], self.top))
        self.ctx.tokens.append(token)
        raw = self.tokenizer.decode_bytes([token])
        self.penalties.update(token, raw.decode("utf-8", errors="replace"))
        for cb in self.request.callbacks:
            cb.on_token(token)
        matched = self.stream.add(raw)
        if matched is not None:
            self.ending = ("stop_string", matched)
        elif self.constraint is not None and self.constraint.is_finished():
            self.ending = ("constraint", None)
        elif len(self.ctx.tokens) == self.request.token_count:
            self.ending = (self.length_reason(), None)
        return True

    def length_reason(self) -> str:
        """Why ``token_count`` tokens end it: ``length``, or ``constraint_incomplete`` when they do
        not satisfy its constraint (never valid-looking output labelled as success)."""
        return "length" if self.constraint is None or self.constraint.is_accepting() else "constraint_incomplete"

    def finish(self, reason: str, state: State | None, stop: int | str | None = None, error: BaseException | None = None) -> None:
        """End with ``reason``: release held-back text on a normal end, then ``on_end`` for every
        started callback. Sets ``result``, and ``error`` to what ended it or failed while ending."""
        if reason in _FLUSHED and error is None:
            try:
                self.stream.add(b"", final=True)
            except Exception as exc:  # noqa: BLE001 - a failing on_text ends this sequence only
                reason, error = "error", exc
        self.result = GenerationResult(
            "".join(self.stream.pieces), self.ctx.tokens, state, reason, stop=stop, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs
        )
        self.error = error
        try:
            _end(self.started, self.result, error)
        except Exception as exc:  # noqa: BLE001 - reported through the handle
            self.error = exc
