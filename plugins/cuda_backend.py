"""The ``cuda`` backend: rwkvkit's own CUDA kernels (``kernels/``) for the WKV-7 scan and int8 weights.

Everything else is the ``torch`` backend's code on the GPU (cuBLAS linears, torch norms). The
kernels are built on first use (``rwkvkit.kernels_build``), never at import; where they cannot be
built, ``unavailable_reason`` says why and backend ``auto`` falls back to ``torch``.

With ``cuda fp16i8`` (``Placement.quant == "i8"``) every projection matrix is stored as int8 with
per-output-channel scales: decoding (≤ 8 rows) streams the int8 weights through ``int8_matvec``;
prefill dequantizes a matrix per call and runs a cuBLAS GEMM, which is compute-bound anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvkit import kernels_build
from rwkvkit.backend import Backend, Role
from rwkvkit.hookspecs import hookimpl
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quant import Int8Weight, quantize_per_channel
from rwkvkit.strategy import Placement

HEAD_SIZE = 64  # the scan kernel's head size (kHeadSize in kernels/rwkvkit_cuda.h); others use the torch scan
MAX_MATVEC_ROWS = 8  # kMaxMatvecRows in kernels/rwkvkit_cuda.h: beyond it, dequantize + GEMM


class CudaBackend(TorchBackend):
    name = "cuda"

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.device.type != "cuda":
            return f"runs CUDA placements only (e.g. 'cuda fp16', 'cuda fp16i8'), not {placement.device.type}"
        if placement.stream:
            return "streaming layers ('*N+') is not supported yet"
        return Backend.unavailable_reason(placement) or kernels_build.build_error()

    def __init__(self, placement: Placement) -> None:
        super().__init__(placement)
        self.ops = kernels_build.ops()

    def prepare(self, tensor: torch.Tensor, role: Role) -> torch.Tensor | Int8Weight:
        if role is Role.MATRIX and self.placement.quant == "i8":
            return quantize_per_channel(tensor.to(self.placement.device, torch.float32))
        return super().prepare(tensor, role)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
        if not isinstance(weight, Int8Weight):
            return super().linear(x, weight)
        rows = x.numel() // x.shape[-1]
        if rows > MAX_MATVEC_ROWS:
            return F.linear(x, weight.dequantize(x.dtype))
        y = self.ops.int8_matvec(x.reshape(rows, -1).contiguous(), weight.q, weight.scale)
        return y.view(*x.shape[:-1], -1)

    def wkv(self, kv, r, decay, k, v, kk, a):
        if r.shape[-1] != HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        return self.ops.wkv7(*(t.contiguous() for t in (kv, r, decay, k, v, kk, a)))


@hookimpl
def register_backends(register) -> None:
    register(CudaBackend)
