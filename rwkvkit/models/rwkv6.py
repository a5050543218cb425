"""RWKV-6 "x060" (Finch): the block's sequence, written once over a backend's ops.

Shapes: B batch, T tokens, C = H*N channels (H heads of size N), R the mix LoRA rank. Differences
from RWKV-5: data-dependent token shift (a LoRA per mixed input, ``time_maa_w1/w2``) and a
data-dependent decay per token (``time_decay + tanh(x w1) w2``). Constants are the reference's:
LayerNorm eps 1e-5, the GroupNorm ``ln_x`` eps 64e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from rwkvkit.architecture import Loader, check_tensors, n_layers, shape2d
from rwkvkit.backend import Backend, Epilogue, Role
from rwkvkit.checkpoint import WeightSource
from rwkvkit.errors import CheckpointError
from rwkvkit.models import gated_ffn
from rwkvkit.models.gated_ffn import GROUP_NORM_EPS, LN_EPS, ChannelMixWeights
from rwkvkit.state import LayerState, StateField, StateLayout
from rwkvkit.weights import derived, group, weight

MIXES = ("w", "k", "v", "r", "g")  # the order of time_maa_w2's five LoRA outputs


@dataclass(frozen=True)
class HeadedSpec:
    """The dimensions RWKV-5 and RWKV-6 share (each spec adds its own after them, then ``version``)."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    dim_ffn: int


@dataclass(frozen=True)
class Rwkv6Spec(HeadedSpec):
    architecture: ClassVar[str] = "rwkv6"
    lora_mix: int  # rank of each token-shift LoRA (time_maa_w1 is [C, 5 * lora_mix])
    lora_decay: int  # rank of the decay LoRA
    version: int = 6


@dataclass
class TimeMixWeights:
    maa_x: torch.Tensor = weight("time_maa_x", Role.VECTOR)  # the mix feeding the mix LoRA
    maa_w: torch.Tensor = weight("time_maa_w", Role.VECTOR)
    maa_k: torch.Tensor = weight("time_maa_k", Role.VECTOR)
    maa_v: torch.Tensor = weight("time_maa_v", Role.VECTOR)
    maa_r: torch.Tensor = weight("time_maa_r", Role.VECTOR)
    maa_g: torch.Tensor = weight("time_maa_g", Role.VECTOR)
    decay: torch.Tensor = weight("time_decay", Role.VECTOR_F32)  # log-log decay base [C]
    decay_w1: torch.Tensor = weight("time_decay_w1", Role.LORA_IN)
    decay_w2: torch.Tensor = weight("time_decay_w2", Role.LORA_OUT)
    bonus: torch.Tensor = weight("time_faaaa", Role.VECTOR_F32)  # u [H*N]
    receptance: Any = weight("receptance.weight", Role.MATRIX)
    key: Any = weight("key.weight", Role.MATRIX)
    value: Any = weight("value.weight", Role.MATRIX)
    gate: Any = weight("gate.weight", Role.MATRIX)
    output: Any = weight("output.weight", Role.MATRIX)
    ln_x_weight: torch.Tensor = weight("ln_x.weight", Role.VECTOR_F32)  # the GroupNorm runs in float32
    ln_x_bias: torch.Tensor = weight("ln_x.bias", Role.VECTOR_F32)
    maa_down: tuple = derived(Role.LORA_IN)  # time_maa_w1 [C, 5R] as five [C, R] factors (w, k, v, r, g)
    maa_up: tuple = derived(Role.LORA_OUT)  # time_maa_w2 [5, R, C] as five [R, C]


@dataclass
class BlockWeights(gated_ffn.NormWeights):
    att: TimeMixWeights = group("att.", TimeMixWeights)
    ffn: ChannelMixWeights = group("ffn.", ChannelMixWeights)
    halve_after: bool = False  # fp16: halve the residual stream after this block (gated_ffn.RESCALE_LAYER)


def wkv_tail(ops: Backend, att: Any, s: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5/6 after the projections: the scan, GroupNorm (float32), the SiLU gate and the output
    projection with its residual. ``decay [B, T, C]`` float32. Returns ``(x + out, new s)``."""
    B, T, C = r.shape
    H, N = s.shape[1], s.shape[2]
    heads = (B, T, H, N)
    y, s = ops.wkv6(s, r.view(heads), k.view(heads), v.view(heads), decay.view(heads), att.bonus)
    y = ops.group_norm(y, H, att.ln_x_weight, att.ln_x_bias, GROUP_NORM_EPS)
    (x,) = ops.project([y.to(x.dtype) * F.silu(g)], [att.output], residual=x)
    return x, s


def time_mix(ops: Backend, w: BlockWeights, x: torch.Tensor, s: LayerState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(x + out, new x_prev, new kv)``."""
    att = w.att
    xx = ops.layer_norm(x, w.ln1_weight, w.ln1_bias, LN_EPS)
    dx = torch.cat((s.att_x_prev.unsqueeze(1), xx[:, :-1]), dim=1) - xx  # previous token minus this one
    xxx = torch.addcmul(xx, dx, att.maa_x)
    lora = ops.lora([xxx] * len(MIXES), [(down, up, Epilogue.TANH) for down, up in zip(att.maa_down, att.maa_up)])
    xw, xk, xv, xr, xg = (torch.addcmul(xx, dx, base + m) for base, m in zip((att.maa_w, att.maa_k, att.maa_v, att.maa_r, att.maa_g), lora))
    r, k, v, g = ops.project([xr, xk, xv, xg], [att.receptance, att.key, att.value, att.gate])
    (w_lora,) = ops.lora([xw], [(att.decay_w1, att.decay_w2, Epilogue.TANH)])
    decay = torch.exp(-torch.exp(att.decay + w_lora.float()))
    x, kv = wkv_tail(ops, att, s.att_kv, r, k, v, decay, g, x)
    return x, xx[:, -1], kv


def halve(x: torch.Tensor, w: Any) -> torch.Tensor:
    return x / 2 if w.halve_after else x


def block(ops: Backend, w: BlockWeights, x: torch.Tensor, carry: Any, s: LayerState) -> tuple[torch.Tensor, Any, LayerState]:
    x, att_x_prev, att_kv = time_mix(ops, w, x, s)
    x, ffn_x_prev = gated_ffn.channel_mix(ops, w.ln2_weight, w.ln2_bias, w.ffn, x, s.ffn_x_prev)
    return halve(x, w), carry, LayerState(att_x_prev, att_kv, ffn_x_prev)


def split_lora(fetch: Loader, key_down: str, key_up: str, parts: int) -> tuple[tuple, tuple]:
    """A packed LoRA (``down [C, parts*R]``, ``up [parts, R, C]``) as ``parts`` ordinary pairs."""
    down, up = fetch.tensors[key_down], fetch.tensors[key_up]
    rank = down.shape[1] // parts
    downs = tuple(fetch.source(WeightSource(key_down, down, _columns(i * rank, (i + 1) * rank), f"columns {i * rank}:{(i + 1) * rank}"), Role.LORA_IN) for i in range(parts))
    ups = tuple(fetch.source(WeightSource(key_up, up[i], None, f"[{i}]"), Role.LORA_OUT) for i in range(parts))
    return downs, ups


def _columns(start: int, stop: int):
    return lambda rows: rows[:, start:stop]


class Rwkv6(gated_ffn.GatedFfnArchitecture):
    name = "rwkv6"
    version = "x060"
    block_weights = BlockWeights
    block = staticmethod(block)
    title = "RWKV-6 (Finch)"

    def claims(self, keys: set[str]) -> bool:
        return "blocks.0.att.time_maa_x" in keys

    def spec(self, t: Mapping[str, torch.Tensor]) -> Rwkv6Spec:
        vocab, C, dim_ffn = gated_ffn.common_shapes(t)
        H, N = shape2d(t, "blocks.0.att.time_faaaa", "n_head, head_size")
        if H * N != C:
            raise CheckpointError(f"key 'blocks.0.att.time_faaaa' has shape {[H, N]}; expected [n_head, head_size] with product {C}")
        mix = shape2d(t, "blocks.0.att.time_maa_w1", "n_embd, 5 * rank")[1]
        if mix % len(MIXES):
            raise CheckpointError(f"key 'blocks.0.att.time_maa_w1' has {mix} columns; expected 5 * rank (one LoRA per mixed input)")
        decay = shape2d(t, "blocks.0.att.time_decay_w1", "n_embd, rank")[1]
        spec = Rwkv6Spec(n_layers(t), C, H, N, vocab, dim_ffn, mix // len(MIXES), decay)
        check_tensors(t, self.expected_shapes(spec), (), "an RWKV-6 variant rwkvkit does not run")
        return spec

    def expected_shapes(self, spec: Rwkv6Spec) -> dict[str, tuple[int, ...]]:
        C, H, N, R, D = spec.n_embd, spec.n_head, spec.head_size, spec.lora_mix, spec.lora_decay
        vec = (1, 1, C)
        shapes = gated_ffn.outer_shapes(spec.vocab_size, C)
        for i in range(spec.n_layer):
            p = f"blocks.{i}."
            shapes.update(gated_ffn.block_shapes(p, C, spec.dim_ffn, ("receptance", "key", "value", "gate", "output")))
            for name in ("x", *MIXES):
                shapes[f"{p}att.time_maa_{name}"] = vec
            shapes[f"{p}att.time_maa_w1"] = (C, len(MIXES) * R)
            shapes[f"{p}att.time_maa_w2"] = (len(MIXES), R, C)
            shapes[f"{p}att.time_decay"] = vec
            shapes[f"{p}att.time_decay_w1"] = (C, D)
            shapes[f"{p}att.time_decay_w2"] = (D, C)
            shapes[f"{p}att.time_faaaa"] = (H, N)
            shapes[f"{p}att.ln_x.weight"] = (C,)
            shapes[f"{p}att.ln_x.bias"] = (C,)
            shapes[f"{p}ffn.time_maa_k"] = vec
            shapes[f"{p}ffn.time_maa_r"] = vec
        return shapes

    def state_layout(self, spec: Any) -> StateLayout:
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        return StateLayout(LayerState, (StateField("att_x_prev", (C,)), StateField("att_kv", (H, N, N), float32=True), StateField("ffn_x_prev", (C,))))

    def load_block(self, spec: Rwkv6Spec, layer: int, fetch: Loader) -> BlockWeights:
        b = super().load_block(spec, layer, fetch)
        p = f"blocks.{layer}.att."
        b.att.maa_down, b.att.maa_up = split_lora(fetch, p + "time_maa_w1", p + "time_maa_w2", len(MIXES))
        return b
