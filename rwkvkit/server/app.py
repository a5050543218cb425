"""The HTTP layer: FastAPI routes for the OpenAI API (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``), ``/health`` and ``/metrics``; SSE streaming (sse-starlette) ending in
``data: [DONE]``; every error as OpenAI's error object. A client that goes away mid-request has
its sequences cancelled (freed at the engine's next step)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from rwkvkit.server.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from rwkvkit.server.service import Service, finish_reason
from rwkvkit.server.worker import Event, Job

PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


class Gate:
    """ASGI middleware: with API keys, every path but ``/health`` needs ``Authorization: Bearer
    KEY`` (a 401 reveals nothing else, not even which paths exist); counts answers by status."""

    def __init__(self, app: Any, keys: list[str], service: Service) -> None:
        self.app, self.keys, self.service = app, [k.encode() for k in keys], service

    def _authorized(self, scope: dict[str, Any]) -> bool:
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        ok = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
        return ok

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.keys and scope["path"] != "/health" and not self._authorized(scope):
                denied = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                denied.headers = {"WWW-Authenticate": "Bearer"}
                await _error(denied)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.service.metrics.requests.labels(path, str(status)).inc()


def create_app(service: Service, grace_period: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.close, grace_period)

    app = FastAPI(title="rwkvkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, lambda request, exc: _error(exc))
    app.add_exception_handler(RequestValidationError, lambda request, exc: _error(validation_error(exc.errors())))
    app.add_exception_handler(HTTPException, lambda request, exc: _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "rwkvkit", "states": sorted(service.states)}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _completions(service, body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await _chat(service, body, request)

    return app


def _prompts(service: Service, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text when given as text."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list", "prompt")
    return [service.prompt_ids(p) for p in prompt], [p if isinstance(p, str) else None for p in prompt]


class _Run:
    """The jobs of one request and their events, handed from the engine thread to this loop."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.deadline = time.monotonic() + service.limits.request_timeout
        self.jobs: list[Job] = []
        self.id, self.created = uuid.uuid4().hex[:24], int(time.time())

    def sink(self, event: Event) -> None:
        """Called on the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    async def events(self, request: Request | None) -> AsyncIterator[Event]:
        """Every job's events until all ended; cancels what is left however it stops (a client
        gone: ``request`` polled when given, else the stream's task is cancelled; the timeout)."""
        left = len(self.jobs)
        try:
            while left:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(504, f"the request took longer than this server's request_timeout={self.service.limits.request_timeout:g} s", code="timeout")
                try:  # events already queued need no timer (wait_for costs a task per call: per token)
                    event = self.queue.get_nowait() if not self.queue.empty() else await asyncio.wait_for(self.queue.get(), min(remaining, POLL_S))
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                left -= event.kind == "end"
                yield event
        finally:
            for job in self.jobs:
                job.cancel()

    def usage(self, prompts: list[list[int]], completion: int) -> dict[str, int]:
        prompt = sum(map(len, prompts))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(self, chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
        async def sse() -> AsyncIterator[dict[str, str]]:
            try:
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
            except APIError as exc:  # after the 200 was sent: an error event, as OpenAI streams do
                yield {"data": json.dumps(exc.body())}
            yield {"data": "[DONE]"}

        # on SIGTERM/Ctrl-C the stream may go on for the grace period (uvicorn waits a little longer)
        return EventSourceResponse(sse(), ping=15, shutdown_grace_period=self.service.limits.grace_period)


async def _completions(service: Service, body: CompletionRequest, request: Request) -> Any:
    service.check_model(body.model)
    prompts, texts = _prompts(service, body.prompt)
    max_tokens = service.max_tokens(body.max_tokens, service.limits.default_max_tokens)
    service.check_counts(len(prompts) * body.n, body.logprobs, "logprobs")
    run = _Run(service)
    echo_logprobs = body.echo and body.logprobs is not None
    run.jobs = service.submit(body, prompts, max_tokens, run.sink, logprobs=body.logprobs, prompt_logprobs=echo_logprobs)

    def echoed(i: int) -> str:
        ids = prompts[i // body.n]
        return texts[i // body.n] if texts[i // body.n] is not None else service.tokenizer.decode(ids, errors="replace")

    def prompt_lp(i: int, result: Any) -> dict[str, Any]:
        return service.completion_logprobs([None, *result.prompt_logprobs], prompts[i // body.n], 0)

    def chunk(i: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": service.model_name, "choices": [choice]}

    if not body.stream:
        ends: dict[int, Event] = {}
        async for event in run.events(request):
            if event.kind == "end":
                ends[event.index] = event
        choices = []
        for i in sorted(ends):
            finish, result = finish_reason(ends[i]), ends[i].result
            head = echoed(i) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = service.completion_logprobs(result.logprobs, result.tokens, len(head))
                if body.echo:
                    before = prompt_lp(i, result)
                    logprobs = {k: before[k] + logprobs[k] for k in logprobs}
            choices.append({"index": i, "text": head + result.text, "logprobs": logprobs, "finish_reason": finish})
        usage = run.usage(prompts, sum(len(e.result.tokens) for e in ends.values()))
        return {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": service.model_name, "choices": choices, "usage": usage}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        offsets = {job.index: 0 for job in run.jobs}
        generated = 0
        echo_pending = set(offsets) if body.echo else set()
        async for event in run.events(None):
            i = event.index
            if i in echo_pending:  # the prompt first (its logprobs come with the result: one chunk at the end of prefill is not known here)
                echo_pending.discard(i)
                head = echoed(i)
                offsets[i] = len(head)
                yield chunk(i, head, None, None)
            logprobs = service.completion_logprobs(event.logprobs, [e.token for e in event.logprobs], offsets[i]) if body.logprobs is not None else None
            offsets[i] += len(event.text)
            if event.kind == "text":
                yield chunk(i, event.text, logprobs, None)
                continue
            finish = finish_reason(event)
            generated += len(event.result.tokens)
            if echo_logprobs:
                yield chunk(i, "", prompt_lp(i, event.result), None)
            yield chunk(i, "", logprobs, finish)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**chunk(0, "", None, None), "choices": [], "usage": run.usage(prompts, generated)}

    return run.stream(chunks())


async def _chat(service: Service, body: ChatRequest, request: Request) -> Any:
    service.check_model(body.model)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "max_tokens and max_completion_tokens: give one of them", "max_tokens")
    field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = service.max_tokens(body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens, service.limits.max_tokens, field)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
    service.check_counts(body.n, top, "top_logprobs")
    messages = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
    prompt = service.prompt_ids(service.template.render(messages), "messages")
    run = _Run(service)
    run.jobs = service.submit(body, [prompt], max_tokens, run.sink, logprobs=top, stops=[service.template.stop])

    def chunk(i: int, delta: dict[str, str], logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": f"chatcmpl-{run.id}", "object": "chat.completion.chunk", "created": run.created, "model": service.model_name, "choices": [choice]}

    if not body.stream:
        ends = {e.index: e async for e in run.events(request) if e.kind == "end"}
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": ends[i].result.text.lstrip()},
                "logprobs": {"content": service.chat_logprobs(ends[i].result.logprobs)} if top is not None else None,
                "finish_reason": finish_reason(ends[i]),
            }
            for i in sorted(ends)
        ]
        usage = run.usage([prompt], sum(len(e.result.tokens) for e in ends.values()))
        return {"id": f"chatcmpl-{run.id}", "object": "chat.completion", "created": run.created, "model": service.model_name, "choices": choices, "usage": usage}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        begun: set[int] = set()  # choices whose content has begun (the reply's leading space is dropped)
        generated = 0
        for job in run.jobs:
            yield chunk(job.index, {"role": "assistant", "content": ""}, None, None)
        async for event in run.events(None):
            i = event.index
            logprobs = {"content": service.chat_logprobs(event.logprobs)} if top is not None else None
            if event.kind == "text":
                text = event.text if i in begun else event.text.lstrip()
                if text:
                    begun.add(i)
                if text or logprobs:
                    yield chunk(i, {"content": text}, logprobs, None)
                continue
            finish = finish_reason(event)
            generated += len(event.result.tokens)
            yield chunk(i, {}, logprobs if event.logprobs else None, finish)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**chunk(0, {}, None, None), "choices": [], "usage": run.usage([prompt], generated)}

    return run.stream(chunks())
