"""The ``cuda`` backend: rwkvkit's own CUDA kernels (``kernels/``) for the WKV-7 scan and int8 weights.

Everything else is the ``torch`` backend's code on the GPU (cuBLAS linears, torch norms). The
kernels are built on first use (``rwkvkit.kernels_build``), never at import; where they cannot be
built, ``unavailable_reason`` says why and backend ``auto`` falls back to ``torch``.

With ``cuda fp16i8`` (``Placement.quant == "i8"``) every projection matrix is stored as int8 with
per-output-channel scales: decoding (≤ 8 rows) streams the int8 weights through ``matvec``;
prefill dequantizes a matrix per call and runs a cuBLAS GEMM, which is compute-bound anyway.

Decoding (one token per sequence, ≤ 8 sequences) is launch-bound on a GPU: the unfused block is
~60 kernels. The ``block`` hook runs it as 8 (``kernels/decode.cu``, ``kernels/matvec.cu``):

1. layer norm + the six token-shift mixes;
2. one grouped product: receptance, key and value projections, and the four LoRA down-projections
   with their activations (tanh, sigmoid) as epilogues;
3. the four LoRA up-projections;
4. everything between the projections and the output (decay, kk, the state update, GroupNorm,
   bonus, gate);
5. the output projection plus the residual;
6.–8. layer norm + mix, the FFN key with relu² as epilogue, the FFN value plus the residual.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.nn.functional as F

from rwkvkit import kernels_build
from rwkvkit.backend import Backend, Role
from rwkvkit.hookspecs import hookimpl
from rwkvkit.models.rwkv7 import GROUP_NORM_EPS, BlockWeights, TimeMixWeights
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quant import Int8Weight, quantize_per_channel
from rwkvkit.state import LayerState
from rwkvkit.strategy import Placement

HEAD_SIZE = 64  # the scan kernel's head size (kHeadSize in kernels/rwkvkit_cuda.h); others use the torch scan
MAX_MATVEC_ROWS = 8  # kMaxMatvecRows in kernels/rwkvkit_cuda.h: beyond it, dequantize + GEMM
LORA_ALIGN = 16  # LoRA ranks are zero-padded to this: matvec reads 16 bytes (8 fp16 values) per load


class Epilogue(IntEnum):  # enum class Epilogue in kernels/rwkvkit_cuda.h
    NONE = 0
    TANH = 1
    SIGMOID = 2
    RELU_SQUARE = 3


class CudaBackend(TorchBackend):
    name = "cuda"
    priority = 30
    quants = ("i8",)

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.device.type != "cuda":
            return f"runs CUDA placements only (e.g. 'cuda fp16', 'cuda fp16i8'), not {placement.device.type}"
        return super().unavailable_reason(placement) or kernels_build.build_error()

    def __init__(self, placement: Placement) -> None:
        super().__init__(placement)
        self.ops = kernels_build.ops()
        self._no_scale = torch.empty(0, device=placement.device)  # matvec's marker for a weight in the activation dtype
        self._loras: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}  # id(w1) -> (w1, downs, ups)

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
        return self._matvec([x.reshape(rows, -1).contiguous()], [weight])[0].view(*x.shape[:-1], -1)

    def _matvec(
        self, xs: list[torch.Tensor], weights: list[torch.Tensor | Int8Weight], epilogues: list[Epilogue] | None = None, residual: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[epilogue(x @ w.T) (+ residual)]`` for each pair, in one launch (inputs ``[rows, in]``)."""
        ws = [w.q if isinstance(w, Int8Weight) else w for w in weights]
        scales = [w.scale if isinstance(w, Int8Weight) else self._no_scale for w in weights]
        return self.ops.matvec(xs, ws, scales, [int(e) for e in epilogues or [Epilogue.NONE] * len(xs)], residual)

    def block(self, weights: BlockWeights, x: torch.Tensor, v_first: torch.Tensor | None, state: LayerState):
        B, T, C = x.shape
        if T != 1 or B > MAX_MATVEC_ROWS or C != state.att_kv.shape[1] * HEAD_SIZE:
            return super().block(weights, x, v_first, state)
        att, ffn, ops = weights.att, weights.ffn, self.ops
        x = x.reshape(B, C).contiguous()
        state = LayerState(*(t.contiguous() for t in state.tensors()))
        downs, ups = self._lora_factors(att)
        residual = att.v0 is not None  # the value residual (every layer but the first)
        att_x, mixed = ops.ln_mix(x, weights.ln1_weight, weights.ln1_bias, state.att_x_prev, [att.x_r, att.x_k, att.x_v, att.x_w, att.x_a, att.x_g], 1e-5)
        xr, xk, xv, xw, xa, xg = mixed.unbind(0)
        act = [Epilogue.NONE] * 3 + [Epilogue.TANH, Epilogue.NONE, Epilogue.SIGMOID, Epilogue.NONE][: len(downs)]
        r, k, v, *hidden = self._matvec([xr, xk, xv, xw, xa, xg, xv][: 3 + len(downs)], [att.receptance, att.key, att.value, *downs], act)
        w_lora, a_lora, g, *v_lora = self._matvec(hidden, ups)
        v_first = v_first.reshape(B, C).contiguous() if residual else v
        y, kv = ops.wkv7_decode(
            state.att_kv, r, k, v, w_lora, a_lora, v_lora[0] if residual else None, g,
            att.w0, att.a0, att.v0, att.k_k, att.k_a, att.r_k, att.ln_x_weight, att.ln_x_bias, v_first, GROUP_NORM_EPS,
        )  # fmt: skip
        x = self._matvec([y], [att.output], residual=x)[0]
        ffn_x, mixed = ops.ln_mix(x, weights.ln2_weight, weights.ln2_bias, state.ffn_x_prev, [ffn.x_k], 1e-5)
        hidden = self._matvec([mixed[0]], [ffn.key], [Epilogue.RELU_SQUARE])[0]
        x = self._matvec([hidden], [ffn.value], residual=x)[0]
        return x.view(B, 1, C), v_first.view(B, 1, C), LayerState(att_x, kv, ffn_x)

    def _lora_factors(self, att: TimeMixWeights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The LoRA factors as matvec reads them, ``[out, in]``, in the order decay, in-context rate,
        gate, value residual (absent in layer 0): down-projections ``[R, C]`` and up-projections
        ``[C, R]``, the rank zero-padded to a multiple of LORA_ALIGN (padded rows of a down factor
        meet zero columns of its up factor, so they add nothing). Built once per layer (a second
        copy of the small LoRA weights) and keyed by the resident ``w1`` tensor, kept alive in the
        entry so its id is never reused; streamed layers, rebuilt per call, hit the same entry."""
        entry = self._loras.get(id(att.w1))
        if entry is None:
            downs, ups = [], []
            for first, second in [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2), (att.v1, att.v2)]:
                if first is None:
                    continue
                rank = -(-first.shape[1] // LORA_ALIGN) * LORA_ALIGN
                downs.append(F.pad(first.t(), (0, 0, 0, rank - first.shape[1])).contiguous())
                ups.append(F.pad(second.t(), (0, rank - first.shape[1])).contiguous())
            entry = self._loras[id(att.w1)] = (att.w1, downs, ups)
        return entry[1], entry[2]

    def wkv(self, kv, r, decay, k, v, kk, a):
        if r.shape[-1] != HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        return self.ops.wkv7(*(t.contiguous() for t in (kv, r, decay, k, v, kk, a)))


@hookimpl
def register_backends(register) -> None:
    register(CudaBackend)
