"""The architecture plugin interface: what the core needs to know of an RWKV generation.

An architecture claims checkpoints by their keys, derives and checks its spec from their shapes,
declares its weights (dataclasses of :mod:`rwkvkit.weights`) and its per-layer state
(:class:`~rwkvkit.state.StateLayout`), and sequences its blocks over a backend's ops. ``Model``,
``State``, the engine, ``PIPELINE`` and the CLI go through this interface only, so a new
generation (or a research variant) is a package registering one through ``register_architectures``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch

from rwkvkit.backend import Backend, Role
from rwkvkit.checkpoint import WeightSource
from rwkvkit.errors import CheckpointError
from rwkvkit.state import LayerTensors, StateLayout
from rwkvkit.weights import Transform

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Loader:
    """Prepares an architecture's weights on one stage's backend, reading the checkpoint on demand.
    Called as ``fetch(key, role, optional)`` by :func:`rwkvkit.weights.load_weights`."""

    tensors: Mapping[str, torch.Tensor]
    ops: Backend
    overrides: Mapping[str, Transform] = field(default_factory=dict)  # key -> a load-time transform of its rows

    def __call__(self, key: str, role: Role, optional: bool = False, transform: Transform | None = None) -> Any:
        if key not in self.tensors and optional:
            return None
        transform = transform or self.overrides.get(key)
        if transform is None:
            return self.ops.prepare_source(WeightSource(key, self.tensors[key]), role)
        name, fn = transform
        return self.ops.prepare_source(WeightSource(key, self.tensors[key], fn, name), role)

    def source(self, source: WeightSource, role: Role) -> Any:
        """A weight derived from checkpoint tensors (a slice, rescaled rows): ``source.derivation``
        must say how, because a backend's cache keys prepared weights by it."""
        return self.ops.prepare_source(source, role)


class Architecture(ABC):
    """One RWKV generation. Subclasses register through ``register_architectures``; one instance
    serves every model of the generation (it holds no per-model data)."""

    name: ClassVar[str]  # the registry name, e.g. "rwkv7"
    version: ClassVar[str]  # the generation's code name in RWKV-LM, e.g. "x070"
    title: ClassVar[str]  # what users call it, e.g. "RWKV-7 (Goose)"
    # keys real files carry that the model never reads: left out of the fingerprint, so the same
    # model has the same fingerprint in a format without them (an HF folder)
    unread: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def claims(self, keys: set[str]) -> bool:
        """Whether a checkpoint with these keys is of this generation (key names alone)."""

    @abstractmethod
    def spec(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        """The model's dimensions from its shapes, every key checked (:func:`check_tensors`);
        CheckpointError naming the key and the expected shape otherwise. A spec is a frozen
        dataclass with at least ``n_layer``, ``n_embd``, ``vocab_size``, ``dim_ffn`` (prefill
        sizes its chunks by it), ``version`` and a class attribute ``architecture`` (this name)."""

    @abstractmethod
    def expected_shapes(self, spec: Any) -> dict[str, tuple[int, ...]]:
        """Every key of a checkpoint of ``spec`` with its shape, as real files store them."""

    @abstractmethod
    def state_layout(self, spec: Any) -> StateLayout:
        """The per-layer state of a model of ``spec``."""

    def constants(self) -> Any:
        """The constants backends receive in ``prepare_block`` (None: the architecture has none a backend uses)."""
        return None

    @abstractmethod
    def embedding(self, tensors: Mapping[str, torch.Tensor]) -> WeightSource:
        """The embedding table as the first block reads it (e.g. with ``ln0`` folded in)."""

    @abstractmethod
    def load_block(self, spec: Any, layer: int, fetch: Loader) -> Any:
        """Layer ``layer``'s weights dataclass, prepared by ``fetch.ops``."""

    @abstractmethod
    def load_head(self, spec: Any, fetch: Loader) -> Any:
        """The output head's weights."""

    @abstractmethod
    def block(self, ops: Backend, weights: Any, x: torch.Tensor, carry: Any, state: LayerTensors) -> tuple[torch.Tensor, Any, LayerTensors]:
        """One residual block over ``x [B, T, C]``: ``(x, carry, new layer state)``, ``state``
        untouched. ``carry`` is what a block hands the next (RWKV-7's ``v_first``; None at the start)."""

    def blocks(self, ops: Backend, weights: Sequence[Any], x: torch.Tensor, carry: Any, states: Sequence[LayerTensors]) -> tuple[torch.Tensor, Any, list[LayerTensors]]:
        """A stage's blocks in order (an architecture may hand them to a backend's fused stage)."""
        new_states = []
        for w, s in zip(weights, states):
            x, carry, s = self.block(ops, w, x, carry, s)
            new_states.append(s)
        return x, carry, new_states

    @abstractmethod
    def head(self, ops: Backend, weights: Any, x: torch.Tensor) -> torch.Tensor:
        """Final norm and vocabulary projection: ``[..., C] -> [..., V]``."""

    def describe(self) -> str:
        return f"{self.title} '{self.version}'"


def n_layers(keys: Iterable[str]) -> int:
    """1 + the highest ``blocks.N.`` index among ``keys``."""
    return 1 + max(int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k)))


def shape2d(tensors: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, int]:
    """The shape of ``key``, which must be a non-empty matrix (``what`` names its two dimensions)."""
    if key not in tensors:
        raise CheckpointError(f"missing key {key!r}")
    t = tensors[key]
    if t.dim() != 2 or 0 in t.shape:
        raise CheckpointError(f"key {key!r} has shape {list(t.shape)}; expected a non-empty 2-D tensor [{what}]")
    return t.shape[0], t.shape[1]


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], optional: Iterable[str], variant: str) -> None:
    """Every expected key present (but ``optional`` ones) with its shape — a per-channel vector
    stored ``[1, 1, C]`` or ``[C]`` alike — and a float dtype; no key left over (``variant`` says
    what a file with more keys is likely to be)."""
    optional = set(optional)
    for key, shape in expected.items():
        if key not in tensors:
            if key in optional:
                continue
            raise CheckpointError(f"missing key {key!r} (expected shape {list(shape)})")
        t = tensors[key]
        got = tuple(t.shape)
        if got != shape and not (len(shape) >= 2 and set(shape[:-1]) == {1} and got == shape[-1:]):
            raise CheckpointError(f"key {key!r} has shape {list(t.shape)}; expected {list(shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"key {key!r} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"unexpected key(s) {shown}: {variant}, or a damaged file")
