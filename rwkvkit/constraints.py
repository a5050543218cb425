"""Structured output: a constraint restricts each next token of one sequence to those that keep
its text a prefix of something a JSON schema, a regex or a grammar accepts.

A constraint is a plugin kind (``register_constraints``): a registered factory
``factory(source, tokenizer)`` compiles its source (a schema, a regex, a grammar) for a tokenizer
and returns a fresh per-sequence :class:`Constraint`, refusing a bad source with a
:class:`ConstraintError` before any token is generated. The engine calls ``mask`` on the row's
scores after bans and penalties and before the sampler, so it composes with every sampler, and
``advance`` with each token it keeps. A constraint whose masks take real work can compute the next
one ahead in ``prepare_masks``: the engine calls it from a worker thread while the model computes
the logits the mask applies to, so a library that releases the GIL (llguidance does) overlaps it
with the forward.

Stop reasons a constraint adds: ``constraint`` (the text is complete: nothing may follow, or the
model chose end-of-text where the constraint allowed it) and ``constraint_incomplete``
(``token_count`` ran out before the text was complete: the output does not satisfy the
constraint). ``length`` under a constraint means the text is complete but could have gone on.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from rwkvkit.errors import ConstraintError, InputError
from rwkvkit.interfaces import Tokenizer
from rwkvkit.registry import registry

ConstraintMaker = Callable[[], "Constraint"]


class Constraint(ABC):
    """One sequence's constraint: its state advances with every generated token.

    ``end_tokens``: ids meaning end-of-text (the World vocabulary's 0) that the constraint allows
    once the text is complete; sampling one ends the sequence (stop reason ``constraint``) without
    it being emitted.
    """

    name: str = ""
    end_tokens: frozenset[int] = frozenset()

    @abstractmethod
    def mask(self, logits: torch.Tensor) -> None:
        """Set the scores of every token not allowed next to -inf, in place (``logits [V]``, V the
        model's vocabulary, which may be larger than the tokenizer's: ids without a token are
        never allowed). ConstraintError if the constraint can no longer be satisfied."""

    @abstractmethod
    def advance(self, token: int) -> None:
        """Take the token that was generated; ConstraintError if ``mask`` did not allow it."""

    @abstractmethod
    def is_finished(self) -> bool:
        """Nothing may follow the text so far: generation ends here (stop reason ``constraint``)."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """The text so far satisfies the constraint (it may still be extended)."""

    @classmethod
    def prepare_masks(cls, constraints: Sequence[Constraint]) -> None:
        """Compute the next masks of ``constraints`` (all of this class, each advanced to where
        its next token is sampled) ahead of their ``mask`` calls, which then only apply them; one
        call for a whole batch, so a library can spread it over its own threads. The engine calls
        it from a worker thread while the model runs, calling nothing else on these constraints
        meanwhile; an exception it raises ends their sequences with it. ``mask`` must still work
        without it (and ``prepare_masks`` may be given a constraint already prepared). Default:
        nothing, ``mask`` does all the work."""


def prepares_masks(constraint: Constraint) -> bool:
    """Whether the constraint's class computes masks ahead (overrides ``prepare_masks``): the
    engine starts a worker thread only for those."""
    return type(constraint).prepare_masks.__func__ is not Constraint.prepare_masks.__func__


def check_constraint(constraint: object) -> Constraint | None:
    """``constraint`` if it is None or a Constraint, else an InputError saying what is accepted."""
    if constraint is None or isinstance(constraint, Constraint):
        return constraint
    raise InputError(
        f"constraint={constraint!r:.80}: expected an rwkvkit.constraints.Constraint object "
        '(PIPELINE.generate also takes {"json_schema": ...}, {"regex": ...} or {"grammar": ...})'
    )


def constraint_maker(spec: Constraint | Mapping[str, Any], tokenizer: Tokenizer, origin: str = "") -> ConstraintMaker:
    """A function returning a fresh constraint per sequence for ``spec``: ``{"json_schema":
    schema}`` (a dict or JSON text), ``{"regex": pattern}``, ``{"grammar": lark_or_gbnf}``, any
    registered kind ``{name: source}``, or a Constraint object (for one sequence only: its state
    is that sequence's). The source is compiled now, so a bad one fails before any token, with
    ``origin`` (where the user set it) leading the message."""
    if isinstance(spec, Constraint):
        used: list[bool] = []

        def once() -> Constraint:
            if used:
                raise InputError("a Constraint object holds one sequence's state: give a {kind: source} spec to constrain several prompts")
            used.append(True)
            return spec

        return once
    if not isinstance(spec, Mapping):
        check_constraint(spec)  # raises, saying what is accepted
    if len(spec) != 1:
        raise InputError(f"constraint={dict(spec)!r:.120}: expected exactly one of {_kinds()} with its source")
    (kind, source), = spec.items()
    if kind not in registry.names("constraints"):
        raise InputError(f"constraint kind {kind!r} is unknown; available: {_kinds()}")
    factory = registry.get("constraints", kind)
    try:
        check_constraint(factory(source, tokenizer))  # compiles it: a bad source fails here
    except ConstraintError as exc:
        raise ConstraintError(f"{origin}: {exc}" if origin else str(exc)) from None
    return lambda: factory(source, tokenizer)


def _kinds() -> str:
    return ", ".join(registry.names("constraints"))


def load_json_schema(value: Any, where: str) -> dict[str, Any]:
    """A JSON schema given as a dict or as JSON text, or a ConstraintError naming ``where``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConstraintError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ConstraintError(f"{where}: expected a JSON schema (an object), got {type(value).__name__}")
    return dict(value)


def constraint_spec(json_schema: str | None = None, regex: str | None = None, grammar: str | None = None) -> dict[str, Any] | None:
    """The spec ``rwkvkit run``'s ``constraint.*`` keys ask for (None: unconstrained): the schema
    and grammar are read from files, the regex is the pattern itself. Errors name the key."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None}
    if len(given) > 1:
        raise ConstraintError(f"constraint: set at most one of json_schema, regex and grammar, got {', '.join(given)}")
    if not given:
        return None
    (kind, value), = given.items()
    if kind == "regex":
        return {"regex": value}
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstraintError(f"constraint.{kind}={value}: cannot read it as a UTF-8 file ({exc.__class__.__name__}: {exc})") from None
    return {kind: load_json_schema(text, f"constraint.json_schema={value}") if kind == "json_schema" else text}


def constraint_from_response_format(response_format: Any) -> dict[str, Any] | None:
    """The constraint spec for an OpenAI ``response_format`` (None: unconstrained text), ready for
    ``constraint_maker`` / ``PIPELINE.generate(constraint=...)``:

    - ``{"type": "text"}`` -> None;
    - ``{"type": "json_object"}`` -> any JSON object;
    - ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` ->
      that schema (a missing ``schema`` means any JSON value, as OpenAI's API treats it).

    InputError names the part of ``response_format`` that is wrong.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping) or not isinstance(response_format.get("type"), str):
        raise InputError(f"response_format={response_format!r:.120}: expected an object with a string 'type'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, Mapping):
            raise InputError("response_format.json_schema: expected an object with a 'schema' (and a 'name')")
        return {"json_schema": load_json_schema(inner.get("schema", {}), "response_format.json_schema.schema")}
    raise InputError(f"response_format.type={kind!r}: expected 'text', 'json_object' or 'json_schema'")
