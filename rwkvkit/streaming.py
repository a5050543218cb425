"""Streamed layers (strategy ``*N+``): big matrices held in CPU RAM, copied to the device per use.

As in ChatRWKV, only the projection matrices (``Role.MATRIX``, nearly all of a layer's bytes) stay
on the host; vectors and LoRA factors are small and stay resident. Host copies are pinned
(page-locked) so copies run asynchronously, and on CUDA the next layer's matrices are copied on a
side stream while the current layer computes, so the copy hides behind the compute where the link
is fast enough. Inside a CUDA-graph capture the copies go on the capturing stream instead (a side
stream would need its own fork and join in the graph); the graph then replays them every step.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from rwkvkit.backend import Role
from rwkvkit.weights import map_role
from rwkvkit.quant import Int8Weight


def _map_tensors(weight: Any, fn: Any) -> Any:
    return Int8Weight(fn(weight.q), fn(weight.scale)) if isinstance(weight, Int8Weight) else fn(weight)


def _pin(t: torch.Tensor) -> torch.Tensor:
    t = t.to("cpu").contiguous()
    return t.pin_memory() if torch.cuda.is_available() else t


def to_host(block: Any) -> Any:
    """The block with its matrices moved to (pinned) CPU memory, as prepared by its backend."""
    return map_role(block, Role.MATRIX, lambda w: _map_tensors(w, _pin))


def _to_device(block: Any, device: torch.device) -> Any:
    return map_role(block, Role.MATRIX, lambda w: _map_tensors(w, lambda t: t.to(device, non_blocking=True)))


def _matrix_tensors(block: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def collect(w: Any) -> Any:
        found.extend((w.q, w.scale) if isinstance(w, Int8Weight) else (w,))
        return w

    map_role(block, Role.MATRIX, collect)
    return found


class Streamer:
    """Yields a streamed stage's blocks with their matrices on ``device``, one layer ahead."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copy_stream: torch.cuda.Stream | None = None

    def blocks(self, host_blocks: Sequence[Any]) -> Iterator[Any]:
        if self.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            for block in host_blocks:
                yield _to_device(block, self.device)
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        copy, compute = self._copy_stream, torch.cuda.current_stream(self.device)

        def start(block: Any) -> Any:
            with torch.cuda.stream(copy):
                return _to_device(block, self.device)

        upcoming = start(host_blocks[0]) if host_blocks else None
        for i in range(len(host_blocks)):
            current = upcoming
            compute.wait_stream(copy)  # this layer's copies are done
            for t in _matrix_tensors(current):
                t.record_stream(compute)  # allocated on the copy stream, freed after compute uses them
            upcoming = start(host_blocks[i + 1]) if i + 1 < len(host_blocks) else None
            yield current
