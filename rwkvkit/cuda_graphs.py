"""Single-token decoding replayed from one CUDA graph.

A decode step of a small model is ~100 tiny kernels (9 per layer with the ``cuda`` backend, about
60 with ``torch``); launched one by one from Python, the GPU waits on the CPU. ``GraphedDecoder`` captures a whole step (embedding,
every layer, head) once, over static buffers for the token ids, the state and the logits, and then
replays it with a single launch per token. Any backend whose ops are capturable works (``cuda``
and ``torch``); every layer must sit on one CUDA device.

The graph updates the decoder's own state buffers in place (``Model.forward`` stays pure): seed
them with ``reset(state)``, take a copy with ``state()``. ``step`` returns the logits buffer,
which the next step overwrites.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rwkvkit.errors import InputError, StrategyError
from rwkvkit.model import Model
from rwkvkit.state import LayerTensors, State


class GraphedDecoder:
    """Decode ``batch_size`` sequences one token at a time through a captured CUDA graph."""

    def __init__(self, model: Model, batch_size: int = 1, state: State | None = None) -> None:
        devices = {stage.ops.placement.device for stage in model.stages}
        device = next(iter(devices))
        if len(devices) != 1 or device.type != "cuda":
            raise StrategyError(f"CUDA-graph decoding needs every layer on one CUDA device; strategy {model.plan.spec!r} uses {sorted(map(str, devices))}")
        self.model, self.batch_size = model, batch_size
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._state = model.zero_state(batch_size)
        self._buffers = _tensors(self._state.layers)
        with torch.no_grad():
            side = torch.cuda.Stream(device)  # warm-up runs outside the capture: cuBLAS handles, lazy inits
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()
        self.reset(state)

    def _run(self) -> torch.Tensor:
        logits, layers = self.model.run(self.tokens, self._state)
        _copy_into(self._buffers, _tensors(layers))
        return logits

    def reset(self, state: State | None = None) -> None:
        """Start from ``state`` (copied; checked like ``Model.forward`` checks it) or from zeros."""
        source = self.model.zero_state(self.batch_size) if state is None else self.model.adopt_state(state)
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
        self.graph.replay()
        return self.logits


def _tensors(layers: Sequence[LayerTensors]) -> list[torch.Tensor]:
    return [t for layer in layers for t in layer.tensors()]


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` as one multi-tensor kernel per dtype, not one per tensor
    (foreach's fast path needs a single dtype; the state mixes float32 kv with activation dtypes)."""
    for dtype in {t.dtype for t in targets}:
        pairs = [(t, s) for t, s in zip(targets, sources) if t.dtype == dtype]
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
