"""int8 weight-only quantization shared by the int8-capable backends (``cuda`` now, CPU ``int8`` next).

A matrix ``w [out, in]`` becomes int8 codes plus one float32 scale per output channel (row), the
scale being the row's absolute maximum / 127: symmetric, so no zero point, and a row's largest
weight is exact. Activations stay in floating point, so ``y = (x @ q^T) * scale`` is exact algebra
and a kernel can apply the scale once per output instead of per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rwkvkit.checkpoint import WeightSource

QMAX = 127  # symmetric range: -127..127 (-128 unused, so negation never overflows)
BLOCK_BYTES = 4 << 20  # float32 rows quantized at a time by quantize_source


@dataclass(frozen=True)
class Int8Weight:
    """``w ≈ q * scale[:, None]``: ``q`` int8 ``[out, in]``, ``scale`` float32 ``[out]``."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, ``[out, in]`` in ``dtype`` (one fused multiply)."""
        return self.q * self.scale.to(dtype).unsqueeze(1)


def quantize_per_channel(w: torch.Tensor) -> Int8Weight:
    """Round ``w [out, in]`` to int8 with per-row absmax scales (computed in float32 on ``w``'s
    device). Each weight's error is at most half its row's scale; an all-zero row stays zero."""
    w = w.float()
    scale = w.abs().amax(dim=1) / QMAX
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.contiguous())


def quantize_source(source: WeightSource) -> Int8Weight:
    """:func:`quantize_per_channel` of ``source``'s rows, a block of :data:`BLOCK_BYTES` at a time,
    each block's mapped pages released once read. Every row is rounded alone, so the result is
    bit-identical to quantizing the whole matrix, while memory holds the codes plus one block of
    float32 temporaries instead of several full-size ones (the 0.1B head: 201 MB each)."""
    rows, cols = source.shape
    q, scale = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, dtype=torch.float32)
    step = max(1, BLOCK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = quantize_per_channel(source.rows(start, stop))
        q[start:stop], scale[start:stop] = block.q, block.scale
        source.release(start, stop)
    return Int8Weight(q, scale)
