"""Built-in constraints ``json_schema``, ``regex`` and ``grammar`` (Lark, or llama.cpp's GBNF),
on llguidance.

Chosen by measurement (benchmarks/bench_constraint_libraries.py): on the World vocabulary (ids of
raw bytes, 486 of them invalid UTF-8 on their own) and the demo's byte-level BPE, llguidance's
masks were right in every case (120/120 random walks valid per vocabulary, multi-byte characters
accepted byte by byte), cost 7-53 us per token (a 0.1B decode step is milliseconds) and it builds a
World tokenizer in ~0.4 s (once per tokenizer object, cached). xgrammar's masks are faster but it let
raw control characters into JSON strings (invalid JSON) and takes ~2.6 s per World tokenizer;
outlines-core has no context-free grammars and ignored integer bounds of a schema.

JSON is compact (no whitespace between tokens) unless the schema's ``x-guidance`` options say
otherwise: a model is free to emit whitespace forever, and a budget spent on it fails the request.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rwkvkit.constraints import Constraint, load_json_schema
from rwkvkit.errors import ConstraintError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import Tokenizer

JSON_DEFAULTS = {"whitespace_flexible": False}
_EMPTY = b"\xff[empty]"  # llguidance reads a token starting with 0xFF as special, never text


class _Vocabulary:
    """llguidance's view of a tokenizer: each id's bytes, and an end-of-text id (the tokenizer's
    ``eos_token_id`` if it has one, else an extra id past its vocabulary that no model samples)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        import llguidance

        tokens = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        eos = getattr(tokenizer, "eos_token_id", None)
        self.size = len(tokens)
        self.end_tokens = frozenset() if eos is None else frozenset({eos})
        if eos is None:
            eos = len(tokens)
            tokens.append(b"")

        class Wrapper(llguidance.TokenizerWrapper):
            def __init__(self) -> None:  # the fields LLTokenizer reads; no tokenizer to wrap
                self.eos_token_id, self.bos_token_id, self.is_tokenizer_wrapper = eos, None, True
                self.tokens = [t or _EMPTY for t in tokens]
                self.special_token_ids = [i for i, t in enumerate(tokens) if not t]

            def __call__(self, text: str) -> list[int]:  # llguidance tokenizes forced text with it
                return tokenizer.encode(text)

        self.ll = llguidance.LLTokenizer(Wrapper())
        self.words = (len(tokens) + 31) // 32  # int32 words of one llguidance bitmask


# a bitmask byte -> the bias of its 8 tokens (bit i of the byte is token 8k+i; set: allowed)
_BIAS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, np.float32(-0.0), np.float32(-np.inf)).astype(np.float32)


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool for a batch's masks (one per process; its default size)."""
    import llguidance

    return llguidance.LLExecutor()


_VOCABULARIES: weakref.WeakKeyDictionary[Tokenizer, _Vocabulary] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    """Built once per tokenizer object (0.1-0.5 s for 65,536 tokens)."""
    if tokenizer not in _VOCABULARIES:
        _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
    return _VOCABULARIES[tokenizer]


class LlguidanceConstraint(Constraint):
    """A compiled llguidance grammar (``grammar`` is llguidance's grammar text) for one sequence.

    Its next mask is kept as an additive bias (``_bias``: -0.0 where allowed, -inf elsewhere), made
    by ``prepare_masks`` (in the engine's worker thread, while the model runs) or else by ``mask``;
    ``advance`` drops it. The first one is made on construction: a JSON grammar's first mask
    fills llguidance's caches for the tokenizer (~0.4 s once per process), and that belongs to
    compiling (before the model loads, in ``rwkvkit run``), not to the first token."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, kind: str) -> None:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise ConstraintError(f"constraint {kind}: {error.strip()}")
        self.name, self._vocab = kind, _vocabulary(tokenizer)
        self.end_tokens = self._vocab.end_tokens
        self._matcher = llguidance.LLMatcher(self._vocab.ll, grammar, log_level=0)
        self._bias: torch.Tensor | None = None
        self._check()
        self.prepare_masks([self])

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError(f"constraint {self.name}: {self._matcher.get_error()}")

    @classmethod
    def prepare_masks(cls, constraints: Sequence[Constraint]) -> None:
        """llguidance's executor computes the masks on its own threads without the GIL."""
        from llguidance.numpy import fill_next_token_bitmask_par

        by_vocab: dict[int, list[LlguidanceConstraint]] = {}
        for c in constraints:
            if c._bias is None:
                by_vocab.setdefault(id(c._vocab), []).append(c)
        for todo in by_vocab.values():
            vocab = todo[0]._vocab
            bits = np.empty((len(todo), vocab.words), dtype=np.int32)
            fill_next_token_bitmask_par(_executor(), [(c._matcher, i) for i, c in enumerate(todo)], bits)
            for c, row in zip(todo, bits):
                c._bias = torch.from_numpy(_BIAS[row.view(np.uint8)].reshape(-1)[: vocab.size])

    def mask(self, logits: torch.Tensor) -> None:
        """Adds the bias: x + -0.0 is x for every x, x + -inf is -inf for every x but +inf and NaN
        (non-finite logits end a sequence before this), and one add is the cheapest full-row
        pass (a boolean masked_fill_ costs several times more)."""
        if self._bias is None:
            self.prepare_masks([self])
        self._check()
        usable = min(logits.shape[-1], self._vocab.size)
        logits[usable:] = -float("inf")
        logits[:usable].add_(self._bias[:usable].to(logits.device))

    def advance(self, token: int) -> None:
        self._bias = None
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"constraint {self.name}: token {token} was not allowed: {self._matcher.get_error()}")

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()


def json_schema(source: Any, tokenizer: Tokenizer) -> LlguidanceConstraint:
    """A JSON schema (a dict, or JSON text); llguidance's ``x-guidance`` options are honoured."""
    import llguidance

    schema = load_json_schema(source, "constraint json_schema")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    except ValueError as exc:
        raise ConstraintError(f"constraint json_schema: {exc}") from None
    return LlguidanceConstraint(grammar, tokenizer, "json_schema")


def regex(source: Any, tokenizer: Tokenizer) -> LlguidanceConstraint:
    """The whole output matches ``source`` (as ``re.fullmatch``; Rust regex syntax)."""
    import llguidance

    if not isinstance(source, str):
        raise ConstraintError(f"constraint regex: expected a pattern string, got {type(source).__name__}")
    return LlguidanceConstraint(llguidance.LLMatcher.grammar_from_regex(source), tokenizer, "regex")


def grammar(source: Any, tokenizer: Tokenizer) -> LlguidanceConstraint:
    """A Lark grammar (from its ``start`` rule; llguidance's dialect) or a GBNF one (``root ::= ...``)."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    if not isinstance(source, str) or not source.strip():
        raise ConstraintError(f"constraint grammar: expected the grammar's text (Lark or GBNF), got {source!r:.80}")
    try:
        lark = any_to_lark(source)
    except Exception as exc:  # noqa: BLE001 - the converter raises its own types for bad GBNF
        raise ConstraintError(f"constraint grammar: not valid GBNF: {exc}") from None
    return LlguidanceConstraint(llguidance.LLMatcher.grammar_from_lark(lark), tokenizer, "grammar")


@hookimpl
def register_constraints(register) -> None:
    register(json_schema, name="json_schema")
    register(regex, name="regex")
    register(grammar, name="grammar")
