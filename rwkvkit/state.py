"""The recurrent state of an RWKV model: what a sequence has left behind, per layer.

Which tensors a layer holds is its architecture's :class:`StateLayout`: RWKV-5/6/7 keep two token
shifts and a matrix (:class:`LayerState`), RWKV-4 five vectors; the core only sees named tensors.

``Model.forward`` never modifies a state passed to it; it returns a new one. A caller may keep an
old state (for example a prompt's state, reused for several continuations) without copying it;
ChatRWKV-style ``copy.deepcopy(state)`` keeps working too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from rwkvkit.errors import StateError
from rwkvkit.native import write_atomically

STATE_FORMAT = "rwkvkit-state/1"


class StateOwner(Protocol):
    """What :meth:`State.load` and :meth:`State.from_tuned` need of a model (``rwkvkit.model.Model``,
    which imports this module)."""

    fingerprint: str
    checkpoint_path: Any
    spec: Any
    state_layout: StateLayout

    def adopt_state(self, state: State) -> State: ...

    def zero_state(self, batch_size: int = 1) -> State: ...


_NAMES: dict[type, tuple[str, ...]] = {}
_GETTERS: dict[type, Callable[[Any], tuple[torch.Tensor, ...]]] = {}


class LayerTensors:
    """One layer's recurrent tensors, each with a leading batch dimension: the base of every
    architecture's layer-state dataclass, so the engine, caches and files handle any of them."""

    def names(self) -> tuple[str, ...]:
        cls = type(self)
        if cls not in _NAMES:
            _NAMES[cls] = tuple(f.name for f in fields(self))  # type: ignore[arg-type]
        return _NAMES[cls]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        cls = type(self)
        if cls not in _GETTERS:  # one C call per layer: states are walked per decoded token
            names = self.names()
            get = operator.attrgetter(*names)
            _GETTERS[cls] = get if len(names) > 1 else lambda layer: (get(layer),)
        return _GETTERS[cls](self)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerTensors:
        """The same layout with ``fn`` applied to every tensor."""
        return type(self)(*(fn(t) for t in self.tensors()))


@dataclass
class LayerState(LayerTensors):
    """The layout of RWKV-5, -6 and -7: two token shifts and one matrix per head."""

    att_x_prev: torch.Tensor  # [B, C]       last input of time mixing (activation dtype)
    att_kv: torch.Tensor  # [B, H, N, N]     WKV matrix state, always float32 (RWKV-7: value x key; RWKV-5/6: key x value)
    ffn_x_prev: torch.Tensor  # [B, C]       last input of channel mixing (activation dtype)


@dataclass(frozen=True)
class StateField:
    """One tensor of a layer's state: its shape without the batch dimension, whether it is always
    float32 (else the layer's activation dtype), and the value a fresh state starts from."""

    name: str
    shape: tuple[int, ...]
    float32: bool = False
    initial: float = 0.0


@dataclass(frozen=True)
class StateLayout:
    """An architecture's per-layer state: the dataclass that holds it and its fields, in order."""

    cls: type[LayerTensors]
    fields: tuple[StateField, ...]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f.name: f.shape for f in self.fields}

    def zeros(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LayerTensors:
        """A fresh layer state (every field at its initial value)."""
        return self.cls(*(torch.full((batch_size, *f.shape), f.initial, device=device, dtype=torch.float32 if f.float32 else dtype) for f in self.fields))

    def adopt(self, layer: LayerTensors, device: torch.device, dtype: torch.dtype) -> LayerTensors:
        """``layer`` on ``device``, each field in its dtype, contiguous."""
        return self.cls(*(t.to(device, torch.float32 if f.float32 else dtype).contiguous() for t, f in zip(layer.tensors(), self.fields)))

    def from_tensors(self, tensors: Sequence[torch.Tensor]) -> LayerTensors:
        return self.cls(*tensors)


def _fits(t: Any, shape: tuple[int, ...]) -> bool:
    """A dense floating-point tensor ``[B >= 1, *shape]``."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided and not t.is_meta and t.dim() == 1 + len(shape) and t.shape[1:] == shape and t.shape[0] >= 1


def _misfit(where: str, t: Any, shape: tuple[int, ...]) -> str:
    """Why ``t`` does not fit ``[B, *shape]``."""
    want = f"[B, {', '.join(map(str, shape))}]"
    if not isinstance(t, torch.Tensor):
        return f"{where} is a {type(t).__name__}; expected a tensor {want}"
    if not t.is_floating_point() or t.layout != torch.strided or t.is_meta:
        return f"{where} is a {t.layout} {t.dtype} tensor on {t.device}; expected a dense floating-point tensor {want}"
    return f"{where} has shape {list(t.shape)}; expected {want} with B >= 1 (the model's dimensions)"


class Maker:
    """A model's mark on the states it produced (:meth:`State.mark_produced`): an identity that a
    deep copy keeps (the copy holds the same values, on the same devices) and a pickle does not."""

    def __deepcopy__(self, memo: dict) -> Maker:
        return self


@dataclass
class State:
    """Per-layer recurrent state with a leading batch dimension, tagged with the model's
    fingerprint so that a state saved from one model is refused by another."""

    layers: list[LayerTensors]
    fingerprint: str = field(default="")
    # the tensors a model produced (so known finite), and who: set by the model, lost by any copy or edit
    _produced: tuple[torch.Tensor, ...] = field(default=(), init=False, repr=False, compare=False)
    _maker: Maker | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.layers[0].tensors()[0].shape[0]

    def clone(self) -> State:
        return self._map(torch.Tensor.clone)

    def to(self, device: torch.device | str) -> State:
        """All layers on one device (a split model moves each layer back to its own device)."""
        return self._map(lambda t: t.to(device))

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Validate every layer against ``shapes`` (per field, without the batch dimension) before
        any kernel sees it: tensors of a floating dtype with these shapes, one batch size for all,
        finite values. A state is user input (edited in memory, or read from a file), and a wrong
        size that reached native code would be an out-of-bounds access. Returns the batch size."""
        # A model's own tensors are dense, floating point and finite: only their shapes could have
        # changed since (in place). Anything else that does not fit gets the full check's message.
        if self._produced and all(isinstance(layer, LayerTensors) for layer in self.layers) and self.is_produced():
            batch = self._produced[0].shape[0]
            want = [(batch, *shapes[name]) if name in shapes else None for name in self.layers[0].names()]
            if all(layer.names() == self.layers[0].names() for layer in self.layers) and [t.shape for t in self._produced] == want * len(self.layers):
                return batch
        batch = None
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerTensors):
                raise StateError(f"state layer {i} is a {type(layer).__name__}; expected a LayerState")
            if layer.names() != tuple(shapes):
                raise StateError(f"state layer {i} holds {', '.join(layer.names())}; this model's layers hold {', '.join(shapes)} (a state of another architecture)")
            for name, t in zip(layer.names(), layer.tensors()):
                if not _fits(t, shapes[name]):  # the message only on failure: this runs per decoded token
                    raise StateError(_misfit(f"state layer {i} {name}", t, shapes[name]))
                if batch is not None and t.shape[0] != batch:
                    raise StateError(f"state layer {i} {name} has batch size {t.shape[0]} but earlier tensors have {batch}: one batch size for all layers")
                batch = t.shape[0]
        if not self.is_produced():
            for i, layer in enumerate(self.layers):
                for name, t in zip(layer.names(), layer.tensors()):
                    if not bool(torch.isfinite(t).all()):
                        raise StateError(f"state layer {i} {name} holds non-finite values (NaN or Inf)")
        if batch is None:
            raise StateError("state has no layers")
        return batch

    def mark_produced(self, maker: Maker | None = None) -> None:
        """Record that a model made these tensors (finite by construction), so checking them again
        on the next ``forward`` can skip the value scan, a visible cost per decoded token. A model
        passes its :class:`Maker`: its own tensors are already on its devices, in its dtypes."""
        self._produced = tuple(self._tensors())
        self._maker = maker

    def produced_by(self, maker: Maker) -> bool:
        """True while the layers hold exactly the tensors ``maker`` marked (:meth:`mark_produced`)."""
        return maker is not None and self._maker is maker and self.is_produced()

    def is_produced(self) -> bool:
        """True while the layers hold exactly the tensors a model produced (any replaced tensor, or
        a copy of the state, makes it False)."""
        produced = self._produced
        current = self._tensors()
        return len(produced) == len(current) and all(map(operator.is_, produced, current))

    def _tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]

    def _map(self, fn) -> State:
        return State([layer.map(fn) for layer in self.layers], self.fingerprint)

    @staticmethod
    def cat(states: list[State]) -> State:
        """Stack states of the same model along the batch dimension (for batched generation)."""
        if len({s.fingerprint for s in states}) != 1:
            raise StateError("cannot batch states of different models")
        layers = [type(layer)(*(torch.cat(ts) for ts in zip(*(s.layers[i].tensors() for s in states)))) for i, layer in enumerate(states[0].layers)]
        return State(layers, states[0].fingerprint)

    def __getitem__(self, index: int | slice) -> State:
        """Select batch rows: ``state[0]`` keeps a batch of one, ``state[1:3]`` a batch of two."""
        rows = slice(index, index + 1) if isinstance(index, int) else index
        return self._map(lambda t: t[rows])

    def save(self, path: str | Path) -> None:
        """Write the state as safetensors (atomically: a failed write never leaves half a file)."""
        from safetensors.torch import save_file

        path = Path(path)
        if not path.parent.is_dir():
            raise StateError(f"cannot save the state to {path}: folder {path.parent} does not exist")
        if path.is_dir():
            raise StateError(f"cannot save the state to {path}: it is a folder; give a file name")
        # own copies: tensors that share memory (views of one buffer) are refused by safetensors
        data = {
            f"layers.{i}.{name}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
            for i, layer in enumerate(self.layers)
            for name, t in zip(layer.names(), layer.tensors())
        }
        try:
            write_atomically(path, lambda tmp: save_file(data, str(tmp), metadata={"format": STATE_FORMAT, "fingerprint": self.fingerprint}))
        except OSError as exc:
            raise StateError(f"cannot save the state to {path}: {exc.strerror or exc}") from None

    @staticmethod
    def from_tuned(path: str | Path, model: StateOwner) -> State:
        """The initial state of a state-tuning file (RWKV-PEFT's ``blocks.N.att.time_state``):
        see :mod:`rwkvkit.formats.tuned_state`."""
        from rwkvkit.formats.tuned_state import load_tuned_state

        return load_tuned_state(path, model)

    @staticmethod
    def load(path: str | Path, model: StateOwner) -> State:
        """Read a state saved by :meth:`save`, refusing one that belongs to another model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StateError(f"state file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise StateError(f"{path}: not a readable rwkvkit state file ({exc})") from exc
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{path}: not an rwkvkit state file (format {meta.get('format')!r}, expected {STATE_FORMAT!r})")
        if meta.get("fingerprint") != model.fingerprint:
            raise StateError(
                f"{path}: this state belongs to another model (fingerprint {meta.get('fingerprint')}, "
                f"model {model.checkpoint_path} has {model.fingerprint})"
            )
        try:
            layout = model.state_layout
            layers = [layout.from_tensors([data[f"layers.{i}.{f.name}"] for f in layout.fields]) for i in range(model.spec.n_layer)]
        except KeyError as exc:
            raise StateError(f"{path}: state file lacks tensor {exc.args[0]!r}") from None
        try:
            return model.adopt_state(State(layers, meta["fingerprint"]))
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from None
