"""The ``cpu`` backend: the torch backend's ops, made fast with CPU kernels (:mod:`rwkvkit.native.cpu`).

- ``ln_mix`` and ``time_mix_core`` (any batch and token count): native kernels in fp32 inside,
  instead of ~50 torch ops that each read and wrote whole [T, C] tensors.
- ``project``, ``lora`` and ``linear`` for one row per sequence (decode ``[B, 1, C]``, the head's
  ``[B, C]``), up to :attr:`CpuBackend.native_rows` rows: kernels that read each weight once per
  step, in its stored format (fp32 AVX512, AVX512-BF16 ``vdpbf16ps``, int8 VNNI), for all B rows,
  each row's sums formed exactly as for a lone row, so a sequence's result does not depend on its
  batch. One row is bound by memory bandwidth, and torch's bf16 GEMV is compute-bound here (see
  shared/PERF_NOTES.md). For more rows, and a sequence's many rows (prefill): GEMMs through oneDNN
  (AVX512-BF16 for bf16; faster than MKL's sgemm here for fp32) and a native relu².
- ``fused_stage`` for one token per sequence (up to ``native_rows`` of them): a stage's blocks in
  one native call composed of the same kernels, instead of ~10 op calls per layer from Python.
- ``wkv``: a C++ scan over all T tokens, for heads ``time_mix_core``'s kernel cannot take.
Each op falls back to the torch default for shapes and dtypes its kernels do not take. Threads
follow ``torch.get_num_threads()`` (the strategy's ``threads`` option sets it); decode results do
not depend on the count. Where the kernels cannot be built (no compiler) the backend warns once
and runs the torch backend's ops.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from rwkvkit.backend import Epilogue, project_epilogues
from rwkvkit.checkpoint import ModelSpec
from rwkvkit.hookspecs import hookimpl
from rwkvkit.errors import InputError
from rwkvkit.models import rwkv7
from rwkvkit.models.rwkv7 import BlockWeights, Constants, HeadWeights, TimeMixWeights
from rwkvkit.native import cpu
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.state import LayerState
from rwkvkit.strategy import Placement


def _native(first: torch.Tensor, *ts: torch.Tensor | None) -> bool:
    """Whether the kernels read these activations: CPU tensors, all fp32 or all bf16 (a plain
    loop: this runs several times per layer and token)."""
    dtype = first.dtype
    if dtype not in cpu.DTYPES or not first.is_cpu or cpu.library() is None:
        return False
    for t in ts:
        if t is not None and (t.dtype != dtype or not t.is_cpu):
            return False
    return True


class CpuBackend(TorchBackend):
    name = "cpu"
    priority = 20
    # Decoded rows per step up to which fp32/bf16 products (and the whole stage) run in the native
    # row kernels; beyond, oneDNN's GEMMs (and ~10 op calls per layer) win. Single-thread CPU time
    # of a 0.1B-shape step, native stage vs GEMMs: bf16 B = 8 / 16 / 32 / 64: 41 / 58 / 97 / 185 ms
    # vs 53 / 65 / 102 / 151; fp32: 61 / 89 / 147 / 266 vs 79 / 99 / 151 / 248. None: no limit.
    native_rows: ClassVar[int | None] = 32
    _plan: tuple[tuple[Any, Any, Any], cpu.DecodePlan | None] | None = None  # (what it was built from, the plan)

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        if placement.device.type != "cpu":
            return "runs on the CPU only"
        if placement.dtype not in cpu.DTYPES:
            return "runs fp32 and bf16 only (use bf16 rather than fp16 on a CPU)"
        return super().unavailable_reason(placement)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def _row_kernels(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether these inputs go to the native row kernels: one row per sequence, at most ``native_rows``."""
        return cpu.decoded(xs) and (self.native_rows is None or xs[0].numel() <= self.native_rows * xs[0].shape[-1])

    def prepare_block(self, weights: BlockWeights, spec: ModelSpec, constants: Constants) -> BlockWeights:
        """The block's weights plus their native layout for the decode stage
        (:class:`~rwkvkit.native.cpu.NativeBlockWeights`), built once here from the checkpoint's
        head layout and the architecture's constants; the weights as they are where it cannot run them."""
        if not isinstance(weights, BlockWeights) or cpu.library() is None or not cpu.head_fits(spec.head_size):
            return weights  # the native layout is RWKV-7's
        att, ffn = weights.att, weights.ffn
        if not all(map(cpu.takes_matrix, (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value))):
            return weights
        return cpu.NativeBlockWeights.wrap(weights, spec.n_head, spec.head_size, constants)

    def fused_stage(
        self, weights: Sequence[BlockWeights], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[LayerState]
    ) -> tuple[torch.Tensor, torch.Tensor, list[LayerState]] | None:
        layers = [getattr(w, "native", None) for w in weights]
        if x.dim() != 3 or x.shape[1] != 1 or not self._row_kernels([x]) or not layers or None in layers or not _native(x):
            return None
        return cpu.decode_stage(layers, x, v_first, states, self.placement.dtype, self.threads)

    def fused_decode(
        self, table: Any, weights: Sequence[BlockWeights], head: Any, ids: torch.Tensor, states: Sequence[LayerState]
    ) -> tuple[torch.Tensor, list[LayerState]] | None:
        plan = self._decode_plan(table, weights, head)
        if plan is None or not self._row_kernels([ids]):
            return None
        return plan(ids, states, self.threads)

    def _decode_plan(self, table: Any, weights: Sequence[BlockWeights], head: Any) -> cpu.DecodePlan | None:
        """The model's :class:`~rwkvkit.native.cpu.DecodePlan`, built on first use (None where the
        layers have no native layout or the head is not RWKV-7's layer norm and matrix), with the
        architecture's layer-norm epsilon as it is then (read, not copied at import: tests patch
        it). Kept with the objects it was built from: a stage's weights never change after loading."""
        key = (table, weights, head)
        if self._plan is not None and all(a is b for a, b in zip(self._plan[0], key)):
            return self._plan[1]
        layers = [getattr(w, "native", None) for w in weights]
        plan = None
        if cpu.library() is not None and layers and None not in layers and isinstance(head, HeadWeights) and cpu.takes_matrix(head.head) and layers[0].struct.C % 16 == 0:
            try:
                plan = cpu.DecodePlan(layers, table, head.ln_out_weight, head.ln_out_bias, rwkv7.LN_EPS, head.head, self.placement.dtype)
            except (TypeError, InputError):
                plan = None  # an embedding or head the native step does not read: the op-by-op path
        self._plan = (key, plan)
        return plan

    def ln_mix(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_prev: torch.Tensor, mixes: Sequence[torch.Tensor], eps: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not _native(x) or x.shape[-1] % 16:
            return super().ln_mix(x, weight, bias, x_prev, mixes, eps)
        return cpu.ln_mix(x, weight, bias, x_prev, mixes, eps, self.threads)

    def project(
        self, xs: Sequence[torch.Tensor], weights: Sequence[Any], epilogues: Sequence[Epilogue] | None = None, residual: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        epilogues = project_epilogues(xs, epilogues, residual)
        if not _native(*xs):
            return super().project(xs, weights, epilogues, residual)
        if self._row_kernels(xs) and all(map(cpu.takes_matrix, weights)):
            return cpu.project(xs, weights, epilogues, residual, self.threads)
        ys = [self._activate(self.linear(x, w), e) for x, w, e in zip(xs, weights, epilogues)]
        return ys if residual is None else [ys[0].to(residual.dtype).add_(residual)]  # a fresh tensor: added in place

    @staticmethod
    def _activate(y: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        """The epilogue on a fresh GEMM output: relu² in place natively (one pass instead of two ops)."""
        return cpu.relu_square_(y) if epilogue is Epilogue.RELU_SQUARE and y.is_contiguous() else epilogue.apply(y)

    def lora(self, xs: Sequence[torch.Tensor], pairs: Sequence[tuple[torch.Tensor, torch.Tensor, Epilogue]]) -> list[torch.Tensor]:
        if not _native(*xs, *(t for first, second, _ in pairs for t in (first, second))):
            return super().lora(xs, pairs)
        if self._row_kernels(xs) and all(first.dim() == 2 and first.is_contiguous() and second.is_contiguous() for first, second, _ in pairs):
            return cpu.lora(xs, pairs, self.threads)
        return [cpu.lora_gemm(x, first, second, act) for x, (first, second, act) in zip(xs, pairs)]

    def time_mix_core(
        self, w: TimeMixWeights, kv: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_lora: torch.Tensor, a_lora: torch.Tensor,
        g: torch.Tensor, v_lora: torch.Tensor | None, v_first: torch.Tensor | None, c: Constants,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        args = (w, kv, r, k, v, w_lora, a_lora, g, v_lora, v_first, c)
        if not _native(r, k, v, w_lora, a_lora, g, v_lora, v_first) or not cpu.head_fits(kv.shape[-1]):
            return super().time_mix_core(*args)
        return cpu.time_mix_core(*args, self.threads)

    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        if not _native(x) or getattr(weight, "dtype", x.dtype) != x.dtype:
            return super().linear(x, weight)
        if self._row_kernels([x]) and cpu.takes_matrix(weight):
            return cpu.project([x], [weight], [Epilogue.NONE], None, self.threads)[0]
        return cpu.gemm(x, weight)

    def wkv(
        self, kv: torch.Tensor, r: torch.Tensor, decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu.library() is None or r.shape[-1] > cpu.MAX_HEAD_SIZE:
            return super().wkv(kv, r, decay, k, v, kk, a)
        y, state = cpu.wkv(kv, r, decay, k, v, kk, a, self.threads)
        return y.to(self.placement.dtype), state


@hookimpl
def register_backends(register) -> None:
    register(CpuBackend)
