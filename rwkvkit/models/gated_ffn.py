"""What RWKV-4, -5 and -6 share: the receptance-gated channel mix, the embedding and head (as in
RWKV-7), and ChatRWKV's fp16 rescaling of the residual stream.

fp16 (``RESCALE_LAYER``): these generations' residual stream grows with depth until fp16
overflows. As the reference does, a layer's output and FFN value matrices are divided by
``2 ** (layer // RESCALE_LAYER)`` at load time and the stream is halved after every
``RESCALE_LAYER``-th layer: the stream stays ``2 ** -(layer // 6)`` times its fp32 value, which the
LayerNorms (and the final one) do not see, so logits are unchanged up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch

from rwkvkit.architecture import Architecture, Loader, shape2d
from rwkvkit.backend import Backend, Epilogue, Role
from rwkvkit.checkpoint import WeightSource
from rwkvkit.models import rwkv7
from rwkvkit.weights import Transform, load_weights, weight

LN_EPS = 1e-5  # ln0/ln1/ln2/ln_out
GROUP_NORM_EPS = 64e-5  # RWKV-5/6 ln_x
RESCALE_LAYER = 6  # fp16: halve the residual stream after every 6th layer (ChatRWKV's default)

HeadWeights = rwkv7.HeadWeights

# ChatRWKV's v4/v5 token shift is ``x * m + shifted * (1 - m)``: with ``1 - m`` stored it is
# ``ln_mix``'s ``x + (shifted - x) * m'``, so every generation shares one op.
COMPLEMENT: Transform = ("1 - mix", lambda rows: 1 - rows)


@dataclass
class NormWeights:
    """A block's two LayerNorms (before the time mix and before the FFN); each generation's block
    weights add their ``att``/``ffn`` groups and a ``halve_after`` flag (fp16 rescaling)."""

    ln1_weight: torch.Tensor = weight("ln1.weight", Role.VECTOR)
    ln1_bias: torch.Tensor = weight("ln1.bias", Role.VECTOR)
    ln2_weight: torch.Tensor = weight("ln2.weight", Role.VECTOR)
    ln2_bias: torch.Tensor = weight("ln2.bias", Role.VECTOR)


@dataclass
class ChannelMixWeights:
    """The FFN of RWKV-6: ``sigmoid(r) * (relu(k)^2 @ value)``."""

    mix_k: torch.Tensor = weight("time_maa_k", Role.VECTOR)
    mix_r: torch.Tensor = weight("time_maa_r", Role.VECTOR)
    key: Any = weight("key.weight", Role.MATRIX)  # [F, C]
    receptance: Any = weight("receptance.weight", Role.MATRIX)  # [C, C]
    value: Any = weight("value.weight", Role.MATRIX)  # [C, F]


@dataclass
class ChannelMixWeights45(ChannelMixWeights):
    """The same FFN in RWKV-4/5 files, whose mixes weigh the current token (complemented at load)."""

    mix_k: torch.Tensor = weight("time_mix_k", Role.VECTOR, transform=COMPLEMENT)
    mix_r: torch.Tensor = weight("time_mix_r", Role.VECTOR, transform=COMPLEMENT)


def channel_mix(ops: Backend, ln_weight: torch.Tensor, ln_bias: torch.Tensor, w: ChannelMixWeights, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(x + out, new x_prev)``."""
    x_prev, (xk, xr) = ops.ln_mix(x, ln_weight, ln_bias, x_prev, [w.mix_k, w.mix_r], LN_EPS)
    hidden, r = ops.project([xk, xr], [w.key, w.receptance], [Epilogue.RELU_SQUARE, Epilogue.SIGMOID])
    (out,) = ops.project([hidden], [w.value])
    return x + r * out, x_prev


def rescaling(fetch: Loader, layer: int) -> tuple[Loader, bool]:
    """fp16 only: a loader that divides this layer's output and FFN value matrices, and whether the
    stream is halved after the layer (see the module docstring). Otherwise ``fetch`` and False."""
    shift = layer // RESCALE_LAYER
    if fetch.ops.placement.dtype != torch.float16 or shift == 0:
        return fetch, fetch.ops.placement.dtype == torch.float16 and (layer + 1) % RESCALE_LAYER == 0
    divide: Transform = (f"divided by 2^{shift}", lambda rows: rows / 2**shift)
    p = f"blocks.{layer}."
    return replace(fetch, overrides={f"{p}att.output.weight": divide, f"{p}ffn.value.weight": divide}), (layer + 1) % RESCALE_LAYER == 0


def embedding(tensors: Mapping[str, torch.Tensor]) -> WeightSource:
    return rwkv7.embedding(tensors, LN_EPS)


def head(ops: Backend, w: HeadWeights, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(ops.layer_norm(x, w.ln_out_weight, w.ln_out_bias, LN_EPS), w.head)


def common_shapes(t: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """``(vocab_size, n_embd, dim_ffn)`` from the shapes every generation has."""
    vocab, n_embd = shape2d(t, "emb.weight", "vocab_size, n_embd")
    return vocab, n_embd, shape2d(t, "blocks.0.ffn.key.weight", "dim_ffn, n_embd")[0]


def outer_shapes(V: int, C: int) -> dict[str, tuple[int, ...]]:
    return {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}


def block_shapes(p: str, C: int, F: int, att_matrices: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The keys of layer prefix ``p`` every generation 4-6 has: norms, matrices, the FFN."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("ln1", "ln2"):
        shapes[f"{p}{name}.weight"] = (C,)
        shapes[f"{p}{name}.bias"] = (C,)
    for name in att_matrices:
        shapes[f"{p}att.{name}.weight"] = (C, C)
    shapes[f"{p}ffn.key.weight"] = (F, C)
    shapes[f"{p}ffn.receptance.weight"] = (C, C)
    shapes[f"{p}ffn.value.weight"] = (C, F)
    return shapes


class GatedFfnArchitecture(Architecture):
    """What RWKV-4/5/6 architectures share: embedding, head, and loading a block (fp16 rescaling included)."""

    block_weights: ClassVar[type]  # the generation's block weights dataclass (with a ``halve_after`` flag)

    def embedding(self, tensors: Mapping[str, torch.Tensor]) -> WeightSource:
        return embedding(tensors)

    def load_block(self, spec: Any, layer: int, fetch: Loader) -> Any:
        fetch, halve_after = rescaling(fetch, layer)
        b = load_weights(self.block_weights, f"blocks.{layer}.", fetch)
        b.halve_after = halve_after
        return b

    def load_head(self, spec: Any, fetch: Loader) -> HeadWeights:
        return load_weights(HeadWeights, "", fetch)

    def head(self, ops: Backend, weights: HeadWeights, x: torch.Tensor) -> torch.Tensor:
        return head(ops, weights, x)
