"""What the HTTP layer asks of the model, without HTTP: checked prompts, per-request samplers and
penalties over the server's ``sampling`` defaults, jobs on the engine thread, and the OpenAI
shapes of finish reasons and logprobs."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import replace
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from rwkvkit.config import SamplingConfig, make_sampler, make_stops
from rwkvkit.constraints import ConstraintMaker, constraint_from_response_format, constraint_maker
from rwkvkit.engine import Engine, Request, TokenLogprob
from rwkvkit.errors import ConstraintError, InputError, RwkvkitError, StateError
from rwkvkit.interfaces import Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.penalties import Penalties
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.server.config import ServerConfig
from rwkvkit.server.metrics import Metrics
from rwkvkit.server.protocol import APIError, SamplingParams
from rwkvkit.server.template import ChatTemplate
from rwkvkit.server.worker import EngineWorker, Event, Job
from rwkvkit.state import State

# a complete constrained text stops; one the token budget cut short is incomplete: "length"
FINISH = {"length": "length", "stop_token": "stop", "stop_string": "stop", "constraint": "stop", "constraint_incomplete": "length"}
SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
_SAMPLERS_KEPT = 64  # distinct sampler settings kept (rows of one sampler are sampled in one call)


class Service:
    """The model, its engine thread and the server's limits (``cfg``: a composed serve config)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, cfg: DictConfig, model_name: str) -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.limits: ServerConfig = OmegaConf.to_object(cfg.server)
        self.sampling: SamplingConfig = OmegaConf.to_object(cfg.sampling)
        self.stops = make_stops(cfg.sampling)
        self.template = ChatTemplate.of(cfg.model.chat)
        self.states = load_states(model, self.limits.states)  # before the engine thread starts
        limits = self.limits
        self.cache = PromptCache(limits.prompt_cache_mb << 20) if limits.prompt_cache_mb > 0 else None
        self.metrics = Metrics(self.cache)
        engine = Engine(model, tokenizer, max_batch=limits.max_batch, prefill_tokens_per_step=limits.prefill_tokens_per_step, cache=self.cache)
        self.worker = EngineWorker(engine, limits.max_batch + limits.max_queue, self.metrics)
        self._samplers: OrderedDict[tuple, Sampler] = OrderedDict()
        self.token_bytes = lru_cache(maxsize=1 << 16)(lambda token: tokenizer.decode_bytes([token]))

    def initial_state(self, body: SamplingParams) -> State | None:
        """The tuned state a request names in ``state`` (None: the model's own start)."""
        if body.state is None:
            return None
        if body.state not in self.states:
            known = ", ".join(sorted(self.states)) or "none (server.states is empty)"
            raise APIError(400, f"state: unknown state {body.state!r}; this server has: {known}", "state")
        return self.states[body.state]

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'", "model", "model_not_found")

    def prompt_ids(self, prompt: str | Sequence[int], field: str = "prompt") -> list[int]:
        """A prompt's token ids, checked against the vocabulary and ``max_prompt_tokens``."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{field}: the prompt is empty (it needs at least one token)", field)
        vocab = self.model.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{field}: token id {bad} is outside the vocabulary 0..{vocab - 1}", field)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{field}: {len(ids)} tokens exceed this server's limit max_prompt_tokens={self.limits.max_prompt_tokens}", field)
        return ids

    def max_tokens(self, asked: int | None, default: int, field: str = "max_tokens") -> int:
        if asked is None:
            return default
        if asked > self.limits.max_tokens:
            raise APIError(400, f"{field}={asked} exceeds this server's limit max_tokens={self.limits.max_tokens}", field)
        return asked

    def check_counts(self, choices: int, logprobs: int | None, field: str) -> None:
        if choices > self.limits.max_n:
            raise APIError(400, f"n: {choices} choices (n x prompts) exceed this server's limit max_n={self.limits.max_n}", "n")
        if logprobs is not None and logprobs > self.limits.max_logprobs:
            raise APIError(400, f"{field}={logprobs} exceeds this server's limit max_logprobs={self.limits.max_logprobs}", field)

    def sampler(self, body: SamplingParams) -> Sampler:
        """The request's sampler: the config's, with the request's options over it (one instance
        per distinct setting, so rows that share it are sampled in one batched call)."""
        common = {k: getattr(body, k) for k in SAMPLER_FIELDS if getattr(body, k) is not None}
        options = body.sampler_options if body.sampler_options is not None else ({} if body.sampler else dict(self.sampling.options))
        cfg = replace(self.sampling, **common, name=body.sampler or self.sampling.name, options=options)
        key = (cfg.name, *(getattr(cfg, k) for k in SAMPLER_FIELDS), repr(sorted(options.items())))
        if key not in self._samplers:
            try:
                self._samplers[key] = make_sampler(cfg)
            except RwkvkitError as exc:
                raise APIError(400, str(exc).removeprefix("sampling: "), "sampler" if body.sampler or body.sampler_options else None) from None
            if len(self._samplers) > _SAMPLERS_KEPT:
                self._samplers.popitem(last=False)
        self._samplers.move_to_end(key)
        return self._samplers[key]

    def penalties(self, body: SamplingParams) -> Penalties:
        s = self.sampling
        presence = s.alpha_presence if body.presence_penalty is None else body.presence_penalty
        frequency = s.alpha_frequency if body.frequency_penalty is None else body.frequency_penalty
        decay = s.alpha_decay if body.alpha_decay is None else body.alpha_decay
        return Penalties(presence, frequency, decay, list(s.token_ban))

    def constraint(self, body: SamplingParams) -> ConstraintMaker | None:
        """``response_format`` compiled once for the request (a fresh constraint per choice); a bad
        one is a 400 before anything is queued."""
        try:
            spec = constraint_from_response_format(body.response_format)
            return constraint_maker(spec, self.tokenizer, "response_format") if spec else None
        except (InputError, ConstraintError) as exc:
            raise APIError(400, str(exc), "response_format") from None

    def submit(
        self,
        body: SamplingParams,
        prompts: list[list[int]],
        max_tokens: int,
        sink: Callable[[Event], None],
        *,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        stops: Sequence[str] = (),
    ) -> list[Job]:
        """One job per prompt and choice (choice ``i * n + j`` is prompt i's j-th), queued all
        together or refused (429). Choice j takes ``seed + j``, so choices differ and a seed
        reproduces all of them."""
        sampler = self.sampler(body)
        constraint = self.constraint(body)
        state = self.initial_state(body)
        asked = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in asked):
            raise APIError(400, "stop: a stop string is empty", "stop")
        stop_tokens = [*self.stops, *asked, *stops]
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**62)
        jobs = [
            Job(
                i * body.n + j,
                Request(
                    ids, max_tokens, sampler, self.penalties(body), stop_tokens, seed=seed + j, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    constraint=constraint() if constraint else None, state=state,
                ),
                sink,
            )
            for i, ids in enumerate(prompts)
            for j in range(body.n)
        ]
        try:
            self.worker.submit(jobs)
        except RwkvkitError as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(self.limits.retry_after)}) from None
        return jobs

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def completion_logprobs(self, entries: Sequence[TokenLogprob | None], tokens: Sequence[int], offset: int) -> dict[str, Any]:
        """The completions API's logprobs object; ``None`` entries (a prompt's first token) have no
        logprob. ``offset``: where the first token's text starts in the choice's text."""
        texts = [self.token_text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {self.token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.token_text(token), "logprob": logprob, "bytes": list(self.token_bytes(token))}

        return [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


def finish_reason(event: Event) -> str:
    """OpenAI's finish reason of an ended job; an error or an unexpected end raises APIError."""
    if event.error is not None:
        status = 400 if isinstance(event.error, RwkvkitError) else 500
        raise APIError(status, f"generation failed: {event.error}")
    reason = event.result.stop_reason
    if reason not in FINISH:
        raise APIError(503, f"generation ended early ({reason}): the server is shutting down", code="shutting_down")
    return FINISH[reason]


def load_states(model: Model, paths: Mapping[str, str]) -> dict[str, State]:
    """``server.states`` read and checked against the model before anything is served; a bad
    file is refused naming its name and path."""
    states = {}
    for name, path in paths.items():
        try:
            states[name] = State.from_tuned(path, model)
        except StateError as exc:
            raise StateError(f"server.states.{name}={path}: {exc}") from None
    return states
