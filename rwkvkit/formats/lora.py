"""LoRA adapters (RWKV-PEFT, RWKV-LM-LoRA) merged into a checkpoint's weights at load, before any
backend prepares (or quantizes) them.

An adapter file is a ``.pth`` (or ``.safetensors``) of ``<name>.lora_A [r, in]`` and
``<name>.lora_B [out, r]`` pairs, one per adapted ``<name>.weight``, plus any parameters trained in
full alongside (layer norms, ``x_*`` mixes...), which replace the base ones. The merge is RWKV-PEFT's
``merge/merge_lora.py``: ``W += B @ A * (alpha / r)``, with ``r`` the pair's rank and ``alpha`` the
training's ``lora_alpha`` (not stored in the file, so the user gives it). Here it is computed in
float32 and rounded once to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from rwkvkit.checkpoint import Checkpoint
from rwkvkit.errors import CheckpointError, InputError
from rwkvkit.formats.files import content_digest, read_tensor_file

_A, _B = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class Lora:
    """One adapter to merge: its file and the ``lora_alpha`` it was trained with."""

    path: Path
    alpha: float


def as_loras(items: Iterable[Any] | None) -> list[Lora]:
    """Adapters from what users write: ``Lora``, ``{"path": ..., "alpha": ...}`` or ``(path, alpha)``."""
    out = []
    for item in items or ():
        if isinstance(item, Lora):
            out.append(item)
            continue
        if isinstance(item, Mapping) and set(item) == {"path", "alpha"}:
            path, alpha = item["path"], item["alpha"]
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, alpha = item
        else:
            raise InputError(f"lora entry {item!r:.80}: expected {{path: FILE, alpha: NUMBER}} or (FILE, alpha)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not isinstance(path, (str, Path)):
            raise InputError(f"lora entry {item!r:.80}: path must be a file name and alpha a number (the training's lora_alpha)")
        out.append(Lora(Path(path).expanduser(), float(alpha)))
    return out


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, refused with a clear message when it is not one."""
    data = read_tensor_file(path, "LoRA file", CheckpointError)
    if not any(k.endswith(_A) for k in data):
        raise CheckpointError(f"{path}: no '*.lora_A' tensors: not a LoRA adapter")
    return data


def merge_loras(checkpoint: Checkpoint, loras: Iterable[Lora]) -> Checkpoint:
    """``checkpoint`` with each adapter merged in, in order (only the changed weights are new
    tensors; the rest stay as loaded). Its fingerprint names the adapters, so states, caches and
    run records keep merged and plain models apart."""
    tensors = dict(checkpoint.tensors)
    merged = list(checkpoint.merged)
    for lora in loras:
        adapter = read_adapter(lora.path)
        try:
            _merge(tensors, adapter, lora.alpha)
        except CheckpointError as exc:
            raise CheckpointError(f"{lora.path}: {exc}") from None
        merged.append(f"lora {content_digest(adapter)[:16]} alpha {lora.alpha!r}")
    return replace(checkpoint, tensors=tensors, merged=tuple(merged))


def _merge(tensors: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], alpha: float) -> None:
    for key, t in adapter.items():  # parameters trained in full first, as merge_lora.py does
        if key.endswith((_A, _B)):
            continue
        if key not in tensors:
            raise CheckpointError(f"holds {key!r}, which the model does not have: an adapter for another model")
        if t.shape != tensors[key].shape:
            raise CheckpointError(f"{key!r} has shape {list(t.shape)}; the model's is {list(tensors[key].shape)}: an adapter for another model")
        tensors[key] = t.to(tensors[key].dtype)
    for key in sorted(k for k in adapter if k.endswith(_B)):
        if key.removesuffix(_B) + _A not in adapter:
            raise CheckpointError(f"holds {key!r} without its {key.removesuffix(_B) + _A!r}")
    for key in sorted(k for k in adapter if k.endswith(_A)):
        name = key.removesuffix(_A)
        a, b, target = adapter[key], adapter.get(name + _B), name + ".weight"
        if b is None:
            raise CheckpointError(f"holds {key!r} without its {name + _B!r}")
        if target not in tensors:
            raise CheckpointError(f"adapts {target!r}, which the model does not have: an adapter for another model")
        w = tensors[target]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(
                f"{name}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not make the model's {list(w.shape)} "
                "(expected lora_B [out, r], lora_A [r, in]): an adapter for another model"
            )
        rank = a.shape[0]
        tensors[target] = (w.float() + (b.float() @ a.float()) * (alpha / rank)).to(w.dtype)
