"""The API ChatRWKV users already write: ``RWKV(model=..., strategy=...)``,
``model.forward(tokens, state) -> (logits, state)``, ``PIPELINE`` and ``PIPELINE_ARGS``."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import torch

from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.constraints import Constraint, constraint_maker
from rwkvkit.engine import Engine, Request
from rwkvkit.errors import InputError
from rwkvkit.formats.lora import as_loras, merge_loras
from rwkvkit.generation import GenerationResult, check_chunk_len, generate_request
from rwkvkit.interfaces import SampleContext, Sampler, Tokenizer
from rwkvkit.model import Model
from rwkvkit.penalties import Penalties, is_int
from rwkvkit.registry import registry
from rwkvkit.resolve import CallbackLike, as_callbacks, resolve_sampler, resolve_tokenizer
from rwkvkit.state import State
from rwkvkit.stops import split_stops
from rwkvkit.strategy import parse_strategy


class RWKV(Model):
    """Load a checkpoint (``.pth`` suffix optional, ``.safetensors`` or a Hugging Face model
    folder) for a ChatRWKV strategy string.

    ``backend`` picks the implementation for every stage (``auto``: the fastest available).
    ``lora``: adapters merged into the weights before they are prepared (and quantized), each
    ``{"path": FILE, "alpha": lora_alpha}`` or ``(FILE, lora_alpha)``: see rwkvkit.formats.lora.
    """

    def __init__(self, model: str | Path, strategy: str = "cpu fp32", *, backend: str = "auto", lora: Sequence[Any] = ()) -> None:
        checkpoint = load_checkpoint(model)
        loras = as_loras(lora)
        if loras:
            checkpoint = merge_loras(checkpoint, loras)
        super().__init__(checkpoint, parse_strategy(strategy, checkpoint.spec.n_layer, backend))
        spec = self.spec
        # ChatRWKV exposes these; scripts read e.g. model.args.n_layer
        dims = ("n_layer", "n_embd", "n_head", "head_size", "vocab_size")  # RWKV-4 has no heads
        self.args = SimpleNamespace(MODEL_NAME=str(model), **{name: getattr(spec, name) for name in dims if hasattr(spec, name)})
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
        ctx: str | Sequence[str | Sequence[int]],
        token_count: int = 100,
        args: PIPELINE_ARGS | None = None,
        callback: CallbackLike | Sequence[CallbackLike] | None = None,
        state: State | None = None,
        *,
        sampler: Sampler | str | None = None,
        sampler_options: dict[str, Any] | None = None,
        seed: int | Sequence[int] | None = None,
        constraint: Constraint | Mapping[str, Any] | None = None,
        return_result: bool = False,
    ) -> str | GenerationResult | list[str] | list[GenerationResult]:
        """ChatRWKV's ``generate``: returns the text. ``sampler`` (name or instance) replaces the
        nucleus sampler built from ``args``; ``return_result=True`` returns the full
        :class:`GenerationResult` (tokens, final state, metrics).

        A list of prompts (texts, or lists of token ids) runs as one batched engine run and returns a list,
        in order. Each prompt continues ``state`` (None: a fresh start) with its own penalties and
        its own seed, as the same calls one by one would have: ``seed=None`` draws one seed per
        prompt from the pipeline's generator, in order; an int seeds every prompt alike; a list
        gives one per prompt. ``callback`` applies to every prompt: a registered name becomes one
        instance per prompt (``"metrics"`` fills each result's metrics), a Callback object or a
        function is shared and receives the events of all prompts, interleaved.

        ``constraint`` makes the output parse: ``{"json_schema": schema}``, ``{"regex": pattern}``,
        ``{"grammar": lark_or_gbnf}`` (each prompt gets its own, compiled before any token), or a
        :class:`rwkvkit.constraints.Constraint` object (one prompt only). See the stop reasons
        ``constraint`` and ``constraint_incomplete`` in :mod:`rwkvkit.constraints`.
        """
        args = args or PIPELINE_ARGS()
        args.check()
        chosen = resolve_sampler(sampler, sampler_options) if sampler is not None else args.sampler()
        batch = _prompt_list(ctx)
        prompts = [ctx] if batch is None else batch
        make = constraint_maker(constraint, self.tokenizer) if constraint is not None else lambda: None
        requests = [
            Request(prompt, token_count, chosen, args.penalties(), args.token_stop, args.chunk_len, state, prompt_seed, as_callbacks(callback), constraint=make())
            for prompt, prompt_seed in zip(prompts, self._seeds(seed, len(prompts)))
        ]
        if batch is None:
            result = generate_request(self.model, self.tokenizer, requests[0])
            return result if return_result else result.text
        results = Engine(self.model, self.tokenizer).generate(requests)
        return results if return_result else [r.text for r in results]

    def _seeds(self, seed: int | Sequence[int] | None, n: int) -> list[int]:
        if seed is None:
            return [int(torch.randint(2**62, (1,), generator=self._generator)) for _ in range(n)]
        if is_int(seed):
            return [seed] * n
        if isinstance(seed, Sequence) and len(seed) == n and all(is_int(s) for s in seed):
            return list(seed)
        raise InputError(f"seed={seed!r:.80}: expected None, an integer, or one integer per prompt ({n})")


def _prompt_list(ctx: Any) -> list[str | Sequence[int]] | None:
    """The prompts of the list form (texts, or lists of token ids), or None when ``ctx`` is one
    prompt: text, or its token ids."""
    if isinstance(ctx, str) or not isinstance(ctx, Sequence) or not ctx:
        return None
    if all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, bytes)) for p in ctx):
        return list(ctx)
    return None
