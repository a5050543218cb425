"""Reading and fingerprinting the small tensor files users bring (LoRA adapters, tuned states)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from rwkvkit.errors import RwkvkitError

SAFETENSORS_SUFFIXES = (".safetensors", ".st")  # .st: what Ai00 / web-rwkv name their safetensors files


def read_tensor_file(path: Path, what: str, error: type[RwkvkitError]) -> dict[str, torch.Tensor]:
    """The name -> tensor dict of a ``.pth`` (memory-mapped, ``weights_only``) or safetensors
    file; anything else raises ``error`` naming the file and ``what`` was expected."""
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as exc:  # torch/safetensors raise many unrelated types for bad files
        raise error(f"{path}: not a readable .pth/.safetensors {what} ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise error(f"{path}: expected a dict of name -> tensor ({what})")
    return dict(data)


def content_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
