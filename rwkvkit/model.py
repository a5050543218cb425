"""A loaded RWKV model: stages of layers, each prepared by its backend and sequenced by the
checkpoint's architecture plugin, and ``forward``."""

from __future__ import annotations

import operator
from contextlib import ExitStack
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Sequence

import numpy as np
import torch

from rwkvkit.architecture import Loader
from rwkvkit.backend import Backend, Role
from rwkvkit.checkpoint import Checkpoint
from rwkvkit.errors import InputError, StateError, StrategyError
from rwkvkit.registry import registry
from rwkvkit.state import LayerTensors, Maker, State
from rwkvkit.strategy import Placement, Plan
from rwkvkit.streaming import Streamer, to_host

Tokens = int | Sequence[int] | torch.Tensor
_EMPTY = "tokens is empty: forward needs at least one token"


def select_backend(name: str, placement: Placement) -> type[Backend]:
    """The backend class for a stage; ``auto`` takes the registered backend of highest
    ``priority`` (then name) that can run it, so an installed third-party backend can win."""
    names = registry.names("backends") if name == "auto" else [name]
    candidates = sorted(((n, registry.get("backends", n)) for n in names), key=lambda item: (-item[1].priority, item[0]))
    reasons = []
    for candidate, cls in candidates:
        try:
            reason = cls.unavailable_reason(placement)
        except Exception as exc:  # noqa: BLE001 - a broken plugin backend must not hide the others
            reason = f"its availability check failed ({type(exc).__name__}: {exc})"
        if reason is None:
            return cls
        reasons.append(f"{candidate}: {reason}")
    where = f"{placement.device} {str(placement.dtype).removeprefix('torch.')}{placement.quant or ''}"
    raise StrategyError(f"no backend can run '{where}' here ({'; '.join(reasons)})")


@dataclass
class _Stage:
    ops: Backend
    layers: range
    blocks: list[Any]  # the architecture's block weights; matrices in CPU RAM when streamed
    streamer: Streamer | None = None


class Model:
    """A model prepared for a Plan. ``forward`` is pure: states are returned, never mutated."""

    def __init__(self, checkpoint: Checkpoint, plan: Plan) -> None:
        self.spec = checkpoint.spec
        self.architecture = arch = checkpoint.architecture
        self.state_layout = arch.state_layout(self.spec)
        self.checkpoint_path = checkpoint.path
        self.fingerprint = checkpoint.fingerprint()
        self.plan = plan
        self._maker = Maker()  # marks the states this model produced (State.mark_produced)
        self.derived: dict[str, Any] = {}  # kept with the model and dropped with it (e.g. captured CUDA graphs)
        t = checkpoint.tensors
        self.stages: list[_Stage] = []
        with ExitStack() as loads:  # each backend's ``loading`` spans all it prepares (its weight cache)
            for stage in plan.stages:
                ops = select_backend(stage.backend, stage.placement)(stage.placement)
                loads.enter_context(ops.loading(checkpoint, stage.layers))
                streamed = stage.placement.stream
                blocks = []
                for i in stage.layers:  # a streamed block goes to the host before the next one is prepared
                    b = arch.load_block(self.spec, i, Loader(t, ops))
                    blocks.append(to_host(b) if streamed else ops.prepare_block(b, self.spec, arch.constants()))
                self.stages.append(_Stage(ops, stage.layers, blocks, Streamer(stage.placement.device) if streamed else None))
            first, last = self.stages[0].ops, self.stages[-1].ops
            self.emb = first.prepare_source(arch.embedding(t), Role.EMBEDDING)
            self.head = arch.load_head(self.spec, Loader(t, last))
        self._tuned: State | None = None  # a "merged state" model file's initial state (batch of one)
        if checkpoint.tuned_state:
            from rwkvkit.formats.tuned_state import tuned_state, wkv_states

            self._tuned = tuned_state(self, wkv_states(checkpoint.tuned_state, self.spec, StateError))

    def weight_bytes(self) -> int:
        """Bytes of prepared weights held by the model (what quantization shrinks)."""

        def size(obj: Any) -> int:
            if obj is None:
                return 0
            if isinstance(obj, (list, tuple)):
                return sum(map(size, obj))
            if is_dataclass(obj) and not hasattr(obj, "nbytes"):
                return sum(size(getattr(obj, f.name)) for f in fields(obj))
            return obj.nbytes

        return size(self.emb) + size(self.head) + sum(size(b) for stage in self.stages for b in stage.blocks)

    def _layer_placements(self) -> list[Placement]:
        return [stage.ops.placement for stage in self.stages for _ in stage.layers]

    def zero_state(self, batch_size: int = 1) -> State:
        """The state before any token: zeros everywhere."""
        return self._produced([self.state_layout.zeros(batch_size, p.device, p.dtype) for p in self._layer_placements()])

    def initial_state(self, batch_size: int = 1) -> State:
        """The state a sequence starts from when none is given: the tuned state the model file
        carries (RWKV-Runner's "merged state" models, :mod:`rwkvkit.formats.tuned_state`), else zeros."""
        if self._tuned is None:
            return self.zero_state(batch_size)
        return self._produced([layer.map(lambda t: t.expand(batch_size, *t.shape[1:]).clone()) for layer in self._tuned.layers])

    def adopt_state(self, state: State) -> State:
        """Check a state belongs to this model and fits it (shapes, dtypes, finite values: see
        :meth:`State.check`), then put each layer on its stage's device/dtype."""
        if not isinstance(state, State):
            raise StateError(f"state must be an rwkvkit State (from forward, zero_state or State.load), or None; got {type(state).__name__}")
        if state.fingerprint != self.fingerprint:
            raise StateError(f"state belongs to another model (fingerprint {state.fingerprint!r}, model has {self.fingerprint!r})")
        if len(state.layers) != self.spec.n_layer:
            raise StateError(f"state has {len(state.layers)} layers; model has {self.spec.n_layer}")
        state.check(self.state_layout.shapes)
        if state.produced_by(self._maker) and all(t.is_contiguous() for t in state._produced):
            return state  # this model's own tensors, of the right shapes: on its devices, in its dtypes already
        return self._produced([self.state_layout.adopt(s, p.device, p.dtype) for s, p in zip(state.layers, self._layer_placements())])

    def _produced(self, layers: list[LayerTensors]) -> State:
        """A state of this model's making, or one it has checked: known to fit, so ``adopt_state``
        skips its value scan, and its copies to this model's devices and dtypes, next time."""
        state = State(layers, self.fingerprint)
        state.mark_produced(self._maker)
        return state

    def _token_batch(self, tokens: Tokens) -> tuple[torch.Tensor, bool]:
        """Normalise input to int64 ``[B, T]``; the bool says the caller passed an unbatched input."""
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(tokens)
        if isinstance(tokens, torch.Tensor):
            if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise InputError(f"tokens must be integer ids, got a tensor of dtype {tokens.dtype}")
            if tokens.dim() > 2:
                raise InputError(f"tokens must be an id, a [T] sequence or a [B, T] batch; got shape {list(tokens.shape)}")
            single = tokens.dim() < 2
            batch = tokens.long().reshape(1, -1) if single else tokens.long()
            if batch.numel() == 0:
                raise InputError(_EMPTY)
            lo, hi = int(batch.min()), int(batch.max())
        else:
            if isinstance(tokens, (str, bytes)) or tokens is None:
                raise InputError(f"tokens must be an int or a sequence of ints, got {type(tokens).__name__}")
            items = tokens if isinstance(tokens, Sequence) else [tokens]
            if any(isinstance(t, (bool, np.bool_)) for t in items):  # True is an int to Python, never a token id
                raise InputError(f"tokens must be integer ids, got bool ({tokens!r:.80})")
            try:
                ids = [operator.index(t) for t in items]
            except TypeError:
                raise InputError(f"tokens must be an int or a sequence of ints, got {tokens!r:.80}") from None
            if not ids:
                raise InputError(_EMPTY)
            lo, hi = min(ids), max(ids)  # checked before the int64 conversion, which overflows on huge ids
            batch, single = None, True
        if lo < 0 or hi >= self.spec.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range: the model's vocabulary has ids 0..{self.spec.vocab_size - 1}")
        if batch is None:
            batch = torch.tensor([ids], dtype=torch.long)
        return batch, single

    def run(self, batch: torch.Tensor, state: State, full_output: bool = False) -> tuple[torch.Tensor, list[LayerTensors]]:
        """The layer loop without input checks (they read ids back to the host, which a CUDA-graph
        capture forbids): ``batch [B, T]`` ids on the first stage's device, a state already adopted.
        Returns float32 logits (``[B, V]``, or ``[B, T, V]`` with ``full_output``) and new layer states."""
        first = self.stages[0]
        if len(self.stages) == 1 and batch.shape[1] == 1 and first.streamer is None:  # one decoded token per sequence
            fused = first.ops.fused_decode(self.emb, first.blocks, self.head, batch, state.layers)
            if fused is not None:
                return fused[0][:, None] if full_output else fused[0], fused[1]
        x = first.ops.embed(self.emb, batch)  # [B, T, C]
        carry = None  # what one block hands the next (RWKV-7: v_first)
        layers: list[LayerTensors] = []
        for stage in self.stages:
            p = stage.ops.placement
            x = x.to(p.device, p.dtype)
            carry = carry.to(p.device, p.dtype) if isinstance(carry, torch.Tensor) else carry
            blocks = stage.streamer.blocks(stage.blocks) if stage.streamer else stage.blocks
            x, carry, new_states = self.architecture.blocks(stage.ops, blocks, x, carry, state.layers[stage.layers.start : stage.layers.stop])
            layers += new_states
        if not full_output:
            x = x[:, -1]
        return self.architecture.head(self.stages[-1].ops, self.head, x).float(), layers

    @torch.inference_mode()
    def forward(self, tokens: Tokens, state: State | None, full_output: bool = False) -> tuple[torch.Tensor, State]:
        """Run tokens through the model.

        ``tokens``: an int, a sequence of ints or a 1-D tensor (one sequence), or a ``[B, T]``
        tensor (a batch). ``state``: None for a fresh start (:meth:`initial_state`), else a state from an earlier call
        (not modified). Returns float32 logits — ``[V]`` for the last token of a sequence,
        ``[T, V]`` with ``full_output``, with a leading ``B`` for batched input — and the new state.
        """
        batch, single = self._token_batch(tokens)
        B = batch.shape[0]
        state = self.initial_state(B) if state is None else self.adopt_state(state)
        if state.batch_size != B:
            raise InputError(f"state has batch size {state.batch_size} but tokens have batch size {B}")

        logits, new_layers = self.run(batch, state, full_output)
        return (logits[0] if single else logits), self._produced(new_layers)
