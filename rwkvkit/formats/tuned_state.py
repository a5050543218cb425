"""State-tuned initial states: RWKV-PEFT's state tuning trains, per layer, the WKV state a
sequence starts from (``blocks.N.att.time_state``, ``[H, N, N]``) and saves those tensors alone, as
``.pth`` (or ``.safetensors``/``.st`` after conversion, as Ai00 / web-rwkv read them). RWKV-Runner
also ships "merged state" models: a model file with the ``time_state`` tensors beside the weights,
which :func:`rwkvkit.checkpoint.load_checkpoint` splits off and the model starts from by default.

Layout: the file holds the state value index first, for RWKV-7, 6 and 5 alike. rwkvkit's RWKV-7
``att_kv`` (like the ``rwkv`` pip package's) is value index first too, so it is taken as is; its
RWKV-5/6 ``att_kv`` (and the package's) is key index first, so it is transposed. Where this was
learnt: RWKV-PEFT ``rwkvt/operator/rwkvop.py`` hands an RWKV-7 ``time_state.transpose(1, 2)`` to
fla's ``chunk_rwkv7``, whose initial state is key index first; RWKV-Runner's ``load_rwkv_state``
(``backend-python/utils/rwkv.py``) uses the tensor as is for ``version >= 7`` and
``.transpose(1, 2)`` below; and the oracle, ``rwkv`` 0.8.32, starts an RWKV-5/6 model file that
carries ``time_state`` from ``time_state.transpose(1, 2)`` (tests/test_formats.py checks ours
against it). RWKV-4 has no WKV matrix state, so nothing is read for it. Token-shift states start
at zero, as there.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from rwkvkit.errors import RwkvkitError, StateError
from rwkvkit.formats.files import read_tensor_file

_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")
KEY_FIRST = {"rwkv7": False, "rwkv6": True, "rwkv5": True}  # rwkvkit's att_kv: key index first?


def split_time_states(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(weights, time states)``: a model file's tensors without and with the ``time_state`` keys."""
    states = {k: v for k, v in tensors.items() if _KEY.fullmatch(k)}
    return {k: v for k, v in tensors.items() if k not in states}, states


def read_time_states(path: Path) -> dict[str, torch.Tensor]:
    """The ``blocks.N.att.time_state`` tensors of a state-tuning file (other keys are ignored: a
    model merged with its state by RWKV-PEFT's ``merge_state.py`` holds them too)."""
    states = split_time_states(read_tensor_file(path, "state file", StateError))[1]
    if not states:
        raise StateError(f"{path}: no 'blocks.N.att.time_state' tensors: not a state-tuning file")
    return states


def wkv_states(states: Mapping[str, torch.Tensor], spec: Any, error: type[RwkvkitError] = StateError) -> list[torch.Tensor]:
    """Each layer's ``att_kv`` ``[H, N, N]`` float32, as rwkvkit's state holds it, from the
    ``time_state`` tensors of a model of ``spec``; ``error`` names the layer and the shapes when
    they were tuned for another model, or the generation when it has no such state."""
    if spec.architecture not in KEY_FIRST:
        what = "RWKV-4 has no WKV matrix state (its state is per channel)" if spec.architecture == "rwkv4" else f"no tuned-state layout is known for {spec.architecture}"
        raise error(f"state-tuned initial states are read for RWKV-5, 6 and 7 models; this model is {spec.architecture}: {what}")
    shape = (spec.n_head, spec.head_size, spec.head_size)
    left = dict(states)
    out = []
    for i in range(spec.n_layer):
        kv = left.pop(f"blocks.{i}.att.time_state", None)
        if kv is None:
            raise error(f"no state for layer {i} ('blocks.{i}.att.time_state'); the model has {spec.n_layer} layers")
        if tuple(kv.shape) != shape or not kv.is_floating_point():
            raise error(
                f"layer {i} state has shape {list(kv.shape)} ({kv.dtype}); this model needs a floating-point "
                f"{list(shape)} [n_head, head_size, head_size]: the state was tuned for another model"
            )
        kv = kv.float()
        out.append(kv.transpose(1, 2) if KEY_FIRST[spec.architecture] else kv)
    if left:
        extra = min(left, key=lambda k: int(_KEY.fullmatch(k).group(1)))
        raise error(f"holds {extra!r} but the model has only {spec.n_layer} layers: the state was tuned for another model")
    return out


def tuned_state(model: Any, kvs: list[torch.Tensor], batch_size: int = 1) -> Any:
    """The ``rwkvkit.state.State`` of ``model`` starting from the WKV states ``kvs`` (from
    :func:`wkv_states`), zero elsewhere; checked by ``model.adopt_state`` (finite values)."""
    zero = model.zero_state(batch_size)
    layers = [replace(layer, att_kv=kv.to(layer.att_kv.device).expand(batch_size, *kv.shape).clone()) for layer, kv in zip(zero.layers, kvs)]
    return model.adopt_state(replace(zero, layers=layers))


def load_tuned_state(path: str | Path, model: Any, batch_size: int = 1) -> Any:
    """The initial ``rwkvkit.state.State`` a state-tuning file holds, for ``model`` (a loaded
    ``rwkvkit.model.Model``); refused, naming the file, the layer and the shapes, when it was tuned
    for another model."""
    path = Path(path).expanduser()
    try:
        return tuned_state(model, wkv_states(read_time_states(path), model.spec), batch_size)
    except StateError as exc:
        message = str(exc)
        raise StateError(message if message.startswith(str(path)) else f"{path}: {message}") from None
