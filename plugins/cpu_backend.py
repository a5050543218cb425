"""The ``cpu`` backend: the torch backend's math with CPU kernels where the torch ops are slow.

- ``wkv``: a C++ scan (``kernels/cpu_rwkv7.cpp``) over all T tokens, one (batch, head) per
  thread, instead of a Python loop over tokens (for heads the fused prefill block cannot take).
- ``block`` for other shapes (prefill): GEMMs through oneDNN (AVX512-BF16 for bf16; faster than
  MKL's sgemm here for fp32) and the elementwise work between them, WKV scan included, in three
  native kernels (``kernels/cpu_prefill.cpp``) instead of ~50 torch ops on [T, C] tensors.
- ``blocks`` for one token (decode, batch 1): one native call per stage (:mod:`.cpu_fused`)
  instead of ~60 torch ops per layer, with matrix-vector kernels that stream the weights (fp32 AVX512,
  AVX512-BF16 ``vdpbf16ps``, int8): decode reads every weight once per token, so it is bound by
  memory bandwidth, and torch's bf16 GEMV is compute-bound here (see shared/PERF_NOTES.md).
- ``linear`` for one row (the head, and decode when not fused): the same fp32 and bf16 kernels;
  torch's fp32 GEMV reads the 0.1B head at ~13 GB/s here, the kernel near the bandwidth limit.
Threads follow ``torch.get_num_threads()`` (the strategy's ``threads`` option sets it); decode
results do not depend on the count. Where the kernels cannot be built (no compiler) the backend
warns once and runs the torch backend's ops.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import torch
import torch.nn.functional as F

from rwkvkit.checkpoint import ModelSpec
from rwkvkit.hookspecs import hookimpl
from rwkvkit.models.rwkv7 import BlockWeights
from rwkvkit.native import load_library
from rwkvkit.plugins import cpu_fused
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.strategy import Placement

KERNELS, FLAGS = ("cpu_rwkv7.cpp", "cpu_decode.cpp", "cpu_prefill.cpp"), ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")


@functools.cache
def library() -> ctypes.CDLL | None:
    try:
        lib = load_library(KERNELS, FLAGS)
    except OSError as exc:
        warnings.warn(f"cpu backend: cannot build its C++ kernels ({exc}); using the torch backend's ops", RuntimeWarning, stacklevel=3)
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.wkv7_f32.argtypes = [i64, i64, i64, i64, *[ptr] * 8, c_int]
    lib.wkv7_f32.restype = c_int
    lib.gemv_bf16.argtypes = [i64, i64, ptr, ptr, ptr, c_int]
    lib.gemv_bf16.restype = None
    lib.gemv_f32.argtypes = [i64, i64, ptr, ptr, ptr, c_int]
    lib.gemv_f32.restype = None
    lib.gemv_i8.argtypes = [i64, i64, ptr, ptr, ptr, ptr, c_int]
    lib.gemv_i8.restype = None
    lib.quantize_rows_i8.argtypes = [i64, i64, ptr, c_int, ptr, ptr, c_int]
    lib.quantize_rows_i8.restype = None
    lib.rescale_i32.argtypes = [i64, i64, ptr, ptr, ptr, ptr, c_int, c_int]
    lib.rescale_i32.restype = None
    cpu_fused.declare(lib)
    return lib


class CpuBackend(TorchBackend):
    name = "cpu"
    priority = 20

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.device.type != "cpu":
            return "runs on the CPU only"
        if placement.dtype not in (torch.float32, torch.bfloat16):
            return "runs fp32 and bf16 only (use bf16 rather than fp16 on a CPU)"
        return super().unavailable_reason(placement)

    def prepare_block(self, weights: BlockWeights, spec: ModelSpec) -> BlockWeights:
        """The block's weights plus their native layout (:class:`cpu_fused.FusedBlockWeights`),
        built once here with the head count from the checkpoint's spec."""
        if library() is None:
            return weights
        return cpu_fused.FusedBlockWeights.wrap(weights, spec.n_head, spec.head_size)

    def blocks(self, weights, x, v_first, states):
        lib = library()
        layers = [getattr(w, "native", None) for w in weights]
        if lib is None or x.shape[:2] != (1, 1) or None in layers:
            return super().blocks(weights, x, v_first, states)
        return cpu_fused.decode_blocks(lib, layers, x, v_first, states, self.placement.dtype, torch.get_num_threads())

    def block(self, weights, x, v_first, state):
        lib, layer = library(), getattr(weights, "native", None)
        if lib is None or layer is None or x.shape[:2] != (1, 1) and not layer.prefill_ok:
            return super().block(weights, x, v_first, state)
        if x.shape[:2] == (1, 1):
            x, v_first, (state,) = self.blocks([weights], x, v_first, [state])
            return x, v_first, state
        return cpu_fused.prefill_block(lib, layer, weights, x, v_first, state, self.linear)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        lib = library()
        if lib is None:
            return F.linear(x, weight)
        kernel = {torch.float32: lib.gemv_f32, torch.bfloat16: lib.gemv_bf16}.get(x.dtype)
        if kernel is None or x.numel() != x.shape[-1] or weight.dtype != x.dtype:
            return cpu_fused.gemm(x, weight)
        xc = x.contiguous()
        cpu_fused.expect(xc, (*x.shape[:-1], weight.shape[1]), "x")
        y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
        kernel(weight.shape[0], weight.shape[1], weight.data_ptr(), xc.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y.to(x.dtype)

    def wkv(self, kv, r, decay, k, v, kk, a):
        lib = library()
        B, T, H, N = r.shape
        if lib is None or N > cpu_fused.MAX_HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        for name, t in zip(("r", "decay", "k", "v", "kk", "a"), (r, decay, k, v, kk, a)):
            cpu_fused.expect(t, (B, T, H, N), name)
        cpu_fused.expect(kv, (B, H, N, N), "kv")
        state = kv.to(torch.float32, copy=True).contiguous()
        r, decay, k, v, kk, a = (t.to(torch.float32).contiguous() for t in (r, decay, k, v, kk, a))
        y = torch.empty(B, T, H * N, dtype=torch.float32)
        cpu_fused.checked(lib.wkv7_f32)(B, T, H, N, *(t.data_ptr() for t in (state, r, decay, k, v, kk, a, y)), torch.get_num_threads())
        return y.to(self.placement.dtype), state


@hookimpl
def register_backends(register) -> None:
    register(CpuBackend)
