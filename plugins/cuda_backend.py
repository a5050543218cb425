"""The ``cuda`` backend: rwkvkit's own CUDA kernels (``kernels/``) behind the backend ops.

Everything the kernels do not cover is the ``torch`` backend's code on the GPU (cuBLAS linears,
torch norms). The kernels are built on first use (``rwkvkit.kernels_build``), never at import;
where they cannot be built, ``unavailable_reason`` says why and backend ``auto`` falls back to ``torch``.

With ``cuda fp16i8`` (``Placement.quant == "i8"``) every projection matrix is stored as int8 with
per-output-channel scales: decoding (≤ 8 rows) streams the int8 weights through ``matvec``;
prefill dequantizes a matrix per call and runs a cuBLAS GEMM, which is compute-bound anyway.
The head (``linear``, V × C: the largest matrix) is one ``matvec`` launch of its own when decoding,
in every dtype; ``matvec`` picks its thread layout per shape (see ``kernels/matvec.cu``).

Decoding (one token per sequence) is launch-bound on a GPU: the ops' torch defaults are ~60
kernels per layer. The overrides here run a decoded layer (``rwkv7.block`` over these ops, the
one place the block is sequenced) as 9 launches (``kernels/decode.cu``, ``kernels/matvec.cu``):

1. ``ln_mix``: layer norm + the six token-shift mixes;
2. ``project``: receptance, key and value in one grouped matvec;
3. ``lora``: the four LoRA down-projections, their activations (tanh, sigmoid) as epilogues;
4. ``lora``: the four LoRA up-projections;
5. ``time_mix_core``: decay, kk, the state update, GroupNorm, bonus and gate (``wkv7_decode``);
6. ``project``: the output projection plus the residual;
7.–9. ``ln_mix``, the FFN key with relu² as epilogue, the FFN value plus the residual.

When this backend sequenced the block itself, receptance/key/value and the LoRA downs shared one
launch (8 per layer); with the contract's separate ``project`` and ``lora`` calls that is one
launch more per layer, the price of the block's sequence existing once. Matvec needs ≤ 8 rows,
≤ 8 products per launch and contiguous 16-byte-aligned inputs whose width is a multiple of 16;
other shapes take the torch defaults (prefill, wide batches). The kernels take and return the
ops' own ``[B, 1, n]`` token tensors, so the overrides add little Python per op: an eager decode
step of a small model pays for every microsecond of it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rwkvkit import kernels_build
from rwkvkit.backend import Epilogue, Role
from rwkvkit.hookspecs import hookimpl
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quant import Int8Weight, quantize_per_channel
from rwkvkit.strategy import Placement

# Limits of the kernels, mirrored from kernels/rwkvkit_cuda.h (a test reads them there).
HEAD_SIZE = 64  # kHeadSize: the scan kernels' head size; others use the torch scan
MAX_MATVEC_ROWS = 8  # kMaxMatvecRows: beyond it, cuBLAS (int8: dequantize + GEMM)
MAX_MATVEC_GROUP = 8  # kMaxMatvecGroup: products per matvec launch
MATVEC_TEAMS = (8, 32, 128)  # kMatvecTeams: threads per row matvec can be forced to (its `team` argument)
MAX_MIXES = 6  # kMaxMixes: mix vectors per ln_mix launch
LORA_ALIGN = 16  # LoRA ranks are zero-padded to this: matvec reads 16 bytes (8 fp16 values) per load
MATVEC_ALIGN = 16  # matvec loads 16 bytes at a time: inputs 16-byte aligned, widths a multiple of 16 values

LoraPair = tuple[torch.Tensor, torch.Tensor, Epilogue]


def lora_layout(factor: torch.Tensor, role: Role) -> torch.Tensor:
    """A LoRA factor as matvec reads it, ``[out, in]``: ``[in, rank]`` (``LORA_IN``) becomes
    ``[rank, in]`` and ``[rank, out]`` (``LORA_OUT``) ``[out, rank]``, the rank zero-padded to a
    multiple of LORA_ALIGN. Padding adds nothing: a padded down row gives ``act(0)``, which meets a
    zero column of the up factor."""
    rank_dim = 1 if role is Role.LORA_IN else 0
    pad = -factor.shape[rank_dim] % LORA_ALIGN
    return F.pad(factor, (0, pad) if rank_dim == 1 else (0, 0, 0, pad)).t().contiguous()


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

    def prepare(self, tensor: torch.Tensor, role: Role) -> torch.Tensor | Int8Weight:
        """Int8 matrices under ``i8``; LoRA factors laid out once for matvec (:func:`lora_layout`)."""
        if role is Role.MATRIX and self.placement.quant == "i8":
            return quantize_per_channel(tensor.to(self.placement.device, torch.float32))
        if role in (Role.LORA_IN, Role.LORA_OUT):
            return lora_layout(super().prepare(tensor, role), role)
        return super().prepare(tensor, role)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
        """matvec for decode shapes (the head); else cuBLAS (int8: on the dequantized weight)."""
        if self._matvec_takes([x]):
            return self._matvec([x], [weight])[0]
        return F.linear(x, weight.dequantize(x.dtype) if isinstance(weight, Int8Weight) else weight)

    def ln_mix(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_prev: torch.Tensor, mixes: Sequence[torch.Tensor], eps: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One kernel per decode step (any batch: one block per sequence); prefill takes the default."""
        if x.shape[1] != 1 or not 1 <= len(mixes) <= MAX_MIXES:
            return super().ln_mix(x, weight, bias, x_prev, mixes, eps)
        x_ln, mixed = self.ops.ln_mix(x.contiguous(), weight, bias, x_prev.contiguous(), mixes, eps)
        return x_ln, list(mixed.unbind(0))

    def project(
        self, xs: Sequence[torch.Tensor], weights: Sequence[Any], epilogues: Sequence[Epilogue] | None = None, residual: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """All products in one matvec launch (epilogues and the residual applied there) for decode shapes."""
        if not self._matvec_takes(xs, residual):
            return super().project(xs, weights, epilogues, residual)
        return self._matvec(xs, weights, epilogues, residual)

    def lora(self, xs: Sequence[torch.Tensor], pairs: Sequence[LoraPair]) -> list[torch.Tensor]:
        """Two matvec launches for decode shapes (every down-projection with its activation, then
        every up-projection); cuBLAS on the same prepared factors otherwise."""
        if not self._matvec_takes(xs):
            return [F.linear(act.apply(F.linear(x, down)), up) for x, (down, up, act) in zip(xs, pairs)]
        downs, ups, acts = zip(*pairs)
        return self._matvec(self._matvec(xs, downs, acts), ups)

    def time_mix_core(
        self, w: Any, kv: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_lora: torch.Tensor, a_lora: torch.Tensor,
        g: torch.Tensor, v_lora: torch.Tensor | None, v_first: torch.Tensor | None, c: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """One ``wkv7_decode`` launch for a decode step of head size 64, the constants from ``c``."""
        if r.shape[1] != 1 or kv.shape[-1] != HEAD_SIZE:
            return super().time_mix_core(w, kv, r, k, v, w_lora, a_lora, g, v_lora, v_first, c)
        residual = v_first is not None  # every layer but the first mixes in layer 0's values
        y, kv = self.ops.wkv7_decode(
            kv.contiguous(), r.contiguous(), k.contiguous(), v.contiguous(), w_lora.contiguous(), a_lora.contiguous(),
            v_lora.contiguous() if residual else None, g.contiguous(), w.w0, w.a0, w.v0 if residual else None, w.k_k, w.k_a, w.r_k,
            w.ln_x_weight, w.ln_x_bias, (v_first if residual else v).contiguous(), c.group_norm_eps, c.decay_scale, c.kk_eps,
        )  # fmt: skip
        return y, kv, v_first if residual else v

    def wkv(self, kv, r, decay, k, v, kk, a):
        if r.shape[-1] != HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        return self.ops.wkv7(*(t.contiguous() for t in (kv, r, decay, k, v, kk, a)))

    def _matvec_takes(self, xs: Sequence[torch.Tensor], residual: torch.Tensor | None = None) -> bool:
        """Whether matvec runs these inputs: 1 to MAX_MATVEC_GROUP products of 1 to MAX_MATVEC_ROWS
        rows, all of the same leading sizes, in the activation dtype, contiguous, 16-byte aligned,
        widths a multiple of 16 values (and a residual only for one product). Otherwise (prefill,
        wide batches, a view) the torch default runs. Written as a plain loop: it runs ~6 times per
        layer of a decode step, whose Python time is a visible share of an eager token."""
        if not 1 <= len(xs) <= MAX_MATVEC_GROUP:
            return False
        if residual is not None and (len(xs) != 1 or residual.dtype != self.placement.dtype or not residual.is_contiguous()):
            return False
        lead = xs[0].shape[:-1]
        if not 1 <= lead.numel() <= MAX_MATVEC_ROWS:
            return False
        for x in xs:
            if (
                x.shape[:-1] != lead or x.dtype != self.placement.dtype or x.shape[-1] % MATVEC_ALIGN
                or not x.is_contiguous() or x.data_ptr() % MATVEC_ALIGN
            ):  # fmt: skip
                return False
        return True

    def _matvec(
        self, xs: Sequence[torch.Tensor], weights: Sequence[Any], epilogues: Sequence[Epilogue] | None = None, residual: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[epilogue(x @ w.T) (+ residual)]`` for each pair, in one launch (inputs ``[..., in]``)."""
        ws = [w.q if isinstance(w, Int8Weight) else w for w in weights]
        scales = [w.scale if isinstance(w, Int8Weight) else self._no_scale for w in weights]
        return self.ops.matvec(xs, ws, scales, epilogues or [Epilogue.NONE] * len(xs), residual)

@hookimpl
def register_backends(register) -> None:
    register(CudaBackend)
