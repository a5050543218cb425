"""Interfaces for the plugin kinds that are plain Python objects (tokenizers; samplers and
callbacks follow). Backends have their own module, :mod:`rwkvkit.backend`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence


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
