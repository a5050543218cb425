"""The engine's own thread. The engine is synchronous and not thread-safe, so one thread owns it:
it takes submitted :class:`Job` s, steps while there is work (requests join the running batch at
the next step) and sleeps when there is none. Each job's text and end reach its asyncio consumer
through ``loop.call_soon_threadsafe``; a job cancelled from the event loop (a client that went
away) is ended by the engine at its next step, which frees its slot."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rwkvkit.engine import Engine, GenerationResult, Handle, Request, TokenLogprob
from rwkvkit.errors import RwkvkitError
from rwkvkit.interfaces import Callback
from rwkvkit.server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(RwkvkitError):
    """More sequences than the server's slots and queue can hold (HTTP 429)."""


@dataclass
class Event:
    """What a job's consumer receives: ``text`` pieces (with the logprobs of the tokens that came
    since the last piece), then one ``end`` with the result, or the error that ended the job."""

    index: int
    kind: str  # "text" or "end"
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerationResult | None = None
    error: BaseException | None = None


class Job:
    """One sequence (one choice of one HTTP request): its engine request and where its events go.
    ``sink`` is called on the engine thread and must only hand the event over."""

    def __init__(self, index: int, request: Request, sink: Callable[[Event], None]) -> None:
        self.index, self.sink = index, sink
        self.arrived = time.perf_counter()
        self.handle: Handle | None = None
        self.cancelled = self.started = self.reported = False
        self.last_token: float | None = None
        self.sent = 0  # logprobs entries already sent with a text event
        self.relay = _Relay(self)
        self.request = Request(**{**vars(request), "callbacks": [*request.callbacks, self.relay]})

    def cancel(self) -> None:
        """Safe from any thread: the engine ends the job at its next step."""
        self.cancelled = True
        handle = self.handle
        if handle is not None:
            handle.cancel()

    def new_logprobs(self) -> list[TokenLogprob]:
        entries = (self.handle.logprobs if self.handle is not None else None) or []
        fresh, self.sent = entries[self.sent :], len(entries)
        return fresh


class _Relay(Callback):
    """Streams a job's text to its consumer and times its tokens (engine thread)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.metrics: Metrics | None = None  # set by the worker

    def on_start(self, run: Any) -> None:
        self.job.started = True
        self.metrics.prompt_tokens.inc(run.prompt_tokens)

    def on_token(self, token: int) -> None:
        now, job = time.perf_counter(), self.job
        if job.last_token is None:
            self.metrics.ttft.observe(now - job.arrived)
        else:
            self.metrics.token_latency.observe(now - job.last_token)
        job.last_token = now
        self.metrics.generated_tokens.inc()

    def on_text(self, piece: str) -> None:
        self.job.sink(Event(self.job.index, "text", piece, self.job.new_logprobs()))


class EngineWorker:
    """Owns ``engine`` on a daemon thread. ``capacity``: sequences in flight at most (slots plus
    queue); :meth:`submit` refuses a request beyond it with :class:`QueueFull`."""

    def __init__(self, engine: Engine, capacity: int, metrics: Metrics) -> None:
        self.engine, self.capacity, self.metrics = engine, capacity, metrics
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._jobs: list[Job] = []  # submitted to the engine, not yet reported ended
        self._load = 0  # jobs in the inbox or the engine
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="rwkvkit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (QueueFull; also once closing)."""
        for job in jobs:
            job.relay.metrics = self.metrics
        with self._cond:
            if self._closing or self._load + len(jobs) > self.capacity:
                state = "shutting down" if self._closing else f"{self._load} sequences in flight, capacity {self.capacity} (max_batch + max_queue)"
                raise QueueFull(f"the server is busy ({state}); retry later")
            self._load += len(jobs)
            self._inbox.extend(jobs)
            self.metrics.queue_length.inc(len(jobs))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Cancel every job, let the engine end them, and stop the thread."""
        with self._cond:
            self._closing = True
            for job in [*self._inbox, *self._jobs]:
                job.cancel()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._jobs or self._closing):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                if self._closing and not (inbox or self._jobs):
                    return
            for job in inbox:
                self._enter(job)
            if self.engine.pending:
                try:
                    self.engine.step()
                except Exception:  # noqa: BLE001 - a bug: the engine ended every request with it; serve on
                    log.exception("engine step failed")
            self._report()

    def _enter(self, job: Job) -> None:
        try:
            job.handle = self.engine.submit(job.request)
        except Exception as exc:  # noqa: BLE001 - refused request (InputError): its consumer gets it
            self._end(job, None, exc)
            return
        self._jobs.append(job)
        if job.cancelled:  # cancelled before it had a handle
            job.handle.cancel()

    def _report(self) -> None:
        """Send the end of every job the engine finished; update the gauges."""
        for job in [j for j in self._jobs if j.handle.done]:
            self._jobs.remove(job)
            self._end(job, job.handle.result, job.handle.error)
        waiting = sum(not j.started for j in self._jobs)
        self.metrics.queue_length.set(waiting + len(self._inbox))
        self.metrics.active_sequences.set(len(self._jobs) - waiting)

    def _end(self, job: Job, result: GenerationResult | None, error: BaseException | None) -> None:
        with self._cond:
            self._load -= 1
        job.reported = True
        job.sink(Event(job.index, "end", logprobs=job.new_logprobs(), result=result, error=error))
