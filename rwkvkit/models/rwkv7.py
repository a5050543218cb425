"""RWKV-7 "x070" (Goose): the block's sequence and constants, written once over a backend's ops.

Shapes: B batch, T tokens, C = H*N channels (H heads of size N), V vocab. Every function handles
any T >= 1: T = 1 is decoding, T > 1 prefill; the only per-token work is inside the scan. What
each op computes is its plain-torch default in :class:`rwkvkit.backend.Backend`; the constants
below reach every backend as arguments (:func:`constants`), so a change here is a change
everywhere, native kernels included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from rwkvkit.architecture import Architecture, Loader, check_tensors, n_layers, shape2d
from rwkvkit.backend import Backend, Epilogue, Role
from rwkvkit.checkpoint import ModelSpec, WeightSource
from rwkvkit.errors import CheckpointError
from rwkvkit.state import LayerState, StateField, StateLayout
from rwkvkit.weights import group, load_weights
from rwkvkit.weights import weight as _w

LN_EPS = 1e-5  # ln0/ln1/ln2/ln_out
DECAY_SCALE = math.exp(-0.5)  # decay = exp(-e^-0.5 * sigmoid(z)): the soft clamp of log-decay below -0.5
GROUP_NORM_EPS = 64e-5  # ln_x eps used in training (note: not 1e-5)
KK_EPS = 1e-12  # F.normalize's floor on the removal key's norm
ATT_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # the token-shift mixes feeding r, decay, k, v, a, gate


@dataclass(frozen=True)
class Constants:
    """The architecture's constants as backends receive them (a native layer copies them at load)."""

    ln_eps: float
    group_norm_eps: float
    decay_scale: float
    kk_eps: float
    att_mixes: tuple[str, ...]


def constants() -> Constants:
    """The constants as this module defines them now."""
    return Constants(LN_EPS, GROUP_NORM_EPS, DECAY_SCALE, KK_EPS, ATT_MIXES)


@dataclass
class TimeMixWeights:
    x_r: torch.Tensor = _w("x_r", Role.VECTOR)  # token-shift mix per input
    x_w: torch.Tensor = _w("x_w", Role.VECTOR)
    x_k: torch.Tensor = _w("x_k", Role.VECTOR)
    x_v: torch.Tensor = _w("x_v", Role.VECTOR)
    x_a: torch.Tensor = _w("x_a", Role.VECTOR)
    x_g: torch.Tensor = _w("x_g", Role.VECTOR)
    w0: torch.Tensor = _w("w0", Role.VECTOR)  # decay: w0 + tanh(x w1) w2
    w1: torch.Tensor = _w("w1", Role.LORA_IN)
    w2: torch.Tensor = _w("w2", Role.LORA_OUT)
    a0: torch.Tensor = _w("a0", Role.VECTOR)  # in-context learning rate: sigmoid(a0 + x a1 a2)
    a1: torch.Tensor = _w("a1", Role.LORA_IN)
    a2: torch.Tensor = _w("a2", Role.LORA_OUT)
    v0: torch.Tensor | None = _w("v0", Role.VECTOR, optional=True)  # value residual (unused in layer 0)
    v1: torch.Tensor | None = _w("v1", Role.LORA_IN, optional=True)
    v2: torch.Tensor | None = _w("v2", Role.LORA_OUT, optional=True)
    g1: torch.Tensor = _w("g1", Role.LORA_IN)  # output gate: sigmoid(x g1) g2
    g2: torch.Tensor = _w("g2", Role.LORA_OUT)
    k_k: torch.Tensor = _w("k_k", Role.VECTOR)  # key scale for the removal key kk
    k_a: torch.Tensor = _w("k_a", Role.VECTOR)  # how much a scales the written key
    r_k: torch.Tensor = _w("r_k", Role.VECTOR)  # per-head "bonus" weights, flattened [H*N]
    receptance: Any = _w("receptance.weight", Role.MATRIX)
    key: Any = _w("key.weight", Role.MATRIX)
    value: Any = _w("value.weight", Role.MATRIX)
    output: Any = _w("output.weight", Role.MATRIX)
    ln_x_weight: torch.Tensor = _w("ln_x.weight", Role.VECTOR)
    ln_x_bias: torch.Tensor = _w("ln_x.bias", Role.VECTOR)


@dataclass
class ChannelMixWeights:
    x_k: torch.Tensor = _w("x_k", Role.VECTOR)
    key: Any = _w("key.weight", Role.MATRIX)  # [F, C]
    value: Any = _w("value.weight", Role.MATRIX)  # [C, F]


@dataclass
class BlockWeights:
    ln1_weight: torch.Tensor = _w("ln1.weight", Role.VECTOR)
    ln1_bias: torch.Tensor = _w("ln1.bias", Role.VECTOR)
    ln2_weight: torch.Tensor = _w("ln2.weight", Role.VECTOR)
    ln2_bias: torch.Tensor = _w("ln2.bias", Role.VECTOR)
    att: TimeMixWeights = group("att.", TimeMixWeights)
    ffn: ChannelMixWeights = group("ffn.", ChannelMixWeights)


@dataclass
class HeadWeights:
    ln_out_weight: torch.Tensor = _w("ln_out.weight", Role.VECTOR)
    ln_out_bias: torch.Tensor = _w("ln_out.bias", Role.VECTOR)
    head: Any = _w("head.weight", Role.MATRIX)  # [V, C]


def embed(emb: torch.Tensor, ln0_weight: torch.Tensor, ln0_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Fold block 0's ``ln0`` into the embedding table (done once, in float32, at load time)."""
    return F.layer_norm(emb.float(), (emb.shape[1],), ln0_weight.float().flatten(), ln0_bias.float().flatten(), eps)


def time_mix(
    ops: Backend, w: BlockWeights, x: torch.Tensor, s: LayerState, v_first: torch.Tensor | None, c: Constants
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-like mixing over time, with its residual. ``x [B,T,C]``, state ``x_prev [B,C]``,
    ``kv [B,H,N,N]``. Returns ``(x + out, new x_prev, new kv, v_first)``."""
    att = w.att
    x_prev, mixed = ops.ln_mix(x, w.ln1_weight, w.ln1_bias, s.att_x_prev, [getattr(att, m) for m in c.att_mixes], c.ln_eps)
    xr, xw, xk, xv, xa, xg = mixed
    r, k, v = ops.project([xr, xk, xv], [att.receptance, att.key, att.value])
    pairs = [(att.w1, att.w2, Epilogue.TANH), (att.a1, att.a2, Epilogue.NONE), (att.g1, att.g2, Epilogue.SIGMOID)]
    if v_first is not None:  # the value residual's mix (layers after the first)
        pairs.append((att.v1, att.v2, Epilogue.NONE))
    w_lora, a_lora, g, *v_lora = ops.lora([xw, xa, xg, xv][: len(pairs)], pairs)  # decay, rate, gate, residual
    y, kv, v_first = ops.time_mix_core(att, s.att_kv, r, k, v, w_lora, a_lora, g, v_lora[0] if v_lora else None, v_first, c)
    (x,) = ops.project([y], [att.output], residual=x)
    return x, x_prev, kv, v_first


def channel_mix(ops: Backend, w: BlockWeights, x: torch.Tensor, x_prev: torch.Tensor, c: Constants) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed-forward with token shift and squared ReLU, with its residual. Returns ``(x + out, new x_prev)``."""
    x_prev, (xk,) = ops.ln_mix(x, w.ln2_weight, w.ln2_bias, x_prev, [w.ffn.x_k], c.ln_eps)
    (hidden,) = ops.project([xk], [w.ffn.key], [Epilogue.RELU_SQUARE])
    (x,) = ops.project([hidden], [w.ffn.value], residual=x)
    return x, x_prev


def block(
    ops: Backend, w: BlockWeights, x: torch.Tensor, v_first: torch.Tensor | None, s: LayerState
) -> tuple[torch.Tensor, torch.Tensor, LayerState]:
    """One residual block; returns ``(x, v_first, new layer state)`` without touching ``s``."""
    c = constants()
    x, att_x_prev, att_kv, v_first = time_mix(ops, w, x, s, v_first, c)
    x, ffn_x_prev = channel_mix(ops, w, x, s.ffn_x_prev, c)
    return x, v_first, LayerState(att_x_prev, att_kv, ffn_x_prev)


def blocks(
    ops: Backend, weights: Sequence[BlockWeights], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[LayerState]
) -> tuple[torch.Tensor, torch.Tensor | None, list[LayerState]]:
    """A stage's blocks in order: the backend's fused stage where it has one, else :func:`block` on each."""
    fused = ops.fused_stage(weights, x, v_first, states)
    if fused is not None:
        return fused
    new_states = []
    for w, s in zip(weights, states):
        x, v_first, s = block(ops, w, x, v_first, s)
        new_states.append(s)
    return x, v_first, new_states


def head(ops: Backend, w: HeadWeights, x: torch.Tensor) -> torch.Tensor:
    """Final norm and vocabulary projection: ``[..., C] -> [..., V]``."""
    return ops.linear(ops.layer_norm(x, w.ln_out_weight, w.ln_out_bias, LN_EPS), w.head)


def spec_from_shapes(t: Mapping[str, torch.Tensor]) -> ModelSpec:
    vocab, n_embd = shape2d(t, "emb.weight", "vocab_size, n_embd")
    n_head, head_size = shape2d(t, "blocks.0.att.r_k", "n_head, head_size")
    if n_head * head_size != n_embd:
        raise CheckpointError(f"key 'blocks.0.att.r_k' has shape {[n_head, head_size]}; expected [n_head, head_size] with product {n_embd}")
    n_layer = n_layers(t)
    return ModelSpec(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_size=head_size,
        vocab_size=vocab,
        dim_ffn=shape2d(t, "blocks.0.ffn.key.weight", "dim_ffn, n_embd")[0],
        lora_w=shape2d(t, "blocks.0.att.w1", "n_embd, rank")[-1],
        lora_a=shape2d(t, "blocks.0.att.a1", "n_embd, rank")[-1],
        lora_v=shape2d(t, "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1", "n_embd, rank")[-1],
        lora_g=shape2d(t, "blocks.0.att.g1", "n_embd, rank")[-1],
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint with its shape, as real World model files store them."""
    C, V, F, H, N = spec.n_embd, spec.vocab_size, spec.dim_ffn, spec.n_head, spec.head_size
    vec = (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(spec.n_layer):
        p = f"blocks.{i}."
        for name in ("ln1", "ln2", "att.ln_x"):
            shapes[f"{p}{name}.weight"] = (C,)
            shapes[f"{p}{name}.bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[f"{p}att.{name}"] = vec
        for name, rank in (("w", spec.lora_w), ("a", spec.lora_a), ("v", spec.lora_v), ("g", spec.lora_g)):
            shapes[f"{p}att.{name}1"] = (C, rank)
            shapes[f"{p}att.{name}2"] = (rank, C)
        shapes[f"{p}att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{name}.weight"] = (C, C)
        shapes[f"{p}ffn.x_k"] = vec
        shapes[f"{p}ffn.key.weight"] = (F, C)
        shapes[f"{p}ffn.value.weight"] = (C, F)
    return shapes


# Layer 0 takes v_first from its own value projection, so real files carry unused v0/v1/v2 there
# (some exporters drop them); the value-residual rank is then read from layer 1.
_OPTIONAL = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def embedding(t: Mapping[str, torch.Tensor], eps: float) -> WeightSource:
    """``emb.weight`` with block 0's ``ln0`` folded in (every generation does this)."""
    ln0_weight, ln0_bias = t["blocks.0.ln0.weight"], t["blocks.0.ln0.bias"]
    return WeightSource("emb.weight", t["emb.weight"], lambda rows: embed(rows, ln0_weight, ln0_bias, eps), f"ln0 folded, eps {eps!r}")


class Rwkv7(Architecture):
    name = "rwkv7"
    version = "x070"
    title = "RWKV-7 (Goose)"
    unread = frozenset(_OPTIONAL)

    def claims(self, keys: set[str]) -> bool:
        return "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys

    def spec(self, tensors: Mapping[str, torch.Tensor]) -> ModelSpec:
        spec = spec_from_shapes(tensors)
        check_tensors(tensors, expected_shapes(spec), _OPTIONAL, "an RWKV-7 variant rwkvkit does not run (e.g. DeepEmbed)")
        return spec

    def expected_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return expected_shapes(spec)

    def state_layout(self, spec: ModelSpec) -> StateLayout:
        C, H, N = spec.n_embd, spec.n_head, spec.head_size
        return StateLayout(LayerState, (StateField("att_x_prev", (C,)), StateField("att_kv", (H, N, N), float32=True), StateField("ffn_x_prev", (C,))))

    def constants(self) -> Constants:
        return constants()

    def embedding(self, tensors: Mapping[str, torch.Tensor]) -> WeightSource:
        return embedding(tensors, LN_EPS)

    def load_block(self, spec: ModelSpec, layer: int, fetch: Loader) -> BlockWeights:
        b = load_weights(BlockWeights, f"blocks.{layer}.", fetch)
        if layer == 0:  # layer 0 takes v_first from its own values; its v0..v2 are never used
            b.att.v0 = b.att.v1 = b.att.v2 = None
        return b

    def load_head(self, spec: ModelSpec, fetch: Loader) -> HeadWeights:
        return load_weights(HeadWeights, "", fetch)

    def block(self, ops: Backend, weights: BlockWeights, x: torch.Tensor, carry: Any, state: LayerState) -> tuple[torch.Tensor, Any, LayerState]:
        return block(ops, weights, x, carry, state)

    def blocks(self, ops: Backend, weights: Sequence[BlockWeights], x: torch.Tensor, carry: Any, states: Sequence[LayerState]) -> tuple[torch.Tensor, Any, list[LayerState]]:
        return blocks(ops, weights, x, carry, states)

    def head(self, ops: Backend, weights: HeadWeights, x: torch.Tensor) -> torch.Tensor:
        return head(ops, weights, x)
