"""Fused blocks for the ``cpu`` and ``int8`` backends.

Decode: one native call per stage for one token (``decode_layers`` in ``kernels/cpu_decode.cpp``)
instead of ~60 torch ops per layer. Prefill (any other shape): the GEMMs in torch (oneDNN: AVX512-BF16 for
bf16) and the elementwise work between them in three native kernels (``kernels/cpu_prefill.cpp``)
instead of ~50 torch ops that each read and wrote whole [T, C] tensors.

The kernel computes in fp32; it reads the big matrices in their stored format (fp32, bf16, or
int8 with row scales) and fp32 copies of the small vectors and LoRA factors, made once per layer
at load time (:class:`FusedBlockWeights`). Native code trusts the sizes it is given, so every
call checks each tensor's shape, dtype and layout against the layer first (:func:`expect`): a
wrong size is an error here, never an out-of-bounds access there. The Python math in :mod:`rwkvkit.models.rwkv7` stays the reference; the tests hold
this path to it.
"""

from __future__ import annotations

import ctypes
from dataclasses import fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rwkvkit.errors import InputError
from rwkvkit.models.rwkv7 import BlockWeights
from rwkvkit.quant import Int8Weight
from rwkvkit.state import LayerState

Linear = Callable[[torch.Tensor, Any], torch.Tensor]  # a backend's ``linear``
_F32, _BF16, _I8 = 0, 1, 2
MAX_HEAD_SIZE = 64  # the prefill and scan kernels keep a head's N x N state in fixed local arrays
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

    def __init__(self, w: BlockWeights, n_head: int, head_size: int) -> None:
        self._keep: list[torch.Tensor] = []

        def f32(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.to(torch.float32).contiguous()
            self._keep.append(t)
            return t.data_ptr()

        att, ffn = w.att, w.ffn
        C = att.x_r.numel()
        if n_head * head_size != C:
            raise ValueError(f"fused layer: {n_head} heads of {head_size} do not make {C} channels")
        self.struct = _Layer(
            f32(w.ln1_weight), f32(w.ln1_bias), f32(w.ln2_weight), f32(w.ln2_bias),
            *(f32(getattr(att, name)) for name in _VECTORS),
            f32(att.ln_x_weight), f32(att.ln_x_bias), f32(ffn.x_k),
            *(_mat(m, self._keep) for m in (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)),
            C, n_head, head_size, att.w1.shape[1], att.a1.shape[1], att.v1.shape[1] if att.v1 is not None else 0,
            att.g1.shape[1], ffn.key.shape[0],
        )  # fmt: skip
        st = self.struct
        self.att_mixes = (ctypes.c_void_p * 6)(st.x_r, st.x_w, st.x_k, st.x_v, st.x_a, st.x_g)  # prefill_mix's lists
        self.ffn_mixes = (ctypes.c_void_p * 1)(st.ffn_x_k)
        self.prefill_ok = head_size <= MAX_HEAD_SIZE and head_size % 16 == 0  # prefill_wkv: 16-float vectors per head

    def check_state(self, s: LayerState, batch: int) -> None:
        """A layer state as the kernels read it: fp32 ``att_kv [B, H, N, N]``, ``x_prev [B, C]``."""
        st = self.struct
        expect(s.att_kv, (batch, st.H, st.N, st.N), "att_kv", torch.float32)
        expect(s.att_x_prev, (batch, st.C), "att_x_prev")
        expect(s.ffn_x_prev, (batch, st.C), "ffn_x_prev")


def expect(t: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> None:
    """Refuse a tensor whose shape, dtype or device differs from what a native call will read
    (``Model.adopt_state`` checks states first; this guards every other way in)."""
    if tuple(t.shape) != shape or t.device.type != "cpu" or (dtype is not None and t.dtype != dtype):
        want = f"{list(shape)}" + (f" {dtype}" if dtype else "")
        raise InputError(f"native kernel input {name}: got {t.dtype} {list(t.shape)} on {t.device}, expected {want} on the CPU")


class FusedBlockWeights(BlockWeights):
    """``BlockWeights`` plus the layer's native layout, built once at load (``CpuBackend.prepare_block``).
    ``native`` is a plain attribute, not a field: copies made with ``dataclasses.replace`` (or any
    other way) lose it, and the backend then runs them through the Python math."""

    native: FusedLayer | None = None

    @classmethod
    def wrap(cls, w: BlockWeights, n_head: int, head_size: int) -> FusedBlockWeights:
        out = cls(**{f.name: getattr(w, f.name) for f in fields(w)})
        out.native = FusedLayer(w, n_head, head_size)
        return out


def decode_blocks(
    lib: ctypes.CDLL, layers: Sequence[FusedLayer], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[LayerState], dtype: torch.dtype, threads: int
):
    """``rwkv7.block`` on each layer in turn for ``x [1, 1, C]``, in one native call
    (``decode_layers``); returns ``(x, v_first, new LayerStates)``. The new states are rows of
    three stacked buffers (one allocation each instead of three per layer)."""
    n, C = len(layers), layers[0].struct.C
    if len(states) != n:
        raise InputError(f"native decode: {n} layers but {len(states)} layer states")
    expect(x, (1, 1, C), "x")
    if v_first is not None:
        expect(v_first, (1, 1, C), "v_first")
    for layer, s in zip(layers, states):
        layer.check_state(s, 1)
    x32 = x.reshape(C).to(torch.float32, copy=True)
    vf = torch.empty(C) if v_first is None else v_first.reshape(C).to(torch.float32, copy=True)  # read, or written by layer 0
    att_in, ffn_in = (torch.stack([getattr(s, name).reshape(C) for s in states]).to(torch.float32) for name in ("att_x_prev", "ffn_x_prev"))
    kv_in = [s.att_kv.contiguous() for s in states]
    att_out, ffn_out, kv_out = torch.empty(n, C), torch.empty(n, C), torch.empty(n, *kv_in[0].shape)
    checked(lib.decode_layers)(
        n, (ctypes.c_void_p * n)(*(ctypes.addressof(layer.struct) for layer in layers)), x32.data_ptr(), vf.data_ptr(), att_in.data_ptr(),
        (ctypes.c_void_p * n)(*(kv.data_ptr() for kv in kv_in)), ffn_in.data_ptr(), att_out.data_ptr(), kv_out.data_ptr(), ffn_out.data_ptr(),
        threads,
    )  # fmt: skip
    att_out, ffn_out = att_out.to(dtype), ffn_out.to(dtype)
    new_states = [LayerState(att_out[i : i + 1], kv_out[i], ffn_out[i : i + 1]) for i in range(n)]
    return x32.view(1, 1, C).to(dtype), vf.view(1, 1, C).to(dtype), new_states


def gemm(x: torch.Tensor, weight: torch.Tensor, act: str = "none") -> torch.Tensor:
    """``act(F.linear(x, weight))`` (act: "none", "tanh" or "sigmoid") through oneDNN's matmul,
    which also takes transposed views (LoRA factors) without a copy. For fp32 it ran 10-30% faster
    here (AMD Zen 4) than F.linear's MKL sgemm; bf16 F.linear already uses oneDNN, but the fused
    activation saves a pass. (A private op, used by torch.compile: plain torch ops where absent.)"""
    if _ONEDNN_LINEAR is None or weight.dtype != x.dtype:
        y = F.linear(x, weight)
        return y if act == "none" else getattr(torch, act)(y)
    return _ONEDNN_LINEAR(x, weight, None, act, [], "")


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _lora(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, act: str = "none") -> torch.Tensor:
    """``act(x @ first) @ second`` for LoRA factors stored ``[in, rank]`` and ``[rank, out]``."""
    return gemm(gemm(x, first.t(), act), second.t())


def prefill_block(
    lib: ctypes.CDLL, layer: FusedLayer, w: BlockWeights, x: torch.Tensor, v_first: torch.Tensor | None, s: LayerState, linear: Linear
) -> tuple[torch.Tensor, torch.Tensor, LayerState]:
    """``rwkv7.block`` for ``x [B, T, C]``: the big projections through ``linear`` (the backend's:
    an int8 GEMM for int8 weights), the LoRAs through :func:`gemm`, the rest in native kernels. GEMM inputs
    and outputs are in x's dtype, as in the reference; the residual stream stays fp32 inside the
    block. Returns ``(x, v_first, new LayerState)``."""
    B, T, C = x.shape
    dtype, att, ffn, st = x.dtype, w.att, w.ffn, layer.struct
    expect(x, (B, T, st.C), "x")
    if v_first is not None:
        expect(v_first, (B, T, st.C), "v_first")
    layer.check_state(s, B)
    bf16, threads, ref = int(dtype == torch.bfloat16), torch.get_num_threads(), ctypes.byref(st)
    x32 = x.to(torch.float32, copy=True).view(B * T, C)  # updated in place by the kernels
    xn, mixed = torch.empty(B * T, C), torch.empty(6, B * T, C, dtype=dtype)

    def mix(ln_w: int, ln_b: int, prev: torch.Tensor, mixes: ctypes.Array, add: torch.Tensor | None) -> torch.Tensor:
        """Fill ``mixed[:len(mixes)]``; returns the state's new x_prev (the last normed row)."""
        prev32 = prev.to(torch.float32).contiguous()
        add_ptr = None if add is None else add.data_ptr()
        lib.prefill_mix(
            ref, B, T, x32.data_ptr(), add_ptr, ln_w, ln_b, prev32.data_ptr(), ctypes.addressof(mixes), len(mixes), xn.data_ptr(), mixed.data_ptr(), bf16, threads
        )
        return xn.view(B, T, C)[:, -1].to(dtype, copy=True)  # a copy: xn is reused

    att_x_prev = mix(st.ln1_w, st.ln1_b, s.att_x_prev, layer.att_mixes, None)
    xr, xw, xk, xv, xa, xg = mixed
    r, k, v = linear(xr, att.receptance), linear(xk, att.key), linear(xv, att.value)
    wl, al, g = _lora(xw, att.w1, att.w2, "tanh"), _lora(xa, att.a1, att.a2), _lora(xg, att.g1, att.g2, "sigmoid")
    vl = None if v_first is None else _lora(xv, att.v1, att.v2)
    vf = None if v_first is None else v_first.to(dtype).reshape(B * T, C).contiguous()
    y, kv = torch.empty(B * T, C, dtype=dtype), torch.empty_like(s.att_kv)
    ptrs = [None if t is None else t.data_ptr() for t in (r, k, v, wl, al, vl, g, vf)]
    checked(lib.prefill_wkv)(ref, B, T, *ptrs, s.att_kv.contiguous().data_ptr(), kv.data_ptr(), y.data_ptr(), bf16, threads)

    ffn_x_prev = mix(st.ln2_w, st.ln2_b, s.ffn_x_prev, layer.ffn_mixes, linear(y, att.output))  # x += att out first
    hidden = linear(mixed[0], ffn.key)
    lib.relu_square(hidden.numel(), hidden.data_ptr(), bf16, threads)
    x32 += linear(hidden, ffn.value)
    return x32.view(B, T, C).to(dtype), v.view(B, T, C) if v_first is None else v_first, LayerState(att_x_prev, kv, ffn_x_prev)


def checked(fn: Callable[..., int]) -> Callable[..., None]:
    """Call a native entry point that returns nonzero when it refuses its sizes."""

    def call(*args: Any) -> None:
        if fn(*args):
            raise InputError(f"native kernel {fn.__name__} refused its arguments (inconsistent dimensions)")

    return call


def check_layout(lib: ctypes.CDLL) -> None:
    """``_Layer``/``_Mat`` must match ``struct Layer``/``Mat`` in kernels/cpu_decode.cpp byte for
    byte (the kernels read the struct Python fills): compared once, when the library loads."""
    native = (ctypes.c_int64 * 5)()
    lib.layer_layout(native)
    mirror = (ctypes.sizeof(_Mat), ctypes.sizeof(_Layer), _Layer.R.offset, _Layer.C.offset, _Layer.F.offset)
    if tuple(native) != mirror:
        raise RuntimeError(f"cpu_fused._Layer does not match struct Layer in kernels/cpu_decode.cpp (sizes and offsets {mirror} vs {tuple(native)})")


def declare(lib: ctypes.CDLL) -> None:
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.layer_layout.argtypes = [ptr]
    lib.layer_layout.restype = None
    check_layout(lib)
    lib.decode_layers.argtypes = [i64, ptr, *[ptr] * 8, c_int]
    lib.decode_layers.restype = c_int
    lib.prefill_mix.argtypes = [ptr, i64, i64, *[ptr] * 6, i64, ptr, ptr, c_int, c_int]
    lib.prefill_mix.restype = None
    lib.prefill_wkv.argtypes = [ptr, i64, i64, *[ptr] * 11, c_int, c_int]
    lib.prefill_wkv.restype = c_int
    lib.relu_square.argtypes = [i64, ptr, c_int, c_int]
    lib.relu_square.restype = None
