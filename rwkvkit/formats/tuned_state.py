"""State-tuned initial states: RWKV-PEFT's state tuning trains, per layer, the WKV state a
sequence starts from (``blocks.N.att.time_state``, ``[H, N, N]``) and saves those tensors alone, as
``.pth`` (or ``.safetensors``/``.st`` after conversion, as Ai00 / web-rwkv read them).

Layout: for RWKV-7 the file holds the state exactly as the model carries it, value index first
(rwkvkit's ``att_kv``, and the ``rwkv`` pip package's state). Where this was learnt:
RWKV-PEFT ``rwkvt/operator/rwkvop.py`` hands ``time_state.transpose(1, 2)`` to fla's
``chunk_rwkv7``, whose initial state is key index first; RWKV-Runner's ``load_rwkv_state``
(``backend-python/utils/rwkv.py``) uses the tensor as is for ``version >= 7`` (and transposes it
for RWKV-6, whose state is key index first). Token-shift states start at zero, as there.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rwkvkit.errors import StateError
from rwkvkit.formats.files import read_tensor_file

_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")


def read_time_states(path: Path) -> dict[str, torch.Tensor]:
    """The ``blocks.N.att.time_state`` tensors of a state-tuning file (other keys are ignored: a
    model merged with its state by RWKV-PEFT's ``merge_state.py`` holds them too)."""
    data = read_tensor_file(path, "state file", StateError)
    states = {k: v for k, v in data.items() if _KEY.fullmatch(k)}
    if not states:
        raise StateError(f"{path}: no 'blocks.N.att.time_state' tensors: not a state-tuning file")
    return states


def load_tuned_state(path: str | Path, model: Any, batch_size: int = 1) -> Any:
    """The initial ``rwkvkit.state.State`` a state-tuning file holds, for ``model`` (a loaded
    ``rwkvkit.model.Model``); refused, naming the layer and the shapes, when it was tuned for a
    model of another size. Built from the model's zero state (so this module needs nothing of
    rwkvkit.state, which offers it as ``State.from_tuned``)."""
    path = Path(path).expanduser()
    spec = model.spec
    if spec.architecture != "rwkv7":  # the layouts of older generations' tuned states are not verified
        raise StateError(f"{path}: state-tuned initial states are read for RWKV-7 models; this model is {spec.architecture}")
    shape = (spec.n_head, spec.head_size, spec.head_size)
    states = read_time_states(path)
    zero = model.zero_state(batch_size)
    layers = []
    for i, layer in enumerate(zero.layers):
        kv = states.pop(f"blocks.{i}.att.time_state", None)
        if kv is None:
            raise StateError(f"{path}: no state for layer {i} ('blocks.{i}.att.time_state'); the model has {spec.n_layer} layers")
        if tuple(kv.shape) != shape or not kv.is_floating_point():
            raise StateError(
                f"{path}: layer {i} state has shape {list(kv.shape)} ({kv.dtype}); this model needs a floating-point "
                f"{list(shape)} [n_head, head_size, head_size]: the state was tuned for another model"
            )
        layers.append(replace(layer, att_kv=kv.to(layer.att_kv.device, torch.float32).expand(batch_size, *shape).clone()))
    if states:
        extra = sorted(states, key=lambda k: int(_KEY.fullmatch(k).group(1)))[0]
        raise StateError(f"{path}: holds {extra!r} but the model has only {spec.n_layer} layers: the state was tuned for another model")
    try:
        return model.adopt_state(replace(zero, layers=layers))
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None
