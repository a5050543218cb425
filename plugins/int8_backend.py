"""The quantizing CPU backends: ``int8`` (``cpu fp32i8`` / ``cpu bf16i8``) and ``int4``
(``cpu fp32i4`` / ``cpu bf16i4``, the same machinery with 4-bit layer matrices; see :class:`Int4Backend`).

Which weights: every ``Role.MATRIX`` projection — attention R/K/V/O, the FFN pair and the head —
becomes int8 with one scale per output row (:mod:`rwkvkit.quant`); these are ~99% of the bytes a
decoded token reads. The embedding table (ln0 already folded in) is int8 per row too: a decoded
token reads one row, but the table is as large as the head, so keeping it in fp32 would hold
resident memory at ~0.45x fp32's instead of ~0.25x. LoRA factors and per-channel vectors stay in
the activation dtype: small, and sensitive.

Decode reads a quarter of fp32's bytes per step through the ``cpu`` backend's row kernel for
int8, which rounds each sequence's activation row to 16 bits with its own step (AVX512-VNNI
``vpdpwssd``) and reads each weight once for all the batch's rows, a row's integer sums and
epilogue exactly a lone row's (so a sequence's logits do not depend on its batch);
``project``, ``fused_stage`` and the rest are the ``cpu`` backend's, which read int8 matrices as
they read fp32 and bf16 ones. Prefill is compute-bound, so it rounds
each activation row to int8 with its own scale and runs one int8 GEMM (``torch._int_mm``): ~3.6x
an fp32 GEMM here, for < 0.1% held-out perplexity (tests/test_int8.py holds both paths to fp32).

Quantizing reads every matrix once, in row blocks whose mapped pages are released as it goes
(:func:`rwkvkit.quant.quantize_source`), and small weights are copied out of the checkpoint, so
after the load nothing keeps the memory-mapped file resident and at no point is it all resident.
Results are cached on disk, one file per model and stage (:mod:`.int8_cache`): a second load of
the same checkpoint reads int8 codes and touches no matrix of the checkpoint. Nothing is written
next to the user's files.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F

from rwkvkit.backend import Role
from rwkvkit.checkpoint import Checkpoint, WeightSource
from rwkvkit.hookspecs import hookimpl
from rwkvkit.native import cpu
from rwkvkit.plugins.cpu_backend import CpuBackend
from rwkvkit.plugins.int8_cache import StageCache
from rwkvkit.quant import Int4Weight, Int8Weight, Quantized, quantize_source
from rwkvkit.strategy import Placement

HEAD_KEY = "head.weight"  # the checkpoint key of the output projection (a Role.MATRIX like the layers')


class Int8Backend(CpuBackend):
    name = "int8"
    priority = 20
    quants = ("i8",)
    # Decoded rows always take the row kernels: each row's own 16-bit rounding makes a sequence's
    # logits equal its lone run's, and at B = 16 the batched int8 kernel beat the GEMM path by ~1.7x
    # (single-thread CPU time of a 0.1B-shape step).
    native_rows = None
    # The format of each quantized role (the head: under HEAD_KEY); other roles stay in the activation dtype.
    formats: ClassVar[dict[Role | str, type[Quantized]]] = {Role.MATRIX: Int8Weight, Role.EMBEDDING: Int8Weight, HEAD_KEY: Int8Weight}
    _cache: StageCache | None = None  # set during ``loading`` only

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        quant = cls.quants[0]
        if placement.quant != quant:
            return f"runs {cls.name} strategies only (e.g. 'cpu fp32{quant}')"
        if placement.device.type == "cpu" and placement.dtype == torch.float16:
            return f"the CPU has no fast fp16 arithmetic: use 'cpu fp32{quant}' or 'cpu bf16{quant}'"
        return super().unavailable_reason(placement)

    @contextmanager
    def loading(self, checkpoint: Checkpoint, layers: range) -> Iterator[None]:
        """Serve this stage's int8 weights from its cache entry, and write it back after the load."""
        self._cache = StageCache(checkpoint, layers, self.name)
        try:
            yield
            self._cache.save()
        finally:
            self._cache = None

    def prepare_source(self, source: WeightSource, role: Role) -> Any:
        fmt = self.formats.get(HEAD_KEY if role is Role.MATRIX and source.key == HEAD_KEY else role)
        if fmt is None:
            return self.prepare(source.rows(), role)
        return self._cache.get(source, fmt) if self._cache is not None else quantize_source(source, fmt.quantize)

    def prepare(self, tensor: torch.Tensor, role: Role) -> Any:
        """Quantized for matrices and the embedding; a copy of anything else, never a view of the
        checkpoint: one view keeps the whole mapped file alive, and with it every page read."""
        if role in self.formats:
            return self.formats[role].quantize(tensor)
        prepared = super().prepare(tensor, role)
        return prepared.clone() if prepared.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() else prepared

    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor:
        return table.q[ids].to(self.placement.dtype) * table.scale[ids].unsqueeze(-1).to(self.placement.dtype)

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        """One row per sequence (decode, the head): the ``cpu`` backend's row kernel, which rounds
        each row's activations to 16 bits. A sequence's many rows (prefill): an int8 GEMM on
        per-row int8 activations (:func:`rwkvkit.native.cpu.int8_gemm`); for int4, a GEMM on the
        weight dequantized to the activation dtype (prefill is compute-bound: the pass that
        unpacks the weight is small next to the product)."""
        if not isinstance(weight, (Int8Weight, Int4Weight)):
            return super().linear(x, weight)
        if cpu.library() is None:
            return F.linear(x, weight.dequantize(x.dtype))
        if cpu.decoded([x]):
            return super().linear(x, weight)
        if isinstance(weight, Int4Weight):
            return cpu.gemm(x, cpu.dequantize_i4(weight, x.dtype))
        return cpu.int8_gemm(x, weight)


class Int4Backend(Int8Backend):
    """``cpu fp32i4`` / ``cpu bf16i4``: every layer matrix (attention R/K/V/O, the FFN pair) in
    4-bit codes with one scale per group of 64 input columns (:class:`rwkvkit.quant.Int4Weight`),
    decoded by the ``cpu`` backend's int4 row kernel (kernels/cpu_i4.cpp). The head and the
    embedding stay int8 per row: the head in 4 bits cost the demo model's held-out perplexity
    another ~1.5% (+2.0% vs +0.5%; see :class:`~rwkvkit.quant.Int4Weight`), and a decoded token reads one
    embedding row. Cached like int8, in its own folder (``<cache>/int4``)."""

    name = "int4"
    quants = ("i4",)
    formats = {**Int8Backend.formats, Role.MATRIX: Int4Weight}


@hookimpl
def register_backends(register) -> None:
    register(Int8Backend)
    register(Int4Backend)
