"""Weight-only quantization shared by the quantizing backends (``cuda``, the CPU ``int8`` and ``int4``).

int8 (``i8``): a matrix ``w [out, in]`` becomes int8 codes plus one float32 scale per output channel (row), the
scale being the row's absolute maximum / 127: symmetric, so no zero point, and a row's largest
weight is exact. Activations stay in floating point, so ``y = (x @ q^T) * scale`` is exact algebra
and a kernel can apply the scale once per output instead of per weight.

int4 (``i4``): each row is cut into groups of :data:`GROUP` consecutive input columns, each with
its own scale (absmax / 7, codes -7..7, symmetric like int8). Chosen by held-out perplexity of the
demo model (see :class:`Int4Weight`): one scale per row loses three times as much at 4 bits, and
groups of 64 with linear codes kept quality as well as NF4 codes (whose lookup a kernel would pay
per weight) and groups of 32 (which cost more bytes per weight).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, TypeVar, Union

import torch

if TYPE_CHECKING:
    from rwkvkit.checkpoint import WeightSource

QMAX = 127  # symmetric range: -127..127 (-128 unused, so negation never overflows)
BLOCK_BYTES = 4 << 20  # float32 rows quantized at a time by quantize_source
QMAX4 = 7  # int4 codes -7..7 (stored + 8 in a nibble; 0 unused)
GROUP = 64  # int4 input columns per scale
CHUNK = 64  # int4 columns packed together: 32 bytes, column j in the low nibble of byte j, column j + 32 in its high nibble


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

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        return quantize_per_channel(w)

    @classmethod
    def stored(cls, q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> Int8Weight | None:
        """The pair read back from a cache as a weight of ``shape``; None if it is not one."""
        if q.dtype != torch.int8 or q.shape != shape or not _scales_fit(scale, shape[:1]):
            return None
        return cls(q, scale)


@dataclass(frozen=True)
class Int4Weight:
    """``w[o, c] ≈ code(o, c) * scale[o, c // group]``: ``q`` uint8 ``[out, ceil(in / 64) * 32]``
    (two codes a byte, + 8, laid out per :data:`CHUNK`; columns past ``cols`` code 0), ``scale``
    float32 ``[out, ceil(in / group)]``. Per output: a sum per group, times its scale (so a kernel
    multiplies codes by activations in integers and scales once per group).

    Held-out perplexity of the demo model vs fp32 (every layer matrix 4-bit, head int8; int8
    everywhere: +0.06%): groups of 64 +0.52%, of 32 +0.61%, one scale per 192 columns (a demo row)
    +1.57%; NF4 codes in groups of 64 +0.62%; the head in int4 too (groups of 64) +2.02%."""

    q: torch.Tensor
    scale: torch.Tensor
    cols: int
    group: int = GROUP

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.cols))

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def codes(self) -> torch.Tensor:
        """The signed codes, int8 ``[out, in]``."""
        rows = self.q.shape[0]
        packed = self.q.view(rows, -1, CHUNK // 2)
        codes = torch.cat(((packed & 15), (packed >> 4)), dim=-1).view(rows, -1)[:, : self.cols]
        return codes.to(torch.int8) - 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, ``[out, in]`` in ``dtype``."""
        scale = self.scale.repeat_interleave(self.group, dim=1)[:, : self.cols]
        return (self.codes().to(torch.float32) * scale).to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int4Weight:
        return quantize_groupwise(w)

    @classmethod
    def stored(cls, q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> Int4Weight | None:
        """The pair read back from a cache as a weight of ``shape``; None if it is not one."""
        rows, cols = shape
        if q.dtype != torch.uint8 or q.shape != (rows, _packed_cols(cols)) or not _scales_fit(scale, (rows, -(-cols // GROUP))):
            return None
        return cls(q, scale, cols)


QuantWeight = TypeVar("QuantWeight", Int8Weight, Int4Weight)  # one of them, the same throughout a signature
Quantized = Union[Int8Weight, Int4Weight]


def _packed_cols(cols: int) -> int:
    return -(-cols // CHUNK) * (CHUNK // 2)


def _scales_fit(scale: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """float32 ``shape``, finite and non-negative (kernels trust a cache's scales)."""
    return scale.dtype == torch.float32 and scale.shape == shape and bool(torch.isfinite(scale).all()) and not bool((scale < 0).any())


def quantize_groupwise(w: torch.Tensor, group: int = GROUP) -> Int4Weight:
    """Round ``w [out, in]`` to int4 codes -7..7 with one absmax scale per ``group`` columns of a row
    (in float32). Each weight's error is at most half its group's scale; an all-zero group stays zero."""
    if group % CHUNK:
        raise ValueError(f"int4 groups are whole chunks of {CHUNK} columns, not {group}")
    rows, cols = w.shape
    padded = torch.zeros(rows, -(-cols // group) * group)
    padded[:, :cols] = w.float()
    groups = padded.view(rows, -1, group)
    scale = groups.abs().amax(dim=2) / QMAX4
    codes = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(2)).clamp_(-QMAX4, QMAX4)
    nibbles = (codes.view(rows, -1, CHUNK) + 8).to(torch.uint8)[:, : _packed_cols(cols) * 2 // CHUNK]
    q = nibbles[..., : CHUNK // 2] | (nibbles[..., CHUNK // 2 :] << 4)
    return Int4Weight(q.reshape(rows, -1).contiguous(), scale.contiguous(), cols, group)


def quantize_per_channel(w: torch.Tensor) -> Int8Weight:
    """Round ``w [out, in]`` to int8 with per-row absmax scales (computed in float32 on ``w``'s
    device). Each weight's error is at most half its row's scale; an all-zero row stays zero."""
    w = w.float()
    scale = w.abs().amax(dim=1) / QMAX
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.contiguous())


def quantize_source(source: WeightSource, quantize: Callable[[torch.Tensor], QuantWeight] = quantize_per_channel) -> QuantWeight:
    """``quantize`` (which rounds each row alone) of ``source``'s rows, a block of
    :data:`BLOCK_BYTES` at a time, each block's mapped pages released once read. The result is
    bit-identical to quantizing the whole matrix, while memory holds the codes plus one block of
    float32 temporaries instead of several full-size ones (the 0.1B head: 201 MB each)."""
    rows, cols = source.shape
    step = max(1, BLOCK_BYTES // (4 * cols))
    out: QuantWeight | None = None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = quantize(source.rows(start, stop))
        if out is None:  # the whole matrix's tensors, shaped like the first block's
            out = replace(block, q=block.q.new_empty(rows, *block.q.shape[1:]), scale=block.scale.new_empty(rows, *block.scale.shape[1:]))
        out.q[start:stop], out.scale[start:stop] = block.q, block.scale
        source.release(start, stop)
    return out
