"""Interfaces of the plugin kinds that are plain Python objects: tokenizers, samplers and
callbacks. Backends have their own module, :mod:`rwkvkit.backend`."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from rwkvkit.errors import InputError, TokenizerError


class Tokenizer(ABC):
    """Text <-> token ids. ``decode_bytes`` exists because a token may hold part of a UTF-8
    character; streaming callers join bytes and decode only whole characters."""

    name: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def decode(self, ids: Sequence[int], errors: str = "strict") -> str:
        """``errors="strict"`` raises TokenizerError on invalid UTF-8 (e.g. ids that end inside a
        character); ``"replace"`` substitutes U+FFFD."""
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", errors=errors)
        except UnicodeDecodeError as exc:
            raise TokenizerError(
                f"token ids decode to invalid UTF-8 at byte {exc.start} of {len(data)} (a token holds part of a "
                "character); use decode(ids, errors='replace'), or decode_bytes when streaming"
            ) from None


def utf8_bytes(text: object) -> bytes:
    """``text`` as UTF-8, or InputError for a non-str or a str with lone surrogates."""
    if not isinstance(text, str):
        raise InputError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"text to encode has a lone surrogate {text[exc.start]!r} at index {exc.start}") from None


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as a list of ints, or InputError naming the first one that is not in [0, vocab_size)."""
    try:
        checked = [operator.index(i) for i in ids]
    except TypeError:
        raise InputError(f"token ids must be a sequence of integers, got {ids!r:.100}") from None
    for i in checked:
        if not 0 <= i < vocab_size:
            raise InputError(f"token id {i} is out of range: this tokenizer's ids are 0..{vocab_size - 1}")
    return checked


@dataclass
class SampleContext:
    """What a sampler may use besides the logits: the run's seeded generator (so a run is
    reproducible from its seed), the tokens generated so far and their decayed occurrence counts."""

    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    occurrence: Mapping[int, float] = field(default_factory=dict)


class Sampler(ABC):
    """Picks the next token from float32 logits ``[V]`` (after bans and penalties were applied).

    ``sample`` returns an int id in ``0..V-1``; generation refuses anything else, naming the sampler.
    Batched generation calls ``sample_batch``, whose default loops over ``sample``, so a sampler
    that implements only ``sample`` works there unchanged.
    """

    name: str = ""

    @abstractmethod
    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int: ...

    def sample_batch(self, logits: torch.Tensor, ctxs: Sequence[SampleContext]) -> list[int]:
        """The next token of each of ``B`` sequences: ``logits [B, V]``, ``ctxs[i]`` row i's context.

        Contract: entry i is exactly ``sample(logits[i], ctxs[i])``, and ``ctxs[i].generator``
        advances exactly as that call would advance it, so a sequence's tokens never depend on what
        else is in the batch. Override it to filter all rows at once; keep the draws per row.
        """
        check_sample_batch(logits, ctxs)
        return [self.sample(row, ctx) for row, ctx in zip(logits, ctxs)]


def check_sample_batch(logits: object, ctxs: Sequence[SampleContext]) -> None:
    """InputError unless ``logits`` is a float ``[B, V]`` tensor with one context per row (a
    mismatch would pair a row with another sequence's generator)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"sample_batch takes float logits [B, V], got {got}")
    if logits.shape[0] != len(ctxs):
        raise InputError(f"sample_batch got {logits.shape[0]} rows of logits for {len(ctxs)} sample contexts")


class Callback:
    """Receives a generation's events. Override what you need; every method defaults to nothing.

    ``on_text`` receives only whole UTF-8 characters: a token holding part of a character is held
    back until the character completes.
    """

    def on_start(self, run: Any) -> None:
        """``run`` is the :class:`rwkvkit.generation.RunInfo` of the generation."""

    def on_prefill(self, done: int, total: int) -> None:
        """After each prompt chunk: ``done`` of ``total`` prompt tokens are in the state (for
        progress on long prompts, which can take minutes)."""

    def on_token(self, token: int) -> None: ...

    def on_text(self, piece: str) -> None: ...

    def on_end(self, result: Any) -> None:
        """``result`` is the :class:`rwkvkit.generation.GenerationResult`. Called on every way
        out once ``on_start`` returned: ``result.stop_reason`` is ``interrupted`` (Ctrl-C) or
        ``error`` when an exception (re-raised afterwards) ended the generation."""
