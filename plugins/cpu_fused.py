"""Fused decode for the ``cpu`` and ``int8`` backends: one native call per block for one token
(``decode_layer`` in ``kernels/cpu_decode.cpp``) instead of ~60 torch ops.

The kernel computes in fp32; it reads the big matrices in their stored format (fp32, bf16, or
int8 with row scales) and fp32 copies of the small vectors and LoRA factors, made once per layer
on first use. The Python math in :mod:`rwkvkit.models.rwkv7` stays the reference; the tests hold
this path to it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from rwkvkit.models.rwkv7 import BlockWeights
from rwkvkit.quant import Int8Weight
from rwkvkit.state import LayerState

_F32, _BF16, _I8 = 0, 1, 2
_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("format", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", *_VECTORS, "lnx_w", "lnx_b", "ffn_x_k")]
        + [(name, _Mat) for name in ("R", "K", "V", "O", "FK", "FV")]
        + [(name, ctypes.c_int64) for name in ("C", "H", "N", "Dw", "Da", "Dv", "Dg", "F")]
    )


def _mat(weight: Any, keep: list[torch.Tensor]) -> _Mat:
    if isinstance(weight, Int8Weight):
        keep += [weight.q, weight.scale]
        return _Mat(weight.q.data_ptr(), weight.scale.data_ptr(), *weight.q.shape, _I8)
    formats = {torch.float32: _F32, torch.bfloat16: _BF16}
    if weight.dtype not in formats or not weight.is_contiguous():
        raise TypeError(f"fused decode reads fp32/bf16/int8 matrices, not {weight.dtype}")
    keep.append(weight)
    return _Mat(weight.data_ptr(), None, *weight.shape, formats[weight.dtype])


class FusedLayer:
    """A block's weights as the kernel reads them (holding every tensor it points to)."""

    def __init__(self, w: BlockWeights, n_head: int) -> None:
        self._keep: list[torch.Tensor] = []

        def f32(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.to(torch.float32).contiguous()
            self._keep.append(t)
            return t.data_ptr()

        att, ffn = w.att, w.ffn
        C = att.x_r.numel()
        self.struct = _Layer(
            f32(w.ln1_weight), f32(w.ln1_bias), f32(w.ln2_weight), f32(w.ln2_bias),
            *(f32(getattr(att, name)) for name in _VECTORS),
            f32(att.ln_x_weight), f32(att.ln_x_bias), f32(ffn.x_k),
            *(_mat(m, self._keep) for m in (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)),
            C, n_head, C // n_head, att.w1.shape[1], att.a1.shape[1], att.v1.shape[1] if att.v1 is not None else 0,
            att.g1.shape[1], ffn.key.shape[0],
        )  # fmt: skip


def decode_block(lib: ctypes.CDLL, layer: FusedLayer, x: torch.Tensor, v_first: torch.Tensor | None, s: LayerState, dtype: torch.dtype):
    """``rwkv7.block`` for ``x [1, 1, C]``; returns ``(x, v_first, new LayerState)``."""
    C = x.shape[-1]
    H = s.att_kv.shape[1]
    x32 = x.reshape(C).to(torch.float32, copy=True)
    vf = torch.empty(C) if v_first is None else v_first.reshape(C).to(torch.float32).contiguous()
    att_in, ffn_in = (t.reshape(C).to(torch.float32).contiguous() for t in (s.att_x_prev, s.ffn_x_prev))
    kv_in = s.att_kv.reshape(H, -1).contiguous()
    att_out, ffn_out, kv_out = torch.empty(C), torch.empty(C), torch.empty_like(kv_in)
    lib.decode_layer(
        ctypes.byref(layer.struct), *(t.data_ptr() for t in (x32, vf, att_in, att_out, kv_in, kv_out, ffn_in, ffn_out)), torch.get_num_threads()
    )
    state = LayerState(att_out.view(1, C).to(dtype), kv_out.view_as(s.att_kv), ffn_out.view(1, C).to(dtype))
    return x32.view(1, 1, C).to(dtype), vf.view(1, 1, C).to(dtype), state


def declare(lib: ctypes.CDLL) -> None:
    lib.decode_layer.argtypes = [ctypes.c_void_p, *[ctypes.c_void_p] * 8, ctypes.c_int]
    lib.decode_layer.restype = None
