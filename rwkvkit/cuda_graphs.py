"""Single-token decoding replayed from one CUDA graph.

A decode step of a small model is ~100 tiny kernels (9 per layer with the ``cuda`` backend, about
60 with ``torch``); launched one by one from Python, the GPU waits on the CPU. ``GraphedDecoder`` captures a whole step (embedding,
every layer, head) once, over static buffers for the token ids, the state and the logits, and then
replays it with a single launch per token. Any backend whose ops are capturable works (``cuda``
and ``torch``); every layer must sit on one CUDA device.

The graph updates the decoder's own state buffers in place (``Model.forward`` stays pure): seed
them with ``reset(state)``, take a copy with ``state()``. ``step`` returns the logits buffer,
which the next step overwrites.

``BatchGraphs`` is what the batching engine decodes through: one state pool of ``max_batch`` rows
and one graph per batch-size bucket (1, 2, 4, … ``max_batch``), captured when a bucket is first
needed, all in one memory pool, each over the first rows of the same state pool.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rwkvkit.errors import InputError, StrategyError
from rwkvkit.model import Model
from rwkvkit.state import LayerTensors, State


def graph_device(model: Model) -> torch.device | None:
    """The CUDA device holding every layer of ``model``, or None when graphs cannot capture it."""
    devices = {stage.ops.placement.device for stage in model.stages}
    device = next(iter(devices))
    return device if len(devices) == 1 and device.type == "cuda" and not any(stage.streamer for stage in model.stages) else None


class GraphedDecoder:
    """Decode ``batch_size`` sequences one token at a time through a captured CUDA graph.

    ``buffers``: a state whose tensors the graph reads and updates in place (default: its own).
    ``pool``: a CUDA graph memory pool shared with other decoders that never replay concurrently.
    ``capture=False`` runs the very same step eagerly over the same buffers, where no CUDA device
    is present: the bookkeeping around a graph (buffers, buckets) is then checked on any machine.
    """

    def __init__(
        self, model: Model, batch_size: int = 1, state: State | None = None, *, buffers: State | None = None, pool: tuple[int, int] | None = None, capture: bool = True
    ) -> None:
        device = graph_device(model)
        if capture and device is None:
            devices = sorted({str(stage.ops.placement.device) for stage in model.stages})
            raise StrategyError(f"CUDA-graph decoding needs every layer on one CUDA device, not streamed; strategy {model.plan.spec!r} uses {devices}")
        self.model, self.batch_size = model, batch_size
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=model.stages[0].ops.placement.device)
        self._state = model.zero_state(batch_size) if buffers is None else buffers
        if self._state.batch_size != batch_size:
            raise InputError(f"buffers hold {self._state.batch_size} rows; this decoder was built for {batch_size}")
        self._buffers = _tensors(self._state.layers)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            kept = _tensors(self._state.clone().layers) if buffers is not None else None  # the warm-up steps advance them
            with torch.no_grad():
                side = torch.cuda.Stream(device)  # warm-up runs outside the capture: cuBLAS handles, lazy inits
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._run()
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.logits = self._run()
            if kept is not None:
                _copy_into(self._buffers, kept)
        else:
            self.logits = torch.zeros(batch_size, model.spec.vocab_size, device=model.stages[-1].ops.placement.device)
        if buffers is None or state is not None:
            self.reset(state)

    def _run(self) -> torch.Tensor:
        logits, layers = self.model.run(self.tokens, self._state)
        _copy_into(self._buffers, _tensors(layers))
        return logits

    def reset(self, state: State | None = None) -> None:
        """Start from ``state`` (copied; checked like ``Model.forward`` checks it) or from the model's initial state."""
        source = self.model.initial_state(self.batch_size) if state is None else self.model.adopt_state(state)
        if source.batch_size != self.batch_size:
            raise InputError(f"state has batch size {source.batch_size} but this decoder was built for {self.batch_size}")
        _copy_into(self._buffers, _tensors(source.layers))

    def state(self) -> State:
        """A copy of the current state (the decoder keeps updating its own)."""
        return self._state.clone()

    def step(self, tokens: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence: an int (batch 1), ``batch_size`` ints, or a tensor of
        ``batch_size`` ids already on the device (not range-checked: no host round trip). Returns
        float32 logits ``[batch_size, V]`` in a buffer that the next step overwrites."""
        if isinstance(tokens, torch.Tensor):
            self.tokens.copy_(tokens.view(self.batch_size, 1))
        else:
            ids = [tokens] if isinstance(tokens, int) else list(tokens)
            if len(ids) != self.batch_size or not all(0 <= t < self.model.spec.vocab_size for t in ids):
                raise InputError(f"expected {self.batch_size} token id(s) in 0..{self.model.spec.vocab_size - 1}, got {ids!r:.80}")
            if self.batch_size == 1:
                self.tokens.fill_(ids[0])  # a kernel argument: no host-to-device copy
            else:
                self.tokens.copy_(torch.tensor(ids).view(-1, 1))
        return self.replay()

    def replay(self) -> torch.Tensor:
        """One step for the ids already in ``self.tokens``; returns the logits buffer."""
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self.logits = self._run()
        return self.logits


class BatchGraphs:
    """Decode steps of a changing batch (the engine's) through one graph per batch-size bucket.

    The decoding sequences' states live in one pool of ``max_batch`` rows; a batch of ``n``
    sequences replays the graph of the smallest bucket ``b >= n`` over the pool's first ``b`` rows
    (rows ``n..b-1`` compute on left-over, finite state and are ignored). A state handed back by
    :meth:`decode` is a view of the pool, so the next step needs no copy; any other state (the
    batch after a sequence joined or left) is copied into the pool first. Graphs are captured on
    first use of their bucket, all into one memory pool: they never replay concurrently, and
    each one's outputs are read before the next replay.
    """

    def __init__(self, model: Model, max_batch: int, *, capture: bool = True) -> None:
        self.model, self.max_batch, self.capture = model, max_batch, capture
        self.in_use = False  # held by an engine while it has a batch (see ``shared_graphs``)
        if capture and graph_device(model) is None:
            raise StrategyError(f"CUDA-graph decoding needs every layer on one CUDA device, not streamed; strategy {model.plan.spec!r} is not")
        self.buckets = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._pool = model.zero_state(max_batch)
        self._memory = torch.cuda.graph_pool_handle() if capture else None
        self._decoders: dict[int, GraphedDecoder] = {}
        self._current: State | None = None  # the state decode returned last: rows already in the pool

    def bucket(self, n: int) -> int:
        """The batch size whose graph runs ``n`` sequences."""
        if not 1 <= n <= self.max_batch:
            raise InputError(f"a batch of {n} sequences does not fit these graphs (1..{self.max_batch})")
        return next(b for b in self.buckets if b >= n)

    def state_bytes(self) -> int:
        """Bytes of the state pool (the graphs' own memory is in the CUDA graph pool)."""
        return sum(t.nbytes for t in _tensors(self._pool.layers))

    def decode(self, tokens: Sequence[int], state: State) -> tuple[torch.Tensor, State]:
        """One step for ``len(tokens)`` sequences from ``state`` (their rows, in order): float32
        logits ``[n, V]`` and the new state, both views that the next ``decode`` overwrites. The
        ids must already be checked (the engine's sampled tokens are)."""
        n = len(tokens)
        b = self.bucket(n)
        if state is not self._current:
            if state.batch_size != n:
                raise InputError(f"state has batch size {state.batch_size} for {n} tokens")
            _copy_into(_tensors(self._pool[:n].layers), _tensors(self.model.adopt_state(state).layers))
        decoder = self._decoders.get(b)
        if decoder is None:
            decoder = self._decoders[b] = GraphedDecoder(self.model, b, buffers=self._pool[:b], pool=self._memory, capture=self.capture)
        decoder.tokens[:n, 0].copy_(torch.tensor(list(tokens)))
        logits = decoder.replay()
        self._current = _view(self._pool, n)
        return logits[:n], self._current


def shared_graphs(model: Model, max_batch: int) -> BatchGraphs | None:
    """The model's graphs for batches up to ``max_batch``, kept with the model (``model.derived``)
    so that repeated calls (``PIPELINE.generate`` in a loop) capture once; None when another
    engine holds them (a generation started from a callback of another) or graphs cannot run it."""
    if graph_device(model) is None:
        return None
    key = f"cuda graphs, max batch {max_batch}"
    graphs = model.derived.get(key)
    if graphs is None:
        graphs = model.derived[key] = BatchGraphs(model, max_batch)
    return None if graphs.in_use else graphs


def _view(pool: State, n: int) -> State:
    """The first ``n`` rows of the pool as a state known to be finite (the model produced them)."""
    state = pool[:n]
    state.mark_produced()
    return state


def _tensors(layers: Sequence[LayerTensors]) -> list[torch.Tensor]:
    return [t for layer in layers for t in layer.tensors()]


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` as one multi-tensor kernel per dtype, not one per tensor
    (foreach's fast path needs a single dtype; the state mixes float32 kv with activation dtypes)."""
    for dtype in {t.dtype for t in targets}:
        pairs = [(t, s) for t, s in zip(targets, sources) if t.dtype == dtype]
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
