"""RWKV-4 (Pile, Raven, World): the block's sequence, written once over a backend's ops.

The time mix is a per-channel WKV (``wkv4``): a decayed weighted average of past values, with the
state kept as ``aa, bb`` scaled by ``exp(-pp)`` (``pp`` the largest exponent so far), so nothing
overflows. A fresh state starts at ``pp = -1e30``, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from rwkvkit.architecture import check_tensors, n_layers
from rwkvkit.backend import Backend, Epilogue, Role
from rwkvkit.models import gated_ffn, rwkv6
from rwkvkit.models.gated_ffn import COMPLEMENT, LN_EPS, ChannelMixWeights45
from rwkvkit.state import LayerTensors, StateField, StateLayout
from rwkvkit.weights import group, weight

PP_START = -1e30  # the running maximum exponent of a fresh state: "no past yet"


@dataclass(frozen=True)
class Rwkv4Spec:
    architecture: ClassVar[str] = "rwkv4"
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    version: int = 4


@dataclass
class Rwkv4LayerState(LayerTensors):
    att_xx: torch.Tensor  # [B, C] last input of time mixing (activation dtype)
    aa: torch.Tensor  # [B, C] float32: sum of e^k v over the past, scaled by e^-pp
    bb: torch.Tensor  # [B, C] float32: sum of e^k, scaled by e^-pp
    pp: torch.Tensor  # [B, C] float32: the exponent both are scaled by
    ffn_xx: torch.Tensor  # [B, C] last input of channel mixing (activation dtype)


@dataclass
class TimeMixWeights:
    mix_k: torch.Tensor = weight("time_mix_k", Role.VECTOR, transform=COMPLEMENT)
    mix_v: torch.Tensor = weight("time_mix_v", Role.VECTOR, transform=COMPLEMENT)
    mix_r: torch.Tensor = weight("time_mix_r", Role.VECTOR, transform=COMPLEMENT)
    decay: torch.Tensor = weight("time_decay", Role.VECTOR_F32, transform=("-exp(w)", lambda w: -torch.exp(w.float())))
    bonus: torch.Tensor = weight("time_first", Role.VECTOR_F32)
    receptance: Any = weight("receptance.weight", Role.MATRIX)
    key: Any = weight("key.weight", Role.MATRIX)
    value: Any = weight("value.weight", Role.MATRIX)
    output: Any = weight("output.weight", Role.MATRIX)


@dataclass
class BlockWeights(gated_ffn.NormWeights):
    att: TimeMixWeights = group("att.", TimeMixWeights)
    ffn: ChannelMixWeights45 = group("ffn.", ChannelMixWeights45)
    halve_after: bool = False  # fp16: halve the residual stream after this block


def block(ops: Backend, w: BlockWeights, x: torch.Tensor, carry: Any, s: Rwkv4LayerState) -> tuple[torch.Tensor, Any, Rwkv4LayerState]:
    att = w.att
    att_xx, (xk, xv, xr) = ops.ln_mix(x, w.ln1_weight, w.ln1_bias, s.att_xx, [att.mix_k, att.mix_v, att.mix_r], LN_EPS)
    r, k, v = ops.project([xr, xk, xv], [att.receptance, att.key, att.value], [Epilogue.SIGMOID, Epilogue.NONE, Epilogue.NONE])
    y, aa, bb, pp = ops.wkv4(s.aa, s.bb, s.pp, k.float(), v.float(), att.decay, att.bonus)
    (x,) = ops.project([r * y.to(r.dtype)], [att.output], residual=x)
    x, ffn_xx = gated_ffn.channel_mix(ops, w.ln2_weight, w.ln2_bias, w.ffn, x, s.ffn_xx)
    return rwkv6.halve(x, w), carry, Rwkv4LayerState(att_xx, aa, bb, pp, ffn_xx)


class Rwkv4(gated_ffn.GatedFfnArchitecture):
    name = "rwkv4"
    version = "v4"
    block_weights = BlockWeights
    block = staticmethod(block)
    title = "RWKV-4"

    def claims(self, keys: set[str]) -> bool:
        return "blocks.0.att.time_first" in keys and "blocks.0.att.ln_x.weight" not in keys

    def spec(self, t: Mapping[str, torch.Tensor]) -> Rwkv4Spec:
        vocab, C, dim_ffn = gated_ffn.common_shapes(t)
        spec = Rwkv4Spec(n_layers(t), C, vocab, dim_ffn)
        check_tensors(t, self.expected_shapes(spec), (), "an RWKV-4 variant rwkvkit does not run")
        return spec

    def expected_shapes(self, spec: Rwkv4Spec) -> dict[str, tuple[int, ...]]:
        C = spec.n_embd
        vec = (1, 1, C)
        shapes = gated_ffn.outer_shapes(spec.vocab_size, C)
        for i in range(spec.n_layer):
            p = f"blocks.{i}."
            shapes.update(gated_ffn.block_shapes(p, C, spec.dim_ffn, ("receptance", "key", "value", "output")))
            for name in ("k", "v", "r"):
                shapes[f"{p}att.time_mix_{name}"] = vec
            shapes[f"{p}att.time_decay"] = (C,)
            shapes[f"{p}att.time_first"] = (C,)
            shapes[f"{p}ffn.time_mix_k"] = vec
            shapes[f"{p}ffn.time_mix_r"] = vec
        return shapes

    def state_layout(self, spec: Rwkv4Spec) -> StateLayout:
        C = spec.n_embd
        return StateLayout(
            Rwkv4LayerState,
            (StateField("att_xx", (C,)), StateField("aa", (C,), True), StateField("bb", (C,), True), StateField("pp", (C,), True, PP_START), StateField("ffn_xx", (C,))),
        )
