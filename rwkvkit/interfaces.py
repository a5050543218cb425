"""Interfaces of the plugin kinds that are plain Python objects: tokenizers, samplers and
callbacks. Backends have their own module, :mod:`rwkvkit.backend`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


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
        """``errors`` is passed to ``bytes.decode``: ``"strict"`` raises on invalid UTF-8,
        ``"replace"`` substitutes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


@dataclass
class SampleContext:
    """What a sampler may use besides the logits: the run's seeded generator (so a run is
    reproducible from its seed), the tokens generated so far and their decayed occurrence counts."""

    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    occurrence: dict[int, float] = field(default_factory=dict)


class Sampler(ABC):
    """Picks the next token from float32 logits ``[V]`` (after bans and penalties were applied)."""

    name: str = ""

    @abstractmethod
    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int: ...


class Callback:
    """Receives a generation's events. Override what you need; every method defaults to nothing.

    ``on_text`` receives only whole UTF-8 characters: a token holding part of a character is held
    back until the character completes.
    """

    def on_start(self, run: Any) -> None:
        """``run`` is the :class:`rwkvkit.generation.RunInfo` of the generation."""

    def on_token(self, token: int) -> None: ...

    def on_text(self, piece: str) -> None: ...

    def on_end(self, result: Any) -> None:
        """``result`` is the :class:`rwkvkit.generation.GenerationResult`."""
