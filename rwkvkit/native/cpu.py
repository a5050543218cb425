"""The CPU kernels (``kernels/cpu_*.cpp``) as the ``cpu`` and ``int8`` backends call them: loading
the library, the ctypes mirrors of its structs (checked against the library's own layout when it
loads), the native layer prepared once per block, and one wrapper per op.

Ops (each for any batch and token count its backend routes to it):

- :func:`ln_mix` and :func:`time_mix_core`: the elementwise work around the products, in fp32
  inside, activations read and written in fp32 or bf16;
- :func:`project` and :func:`lora`: products for one row per sequence (decode, the head) that
  read each weight once per step in its stored format (fp32, bf16, int8 with row scales or int4
  with group scales) for
  all the batch's rows, each row's sums formed exactly as for a lone row (a sequence's result
  does not depend on its batch); a sequence's many rows (prefill) go through :func:`gemm`
  (oneDNN) or :func:`int8_gemm` instead;
- :func:`decode_stage`: a stage's blocks for one token of each sequence in one native call
  (``decode_layers``), composed in C++ of the very functions the op entry points call.

The kernels run in parallel on a thread pool of their own during decode (``kernels/cpu_pool.h``: a
waiting thread spins ~5 us, then yields its core for up to 2 ms, then sleeps), so decoding next to
another busy process does not collapse, and as OpenMP regions, in the libgomp torch loads,
elsewhere. Where libgomp's threads spin for long after a region (torch loaded before ``rwkvkit``,
or the user asked for it), decode stays on OpenMP regions: a spinning libgomp thread would take
the core a pool thread needs (see :mod:`rwkvkit.omp_wait`). ``RWKVKIT_CPU_POOL=pool|omp`` chooses either
way; with the pool, ``OMP_WAIT_POLICY=ACTIVE`` makes it spin only, ``PASSIVE`` sleep at once.
Read once, when the library loads (:func:`wait_policy`).

Native code trusts the sizes it is given, so every wrapper checks each tensor's shape, dtype and
device first (:func:`expect`): a wrong size is an error here, never an out-of-bounds access there.
The torch defaults in :mod:`rwkvkit.backend` stay the reference; the tests hold these ops to them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import warnings
from dataclasses import fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rwkvkit.backend import Epilogue
from rwkvkit.errors import InputError
from rwkvkit.models.rwkv7 import BlockWeights, Constants, TimeMixWeights
from rwkvkit.native import load_library
from rwkvkit.omp_wait import openmp_spins
from rwkvkit.quant import CHUNK, Int4Weight, Int8Weight
from rwkvkit.state import LayerState

KERNELS = ("cpu_pool.h", "cpu_rwkv7.cpp", "cpu_i4.cpp", "cpu_mix.cpp", "cpu_decode.cpp", "cpu_sample.cpp")  # one translation unit, in this order
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
DTYPES = (torch.float32, torch.bfloat16)  # the activation dtypes the kernels read and write
MAX_HEAD_SIZE = 64  # the scans keep a head's N x N state in fixed local arrays
_F32, _BF16, _I8, _I4 = 0, 1, 2, 3  # enum Format
_QUANTIZED = (Int8Weight, Int4Weight)
_POOL, _ACTIVE, _PASSIVE, _OPENMP = 0, 1, 2, 3  # enum WaitMode
SPIN_NS, YIELD_NS = 5_000, 2_000_000  # a waiting pool thread's spin, then sched_yield, before it sleeps
_FORMATS = {torch.float32: _F32, torch.bfloat16: _BF16}

_ptr, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Mat(ctypes.Structure):
    _fields_ = [("w", _ptr), ("scale", _ptr), ("rows", _i64), ("cols", _i64), ("format", _i32), ("group", _i32)]


class _Product(ctypes.Structure):
    _fields_ = [("m", ctypes.POINTER(_Mat)), ("x", _ptr), ("y", _ptr), ("residual", _ptr), ("n", _i64), ("epilogue", _i32)]


class _LoraPair(ctypes.Structure):
    _fields_ = [("first", _ptr), ("second", _ptr), ("in_", _i64), ("rank", _i64), ("out", _i64), ("format", _i32)]


class _LoraJob(ctypes.Structure):
    _fields_ = [("pair", ctypes.POINTER(_LoraPair)), ("x", _ptr), ("y", _ptr), ("n", _i64), ("act", _i32)]


_TM_VECTORS = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_weight", "ln_x_bias")


class _TimeMix(ctypes.Structure):
    _fields_ = [*((name, _ptr) for name in _TM_VECTORS), ("H", _i64), ("N", _i64), ("group_norm_eps", _f32), ("decay_scale", _f32), ("kk_eps", _f32)]


class _Embedding(ctypes.Structure):
    _fields_ = [("w", _ptr), ("scale", _ptr), ("rows", _i64), ("cols", _i64), ("format", _i32)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _ptr) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")),
        ("att_mixes", _ptr * 6),
        ("ffn_mix", _ptr),
        *((name, _LoraPair) for name in ("w", "a", "g", "v")),
        *((name, _Mat) for name in ("R", "K", "V", "O", "FK", "FV")),
        ("tm", _TimeMix),
        ("C", _i64),
        ("F", _i64),
        ("ln_eps", _f32),
    ]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, built on first use; None (after a warning) where they cannot be built."""
    try:
        lib = load_library(KERNELS, FLAGS)
    except OSError as exc:
        warnings.warn(f"cpu backend: cannot build its C++ kernels ({exc}); using the torch backend's ops", RuntimeWarning, stacklevel=3)
        return None
    _declare(lib)
    if lib.pool_policy(*wait_policy(os.environ)):  # reloaded (cache cleared) with another policy than the running pool's
        raise InputError("OMP_WAIT_POLICY or RWKVKIT_CPU_POOL changed after the CPU kernels started: they apply to a new process")
    return lib


def wait_policy(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """The pool's ``(mode, spin_ns, yield_ns)`` from ``OMP_WAIT_POLICY`` and ``RWKVKIT_CPU_POOL``."""
    pool = environ.get("RWKVKIT_CPU_POOL", "") or ("omp" if openmp_spins(environ) else "pool")
    if pool not in ("omp", "pool"):
        raise InputError(f"RWKVKIT_CPU_POOL={pool!r}: expected 'pool' (the kernels' own thread pool) or 'omp' (OpenMP regions); unset, decode uses the pool unless libgomp's threads spin")
    policy = environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy not in ("", "ACTIVE", "PASSIVE"):
        warnings.warn(f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']!r} is neither ACTIVE nor PASSIVE: ignored", RuntimeWarning, stacklevel=3)
    mode = _OPENMP if pool == "omp" else {"ACTIVE": _ACTIVE, "PASSIVE": _PASSIVE}.get(policy, _POOL)
    return mode, SPIN_NS, YIELD_NS


def _declare(lib: ctypes.CDLL) -> None:
    c_int = ctypes.c_int
    signatures = {
        "layer_layout": ([_ptr, _i64], _i64),
        "pool_policy": ([_i32, _i64, _i64], c_int),
        "project": ([_ptr, _i64, c_int], c_int),
        "lora": ([_ptr, _i64, c_int], c_int),
        "ln_mix": ([_i64, _i64, _i64, *[_ptr] * 5, _i64, _f32, _ptr, _ptr, c_int, c_int], c_int),
        "time_mix_core": ([_ptr, _i64, _i64, *[_ptr] * 11, c_int, c_int], c_int),
        "decode_layers": ([_i64, _ptr, _i64, c_int, *[_ptr] * 5, c_int, *[_ptr] * 3, c_int], c_int),
        "decode_model": ([_i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _f32, _ptr, c_int, *[_ptr] * 7, c_int], c_int),
        "wkv7_f32": ([_i64, _i64, _i64, _i64, *[_ptr] * 8, c_int], c_int),
        "quantize_rows_i8": ([_i64, _i64, _ptr, c_int, _ptr, _ptr, c_int], None),
        "rescale_i32": ([_i64, _i64, _ptr, _ptr, _ptr, _ptr, c_int, c_int], None),
        "relu_square": ([_i64, _ptr, c_int, c_int], None),
        "dequantize_i4": ([_ptr, _ptr, c_int, c_int], c_int),
        "nucleus_cutoffs": ([_i64, _i64, _ptr, _f32, _ptr], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    check_layout(lib)


def _layout() -> tuple[int, ...]:
    """What ``layer_layout`` reports, computed from the ctypes mirrors."""
    sizes = tuple(ctypes.sizeof(s) for s in (_Mat, _Product, _LoraPair, _LoraJob, _TimeMix, _Layer))
    offsets = (*(getattr(_Layer, f).offset for f in ("att_mixes", "w", "R", "tm", "C", "ln_eps")), _TimeMix.H.offset, _TimeMix.kk_eps.offset)
    return (*sizes, *offsets, _Product.n.offset, _LoraJob.n.offset, ctypes.sizeof(_Embedding), _Embedding.format.offset)


def check_layout(lib: ctypes.CDLL) -> None:
    """The ctypes mirrors must match the structs in kernels/cpu_*.cpp byte for byte (the kernels
    read the structs Python fills): compared once, when the library loads."""
    mirror = _layout()
    native = (ctypes.c_int64 * len(mirror))()
    count = lib.layer_layout(native, len(mirror))
    if count != len(mirror) or tuple(native) != mirror:
        raise RuntimeError(f"the ctypes mirror _Layer does not match struct Layer in kernels/cpu_decode.cpp (sizes and offsets {mirror} vs {tuple(native)})")


def checked(fn: Callable[..., int]) -> Callable[..., None]:
    """Call a native entry point that returns nonzero when it refuses its sizes."""

    def call(*args: Any) -> None:
        if fn(*args):
            raise InputError(f"native kernel {fn.__name__} refused its arguments (inconsistent dimensions)")

    return call


def expect(t: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> None:
    """Refuse a tensor whose shape, dtype or device differs from what a native call will read
    (``Model.adopt_state`` checks states first; this guards every other way in)."""
    if t.shape != shape or not t.is_cpu or (dtype is not None and t.dtype != dtype):
        want = f"{list(shape)}" + (f" {dtype}" if dtype else "")
        raise InputError(f"native kernel input {name}: got {t.dtype} {list(t.shape)} on {t.device}, expected {want} on the CPU")


def head_fits(head_size: int) -> bool:
    """Whether time_mix_core (and so the decode stage) takes this head size."""
    return head_size % 16 == 0 and 16 <= head_size <= MAX_HEAD_SIZE


def takes_matrix(weight: Any) -> bool:
    """Whether the one-row products read this weight as it is (fp32, bf16, int8 or int4, contiguous, on the CPU)."""
    quantized = isinstance(weight, _QUANTIZED)
    t = weight.q if quantized else weight
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.device.type == "cpu" and t.is_contiguous() and (quantized or t.dtype in _FORMATS)


def decoded(xs: Sequence[torch.Tensor]) -> bool:
    """Whether every row of these inputs is a different sequence's (one token each), as
    :func:`project` and :func:`lora` take them: decode ``[B, 1, C]``, the head's ``[B, C]``, one
    row ``[C]``; not a sequence's many tokens ``[B, T > 1, C]`` (a GEMM's work)."""
    for x in xs:
        if x.dim() > 3 or (x.dim() == 3 and x.shape[1] != 1):
            return False
    return True


def _mat(weight: Any) -> _Mat:
    if isinstance(weight, Int8Weight):
        expect(weight.scale, (weight.q.shape[0],), "scale", torch.float32)
        return _Mat(weight.q.data_ptr(), weight.scale.data_ptr(), *weight.q.shape, _I8)
    if isinstance(weight, Int4Weight):  # the kernel reads whole chunks and groups: every size checked here
        rows, cols, group = *weight.shape, weight.group
        if group <= 0 or group % CHUNK:
            raise InputError(f"native kernel input int4 group: got {group}, expected a positive multiple of {CHUNK}")
        expect(weight.q, (rows, -(-cols // CHUNK) * CHUNK // 2), "int4 codes", torch.uint8)
        expect(weight.scale, (rows, -(-cols // group)), "int4 scales", torch.float32)
        if not (weight.q.is_contiguous() and weight.scale.is_contiguous()):
            raise InputError("native kernel input int4: codes and scales must be contiguous")
        return _Mat(weight.q.data_ptr(), weight.scale.data_ptr(), rows, cols, _I4, group)
    if not takes_matrix(weight):
        raise TypeError(f"the native products read contiguous fp32/bf16/int8 matrices on the CPU, not {weight.dtype} {list(weight.shape)}")
    return _Mat(weight.data_ptr(), None, *weight.shape, _FORMATS[weight.dtype])


def _vector(t: torch.Tensor, size: int, name: str, dtype: torch.dtype, keep: list[torch.Tensor]) -> int:
    """A per-channel vector ``[size]`` in ``dtype`` as the kernels read it: the tensor itself where
    it is one already (the usual case: weights and activations share the placement's dtype), else
    a copy kept alive in ``keep``."""
    if not (t.dtype == dtype and t.is_contiguous() and t.numel() == size and t.is_cpu):
        t = t.reshape(-1)
        expect(t, (size,), name)
        t = t.to(dtype).contiguous()
        keep.append(t)
    return t.data_ptr()


def _lora_pair(first: torch.Tensor, second: torch.Tensor) -> _LoraPair:
    """A factor pair as the kernels read it: both fp32 or both bf16, contiguous ``[in, rank]``, ``[rank, out]``."""
    if first.dim() != 2 or first.dtype not in _FORMATS or not first.is_contiguous():
        raise TypeError(f"the native LoRA reads contiguous fp32/bf16 factors, not {first.dtype} {list(first.shape)}")
    expect(second, (first.shape[1], second.shape[-1]), "LoRA second factor", first.dtype)
    if not second.is_contiguous():
        raise TypeError("the native LoRA reads contiguous factors")
    return _LoraPair(first.data_ptr(), second.data_ptr(), *first.shape, second.shape[1], _FORMATS[first.dtype])


def _time_mix(w: TimeMixWeights, H: int, N: int, c: Constants, dtype: torch.dtype, keep: list[torch.Tensor]) -> _TimeMix:
    """What time_mix_core reads besides its activations: ``w``'s vectors in ``dtype``, the head layout, ``c``'s constants."""
    ptrs = [None if getattr(w, name) is None else _vector(getattr(w, name), H * N, name, dtype, keep) for name in _TM_VECTORS]
    return _TimeMix(*ptrs, H, N, c.group_norm_eps, c.decay_scale, c.kk_eps)


class NativeLayer:
    """A block's weights as ``decode_layers`` reads them, with the constants it was prepared with;
    holds every tensor it points to. Matrices and LoRA factors are read in place; the per-channel
    vectors are fp32 copies where the weights are bf16 (decode computes in fp32)."""

    def __init__(self, w: BlockWeights, n_head: int, head_size: int, c: Constants) -> None:
        att, ffn = w.att, w.ffn
        C, keep, f32 = n_head * head_size, [], torch.float32
        if len(c.att_mixes) != 6:
            raise ValueError(f"the native decode takes six attention mixes (rwkv7.time_mix), not {len(c.att_mixes)}")
        vectors = ((w.ln1_weight, "ln1.weight"), (w.ln1_bias, "ln1.bias"), (w.ln2_weight, "ln2.weight"), (w.ln2_bias, "ln2.bias"))
        matrices = (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value)
        self.struct = _Layer(
            *(_vector(t, C, name, f32, keep) for t, name in vectors),
            (_ptr * 6)(*(_vector(getattr(att, name), C, name, f32, keep) for name in c.att_mixes)),
            _vector(ffn.x_k, C, "ffn.x_k", f32, keep),
            _lora_pair(att.w1, att.w2), _lora_pair(att.a1, att.a2), _lora_pair(att.g1, att.g2),
            _LoraPair() if att.v1 is None or att.v2 is None else _lora_pair(att.v1, att.v2),  # none in the model's first layer
            *(_mat(m) for m in matrices),
            _time_mix(att, n_head, head_size, c, f32, keep),
            C, ffn.key.shape[0], c.ln_eps,
        )  # fmt: skip
        keep += [t for t in (att.w1, att.w2, att.a1, att.a2, att.g1, att.g2, att.v1, att.v2) if t is not None]
        keep += [t for m in matrices for t in ((m.q, m.scale) if isinstance(m, _QUANTIZED) else (m,))]
        self._keep = keep
        self.address = ctypes.addressof(self.struct)
        self._kv_shape = (self.struct.tm.H, self.struct.tm.N, self.struct.tm.N)

    def check_state(self, s: LayerState, batch: int) -> None:
        """A layer state as the kernels read it: fp32 ``att_kv [B, H, N, N]``, ``x_prev [B, C]`` (the
        common case tested first in one expression: this runs per layer and decoded token)."""
        kv, att, ffn, C = s.att_kv, s.att_x_prev, s.ffn_x_prev, self.struct.C
        if kv.dtype == torch.float32 and kv.is_cpu and att.is_cpu and ffn.is_cpu and kv.shape == (batch, *self._kv_shape) and att.shape == ffn.shape == (batch, C):
            return
        expect(kv, (batch, *self._kv_shape), "att_kv", torch.float32)
        expect(att, (batch, C), "att_x_prev")
        expect(ffn, (batch, C), "ffn_x_prev")


class NativeBlockWeights(BlockWeights):
    """``BlockWeights`` plus the layer's native layout, built once at load (``CpuBackend.prepare_block``).
    ``native`` is a plain attribute, not a field: copies made with ``dataclasses.replace`` (or any
    other way) lose it, and the backend then runs them op by op."""

    native: NativeLayer | None = None

    @classmethod
    def wrap(cls, w: BlockWeights, n_head: int, head_size: int, c: Constants) -> NativeBlockWeights:
        out = cls(**{f.name: getattr(w, f.name) for f in fields(w)})
        out.native = NativeLayer(w, n_head, head_size, c)
        return out


# ---- ops


def _bf16(dtype: torch.dtype) -> int:
    return int(dtype == torch.bfloat16)


def ln_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_prev: torch.Tensor, mixes: Sequence[torch.Tensor], eps: float, threads: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``Backend.ln_mix`` for ``x [B, T, C]`` in fp32 or bf16 (C a multiple of 16)."""
    B, T, C = x.shape
    expect(x, (B, T, C), "x")
    expect(x_prev, (B, C), "x_prev")
    keep: list[torch.Tensor] = []
    w, b = _vector(weight, C, "ln weight", x.dtype, keep), _vector(bias, C, "ln bias", x.dtype, keep)
    ptrs = (_ptr * max(1, len(mixes)))(*(_vector(m, C, "mix", x.dtype, keep) for m in mixes))
    xc, prev = x.contiguous(), x_prev.to(x.dtype).contiguous()
    last, out = torch.empty(B, C, dtype=x.dtype), torch.empty(len(mixes), B, T, C, dtype=x.dtype)
    checked(library().ln_mix)(B, T, C, xc.data_ptr(), w, b, prev.data_ptr(), ptrs, len(mixes), eps, last.data_ptr(), out.data_ptr(), _bf16(x.dtype), threads)
    return last, list(out.unbind(0))


def _rows(x: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """``x [..., width]`` as ``n`` contiguous fp32 rows (what the row kernels read)."""
    expect(x, (*x.shape[:-1], width), "x")
    if x.numel() != n * width:
        raise InputError(f"native kernel input x: got {list(x.shape)}, expected {n} rows like the first input's")
    return x.reshape(n, width).to(torch.float32).contiguous()


def project(xs: Sequence[torch.Tensor], weights: Sequence[Any], epilogues: Sequence[Epilogue], residual: torch.Tensor | None, threads: int) -> list[torch.Tensor]:
    """``Backend.project`` for inputs ``x [..., in]`` whose rows are all different sequences (one
    token each: decode, the head), in one native call: the products share one parallel region,
    and each weight is read once for all rows. Outputs in each input's dtype (``residual``'s with one)."""
    mats = [_mat(w) for w in weights]
    n = xs[0].numel() // max(1, xs[0].shape[-1])
    rows = [_rows(x, mat.cols, n) for x, mat in zip(xs, mats)]
    if residual is None:
        ys = [torch.empty(n, mat.rows) for mat in mats]
    else:
        expect(residual, (*xs[0].shape[:-1], mats[0].rows), "residual")
        ys = [residual.reshape(n, -1).to(torch.float32, copy=True)]  # y = residual + ..., in place
    products = (_Product * len(xs))(
        *(_Product(ctypes.pointer(m), x.data_ptr(), y.data_ptr(), None if residual is None else y.data_ptr(), n, int(e)) for m, x, y, e in zip(mats, rows, ys, epilogues))
    )
    checked(library().project)(products, len(xs), threads)
    dtypes = [x.dtype for x in xs] if residual is None else [residual.dtype]
    return [y.view(*x.shape[:-1], -1).to(dtype) for x, y, dtype in zip(xs, ys, dtypes)]


def lora(xs: Sequence[torch.Tensor], pairs: Sequence[tuple[torch.Tensor, torch.Tensor, Epilogue]], threads: int) -> list[torch.Tensor]:
    """``Backend.lora`` for inputs whose rows are all different sequences (as :func:`project`), in
    one native call (two parallel regions for all pairs)."""
    factors = [_lora_pair(first, second) for first, second, _ in pairs]
    n = xs[0].numel() // max(1, xs[0].shape[-1])
    rows = [_rows(x, pair.in_, n) for x, pair in zip(xs, factors)]
    ys = [torch.empty(n, pair.out) for pair in factors]
    jobs = (_LoraJob * len(xs))(*(_LoraJob(ctypes.pointer(p), x.data_ptr(), y.data_ptr(), n, int(act)) for p, x, y, (_, _, act) in zip(factors, rows, ys, pairs)))
    checked(library().lora)(jobs, len(xs), threads)
    return [y.view(*x.shape[:-1], -1).to(x.dtype) for x, y in zip(xs, ys)]


def time_mix_core(
    w: TimeMixWeights, kv: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_lora: torch.Tensor, a_lora: torch.Tensor,
    g: torch.Tensor, v_lora: torch.Tensor | None, v_first: torch.Tensor | None, c: Constants, threads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``Backend.time_mix_core`` for inputs ``[B, T, C]``, all fp32 or all bf16 (head size:
    :func:`head_fits`), with ``c``'s constants."""
    B, T, C = r.shape
    H, N = kv.shape[1], kv.shape[-1]
    expect(kv, (B, H, N, N), "kv", torch.float32)
    residual = v_first is not None
    if residual and (v_lora is None or w.v0 is None):
        raise InputError("time_mix_core: a value residual needs its LoRA output and v0")
    acts = {"r": r, "k": k, "v": v, "w_lora": w_lora, "a_lora": a_lora, "g": g, **({"v_lora": v_lora, "v_first": v_first} if residual else {})}
    for name, t in acts.items():
        expect(t, (B, T, H * N), name, r.dtype)
    keep: list[torch.Tensor] = []
    tm = _time_mix(w, H, N, c, r.dtype, keep)
    acts = {name: t.contiguous() for name, t in acts.items()}
    ptrs = (acts[name].data_ptr() if name in acts else None for name in ("r", "k", "v", "w_lora", "a_lora", "v_lora", "g", "v_first"))
    kv_in, state, y = kv.contiguous(), torch.empty_like(kv), torch.empty(B, T, C, dtype=r.dtype)
    checked(library().time_mix_core)(ctypes.byref(tm), B, T, *ptrs, kv_in.data_ptr(), state.data_ptr(), y.data_ptr(), _bf16(r.dtype), threads)
    return y, state, v_first if residual else v


class _Recycled:
    """Buffers for a decode step's new states and logits that are used again once nothing holds them.

    A step's new states are ~38 MB at B = 16 (the 0.1B shape's 12 layers), beyond malloc's mmap
    threshold: fresh pages each step, whose faults and clearing were ~15% of the step. Each buffer
    is a numpy array lent to torch (``torch.from_numpy`` holds a reference to it for as long as any
    tensor uses its memory), so an array only the pool references is free. A caller that drops the
    state it decoded from (the engine, a generate loop) leaves one buffer free every step; states
    kept longer just take new buffers. At most ``keep`` buffers are held (a free one of another
    size is replaced), so idle ones cost at most ``keep`` states of memory."""

    def __init__(self, keep: int) -> None:
        self._keep, self._arrays, self._lock = keep, [], threading.Lock()
        self._never_lent = [np.empty(0, dtype=np.float32)]  # the reference count of an array only a list holds, read the same way

    def empty(self, size: int) -> torch.Tensor:
        """An uninitialized fp32 tensor ``[size]``."""
        with self._lock:
            alone = sys.getrefcount(self._never_lent[0])
            free = [i for i in range(len(self._arrays)) if sys.getrefcount(self._arrays[i]) == alone]
            fits = next((i for i in free if self._arrays[i].size == size), None)
            if fits is None:
                fits = free[0] if free else (len(self._arrays) if len(self._arrays) < self._keep else None)
                if fits is None:
                    return torch.empty(size)
                array = np.empty(size, dtype=np.float32)
                self._arrays[fits : fits + 1] = [array]
            return torch.from_numpy(self._arrays[fits])


_STATES = _Recycled(keep=2)  # the state decoded from and the new one
_LOGITS = _Recycled(keep=2)  # a step's logits, usually dropped once sampled: fresh ones cost cpu bf16 at B = 16 ~20% of a step
_LOGITS_RECYCLED = 1 << 18  # floats (1 MiB) from which logits are recycled: smaller ones malloc reuses from its heap (B = 1: no gain measured)


def decode_stage(
    layers: Sequence[NativeLayer], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[LayerState], dtype: torch.dtype, threads: int
) -> tuple[torch.Tensor, torch.Tensor, list[LayerState]]:
    """``rwkv7.block`` on each layer in turn for one token of each of B sequences, ``x [B, 1, C]``,
    in one native call (``decode_layers``); returns ``(x, v_first, new LayerStates)`` in ``dtype``."""
    n, C, B = len(layers), layers[0].struct.C, x.shape[0]
    expect(x, (B, 1, C), "x")
    if v_first is not None:
        expect(v_first, (B, 1, C), "v_first")
    x32 = x.reshape(B, C).to(torch.float32, copy=True)
    vf = torch.empty(B, C) if v_first is None else v_first.reshape(B, C).to(torch.float32, copy=True)  # read, or written by the first layer
    inputs = _StateInputs(layers, states, B, dtype)
    shifts, kv = _new_states(n, B, C, inputs.kv_shape)
    checked(library().decode_layers)(
        n, inputs.layers, B, int(v_first is not None), x32.data_ptr(), vf.data_ptr(), inputs.att, inputs.kv, inputs.ffn, inputs.bf16,
        shifts.data_ptr(), kv.data_ptr(), shifts[n].data_ptr(), threads,
    )  # fmt: skip
    return x32.view(B, 1, C).to(dtype), vf.view(B, 1, C).to(dtype), _layer_states(shifts, kv, dtype)


class _StateInputs:
    """A stage's layer states as ``decode_layers`` reads them: a pointer per layer to each token
    shift (``dtype``, fp32 or bf16) and WKV state (fp32), checked first; a tensor in another dtype
    or layout is converted and kept alive here. ``layers``: the layers' structs, as an array."""

    def __init__(self, layers: Sequence[NativeLayer], states: Sequence[LayerState], batch: int, dtype: torch.dtype) -> None:
        if len(states) != len(layers):
            raise InputError(f"native decode: {len(layers)} layers but {len(states)} layer states")
        self._keep: list[torch.Tensor] = []
        att, kv, ffn = [], [], []
        f32 = torch.float32
        for layer, s in zip(layers, states):
            layer.check_state(s, batch)
            att.append(self._pointer(s.att_x_prev, dtype))
            kv.append(self._pointer(s.att_kv, f32))
            ffn.append(self._pointer(s.ffn_x_prev, dtype))
        n = len(layers)
        self.att, self.kv, self.ffn = (_ptr * n)(*att), (_ptr * n)(*kv), (_ptr * n)(*ffn)
        self.layers = (_ptr * n)(*[layer.address for layer in layers])
        self.bf16 = int(dtype == torch.bfloat16)
        self.kv_shape = layers[0]._kv_shape

    def _pointer(self, t: torch.Tensor, dtype: torch.dtype) -> int:
        if t.dtype != dtype or not t.is_contiguous():
            t = t.to(dtype).contiguous()
            self._keep.append(t)
        return t.data_ptr()


def _new_states(n: int, B: int, C: int, kv_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a decode step writes the new states, carved from one recycled buffer (:class:`_Recycled`):
    fp32 token shifts ``[2n, B, C]`` (every layer's att, then every layer's ffn) and WKV states ``[n, B, *kv_shape]``."""
    kv_size = B * kv_shape[0] * kv_shape[1] * kv_shape[2]
    out = _STATES.empty(n * (2 * B * C + kv_size))
    return out[: 2 * n * B * C].view(2 * n, B, C), out[2 * n * B * C :].view(n, B, *kv_shape)


def _layer_states(shifts: torch.Tensor, kv: torch.Tensor, dtype: torch.dtype) -> list[LayerState]:
    """The per-layer LayerStates of what a decode step wrote (views: no copy where dtype is fp32)."""
    n = kv.shape[0]
    shifts = shifts.to(dtype).unbind(0)
    return [LayerState(a, k, f) for a, k, f in zip(shifts[:n], kv.unbind(0), shifts[n:])]


class DecodePlan:
    """A whole model on one stage, for one token per sequence, as ``decode_model`` runs it: the
    embedding table, the native layers and the head (final layer norm, then a matrix of any
    format), built once and kept alive here. Per decoded token, Python then does one native call
    and a handful of tensor ops: after the weights have streamed through the caches, each torch op
    costs ~10 us of cache misses, and the op-by-op head and stage took ~0.5 ms a token."""

    def __init__(self, layers: Sequence[NativeLayer], table: Any, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, head: Any, dtype: torch.dtype) -> None:
        C, keep = layers[0].struct.C, []
        if isinstance(table, Int8Weight):
            expect(table.scale, (table.q.shape[0],), "embedding scale", torch.float32)
            rows, format_ = table.q, _I8
        elif isinstance(table, torch.Tensor) and table.dtype in _FORMATS:
            rows, format_ = table, _FORMATS[table.dtype]
        else:
            raise TypeError(f"the native decode reads fp32, bf16 or int8 embeddings, not {type(table).__name__}")
        expect(rows, (rows.shape[0], C), "embedding", None)
        if not rows.is_contiguous():
            raise InputError("native kernel input embedding: must be contiguous")
        self.embedding = _Embedding(rows.data_ptr(), table.scale.data_ptr() if format_ == _I8 else None, rows.shape[0], C, format_)
        self.ln = (_vector(ln_weight, C, "ln_out.weight", dtype, keep), _vector(ln_bias, C, "ln_out.bias", dtype, keep))
        self.head = _mat(head)
        if self.head.cols != C:
            raise InputError(f"native kernel input head: {self.head.cols} columns, expected {C}")
        self.layers, self.eps, self.dtype, self.vocab = list(layers), eps, dtype, self.head.rows
        self._keep = [table, rows, head, ln_weight, ln_bias, *keep]

    def __call__(self, ids: torch.Tensor, states: Sequence[LayerState], threads: int) -> tuple[torch.Tensor, list[LayerState]]:
        """``ids [B, 1]`` (int64) and the layers' states -> float32 logits ``[B, V]`` and the new states."""
        B, n, C = ids.shape[0], len(self.layers), self.embedding.cols
        expect(ids, (B, 1), "ids", torch.int64)
        ids = ids.contiguous()
        inputs = _StateInputs(self.layers, states, B, self.dtype)
        shifts, kv = _new_states(n, B, C, inputs.kv_shape)
        size = B * self.vocab
        logits = (_LOGITS.empty(size) if size >= _LOGITS_RECYCLED else torch.empty(size)).view(B, self.vocab)
        status = library().decode_model(
            n, inputs.layers, ctypes.byref(self.embedding), ids.data_ptr(), B, self.ln[0], self.ln[1], self.eps, ctypes.byref(self.head),
            inputs.bf16, inputs.att, inputs.kv, inputs.ffn, shifts.data_ptr(), kv.data_ptr(), shifts[n].data_ptr(), logits.data_ptr(), threads,
        )  # fmt: skip
        if status:
            raise InputError("native kernel decode_model: a token id outside the embedding" if status == 2 else "native kernel decode_model refused its arguments (inconsistent dimensions)")
        return logits, _layer_states(shifts, kv, self.dtype)


# ---- many rows, and the scan alone


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


def lora_gemm(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, act: Epilogue) -> torch.Tensor:
    """``act(x @ first) @ second`` for many rows, the activation fused into the first GEMM where oneDNN has it."""
    fused = {Epilogue.NONE: "none", Epilogue.TANH: "tanh", Epilogue.SIGMOID: "sigmoid"}.get(act)
    hidden = gemm(x, first.t(), fused) if fused else act.apply(gemm(x, first.t()))
    return gemm(hidden, second.t())


def int8_gemm(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``x @ w.T`` for ``x [..., in]`` (fp32 or bf16) with activations rounded to int8 per row
    (``quantize_rows_i8``) and one ``torch._int_mm`` (VNNI): ~3.6x an fp32 GEMM on this machine's
    AVX512-VNNI cores, and the demo model's held-out perplexity moves by < 0.1%."""
    lib = library()
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    expect(x, (*x.shape[:-1], weight.q.shape[1]), "x")
    xc, bf16, threads = x.contiguous(), _bf16(x.dtype), torch.get_num_threads()
    xq, step = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows)
    lib.quantize_rows_i8(rows, cols, xc.data_ptr(), bf16, xq.data_ptr(), step.data_ptr(), threads)
    acc = torch._int_mm(xq, weight.q.t())
    y = torch.empty(rows, weight.q.shape[0], dtype=x.dtype)
    lib.rescale_i32(rows, weight.q.shape[0], acc.data_ptr(), step.data_ptr(), weight.scale.data_ptr(), y.data_ptr(), bf16, threads)
    return y.view(*x.shape[:-1], -1)


def dequantize_i4(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight.dequantize(dtype)`` (fp32 or bf16) in one native pass over the codes (torch's takes
    several): the int4 prefill GEMM's operand."""
    mat = _mat(weight)
    out = torch.empty(*weight.shape, dtype=dtype)
    checked(library().dequantize_i4)(ctypes.byref(mat), out.data_ptr(), _bf16(dtype), torch.get_num_threads())
    return out


def relu_square_(h: torch.Tensor) -> torch.Tensor:
    """``relu(h) ** 2`` in place for a contiguous fp32 or bf16 tensor (one pass instead of two ops)."""
    library().relu_square(h.numel(), h.data_ptr(), _bf16(h.dtype), torch.get_num_threads())
    return h


def wkv(kv: torch.Tensor, r: torch.Tensor, decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor, a: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Backend.wkv`` in fp32 (any head size up to :data:`MAX_HEAD_SIZE`); y in fp32."""
    B, T, H, N = r.shape
    for name, t in zip(("r", "decay", "k", "v", "kk", "a"), (r, decay, k, v, kk, a)):
        expect(t, (B, T, H, N), name)
    expect(kv, (B, H, N, N), "kv")
    state = kv.to(torch.float32, copy=True).contiguous()
    r, decay, k, v, kk, a = (t.to(torch.float32).contiguous() for t in (r, decay, k, v, kk, a))
    y = torch.empty(B, T, H * N, dtype=torch.float32)
    checked(library().wkv7_f32)(B, T, H, N, *(t.data_ptr() for t in (state, r, decay, k, v, kk, a, y)), threads)
    return y, state


def nucleus_cutoffs(probs: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """ChatRWKV's top-p cutoff of each row of float32 probabilities ``[B, V]`` on the CPU (``[B]``;
    0 where the running sum never reaches ``top_p``), sorting by radix on the calling thread;
    None where the kernels cannot be built."""
    lib = library()
    if lib is None:
        return None
    probs = probs.contiguous()
    expect(probs, tuple(probs.shape), "probs", torch.float32)
    out = torch.empty(probs.shape[0], dtype=torch.float32)
    lib.nucleus_cutoffs(*probs.shape, probs.data_ptr(), top_p, out.data_ptr())
    return out
