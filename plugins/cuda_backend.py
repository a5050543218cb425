"""The ``cuda`` backend: rwkvkit's own CUDA kernels (``kernels/``) for the WKV-7 scan and int8 weights.

Everything else is the ``torch`` backend's code on the GPU (cuBLAS linears, torch norms). The
kernels are built on first use (``rwkvkit.kernels_build``), never at import; where they cannot be
built, ``unavailable_reason`` says why and backend ``auto`` falls back to ``torch``.

With ``cuda fp16i8`` (``Placement.quant == "i8"``) every projection matrix is stored as int8 with
per-output-channel scales: decoding (≤ 8 rows) streams the int8 weights through ``int8_matvec``;
prefill dequantizes a matrix per call and runs a cuBLAS GEMM, which is compute-bound anyway.

Decoding (one token per sequence) is launch-bound on a GPU: the unfused block is ~60 kernels. The
``block`` hook runs it as ~15 instead (``kernels/decode.cu``): a fused layer norm + token-shift
mixes, the projections, the four LoRAs as two batched products over zero-padded stacked factors,
one kernel for everything between the projections and the output (decay, kk, the state update,
GroupNorm, bonus, gate), and residual adds folded into the output GEMMs where cuBLAS allows.
"""

from __future__ import annotations

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


class CudaBackend(TorchBackend):
    name = "cuda"

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.device.type != "cuda":
            return f"runs CUDA placements only (e.g. 'cuda fp16', 'cuda fp16i8'), not {placement.device.type}"
        return Backend.unavailable_reason(placement) or kernels_build.build_error()

    def __init__(self, placement: Placement) -> None:
        super().__init__(placement)
        self.ops = kernels_build.ops()
        self._loras: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id(w1) -> (w1, down, up)

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

    def block(self, weights: BlockWeights, x: torch.Tensor, v_first: torch.Tensor | None, state: LayerState):
        B, T, C = x.shape
        if T != 1 or C != state.att_kv.shape[1] * HEAD_SIZE:
            return super().block(weights, x, v_first, state)
        att, ffn, ops = weights.att, weights.ffn, self.ops
        x = x.reshape(B, C).contiguous()
        state = LayerState(*(t.contiguous() for t in state.tensors()))
        att_x, mixed = ops.ln_mix(x, weights.ln1_weight, weights.ln1_bias, state.att_x_prev, [att.x_w, att.x_a, att.x_v, att.x_g, att.x_r, att.x_k], 1e-5)
        r, k, v = self.linear(mixed[4], att.receptance), self.linear(mixed[5], att.key), self.linear(mixed[2], att.value)
        down, up = self._stacked_lora(att)
        hidden = torch.bmm(mixed[:4], down)  # [4, B, R]: decay, in-context rate, value residual, gate
        ops.lora_activate_(hidden)
        lora = torch.bmm(hidden, up)  # [4, B, C]
        v_first = v if att.v0 is None else v_first.view(B, C)
        y, kv = ops.wkv7_decode(state.att_kv, r, k, v, lora, att.w0, att.a0, att.v0, att.k_k, att.k_a, att.r_k, att.ln_x_weight, att.ln_x_bias, v_first, GROUP_NORM_EPS)
        x = self._linear_add(x, y, att.output, in_place=False)  # x is the caller's
        ffn_x, mixed = ops.ln_mix(x, weights.ln2_weight, weights.ln2_bias, state.ffn_x_prev, [ffn.x_k], 1e-5)
        hidden = self.linear(mixed[0], ffn.key)
        ops.relu_square_(hidden)
        x = self._linear_add(x, hidden, ffn.value, in_place=True)
        return x.view(B, 1, C), v_first.view(B, 1, C), LayerState(att_x, kv, ffn_x)

    def _linear_add(self, x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor | Int8Weight, in_place: bool) -> torch.Tensor:
        """``x + linear(inp, weight)``; cuBLAS adds in its epilogue (beta = 1) when x may be overwritten."""
        if isinstance(weight, Int8Weight):
            out = self.linear(inp, weight)
            return x.add_(out) if in_place else out.add_(x)
        return x.addmm_(inp, weight.t()) if in_place else torch.addmm(x, inp, weight.t())

    def _stacked_lora(self, att: TimeMixWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """The four LoRA factor pairs stacked as ``down [4, C, R]`` and ``up [4, R, C]`` (zero-padded
        to the largest rank R; layer 0's unused value LoRA stays zero), built once per layer. Keyed
        by the resident ``w1`` tensor (kept alive in the entry, so its id is never reused), which
        also serves streamed layers, whose weights objects are rebuilt on every call."""
        entry = self._loras.get(id(att.w1))
        if entry is None:
            pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)]
            C, rank = att.w1.shape[0], max(first.shape[1] for first, _ in pairs if first is not None)
            down = att.w1.new_zeros(4, C, rank)
            up = att.w1.new_zeros(4, rank, C)
            for i, (first, second) in enumerate(pairs):
                if first is not None:
                    down[i, :, : first.shape[1]] = first
                    up[i, : first.shape[1]] = second
            entry = self._loras[id(att.w1)] = (att.w1, down, up)
        return entry[1], entry[2]

    def wkv(self, kv, r, decay, k, v, kk, a):
        if r.shape[-1] != HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        return self.ops.wkv7(*(t.contiguous() for t in (kv, r, decay, k, v, kk, a)))


@hookimpl
def register_backends(register) -> None:
    register(CudaBackend)
