"""Batched generation: :class:`Engine` runs many :class:`Request` s at once (continuous batching,
chunked prefill under a token budget, one batched decode step for all sequences); see
:mod:`rwkvkit.engine.core`. ``rwkvkit.generation.generate`` is a single request through it."""

from rwkvkit.engine.core import Engine, Handle, check_limits
from rwkvkit.engine.sequence import AUTO_CHUNK_RANGE, GenerationResult, Request, RunInfo, auto_chunk_len, check_chunk_len

__all__ = ["AUTO_CHUNK_RANGE", "Engine", "GenerationResult", "Handle", "Request", "RunInfo", "auto_chunk_len", "check_chunk_len", "check_limits"]
