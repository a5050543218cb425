"""The ``int8`` backend on the CPU: ``cpu fp32i8`` / ``cpu bf16i8``.

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
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from rwkvkit.backend import Role
from rwkvkit.checkpoint import Checkpoint, WeightSource
from rwkvkit.hookspecs import hookimpl
from rwkvkit.native import cpu
from rwkvkit.plugins.cpu_backend import CpuBackend
from rwkvkit.plugins.int8_cache import StageCache
from rwkvkit.quant import Int8Weight, quantize_per_channel, quantize_source
from rwkvkit.strategy import Placement

_QUANTIZED = (Role.MATRIX, Role.EMBEDDING)


class Int8Backend(CpuBackend):
    name = "int8"
    priority = 20
    quants = ("i8",)
    # Decoded rows always take the row kernels: each row's own 16-bit rounding makes a sequence's
    # logits equal its lone run's, and at B = 16 the batched int8 kernel beat the GEMM path by ~1.7x
    # (single-thread CPU time of a 0.1B-shape step).
    native_rows = None
    _cache: StageCache | None = None  # set during ``loading`` only

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.quant != "i8":
            return "runs int8 strategies only (e.g. 'cpu fp32i8')"
        if placement.device.type == "cpu" and placement.dtype == torch.float16:
            return "the CPU has no fast fp16 arithmetic: use 'cpu fp32i8' or 'cpu bf16i8'"
        return super().unavailable_reason(placement)

    @contextmanager
    def loading(self, checkpoint: Checkpoint, layers: range) -> Iterator[None]:
        """Serve this stage's int8 weights from its cache entry, and write it back after the load."""
        self._cache = StageCache(checkpoint, layers)
        try:
            yield
            self._cache.save()
        finally:
            self._cache = None

    def prepare_source(self, source: WeightSource, role: Role) -> Any:
        if role not in _QUANTIZED:
            return self.prepare(source.rows(), role)
        return self._cache.get(source) if self._cache is not None else quantize_source(source)

    def prepare(self, tensor: torch.Tensor, role: Role) -> Any:
        """int8 for matrices and the embedding; a copy of anything else, never a view of the
        checkpoint: one view keeps the whole mapped file alive, and with it every page read."""
        if role in _QUANTIZED:
            return quantize_per_channel(tensor)
        prepared = super().prepare(tensor, role)
        return prepared.clone() if prepared.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() else prepared

    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor:
        return table.q[ids].to(self.placement.dtype) * table.scale[ids].unsqueeze(-1).to(self.placement.dtype)

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        """One row per sequence (decode, the head): the ``cpu`` backend's row kernel, which rounds
        each row's activations to 16 bits. A sequence's many rows (prefill): an int8 GEMM on
        per-row int8 activations (:func:`rwkvkit.native.cpu.int8_gemm`)."""
        if not isinstance(weight, Int8Weight):
            return super().linear(x, weight)
        if cpu.library() is None:
            return F.linear(x, weight.dequantize(x.dtype))
        if cpu.decoded([x]):
            return super().linear(x, weight)
        return cpu.int8_gemm(x, weight)


@hookimpl
def register_backends(register) -> None:
    register(Int8Backend)
