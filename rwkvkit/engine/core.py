"""The batched generation engine: many sequences per step, continuous batching.

Each :meth:`Engine.step` ends cancelled requests, admits waiting ones into free slots (at most
``max_batch`` in flight), prefills new prompts chunk by chunk under a per-step token budget (a long
prompt delays the others' next token by at most one budget of prefill, not by its whole length),
decodes every prefilled sequence in one batched ``Model.forward`` of ``[B, 1]`` tokens, samples
each row with its own sampler, penalties and seeded generator, streams, and retires finished
sequences, whose slots the next step reuses.

A sequence's tokens do not depend on what else is in the batch: its prompt is cut into chunks by
its request and the engine's budget, never by its neighbours (chunks of equal length from several
prompts share one ``[B, T]`` forward); a batched row differs from a batch-1 step only in the
summation order of the backend's matrix products (bounded in tests/test_engine.py and
tests/test_engine_prefill.py); each row samples from its own generator.

The decoding sequences' states are the rows of one batched :class:`State` (``Model.forward``
returns the next one): rows are gathered or appended only when a sequence joins or leaves.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from rwkvkit.constraints import Constraint, prepares_masks
from rwkvkit.cuda_graphs import BatchGraphs, graph_device, shared_graphs
from rwkvkit.engine.sequence import PROMPT_LOGPROBS_CHUNK, Generation, GenerationResult, Request, TokenLogprob, auto_chunk_len, stop_reason_of
from rwkvkit.errors import InputError, PluginError, StrategyError
from rwkvkit.interfaces import Sampler, SampleContext, Tokenizer
from rwkvkit.model import Model
from rwkvkit.nonfinite import check_logits
from rwkvkit.penalties import Penalties, is_int
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.state import State


@dataclass(frozen=True)
class EngineMemory:
    """What the engine holds for its sequences and its prompt cache, in bytes.

    ``in_flight``: the states and next-token logits of the sequences admitted and not ended
    (prefilling or decoding), measured after each step's prefill and at its end; ``peak_in_flight``
    their maximum, never above ``max_in_flight`` = ``max_batch`` x ``sequence`` (one state plus one
    row of float32 logits). Within a step the batch is briefly held twice (the forward's output
    next to its input; the copy that drops ended rows), so the process peak is up to
    2 x ``max_in_flight``. ``cache``/``peak_cache`` are the prompt cache's, bounded by
    ``max_cache`` (its ``max_bytes``; 0 without a cache)."""

    sequence: int
    in_flight: int
    peak_in_flight: int
    max_in_flight: int
    cache: int
    peak_cache: int
    max_cache: int

    def metrics(self) -> dict[str, float]:
        """The same in MiB, named for a run's metrics.json."""
        return {f"engine_{k}_mb": v / 2**20 for k, v in asdict(self).items()}


def _state_bytes(state: State | None) -> int:
    return 0 if state is None else sum(t.nbytes for layer in state.layers for t in layer.tensors())


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

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """The generated tokens' logprobs so far (``Request.logprobs``; None when not asked for):
        a token's entry is there before ``on_token`` receives it."""
        return self._generation.logprobs

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


def _per_sequence(request: Request) -> tuple[Any, ...]:
    """The objects of a request that hold one sequence's state (two requests must not share one)."""
    return request.penalties, request.constraint


SERIAL_LOGITS = 1 << 18  # a step's host-side work on at most this many logits runs on one torch thread


@contextlib.contextmanager
def _serial(logits: torch.Tensor) -> Iterator[None]:
    """One torch thread for a step's host-side ops (penalties, sampling, checks) on CPU logits of
    at most SERIAL_LOGITS values. torch opens a parallel region for every op on 32,768 values or
    more, and with libgomp's threads asleep between regions (rwkvkit's default wait policy,
    :mod:`rwkvkit.omp_wait`) each region pays a wake-up (~0.1-0.25 ms on a VM), more than such an
    op takes on one thread: at batch 1 the 0.1B shape decoded 5-11% faster, the demo model 12-19%.
    Larger batches keep every thread, where the work pays for the wake-ups."""
    threads = torch.get_num_threads()
    if logits.device.type != "cpu" or logits.numel() > SERIAL_LOGITS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample(sampler: Sampler, scores: torch.Tensor, ctxs: list[SampleContext]) -> list[Any]:
    tokens = list(sampler.sample_batch(scores, ctxs))
    if len(tokens) != len(ctxs):
        name = getattr(sampler, "name", "") or "?"
        where = f"{type(sampler).__module__}.{type(sampler).__qualname__}"
        raise PluginError(f"sampler {name!r} ({where}) returned {len(tokens)} tokens from sample_batch for {len(ctxs)} rows")
    return tokens


@functools.cache
def _mask_worker() -> ThreadPoolExecutor:
    """The thread that computes constraints' next masks while the model runs (one per process:
    the work is small, and an engine waits for its masks before its next step)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkvkit-masks")


def _start_masks(constraints: list[Constraint]) -> Future[dict[int, Exception]] | None:
    """Start ``prepare_masks`` for the constraints that compute masks ahead, one call per class,
    in the worker; its result maps ``id(constraint)`` to the exception its class's call raised.
    None when no constraint prepares masks."""
    groups: dict[type, list[Constraint]] = {}
    for c in constraints:
        if prepares_masks(c):
            groups.setdefault(type(c), []).append(c)
    if not groups:
        return None

    def prepare() -> dict[int, Exception]:
        failed: dict[int, Exception] = {}
        for cls, group in groups.items():
            try:
                cls.prepare_masks(group)
            except Exception as exc:  # noqa: BLE001 - ends the sequences of this class's constraints only
                failed.update((id(c), exc) for c in group)
        return failed

    return _mask_worker().submit(prepare)


def check_limits(max_batch: int, prefill_tokens_per_step: int | None, names: tuple[str, str] = ("max_batch", "prefill_tokens_per_step")) -> None:
    """InputError for an engine size out of range, naming it as ``names`` do (``rwkvkit run``
    checks its config keys before loading a model)."""
    if not is_int(max_batch) or max_batch < 1:
        raise InputError(f"{names[0]}={max_batch!r}: expected an integer >= 1")
    if prefill_tokens_per_step is not None and (not is_int(prefill_tokens_per_step) or prefill_tokens_per_step < 1):
        raise InputError(f"{names[1]}={prefill_tokens_per_step!r}: expected an integer >= 1, or None for no limit")


class Engine:
    """Generates many requests at once with one model: ``submit`` them, then ``run`` (or ``step``
    yourself), or ``generate`` a list in one call.

    ``max_batch``: sequences in flight (prefilling or decoding); the rest wait in submission order.
    ``prefill_tokens_per_step``: prompt tokens one step may prefill (None: no limit); it also caps
    the automatic prefill chunk, and a step always runs at least one chunk, so an explicit
    ``chunk_len`` larger than the budget is honoured. ``cache``: a prompt without an initial state
    starts from its longest prefix in the cache (a whole prompt found there needs no forward
    step), and its state after the whole prompt is stored there, as is the state after its first
    ``cache_prefix_len`` tokens when the request gives that cut point (prefill stops there).
    ``cuda_graphs``: decode steps replay CUDA graphs, one per batch-size bucket
    (:class:`rwkvkit.cuda_graphs.BatchGraphs`) — None (the default) when every layer sits on one
    CUDA device, True to insist, False for eager steps, or a ``BatchGraphs`` of your own.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 64,
        prefill_tokens_per_step: int | None = 512,
        cache: PromptCache | None = None,
        cuda_graphs: bool | BatchGraphs | None = None,
    ) -> None:
        check_limits(max_batch, prefill_tokens_per_step)
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_batch, self.prefill_tokens_per_step = max_batch, prefill_tokens_per_step
        self._default_chunk = min(auto_chunk_len(model), prefill_tokens_per_step or math.inf)
        self._logits_device = model.stages[-1].ops.placement.device
        self._waiting: deque[Generation] = deque()
        self._active: list[Generation] = []  # admitted and not ended, in admission order
        self._rows: list[Generation] = []  # row i of _batch and _logits (ended ones until the next regroup)
        self._batch: State | None = None
        self._logits: torch.Tensor | None = None
        self._sequence_bytes = _state_bytes(model.zero_state()) + model.spec.vocab_size * torch.float32.itemsize
        self._peak_in_flight = 0
        if cuda_graphs is True and graph_device(model) is None:
            raise StrategyError(f"cuda_graphs=True needs every layer on one CUDA device, not streamed; strategy {model.plan.spec!r} is not")
        if cuda_graphs is not None and not isinstance(cuda_graphs, (bool, BatchGraphs)):
            raise InputError(f"cuda_graphs={cuda_graphs!r}: expected True, False, None (when the model is on one CUDA device) or a BatchGraphs")
        if isinstance(cuda_graphs, BatchGraphs) and (cuda_graphs.model is not model or cuda_graphs.max_batch < max_batch):
            raise InputError(f"cuda_graphs: a BatchGraphs of this model for batches up to max_batch={max_batch} is needed")
        self._graph_choice = False if cuda_graphs is None and graph_device(model) is None else cuda_graphs
        self._graphs: BatchGraphs | None = None  # held while there is a batch

    @property
    def pending(self) -> int:
        """Requests submitted and not yet ended."""
        return len(self._waiting) + len(self._active)

    def memory(self) -> EngineMemory:
        """The bytes held for sequences in flight and in the prompt cache, their peaks and bounds."""
        cache = self.cache.stats() if self.cache is not None else None
        return EngineMemory(
            self._sequence_bytes, self._in_flight(), self._peak_in_flight, self.max_batch * self._sequence_bytes,
            cache.bytes if cache else 0, cache.peak_bytes if cache else 0, self.cache.max_bytes if self.cache is not None else 0,
        )

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
            self._regroup()  # a cancelled row's memory is free before its slot is reused
            self._admit()
            self._prefill()
            self._measure()
            self._decode()
            self._regroup()  # without the rows that just ended
            self._measure()
        except BaseException as exc:
            for g in [*self._active, *self._waiting]:
                self._end(g, stop_reason_of(exc), error=exc)
            raise
        finally:
            if not self._active:  # nothing decoding: let go of the last batch's memory (and graphs)
                self._rows, self._batch, self._logits = [], None, None
                if self._graphs is not None:
                    self._graphs.in_use, self._graphs = False, None

    # --- the parts of a step ----------------------------------------------------------------

    def _in_flight(self) -> int:
        """Bytes of the batch and of the states and logits of sequences not (yet) in it."""
        own = [g for g in self._active if g.row is None]
        logits = [t for t in [self._logits, *(g.logits for g in own)] if t is not None]
        # a prefilling sequence's state is the caller's until its first chunk: the engine holds it from then on
        states = [self._batch, *(g.state for g in own if g.state is not g.request.state)]
        return sum(map(_state_bytes, states)) + sum(t.nbytes for t in logits)

    def _measure(self) -> None:
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight())

    def _prepare(self, requests: Sequence[Request]) -> list[Generation]:
        """Check every request before queueing any (a refused list leaves nothing behind)."""
        gens: list[Generation] = []
        in_use = {id(obj) for g in [*self._waiting, *self._active] for obj in _per_sequence(g.request) if obj is not None}
        for request in requests:
            if not isinstance(request, Request):
                raise InputError(f"expected an rwkvkit.engine.Request, got {type(request).__name__}")
            gens.append(Generation(request, self.model, self.tokenizer, self._default_chunk))
            for obj in _per_sequence(request):
                if obj is not None and id(obj) in in_use:
                    raise InputError(f"two requests in flight share one {type(obj).__name__} object: it holds one sequence's state, give each request its own")
                in_use.add(id(obj))
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
        if self.cache is None or g.request.state is not None or g.prompt_logprobs is not None:
            return
        hit = self.cache.lookup(g.ids)
        if hit is not None:
            g.state = self.model.adopt_state(hit.state)
            g.advance_prefill(hit.length)
        cut = g.request.cache_prefix_len
        if cut is not None and g.prefilled < cut < len(g.ids):
            g.cut = cut
        if not g.prefilling:  # the whole prompt was cached: no forward at all
            self._prefilled(g, hit.logits.to(self._logits_device, torch.float32))

    def _prefill(self) -> None:
        """Chunks of prompts under the budget (at least one per step), in rounds: a round takes the
        next chunk of each prefilling sequence, in admission order, while the budget lasts, and
        runs the chunks of one length (and output kind) in one ``[B, T]`` forward (rows recording
        prompt logprobs: at most PROMPT_LOGPROBS_CHUNK positions' logits per forward, as alone). A
        prompt's chunks are cut by its request, the cache and the budget alone, never by its
        neighbours."""
        budget, spent = self.prefill_tokens_per_step or math.inf, 0
        while True:
            groups: dict[tuple[int, bool], list[Generation]] = {}
            for g in self._active:
                if g.ended or g.cancelled or not g.prefilling:
                    continue
                n = len(g.next_chunk())
                if spent == 0 or spent + n <= budget:
                    spent += n
                    groups.setdefault((n, g.prompt_logprobs is not None), []).append(g)
            if not groups:
                return
            for (n, full), gens in groups.items():
                rows = max(1, PROMPT_LOGPROBS_CHUNK // n) if full else len(gens)  # full output: [rows, n, V] logits
                for i in range(0, len(gens), rows):
                    self._prefill_group(gens[i : i + rows])

    def _prefill_group(self, gens: list[Generation]) -> None:
        """The next chunk of each of ``gens`` in one forward; if that fails, each alone again, so a
        failure ends only the sequences it belongs to (one request's bad initial state, say)."""
        for g in gens:
            self._guard(g, self._adopt, g)
        gens = [g for g in gens if not g.ended]
        if len(gens) > 1:
            try:
                self._prefill_chunks(gens)
                return
            except Exception:  # noqa: BLE001 - retried row by row below, where it ends its own rows
                pass
        for g in gens:
            self._guard(g, self._prefill_chunks, [g])

    def _adopt(self, g: Generation) -> None:
        """``g.state`` as one row this model can stack with others (for a fresh start, the model's
        initial state: zeros, or the tuned state its file carries)."""
        if g.state is None:
            g.state = self.model.initial_state()
        elif g.state is g.request.state:
            state = self.model.adopt_state(g.state)
            if state.batch_size != 1:
                raise InputError(f"the request's state has batch size {state.batch_size}: expected one sequence's state (batch size 1)")
            g.state = state

    def _prefill_chunks(self, gens: list[Generation]) -> None:
        chunks = [g.next_chunk() for g in gens]
        befores = [g.state for g in gens]
        full = gens[0].prompt_logprobs is not None
        logits, state = self.model.forward(torch.tensor(chunks), _stack(befores), full_output=full)
        for i, (g, chunk, before) in enumerate(zip(gens, chunks, befores)):
            g.state = state if len(gens) == 1 else _take(state, [i])
            self._guard(g, self._prefilled_chunk, g, chunk, before, logits[i])

    def _prefilled_chunk(self, g: Generation, chunk: list[int], before: State, logits: torch.Tensor) -> None:
        """Bookkeeping after ``chunk`` went into ``g.state``: ``logits`` are ``[T, V]`` when the
        prompt's logprobs are recorded, else ``[V]``."""
        if g.prompt_logprobs is not None:
            g.record_prompt(logits)
            logits = logits[-1].clone()  # not a view keeping the whole [B, T, V] output alive
        g.advance_prefill(len(chunk))
        if g.prefilled == g.cut:
            self.cache.store(g.ids[: g.cut], g.state, logits)
        if not g.prefilling:
            check_logits(logits, self.model, chunk, before, f"after the prompt's {len(g.ids)} tokens")
            if self.cache is not None and g.request.state is None:
                self.cache.store(g.ids, g.state, logits)
            self._prefilled(g, logits)

    def _prefilled(self, g: Generation, logits: torch.Tensor) -> None:
        g.logits = logits
        if g.request.token_count == 0:
            self._end(g, g.length_reason())

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
        """Sample every prefilled sequence, then feed the tokens in one batched forward, while a
        worker thread computes the constrained sequences' next masks (``Constraint.prepare_masks``)."""
        self._regroup()
        if self._rows:
            with _serial(self._logits):
                self._sample_rows()
        self._regroup()  # without the sequences that just stopped
        if not self._rows:
            return
        rows, before = self._rows, self._batch
        graphs = self._acquire_graphs()
        tokens = [g.ctx.tokens[-1] for g in rows]
        masks = _start_masks([g.constraint for g in rows if g.constraint is not None and g.ending is None])
        try:
            if graphs is not None:  # updates the pool in place: ``before`` is gone after the step
                logits, self._batch = self._graph_step(graphs, tokens, before)
            else:
                logits, self._batch = self.model.forward(torch.tensor(tokens).view(-1, 1), before)
        except Exception as exc:  # noqa: BLE001 - the step failed for every row in it
            for g in rows:
                self._end(g, "error", error=exc)
            return
        finally:  # the worker is done with the constraints before anything else touches them
            unprepared = masks.result() if masks is not None else {}
        self._logits = logits
        with _serial(logits):
            finite = torch.isfinite(logits).all(dim=1)
            suspects = set() if bool(finite.all()) else set((~finite).nonzero().flatten().tolist())
        for i, g in enumerate(rows):
            reason, stop = g.ending or (None, None)
            if reason != "stop_string" and i in suspects:  # names the first non-finite layer (eager steps only)
                before_i = None if graphs is not None else _take(before, [i])
                self._guard(g, check_logits, logits[i], self.model, [tokens[i]], before_i, f"at generated token {len(g.ctx.tokens)}", graphs is None)
            if reason is not None:
                self._end(g, reason, stop)
            elif id(g.constraint) in unprepared:
                self._end(g, "error", error=unprepared[id(g.constraint)])

    def _acquire_graphs(self) -> BatchGraphs | None:
        """The graphs this batch decodes through, or None for eager steps: a given BatchGraphs;
        else, unless ``cuda_graphs=False``, the model's shared ones when it sits on one CUDA
        device and no other engine holds them."""
        if self._graphs is None and self._graph_choice is not False:
            given = self._graph_choice if isinstance(self._graph_choice, BatchGraphs) else None
            self._graphs = given or shared_graphs(self.model, self.max_batch)
            if self._graphs is not None:
                self._graphs.in_use = True
        return self._graphs

    def _graph_step(self, graphs: BatchGraphs, tokens: list[int], before: State) -> tuple[torch.Tensor, State]:
        """``graphs.decode``; when a graph chosen automatically cannot be captured (an op of a
        third-party backend that syncs with the host, say), warn once and decode eagerly from now
        on. A capture happens only when the batch size changed, so ``before`` is then a state of
        its own, not the pool, and still intact."""
        try:
            return graphs.decode(tokens, before)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager path
            if self._graph_choice is not None:
                raise
            warnings.warn(f"decoding without CUDA graphs: capturing one failed ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
            self._graph_choice, self._graphs, graphs.in_use = False, None, False
            return self.model.forward(torch.tensor(tokens).view(-1, 1), before)

    def _sample_rows(self) -> None:
        rows = self._rows
        scores = Penalties.apply_batch(self._logits, [g.penalties for g in rows])
        for i, g in enumerate(rows):
            if g.constraint is not None:  # after bans and penalties, before any sampler
                self._guard(g, g.constraint.mask, scores[i])
        possible = torch.isfinite(scores).any(dim=1).tolist()
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(rows):
            if g.ended:
                continue
            if possible[i]:
                groups.setdefault(id(g.request.sampler), []).append(i)
            else:
                banned = "the constraint allows only banned tokens" if g.constraint is not None else "every token is banned"
                self._end(g, "error", error=InputError(f"{banned}: nothing left to sample"))
        for idx in groups.values():
            try:
                tokens = _sample(rows[idx[0]].request.sampler, scores if len(idx) == len(rows) else scores[idx], [rows[i].ctx for i in idx])
            except Exception as exc:  # noqa: BLE001 - ends the rows of this sampler only
                for i in idx:
                    self._end(rows[i], "error", error=exc)
                continue
            for i, token in zip(idx, tokens):
                self._guard(rows[i], self._feed, rows[i], token, self._logits[i])

    def _feed(self, g: Generation, token: Any, logits: torch.Tensor) -> None:
        if not g.accept(token, logits):
            self._end(g, *g.ending)
