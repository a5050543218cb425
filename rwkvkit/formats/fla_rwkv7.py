"""RWKV-7 in flash-linear-attention's layout (``RWKV7ForCausalLM``, the fla-hub model folders),
mapped key by key to and from BlinkDL's names.

Learnt from fla's ``utils/convert_from_rwkv7.py`` and ``fla/layers/rwkv7.py`` (fla-org/
flash-linear-attention): the LoRA pairs ``w1/w2`` etc. become ``nn.Sequential(Linear, act, Linear)``
weights (so transposed) with ``w0/a0/v0`` as the second Linear's bias (flattened to ``[C]``);
``k_k``, ``k_a`` and ``ffn.x_k`` are ``[C]``; the token-shift mixes ``x_*`` stay ``[1, 1, C]``
(older fla versions stored them stacked as ``attn.x_x [6, C]``, still read here); layer 0 has no
value-residual LoRA, so BlinkDL's unused ``blocks.0.att.v0/v1/v2`` are not written.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from rwkvkit.errors import CheckpointError

MODEL_TYPE = "rwkv7"
Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, -1)


def _layer_table() -> dict[str, tuple[str, Transform, Transform]]:
    """BlinkDL key after ``blocks.N.`` -> (fla key after ``model.layers.N.``, to fla, from fla)."""
    table = {
        "att.r_k": ("attn.r_k", _same, _same),
        "ffn.x_k": ("ffn.x_k", _flat, _vector),
        "ffn.key.weight": ("ffn.key.weight", _same, _same),
        "ffn.value.weight": ("ffn.value.weight", _same, _same),
    }
    for blink, fla in (("ln0", "pre_norm"), ("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm")):
        for part in ("weight", "bias"):
            table[f"{blink}.{part}"] = (f"{fla}.{part}", _same, _same)
    for mix in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
        table[f"att.{mix}"] = (f"attn.{mix}", _vector, _vector)
    for name in ("k_k", "k_a"):
        table[f"att.{name}"] = (f"attn.{name}", _flat, _vector)
    for blink, fla in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
        table[f"att.{blink}.weight"] = (f"attn.{fla}.weight", _same, _same)
    for lora in "wavg":
        if lora != "g":  # the gate has no bias
            table[f"att.{lora}0"] = (f"attn.{lora}_lora.lora.2.bias", _flat, _vector)
        table[f"att.{lora}1"] = (f"attn.{lora}_lora.lora.0.weight", _transpose, _transpose)
        table[f"att.{lora}2"] = (f"attn.{lora}_lora.lora.2.weight", _transpose, _transpose)
    return table


_LAYER = _layer_table()
_TOP = {
    "emb.weight": ("model.embeddings.weight", _same, _same),
    "ln_out.weight": ("model.norm.weight", _same, _same),
    "ln_out.bias": ("model.norm.bias", _same, _same),
    "head.weight": ("lm_head.weight", _same, _same),
}
_FROM_LAYER = {fla: (blink, back) for blink, (fla, _, back) in _LAYER.items()}
_FROM_TOP = {fla: (blink, back) for blink, (fla, _, back) in _TOP.items()}
_BLINK_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_FLA_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
NOT_WRITTEN = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # layer 0's value residual: never read
_OLD_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # the rows of an old fla ``attn.x_x``


def to_blink(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fla-named tensors -> BlinkDL-named ones (an unknown key is refused, naming it)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _FLA_LAYER.fullmatch(key)
        if m and m.group(2) == "attn.x_x" and t.dim() == 2 and t.shape[0] == len(_OLD_MIXES):
            out.update({f"blocks.{m.group(1)}.att.{mix}": _vector(row) for mix, row in zip(_OLD_MIXES, t)})
            continue
        found = _FROM_LAYER.get(m.group(2)) if m else _FROM_TOP.get(key)
        if found is None:
            raise CheckpointError(f"unexpected key {key!r}: not part of fla's RWKV-7 layout (a damaged file, or another model)")
        blink, back = found
        out[f"blocks.{m.group(1)}.{blink}" if m else blink] = back(t)
    if "head.weight" not in out and config.get("tie_word_embeddings") and "emb.weight" in out:
        out["head.weight"] = out["emb.weight"]
    return out


def from_blink(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL-named tensors (a validated RWKV-7 checkpoint) -> fla-named ones."""
    out = {}
    for key, t in tensors.items():
        if key in NOT_WRITTEN:
            continue
        m = _BLINK_LAYER.fullmatch(key)
        fla, there, _ = _LAYER[m.group(2)] if m else _TOP[key]
        out[f"model.layers.{m.group(1)}.{fla}" if m else fla] = there(t)
    return out


def config(spec: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of fla's ``RWKV7Config`` for ``spec`` (a ``ModelSpec``; what
    ``AutoConfig`` reads)."""
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.n_embd,
        "num_hidden_layers": spec.n_layer,
        "head_dim": spec.head_size,
        "num_heads": spec.n_head,
        "intermediate_size": spec.dim_ffn,
        "hidden_ratio": spec.dim_ffn / spec.n_embd,
        "decay_low_rank_dim": spec.lora_w,
        "a_low_rank_dim": spec.lora_a,
        "v_low_rank_dim": spec.lora_v,
        "gate_low_rank_dim": spec.lora_g,
        "value_dim": [spec.n_embd] * spec.n_layer,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 0,  # RWKV vocabularies (World, Pile) end a text with token 0
        "eos_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def check_config(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a config.json that contradicts the (BlinkDL-named) tensors or asks for math rwkvkit
    does not do; the tensors themselves are validated later, like any checkpoint's."""
    emb, r_k = tensors.get("emb.weight"), tensors.get("blocks.0.att.r_k")
    found = {"num_hidden_layers": len({m.group(1) for k in tensors if (m := _BLINK_LAYER.fullmatch(k))})}
    if emb is not None and emb.dim() == 2:
        found |= {"vocab_size": emb.shape[0], "hidden_size": emb.shape[1]}
    if r_k is not None and r_k.dim() == 2:
        found["head_dim"] = r_k.shape[1]
    for key, value in found.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"config.json has {key}={config[key]!r} but the weights have {value}: a damaged or mixed-up folder")
    if config.get("norm_eps", 1e-5) != 1e-5:
        raise CheckpointError(f"config.json has norm_eps={config['norm_eps']!r}; rwkvkit runs RWKV-7 with 1e-5 (BlinkDL's value)")
    value_dim, width = config.get("value_dim"), config.get("hidden_size")
    if value_dim is not None and any(v != width for v in ([value_dim] if isinstance(value_dim, int) else value_dim)):
        raise CheckpointError(f"config.json has value_dim={value_dim!r}; rwkvkit runs RWKV-7 with value_dim = hidden_size only")
    if config.get("attn") not in (None, {}):
        raise CheckpointError("config.json has hybrid attention layers ('attn'); rwkvkit runs pure RWKV-7 models only")
