"""The ``int8`` backend on the CPU: ``cpu fp32i8`` / ``cpu bf16i8``.

Which weights: every ``Role.MATRIX`` projection — attention R/K/V/O, the FFN pair and the head —
becomes int8 with one scale per output row (:mod:`rwkvkit.quant`); these are ~99% of the bytes a
decoded token reads. The embedding table (ln0 already folded in) is int8 per row too: a decoded
token reads one row, but the table is as large as the head, so keeping it in fp32 would hold
resident memory at ~0.45x fp32's instead of ~0.25x. LoRA factors and per-channel vectors stay in
the activation dtype: small, and sensitive.

Decode (one row) reads a quarter of fp32's bytes per token through an int8 GEMV kernel that rounds
the activation vector to 16 bits (AVX512-VNNI ``vpdpwssd``). Prefill is compute-bound, so it rounds
each activation row to int8 with its own scale and runs one int8 GEMM (``torch._int_mm``): ~3.6x
an fp32 GEMM here, for < 0.1% held-out perplexity (tests/test_int8.py holds both paths to fp32).

Quantizing takes a few passes over the weights, so results are cached on disk
(``<cache>/int8/<digest>.safetensors``, see :func:`rwkvkit.native.cache_dir`) keyed by the
matrix's shape, dtype and content checksums: a second load of the same checkpoint reads int8
codes instead of quantizing again. Nothing is written next to the user's files.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rwkvkit.backend import Role
from rwkvkit.hookspecs import hookimpl
from rwkvkit.native import cache_dir, write_atomically
from rwkvkit.plugins import cpu_fused
from rwkvkit.plugins.cpu_backend import CpuBackend, library
from rwkvkit.quant import Int8Weight, quantize_per_channel
from rwkvkit.strategy import Placement

CACHE_VERSION = "int8-per-row-v1"


def _cache_path(w: torch.Tensor) -> Path:
    """Identifies a matrix by shape, dtype, float64-accumulated sum and L1 norm, and a strided
    sample of values: two reductions over the weight (no float64 copy of it), far cheaper than
    quantizing it."""
    flat = w.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous()
    total = l1 = 0.0
    for chunk in flat.split(1 << 22):  # chunked: no full-size temporary for a large head
        total += chunk.sum(dtype=torch.float64).item()
        l1 += chunk.abs().sum(dtype=torch.float64).item()
    key = f"{CACHE_VERSION}|{tuple(w.shape)}|{w.dtype}|{total!r}|{l1!r}"
    digest = hashlib.sha256(key.encode() + sample.numpy().tobytes()).hexdigest()[:32]
    return cache_dir() / "int8" / f"{digest}.safetensors"


def quantize_cached(w: torch.Tensor) -> Int8Weight:
    """:func:`quantize_per_channel`, reusing an earlier result from the disk cache. An entry that
    is unreadable or does not fit ``w`` (shape, dtypes, finite scales) is rebuilt, never trusted:
    the kernels index ``q`` by its own shape."""
    from safetensors.torch import load_file, save_file

    path = _cache_path(w)
    if path.is_file():
        try:
            cached = _fitting(load_file(str(path)), w)
        except Exception:  # whatever the damage, the entry is rebuilt
            cached = None
        if cached is not None:
            return cached
    weight = quantize_per_channel(w)
    try:
        write_atomically(path, lambda tmp: save_file({"q": weight.q, "scale": weight.scale}, str(tmp)))
    except OSError as exc:
        reason = exc.strerror or exc  # no file name: one warning per load, not one per matrix
        warnings.warn(f"int8: cannot write the quantization cache in {path.parent} ({reason}); quantizing again on every load", RuntimeWarning, stacklevel=2)
    return weight


def _fitting(entry: dict[str, torch.Tensor], w: torch.Tensor) -> Int8Weight | None:
    """The cache entry as an :class:`Int8Weight` if it is one for a matrix of ``w``'s shape."""
    if entry.keys() != {"q", "scale"}:
        return None
    q, scale = entry["q"], entry["scale"]
    if q.dtype != torch.int8 or q.shape != w.shape or scale.dtype != torch.float32 or scale.shape != w.shape[:1]:
        return None
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        return None
    return Int8Weight(q, scale)


class Int8Backend(CpuBackend):
    name = "int8"

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.quant != "i8":
            return "runs int8 strategies only (e.g. 'cpu fp32i8')"
        if placement.device.type == "cpu" and placement.dtype == torch.float16:
            return "the CPU has no fast fp16 arithmetic: use 'cpu fp32i8' or 'cpu bf16i8'"
        return CpuBackend.unavailable_reason(Placement(placement.device, placement.dtype))

    def prepare(self, tensor: torch.Tensor, role: Role) -> Any:
        if role in (Role.MATRIX, Role.EMBEDDING):
            return quantize_cached(tensor)
        return super().prepare(tensor, role)

    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor:
        return table.q[ids].to(self.placement.dtype) * table.scale[ids].unsqueeze(-1).to(self.placement.dtype)

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if not isinstance(weight, Int8Weight):
            return super().linear(x, weight)
        lib = library()
        if lib is None:
            return F.linear(x, weight.dequantize(x.dtype))
        if x.numel() != x.shape[-1]:  # prefill: an int8 GEMM on per-row quantized activations
            return _int8_gemm(lib, x, weight)
        xf = x.to(torch.float32).contiguous()
        cpu_fused.expect(xf, (*x.shape[:-1], weight.q.shape[1]), "x")
        y = torch.empty(*x.shape[:-1], weight.q.shape[0], dtype=torch.float32)
        lib.gemv_i8(*weight.q.shape, weight.q.data_ptr(), weight.scale.data_ptr(), xf.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y.to(x.dtype)


def _int8_gemm(lib: Any, x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``x @ w.T`` for ``x [..., in]`` (fp32 or bf16) with activations rounded to int8 per row
    (``quantize_rows_i8``) and one ``torch._int_mm`` (VNNI): ~3.6x an fp32 GEMM on this machine's
    AVX512-VNNI cores, and the demo model's held-out perplexity moves by < 0.1%."""
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    xc, bf16, threads = x.contiguous(), int(x.dtype == torch.bfloat16), torch.get_num_threads()
    xq, step = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows)
    lib.quantize_rows_i8(rows, cols, xc.data_ptr(), bf16, xq.data_ptr(), step.data_ptr(), threads)
    acc = torch._int_mm(xq, weight.q.t())
    y = torch.empty(rows, weight.q.shape[0], dtype=x.dtype)
    lib.rescale_i32(rows, weight.q.shape[0], acc.data_ptr(), step.data_ptr(), weight.scale.data_ptr(), y.data_ptr(), bf16, threads)
    return y.view(*x.shape[:-1], -1)


@hookimpl
def register_backends(register) -> None:
    register(Int8Backend)
