"""RWKV-5.2 "x052" (Eagle, the World models): RWKV-6's block with a static token shift and one
decay per channel for every token, written over the same ops (``wkv6`` with the decay expanded).

RWKV-5.0 and 5.1 files (one decay per head; 5.0 without a gate) are recognised and refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from rwkvkit.architecture import check_tensors, n_layers, shape2d
from rwkvkit.backend import Backend, Role
from rwkvkit.errors import CheckpointError
from rwkvkit.models import gated_ffn, rwkv6
from rwkvkit.models.gated_ffn import COMPLEMENT, LN_EPS, ChannelMixWeights45
from rwkvkit.state import LayerState, StateLayout
from rwkvkit.weights import group, weight


@dataclass(frozen=True)
class Rwkv5Spec(rwkv6.HeadedSpec):
    architecture: ClassVar[str] = "rwkv5"
    version: float = 5.2


@dataclass
class TimeMixWeights:
    mix_k: torch.Tensor = weight("time_mix_k", Role.VECTOR, transform=COMPLEMENT)
    mix_v: torch.Tensor = weight("time_mix_v", Role.VECTOR, transform=COMPLEMENT)
    mix_r: torch.Tensor = weight("time_mix_r", Role.VECTOR, transform=COMPLEMENT)
    mix_g: torch.Tensor = weight("time_mix_g", Role.VECTOR, transform=COMPLEMENT)
    decay: torch.Tensor = weight("time_decay", Role.VECTOR_F32, transform=("exp(-exp(w))", lambda w: torch.exp(-torch.exp(w.float()))))
    bonus: torch.Tensor = weight("time_faaaa", Role.VECTOR_F32)
    receptance: Any = weight("receptance.weight", Role.MATRIX)
    key: Any = weight("key.weight", Role.MATRIX)
    value: Any = weight("value.weight", Role.MATRIX)
    gate: Any = weight("gate.weight", Role.MATRIX)
    output: Any = weight("output.weight", Role.MATRIX)
    ln_x_weight: torch.Tensor = weight("ln_x.weight", Role.VECTOR_F32)
    ln_x_bias: torch.Tensor = weight("ln_x.bias", Role.VECTOR_F32)


@dataclass
class BlockWeights(gated_ffn.NormWeights):
    att: TimeMixWeights = group("att.", TimeMixWeights)
    ffn: ChannelMixWeights45 = group("ffn.", ChannelMixWeights45)
    halve_after: bool = False  # fp16: halve the residual stream after this block


def time_mix(ops: Backend, w: BlockWeights, x: torch.Tensor, s: LayerState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(x + out, new x_prev, new kv)``."""
    att = w.att
    x_prev, (xk, xv, xr, xg) = ops.ln_mix(x, w.ln1_weight, w.ln1_bias, s.att_x_prev, [att.mix_k, att.mix_v, att.mix_r, att.mix_g], LN_EPS)
    r, k, v, g = ops.project([xr, xk, xv, xg], [att.receptance, att.key, att.value, att.gate])
    decay = att.decay.expand(*r.shape)  # the same decay for every token
    x, kv = rwkv6.wkv_tail(ops, att, s.att_kv, r, k, v, decay, g, x)
    return x, x_prev, kv


def block(ops: Backend, w: BlockWeights, x: torch.Tensor, carry: Any, s: LayerState) -> tuple[torch.Tensor, Any, LayerState]:
    x, att_x_prev, att_kv = time_mix(ops, w, x, s)
    x, ffn_x_prev = gated_ffn.channel_mix(ops, w.ln2_weight, w.ln2_bias, w.ffn, x, s.ffn_x_prev)
    return rwkv6.halve(x, w), carry, LayerState(att_x_prev, att_kv, ffn_x_prev)


class Rwkv5(gated_ffn.GatedFfnArchitecture):
    name = "rwkv5"
    version = "x052"
    block_weights = BlockWeights
    block = staticmethod(block)
    title = "RWKV-5.2 (Eagle)"

    def claims(self, keys: set[str]) -> bool:
        newer = ("blocks.0.att.time_maa_x", "blocks.0.att.r_k", "blocks.0.att.x_r")
        return ("blocks.0.att.ln_x.weight" in keys or "blocks.0.att.time_faaaa" in keys) and not any(k in keys for k in newer)

    def spec(self, t: Mapping[str, torch.Tensor]) -> Rwkv5Spec:
        decay = t.get("blocks.0.att.time_decay")
        if decay is not None and decay.dim() == 1 or "blocks.0.att.gate.weight" not in t:
            raise CheckpointError("an RWKV-5.0/5.1 file (one decay per head, or no gate): rwkvkit runs RWKV-5.2 'x052' (the World models) only")
        vocab, C, dim_ffn = gated_ffn.common_shapes(t)
        H, N = shape2d(t, "blocks.0.att.time_faaaa", "n_head, head_size")
        if H * N != C:
            raise CheckpointError(f"key 'blocks.0.att.time_faaaa' has shape {[H, N]}; expected [n_head, head_size] with product {C}")
        spec = Rwkv5Spec(n_layers(t), C, H, N, vocab, dim_ffn)
        check_tensors(t, self.expected_shapes(spec), (), "an RWKV-5 variant rwkvkit does not run")
        return spec

    def expected_shapes(self, spec: Rwkv5Spec) -> dict[str, tuple[int, ...]]:
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        vec = (1, 1, C)
        shapes = gated_ffn.outer_shapes(spec.vocab_size, C)
        for i in range(spec.n_layer):
            p = f"blocks.{i}."
            shapes.update(gated_ffn.block_shapes(p, C, spec.dim_ffn, ("receptance", "key", "value", "gate", "output")))
            for name in ("k", "v", "r", "g"):
                shapes[f"{p}att.time_mix_{name}"] = vec
            shapes[f"{p}att.time_decay"] = (H, N)
            shapes[f"{p}att.time_faaaa"] = (H, N)
            shapes[f"{p}att.ln_x.weight"] = (C,)
            shapes[f"{p}att.ln_x.bias"] = (C,)
            shapes[f"{p}ffn.time_mix_k"] = vec
            shapes[f"{p}ffn.time_mix_r"] = vec
        return shapes

    def state_layout(self, spec: Rwkv5Spec) -> StateLayout:
        return rwkv6.Rwkv6().state_layout(spec)
