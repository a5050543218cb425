"""The API ChatRWKV users already write: ``RWKV(model=..., strategy=...)``,
``model.forward(tokens, state) -> (logits, state)``, ``PIPELINE`` and ``PIPELINE_ARGS``."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import torch

from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.generation import GenerationResult, check_chunk_len, generate
from rwkvkit.interfaces import SampleContext, Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.penalties import Penalties
from rwkvkit.registry import registry
from rwkvkit.resolve import CallbackLike, as_callbacks, resolve_sampler, resolve_tokenizer
from rwkvkit.state import State
from rwkvkit.stops import split_stops
from rwkvkit.strategy import parse_strategy


class RWKV(Model):
    """Load a checkpoint (``.pth`` suffix optional) for a ChatRWKV strategy string.

    ``backend`` picks the implementation for every stage (``auto``: the fastest available).
    """

    def __init__(self, model: str | Path, strategy: str = "cpu fp32", *, backend: str = "auto") -> None:
        checkpoint = load_checkpoint(model)
        super().__init__(checkpoint, parse_strategy(strategy, checkpoint.spec.n_layer, backend))
        spec = self.spec
        # ChatRWKV exposes these; scripts read e.g. model.args.n_layer
        self.args = SimpleNamespace(
            MODEL_NAME=str(model),
            n_layer=spec.n_layer,
            n_embd=spec.n_embd,
            n_head=spec.n_head,
            head_size=spec.head_size,
            vocab_size=spec.vocab_size,
        )
        self.version = spec.version

    def generate_zero_state(self) -> State:
        return self.zero_state()


def _nucleus(temperature: float, top_p: float, top_k: int) -> Sampler:
    return registry.get("samplers", "nucleus")(temperature=temperature, top_p=top_p, top_k=top_k)


class PIPELINE_ARGS:  # noqa: N801 - ChatRWKV's name
    """ChatRWKV's generation options, with its defaults, checked on construction and again by
    ``PIPELINE.generate`` (ChatRWKV programs also set attributes afterwards).

    ``token_stop`` takes token ids and stop strings; ``chunk_len=None`` (the default here) lets
    generation pick a prefill chunk for speed, an integer is honoured exactly.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 0.85,
        top_k: int = 0,
        alpha_frequency: float = 0.2,
        alpha_presence: float = 0.2,
        alpha_decay: float = 0.996,
        token_ban: Sequence[int] = (),
        token_stop: Sequence[int | str] = (),
        chunk_len: int | None = None,
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.alpha_frequency = alpha_frequency
        self.alpha_presence = alpha_presence
        self.alpha_decay = alpha_decay
        self.token_ban = list(token_ban) if isinstance(token_ban, Iterable) and not isinstance(token_ban, (str, bytes)) else token_ban
        self.token_stop = list(token_stop) if isinstance(token_stop, Iterable) and not isinstance(token_stop, (str, bytes)) else token_stop
        self.chunk_len = chunk_len
        self.check()

    def sampler(self) -> Sampler:
        """ChatRWKV's sampling with these options: the registered ``nucleus`` sampler."""
        return _nucleus(self.temperature, self.top_p, self.top_k)

    def penalties(self) -> Penalties:
        return Penalties(self.alpha_presence, self.alpha_frequency, self.alpha_decay, self.token_ban)

    def check(self) -> None:
        """Raise InputError naming the first option out of range (ids against a vocabulary are
        checked when generating)."""
        self.sampler()
        self.penalties()
        split_stops(self.token_stop)
        check_chunk_len(self.chunk_len)


class PIPELINE:  # noqa: N801 - ChatRWKV's name
    """ChatRWKV's text pipeline over a model and a tokenizer (a registered name such as
    ``"rwkv_vocab_v20230424"`` or a path to a ``tokenizer.json``).

    ``seed`` makes sampling reproducible; without it every ``generate`` draws a fresh seed.
    """

    def __init__(self, model: Model, WORD_NAME: str | Path | Tokenizer, seed: int | None = None) -> None:  # noqa: N803
        self.model = model
        self.tokenizer = resolve_tokenizer(WORD_NAME)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a partial character) becomes U+FFFD, as in ChatRWKV."""
        return self.tokenizer.decode(ids, errors="replace")

    def sample_logits(self, logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0) -> int:
        return _nucleus(temperature, top_p, top_k).sample(logits, SampleContext(self._generator))

    def generate(
        self,
        ctx: str,
        token_count: int = 100,
        args: PIPELINE_ARGS | None = None,
        callback: CallbackLike | Sequence[CallbackLike] | None = None,
        state: State | None = None,
        *,
        sampler: Sampler | str | None = None,
        sampler_options: dict[str, Any] | None = None,
        seed: int | None = None,
        return_result: bool = False,
    ) -> str | GenerationResult:
        """ChatRWKV's ``generate``: returns the text. ``sampler`` (name or instance) replaces the
        nucleus sampler built from ``args``; ``return_result=True`` returns the full
        :class:`GenerationResult` (tokens, final state, metrics)."""
        args = args or PIPELINE_ARGS()
        args.check()
        chosen = resolve_sampler(sampler, sampler_options) if sampler is not None else args.sampler()
        result = generate(
            self.model,
            self.tokenizer,
            ctx,
            token_count=token_count,
            sampler=chosen,
            penalties=args.penalties(),
            stop_tokens=args.token_stop,
            chunk_len=args.chunk_len,
            state=state,
            seed=seed if seed is not None else int(torch.randint(2**62, (1,), generator=self._generator)),
            callbacks=as_callbacks(callback),
        )
        return result if return_result else result.text
