"""RWKV-7 "x070" (Goose) math, written once over a backend's ops.

Shapes: B batch, T tokens, C = H*N channels (H heads of size N), V vocab. Every function handles
any T >= 1: T = 1 is decoding, T > 1 prefill; the only per-token work is inside ``ops.wkv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rwkvkit.backend import Backend, Role
from rwkvkit.state import LayerState

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-e^-0.5 * sigmoid(z)): the soft clamp of log-decay below -0.5
GROUP_NORM_EPS = 64e-5  # ln_x eps used in training (note: not 1e-5)


def _w(key: str, role: Role, optional: bool = False) -> Any:
    """A weight field read from checkpoint key ``<prefix><key>``."""
    return field(metadata={"key": key, "role": role, "optional": optional})


@dataclass
class TimeMixWeights:
    x_r: torch.Tensor = _w("x_r", Role.VECTOR)  # token-shift mix per input
    x_w: torch.Tensor = _w("x_w", Role.VECTOR)
    x_k: torch.Tensor = _w("x_k", Role.VECTOR)
    x_v: torch.Tensor = _w("x_v", Role.VECTOR)
    x_a: torch.Tensor = _w("x_a", Role.VECTOR)
    x_g: torch.Tensor = _w("x_g", Role.VECTOR)
    w0: torch.Tensor = _w("w0", Role.VECTOR)  # decay: w0 + tanh(x w1) w2
    w1: torch.Tensor = _w("w1", Role.LORA)
    w2: torch.Tensor = _w("w2", Role.LORA)
    a0: torch.Tensor = _w("a0", Role.VECTOR)  # in-context learning rate: sigmoid(a0 + x a1 a2)
    a1: torch.Tensor = _w("a1", Role.LORA)
    a2: torch.Tensor = _w("a2", Role.LORA)
    v0: torch.Tensor | None = _w("v0", Role.VECTOR, optional=True)  # value residual (unused in layer 0)
    v1: torch.Tensor | None = _w("v1", Role.LORA, optional=True)
    v2: torch.Tensor | None = _w("v2", Role.LORA, optional=True)
    g1: torch.Tensor = _w("g1", Role.LORA)  # output gate: sigmoid(x g1) g2
    g2: torch.Tensor = _w("g2", Role.LORA)
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
    att: TimeMixWeights = field(metadata={"key": "att.", "group": TimeMixWeights})
    ffn: ChannelMixWeights = field(metadata={"key": "ffn.", "group": ChannelMixWeights})


@dataclass
class HeadWeights:
    ln_out_weight: torch.Tensor = _w("ln_out.weight", Role.VECTOR)
    ln_out_bias: torch.Tensor = _w("ln_out.bias", Role.VECTOR)
    head: Any = _w("head.weight", Role.MATRIX)  # [V, C]


Fetch = Callable[[str, Role, bool], Any]


def load_weights(cls: type, prefix: str, fetch: Fetch) -> Any:
    """Build a weights dataclass from checkpoint keys; ``fetch(key, role, optional)`` returns the
    prepared tensor (or None for a missing optional key)."""
    values = {}
    for f in fields(cls):
        meta = f.metadata
        if "role" in meta:
            values[f.name] = fetch(prefix + meta["key"], meta["role"], meta["optional"])
        else:  # a nested weights group
            values[f.name] = load_weights(meta["group"], prefix + meta["key"], fetch)
    return cls(**values)


def map_role(weights: Any, role: Role, fn: Callable[[Any], Any]) -> Any:
    """A shallow copy of a weights dataclass with ``fn`` applied to every tensor of ``role``
    (nested groups included); e.g. moving only the big matrices of a streamed layer."""
    values = {}
    for f in fields(weights):
        value = getattr(weights, f.name)
        if "group" in f.metadata:
            values[f.name] = map_role(value, role, fn)
        elif f.metadata["role"] is role and value is not None:
            values[f.name] = fn(value)
    return replace(weights, **values)


def embed(emb: torch.Tensor, ln0_weight: torch.Tensor, ln0_bias: torch.Tensor) -> torch.Tensor:
    """Fold block 0's ``ln0`` into the embedding table (done once, in float32, at load time)."""
    return F.layer_norm(emb.float(), (emb.shape[1],), ln0_weight.float().flatten(), ln0_bias.float().flatten())


def _token_shift(x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """Each position's predecessor: ``x_prev`` (carried in the state) for the first."""
    return torch.cat((x_prev.unsqueeze(1), x[:, :-1]), dim=1)


def time_mix(
    ops: Backend, w: TimeMixWeights, x: torch.Tensor, x_prev: torch.Tensor, kv: torch.Tensor, v_first: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention-like mixing over time. ``x [B,T,C]`` (already ln1-normalised), ``x_prev [B,C]``,
    ``kv [B,H,N,N]``. Returns ``(out [B,T,C], new x_prev, new kv, v_first)``."""
    B, T, C = x.shape
    H, N = kv.shape[1], kv.shape[2]
    dx = _token_shift(x, x_prev) - x
    xr, xw, xk, xv, xa, xg = (torch.addcmul(x, dx, m) for m in (w.x_r, w.x_w, w.x_k, w.x_v, w.x_a, w.x_g))

    r = ops.linear(xr, w.receptance)
    k = ops.linear(xk, w.key)
    v = ops.linear(xv, w.value)
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid((w.w0 + torch.tanh(xw @ w.w1) @ w.w2).float()))  # (0.54, 1)
    a = torch.sigmoid(w.a0 + (xa @ w.a1) @ w.a2)  # in-context learning rate, (0, 1)
    g = torch.sigmoid(xg @ w.g1) @ w.g2

    kk = F.normalize((k * w.k_k).view(B, T, H, N), dim=-1, p=2.0)  # unit "removal" key per head
    k = k * (1 + (a - 1) * w.k_a)
    if v_first is None:  # layer 0 hands its values to every later layer
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(w.v0 + (xv @ w.v1) @ w.v2))

    heads = (B, T, H, N)
    y, kv = ops.wkv(kv, r.view(heads), decay.view(heads), k.view(heads), v.view(heads), kk, a.view(heads))
    y = ops.group_norm(y, H, w.ln_x_weight, w.ln_x_bias, GROUP_NORM_EPS)
    bonus = (r * k * w.r_k).view(heads).sum(dim=-1, keepdim=True) * v.view(heads)  # the current token's own k.r
    out = ops.linear((y + bonus.view(B, T, C)) * g, w.output)
    return out, x[:, -1], kv, v_first


def channel_mix(ops: Backend, w: ChannelMixWeights, x: torch.Tensor, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed-forward with token shift and squared ReLU. Returns ``(out [B,T,C], new x_prev)``."""
    xk = torch.addcmul(x, _token_shift(x, x_prev) - x, w.x_k)
    hidden = torch.relu(ops.linear(xk, w.key)) ** 2
    return ops.linear(hidden, w.value), x[:, -1]


def block(
    ops: Backend, w: BlockWeights, x: torch.Tensor, v_first: torch.Tensor | None, s: LayerState
) -> tuple[torch.Tensor, torch.Tensor, LayerState]:
    """One residual block; returns ``(x, v_first, new layer state)`` without touching ``s``."""
    h, att_x_prev, att_kv, v_first = time_mix(ops, w.att, ops.layer_norm(x, w.ln1_weight, w.ln1_bias), s.att_x_prev, s.att_kv, v_first)
    x = x + h
    h, ffn_x_prev = channel_mix(ops, w.ffn, ops.layer_norm(x, w.ln2_weight, w.ln2_bias), s.ffn_x_prev)
    return x + h, v_first, LayerState(att_x_prev, att_kv, ffn_x_prev)


def head(ops: Backend, w: HeadWeights, x: torch.Tensor) -> torch.Tensor:
    """Final norm and vocabulary projection: ``[..., C] -> [..., V]``."""
    return ops.linear(ops.layer_norm(x, w.ln_out_weight, w.ln_out_bias), w.head)
