"""The pluggy hooks through which every plugin, built-in or third-party, registers what it offers.

Each hook receives a ``register`` callable; a plugin calls it once per thing it provides::

    from rwkvkit.hookspecs import hookimpl

    @hookimpl
    def register_tokenizers(register):
        register(MyTokenizer, name="mytok")

Third-party packages expose such a module through the ``rwkvkit`` entry-point group.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "rwkvkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_backends(register: Register) -> None:
    """Register backend classes (subclasses of :class:`rwkvkit.backend.Backend`).

    ``register(cls)`` uses ``cls.name``; ``register(cls, name="x")`` overrides it. Selected by
    ``RWKV(..., backend="x")``; ``cls.unavailable_reason(placement)`` says why it cannot run.
    Example: ``register(MyCpuBackend)``.
    """


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizer factories: ``register(factory, name="mytok")``.

    ``factory(**options)`` returns a :class:`rwkvkit.interfaces.Tokenizer`; selected by
    ``PIPELINE(model, "mytok")``. Example: ``register(MyTokenizer, name="mytok")``.
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register sampler factories: ``register(factory, name="top_a")``.

    ``factory(**options)`` returns a :class:`rwkvkit.interfaces.Sampler`; it receives the
    options a user gives (``sampler_options={"a": 0.3}``) and should reject bad values with a
    clear error. Example: ``register(TopASampler)`` (``TopASampler.name == "top_a"``).
    """


@hookspec
def register_callbacks(register: Register) -> None:
    """Register callback factories: ``register(factory, name="stdout")``.

    ``factory(**options)`` returns a :class:`rwkvkit.interfaces.Callback`; selected by name in
    ``generate(..., callback="stdout")``. Example: ``register(MyLogger, name="mylog")``.
    """


@hookspec
def register_constraints(register: Register) -> None:
    """Register structured-output constraint factories: ``register(factory, name="json_schema")``.

    ``factory(source, tokenizer)`` compiles ``source`` (what the user gave: ``{"name": source}``)
    for the tokenizer and returns a fresh :class:`rwkvkit.constraints.Constraint` for one sequence;
    a bad source raises :class:`rwkvkit.errors.ConstraintError`. Selected by
    ``PIPELINE.generate(..., constraint={"name": source})``. Example: ``register(Regex, name="regex")``.
    """


@hookspec
def register_architectures(register: Register) -> None:
    """Register model architectures (subclasses of :class:`rwkvkit.architecture.Architecture`).

    ``register(cls)`` uses ``cls.name``. A checkpoint is run by the one architecture whose
    ``claims(keys)`` accepts its keys; ``rwkvkit info`` names it. Example: ``register(MyVariant)``.
    """
