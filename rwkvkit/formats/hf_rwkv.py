"""RWKV-4, 5 and 6 in the Hugging Face layouts: transformers' ``RwkvForCausalLM`` (RWKV-4, the
``RWKV/rwkv-4-*`` folders), and the trust_remote_code ``Rwkv5ForCausalLM`` / ``Rwkv6ForCausalLM``
of the ``RWKV/v5-Eagle-*-HF`` / ``RWKV/v6-Finch-*-HF`` folders; mapped key by key to and from
BlinkDL's names.

Learnt from the published conversion scripts: transformers' ``models/rwkv/
convert_rwkv_checkpoint_to_hf.py`` and BBuf/RWKV-World-HF-Tokenizer's ``convert_rwkv5_checkpoint_
to_hf.py`` / ``convert_rwkv6_checkpoint_to_hf.py`` (whose ``modeling_rwkv5/6.py`` the Hub folders
ship). All three only rename: ``emb.`` -> ``embeddings.``, ``blocks.0.ln0`` -> ``blocks.0.pre_ln``,
``att`` -> ``attention``, ``ffn`` -> ``feed_forward``, RWKV-4/5's ``time_mix_k/v/r/g`` ->
``time_mix_key/value/receptance/gate``, and ``rwkv.`` before everything but ``head.weight``. No
tensor is reshaped or transformed: ``time_decay`` stays raw (the modeling files apply ``-exp`` /
``exp(-exp)`` themselves, as BlinkDL's loaders do), ``time_faaaa`` / ``time_first`` keep their
shapes. ``config.json``'s ``rescale_every`` is transformers' fp16 trick applied at run time, not to
the stored weights, so it is not read (rwkvkit rescales fp16 its own way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from rwkvkit.errors import CheckpointError

_MIX_NAMES = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}
_BLINK_LAYER = re.compile(r"blocks\.(\d+)\.(att|ffn|ln0|ln1|ln2)\.(.+)")
_HF_LAYER = re.compile(r"rwkv\.blocks\.(\d+)\.(attention|feed_forward|pre_ln|ln1|ln2)\.(.+)")
_PARTS = {"att": "attention", "ffn": "feed_forward", "ln0": "pre_ln", "ln1": "ln1", "ln2": "ln2"}
_TOP = {"emb.weight": "rwkv.embeddings.weight", "ln_out.weight": "rwkv.ln_out.weight", "ln_out.bias": "rwkv.ln_out.bias", "head.weight": "head.weight"}
_PARAM = re.compile(r"[A-Za-z_0-9]+(\.(weight|bias))?")


@dataclass(frozen=True)
class RwkvLayout:
    """One generation's HF naming: the renames of its parameter names, and its config.json."""

    model_type: str
    architecture: str  # config.json's "architectures" entry
    renames: dict[str, str]  # BlinkDL parameter name -> HF's (the rest are kept)
    headed: bool  # RWKV-5/6: head_size in config.json
    NOT_WRITTEN: tuple[str, ...] = ()
    TUNED_STATE: bool = True  # a merged state's blocks.N.att.time_state is renamed like any attention parameter

    def from_blink(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BlinkDL-named tensors (a validated checkpoint) -> HF-named ones."""
        out = {}
        for key, t in tensors.items():
            m = _BLINK_LAYER.fullmatch(key)
            if m is None:
                out[_TOP[key]] = t
                continue
            name = self.renames.get(m.group(3), m.group(3))
            out[f"rwkv.blocks.{m.group(1)}.{_PARTS[m.group(2)]}.{name}"] = t
        return out

    def to_blink(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """HF-named tensors -> BlinkDL-named ones (a key outside the layout is refused, naming it)."""
        back_top = {hf: blink for blink, hf in _TOP.items()}
        back_names = {hf: blink for blink, hf in self.renames.items()}
        back_parts = {hf: blink for blink, hf in _PARTS.items()}
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            m = _HF_LAYER.fullmatch(key)
            if m and _PARAM.fullmatch(m.group(3)) and m.group(3) not in self.renames:  # BlinkDL's short name is not HF's
                name = back_names.get(m.group(3), m.group(3))
                out[f"blocks.{m.group(1)}.{back_parts[m.group(2)]}.{name}"] = t
            elif key in back_top:
                out[back_top[key]] = t
            else:
                raise CheckpointError(f"unexpected key {key!r}: not part of the {self.architecture} layout (a damaged file, or another model)")
        if "head.weight" not in out and config.get("tie_word_embeddings") and "emb.weight" in out:
            out["head.weight"] = out["emb.weight"]
        return out

    def config(self, spec: Any, dtype: torch.dtype) -> dict[str, Any]:
        """The ``config.json`` its modeling code reads for ``spec``."""
        config = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.n_embd,
            "attention_hidden_size": spec.n_embd,
            "num_hidden_layers": spec.n_layer,
            "intermediate_size": spec.dim_ffn,
            "layer_norm_epsilon": 1e-5,
            "rescale_every": 6,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if self.headed:
            config["head_size"] = spec.head_size
        return config

    def check_config(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Refuse a config.json that contradicts the (BlinkDL-named) tensors or asks for math
        rwkvkit does not do; the tensors themselves are validated later, like any checkpoint's."""
        emb, ffn = tensors.get("emb.weight"), tensors.get("blocks.0.ffn.key.weight")
        found: dict[str, Any] = {"num_hidden_layers": len({m.group(1) for k in tensors if (m := _BLINK_LAYER.fullmatch(k))})}
        if emb is not None and emb.dim() == 2:
            found |= {"vocab_size": emb.shape[0], "hidden_size": emb.shape[1], "attention_hidden_size": emb.shape[1]}
        if ffn is not None and ffn.dim() == 2:
            found["intermediate_size"] = ffn.shape[0]
        bonus = tensors.get("blocks.0.att.time_faaaa")
        if self.headed and bonus is not None and bonus.dim() == 2:
            found["head_size"] = bonus.shape[1]
        for key, value in found.items():
            if config.get(key) is not None and config[key] != value:
                raise CheckpointError(f"config.json has {key}={config[key]!r} but the weights have {value}: a damaged or mixed-up folder")
        if config.get("layer_norm_epsilon", 1e-5) != 1e-5:
            raise CheckpointError(f"config.json has layer_norm_epsilon={config['layer_norm_epsilon']!r}; rwkvkit runs RWKV with 1e-5 (BlinkDL's value)")
        if config.get("head_size_divisor", 8) != 8:
            raise CheckpointError(f"config.json has head_size_divisor={config['head_size_divisor']!r}; rwkvkit runs ln_x with BlinkDL's 8 (eps 64e-5)")


RWKV4 = RwkvLayout("rwkv", "RwkvForCausalLM", {k: v for k, v in _MIX_NAMES.items() if k != "time_mix_g"}, headed=False)
RWKV5 = RwkvLayout("rwkv5", "Rwkv5ForCausalLM", _MIX_NAMES, headed=True)
RWKV6 = RwkvLayout("rwkv6", "Rwkv6ForCausalLM", {}, headed=True)
