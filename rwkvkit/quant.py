"""int8 weight-only quantization shared by the int8-capable backends (``cuda`` now, CPU ``int8`` next).

A matrix ``w [out, in]`` becomes int8 codes plus one float32 scale per output channel (row), the
scale being the row's absolute maximum / 127: symmetric, so no zero point, and a row's largest
weight is exact. Activations stay in floating point, so ``y = (x @ q^T) * scale`` is exact algebra
and a kernel can apply the scale once per output instead of per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 127  # symmetric range: -127..127 (-128 unused, so negation never overflows)


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
