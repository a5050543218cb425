"""The batched generation engine: many sequences per step, continuous batching.

Each :meth:`Engine.step` ends cancelled requests, admits waiting ones into free slots (at most
``max_batch`` in flight), prefills new prompts chunk by chunk under a per-step token budget (a long
prompt delays the others' next token by at most one budget of prefill, not by its whole length),
decodes every prefilled sequence in one batched ``Model.forward`` of ``[B, 1]`` tokens, samples
each row with its own sampler, penalties and seeded generator, streams, and retires finished
sequences, whose slots the next step reuses.

A sequence's tokens do not depend on what else is in the batch: prefill runs per sequence in
chunks fixed by its request and the engine's budget, never by its neighbours; a batched decode row
differs from a batch-1 step only in the summation order of the backend's matrix products (bounded
in tests/test_engine.py); each row samples from its own generator.

The decoding sequences' states are the rows of one batched :class:`State` (``Model.forward``
returns the next one): rows are gathered or appended only when a sequence joins or leaves.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

import torch

from rwkvkit.engine.sequence import Generation, GenerationResult, Request, auto_chunk_len, stop_reason_of
from rwkvkit.errors import InputError, PluginError
from rwkvkit.interfaces import Sampler, SampleContext, Tokenizer
from rwkvkit.model import Model
from rwkvkit.nonfinite import check_logits
from rwkvkit.penalties import Penalties, is_int
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.state import State


class Handle:
    """A submitted request. Once ``done``, ``result`` holds its :class:`GenerationResult` and
    ``error`` the exception that ended it (``result.stop_reason`` is then ``error``, or
    ``interrupted``), or that a callback's ``on_end`` raised; None otherwise."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    @property
    def request(self) -> Request:
        return self._generation.request

    @property
    def done(self) -> bool:
        return self._generation.ended

    @property
    def result(self) -> GenerationResult | None:
        return self._generation.result

    @property
    def error(self) -> BaseException | None:
        return self._generation.error

    def cancel(self) -> None:
        """End the request when the next step begins (stop reason ``cancelled``), freeing its
        slot for that step. Callable from a callback or another thread; no effect once done."""
        self._generation.cancelled = True


def _take(state: State, rows: list[int]) -> State:
    """Copies of some rows of a batched state (still known finite if the source was)."""
    index: dict[torch.device, torch.Tensor] = {}

    def pick(t: torch.Tensor) -> torch.Tensor:
        if t.device not in index:
            index[t.device] = torch.tensor(rows, device=t.device)
        return t.index_select(0, index[t.device])

    taken = State([layer.map(pick) for layer in state.layers], state.fingerprint)
    if state.is_produced():
        taken.mark_produced()
    return taken


def _stack(states: list[State]) -> State:
    """One batched state of ``states``' rows, in order."""
    if len(states) == 1:
        return states[0]
    stacked = State.cat(states)
    if all(s.is_produced() for s in states):
        stacked.mark_produced()
    return stacked


def _sample(sampler: Sampler, scores: torch.Tensor, ctxs: list[SampleContext]) -> list[Any]:
    tokens = list(sampler.sample_batch(scores, ctxs))
    if len(tokens) != len(ctxs):
        name = getattr(sampler, "name", "") or "?"
        where = f"{type(sampler).__module__}.{type(sampler).__qualname__}"
        raise PluginError(f"sampler {name!r} ({where}) returned {len(tokens)} tokens from sample_batch for {len(ctxs)} rows")
    return tokens


class Engine:
    """Generates many requests at once with one model: ``submit`` them, then ``run`` (or ``step``
    yourself), or ``generate`` a list in one call.

    ``max_batch``: sequences in flight (prefilling or decoding); the rest wait in submission order.
    ``prefill_tokens_per_step``: prompt tokens one step may prefill (None: no limit); it also caps
    the automatic prefill chunk, and a step always runs at least one chunk, so an explicit
    ``chunk_len`` larger than the budget is honoured. ``cache``: a prompt without an initial state
    starts from its longest prefix in the cache (a whole prompt found there needs no forward
    step), and its state after the whole prompt is stored there.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 64,
        prefill_tokens_per_step: int | None = 512,
        cache: PromptCache | None = None,
    ) -> None:
        if not is_int(max_batch) or max_batch < 1:
            raise InputError(f"max_batch={max_batch!r}: expected an integer >= 1")
        if prefill_tokens_per_step is not None and (not is_int(prefill_tokens_per_step) or prefill_tokens_per_step < 1):
            raise InputError(f"prefill_tokens_per_step={prefill_tokens_per_step!r}: expected an integer >= 1, or None for no limit")
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_batch, self.prefill_tokens_per_step = max_batch, prefill_tokens_per_step
        self._default_chunk = min(auto_chunk_len(model), prefill_tokens_per_step or math.inf)
        self._logits_device = model.stages[-1].ops.placement.device
        self._waiting: deque[Generation] = deque()
        self._active: list[Generation] = []  # admitted and not ended, in admission order
        self._rows: list[Generation] = []  # row i of _batch and _logits (ended ones until the next regroup)
        self._batch: State | None = None
        self._logits: torch.Tensor | None = None

    @property
    def pending(self) -> int:
        """Requests submitted and not yet ended."""
        return len(self._waiting) + len(self._active)

    def submit(self, request: Request) -> Handle:
        """Queue a request (checked now: InputError for bad options) and return its handle."""
        return self._enqueue(self._prepare([request]))[0]

    def run(self) -> None:
        """Step until every request has ended, including any submitted meanwhile (from a callback)."""
        while self.pending:
            self.step()

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult]:
        """Run ``requests`` (with anything already submitted) to the end; their results in order.
        If some ended with an error, the first one's is raised once all have ended (``submit``
        and the handles keep every result)."""
        handles = self._enqueue(self._prepare(requests))
        self.run()
        for handle in handles:
            if handle.error is not None:
                raise handle.error
        return [handle.result for handle in handles]

    def step(self) -> None:
        """One round: end cancelled requests, admit, prefill under the budget, decode once.

        An exception from a sequence's callbacks, sampler or check ends that sequence only (its
        handle holds it); a KeyboardInterrupt (or anything escaping the engine) ends every
        request, started or waiting, with stop reason ``interrupted`` (or the exception's own
        ``stop_reason``), and is raised."""
        try:
            for g in [*self._waiting, *self._active]:
                if g.cancelled:
                    self._end(g, "cancelled")
            self._admit()
            self._prefill()
            self._decode()
        except BaseException as exc:
            for g in [*self._active, *self._waiting]:
                self._end(g, stop_reason_of(exc), error=exc)
            raise
        finally:
            if not self._active:  # nothing decoding: let go of the last batch's memory
                self._rows, self._batch, self._logits = [], None, None

    # --- the parts of a step ----------------------------------------------------------------

    def _prepare(self, requests: Sequence[Request]) -> list[Generation]:
        """Check every request before queueing any (a refused list leaves nothing behind)."""
        gens: list[Generation] = []
        in_use = {id(g.request.penalties) for g in [*self._waiting, *self._active] if g.request.penalties is not None}
        for request in requests:
            if not isinstance(request, Request):
                raise InputError(f"expected an rwkvkit.engine.Request, got {type(request).__name__}")
            gens.append(Generation(request, self.model, self.tokenizer, self._default_chunk))
            if request.penalties is not None:
                if id(request.penalties) in in_use:
                    raise InputError("two requests in flight share one Penalties object: its counts are per sequence, give each request its own")
                in_use.add(id(request.penalties))
        return gens

    def _enqueue(self, gens: list[Generation]) -> list[Handle]:
        self._waiting.extend(gens)
        return [Handle(g) for g in gens]

    def _guard(self, g: Generation, fn: Any, *args: Any) -> None:
        """``fn(*args)``; an Exception ends ``g`` with it (KeyboardInterrupt passes: see ``step``)."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one sequence's failure, kept in its handle
            self._end(g, "error", error=exc)

    def _end(self, g: Generation, reason: str, stop: int | str | None = None, error: BaseException | None = None) -> None:
        if g.ended:
            return
        g.finish(reason, _take(self._batch, [g.row]) if g.row is not None else g.state, stop, error)
        if g in self._active:
            self._active.remove(g)
        elif g in self._waiting:
            self._waiting.remove(g)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            g = self._waiting.popleft()
            self._active.append(g)
            self._guard(g, self._start, g)

    def _start(self, g: Generation) -> None:
        g.start()
        hit = self.cache.lookup(g.ids) if self.cache is not None and g.request.state is None else None
        if hit is not None:
            g.state = self.model.adopt_state(hit.state)
            g.advance_prefill(hit.length)
            if not g.prefilling:  # the whole prompt: no forward at all
                self._prefilled(g, hit.logits.to(self._logits_device, torch.float32))

    def _prefill(self) -> None:
        """Chunks of prompts in admission order while the budget lasts (at least one per step)."""
        budget, spent = self.prefill_tokens_per_step or math.inf, 0
        for g in [g for g in self._active if g.prefilling]:
            while not (g.ended or g.cancelled) and g.prefilling and (spent == 0 or spent + len(g.next_chunk()) <= budget):
                chunk = g.next_chunk()
                spent += len(chunk)
                self._guard(g, self._prefill_chunk, g, chunk)

    def _prefill_chunk(self, g: Generation, chunk: list[int]) -> None:
        before = g.state
        logits, g.state = self.model.forward(chunk, before)
        g.advance_prefill(len(chunk))
        if not g.prefilling:
            check_logits(logits, self.model, chunk, before, f"after the prompt's {len(g.ids)} tokens")
            if self.cache is not None and g.request.state is None:
                self.cache.store(g.ids, g.state, logits)
            self._prefilled(g, logits)

    def _prefilled(self, g: Generation, logits: torch.Tensor) -> None:
        g.logits = logits
        if g.request.token_count == 0:
            self._end(g, "length")

    def _regroup(self) -> None:
        """Drop ended sequences' rows and append the newly prefilled ones (a no-op when neither)."""
        keep = [i for i, g in enumerate(self._rows) if not g.ended]
        joins = [g for g in self._active if g.row is None and g.logits is not None]
        if not joins and len(keep) == len(self._rows):
            return
        states, logits = [], []
        if keep:
            whole = len(keep) == len(self._rows)
            states.append(self._batch if whole else _take(self._batch, keep))
            logits.append(self._logits if whole else self._logits[keep])
        states += [g.state for g in joins]
        logits += [g.logits[None] for g in joins]
        for g in self._rows:
            g.row = None
        self._rows = [self._rows[i] for i in keep] + joins
        self._batch = _stack(states) if states else None
        self._logits = torch.cat(logits) if logits else None
        for i, g in enumerate(self._rows):
            g.row = i
        for g in joins:
            g.state = g.logits = None

    def _decode(self) -> None:
        """Sample every prefilled sequence, then feed the tokens in one batched forward."""
        self._regroup()
        if self._rows:
            self._sample_rows()
        self._regroup()  # without the sequences that just stopped
        if not self._rows:
            return
        rows, before = self._rows, self._batch
        try:
            logits, self._batch = self.model.forward(torch.tensor([[g.ctx.tokens[-1]] for g in rows]), before)
        except Exception as exc:  # noqa: BLE001 - the step failed for every row in it
            for g in rows:
                self._end(g, "error", error=exc)
            return
        self._logits = logits
        finite = torch.isfinite(logits).all(dim=1)
        suspects = set() if bool(finite.all()) else set((~finite).nonzero().flatten().tolist())
        for i, g in enumerate(rows):
            reason, stop = g.ending or (None, None)
            if reason != "stop_string" and i in suspects:  # names the first non-finite layer
                self._guard(g, check_logits, logits[i], self.model, [g.ctx.tokens[-1]], _take(before, [i]), f"at generated token {len(g.ctx.tokens)}")
            if reason is not None:
                self._end(g, reason, stop)

    def _sample_rows(self) -> None:
        rows = self._rows
        scores = Penalties.apply_batch(self._logits, [g.penalties for g in rows])
        possible = torch.isfinite(scores).any(dim=1).tolist()
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(rows):
            if possible[i]:
                groups.setdefault(id(g.request.sampler), []).append(i)
            else:
                self._end(g, "error", error=InputError("every token is banned: nothing left to sample"))
        for idx in groups.values():
            try:
                tokens = _sample(rows[idx[0]].request.sampler, scores if len(idx) == len(rows) else scores[idx], [rows[i].ctx for i in idx])
            except Exception as exc:  # noqa: BLE001 - ends the rows of this sampler only
                for i in idx:
                    self._end(rows[i], "error", error=exc)
                continue
            for i, token in zip(idx, tokens):
                self._guard(rows[i], self._feed, rows[i], token)

    def _feed(self, g: Generation, token: Any) -> None:
        if not g.accept(token):
            self._end(g, *g.ending)
