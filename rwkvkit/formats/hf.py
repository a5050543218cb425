"""Hugging Face model folders: ``config.json`` plus ``model.safetensors``, or shards
``model-0000N-of-0000M.safetensors`` listed by ``model.safetensors.index.json``.

``config.json``'s ``model_type`` picks the key layout (:data:`LAYOUTS`, one per architecture: RWKV-7
is fla-hub's ``rwkv7``, RWKV-6/5/4 the ``rwkv6``/``rwkv5``/``rwkv`` of :mod:`.hf_rwkv`); the layout renames the tensors to BlinkDL's keys, which
:func:`rwkvkit.checkpoint.validate` then checks like any other checkpoint's.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rwkvkit.errors import CheckpointError, TokenizerError
from rwkvkit.formats import fla_rwkv7, hf_rwkv

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# what rwkvkit can read, preferred first; vocab.txt: the Rwkv5Tokenizer file of RWKV/v5-Eagle-*-HF and v6-Finch-*-HF
TOKENIZER_FILES = ("tokenizer.json", "rwkv_vocab_v20230424.txt", "vocab.txt")
HF_WORLD_VOCAB = "vocab.txt"


@dataclass(frozen=True)
class Layout:
    """How one architecture's tensors are named in HF folders (``mapping``: an object with
    ``to_blink``, ``from_blink``, ``config``, ``check_config`` and ``NOT_WRITTEN``: see
    :mod:`.fla_rwkv7`, :mod:`.hf_rwkv`)."""

    model_type: str
    version: float  # the RWKV generation it holds (its spec's ``version``)
    mapping: Any


LAYOUTS: dict[str, Layout] = {
    layout.model_type: layout
    for layout in (
        Layout(fla_rwkv7.MODEL_TYPE, 7, fla_rwkv7),
        Layout(hf_rwkv.RWKV6.model_type, 6, hf_rwkv.RWKV6),
        Layout(hf_rwkv.RWKV5.model_type, 5.2, hf_rwkv.RWKV5),
        Layout(hf_rwkv.RWKV4.model_type, 4, hf_rwkv.RWKV4),
    )
}


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict, refused with a clear message when missing or not JSON."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG}; expected a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG}: expected a JSON object, got {type(config).__name__}")
    return config


def layout_of(folder: Path, config: dict[str, Any]) -> Layout:
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        raise CheckpointError(f"{folder / CONFIG}: model_type {model_type!r} is not an RWKV layout rwkvkit reads (it reads: {known})")
    return LAYOUTS[model_type]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights (the index's shards, or ``model.safetensors``)."""
    if (folder / INDEX).is_file():
        return sorted({folder / name for name in _weight_map(folder).values()})
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX} (only safetensors weights are read; convert pytorch_model.bin first)")


def _weight_map(folder: Path) -> dict[str, str]:
    path = folder / INDEX
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors index (a JSON object with a 'weight_map'): {exc!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to file names")
    for name in set(weight_map.values()):
        if Path(name).name != name:
            raise CheckpointError(f"{path}: shard {name!r} is not a file name inside the folder")
        if not (folder / name).is_file():
            raise CheckpointError(f"{path}: shard {name} is missing from the folder")
    return weight_map


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt): {exc}") from None


def read_raw(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder under its own (HF) names; each shard must hold exactly the
    tensors the index lists for it."""
    files = weight_files(folder)
    if not (folder / INDEX).is_file():
        return _read_shard(files[0])
    listed = _weight_map(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        shard = _read_shard(path)
        wanted = {key for key, name in listed.items() if name == path.name}
        for key in sorted(wanted ^ shard.keys())[:1]:
            where = f"listed for it in {INDEX} but not in it" if key in wanted else f"in it but not listed for it in {INDEX}"
            raise CheckpointError(f"{path}: tensor {key!r} is {where}: a damaged or mixed-up folder")
        tensors.update(shard)
    return tensors


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors under BlinkDL's key names, checked against its config.json (every
    error names the folder or file)."""
    config = read_config(folder)
    layout = layout_of(folder, config)
    try:
        tensors = layout.mapping.to_blink(read_raw(folder), config)
        layout.mapping.check_config(config, tensors)
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(folder)) else f"{folder}: {message}") from None
    return tensors


def layout_for(version: float) -> Layout:
    """The layout that writes RWKV-``version`` models."""
    for layout in LAYOUTS.values():
        if layout.version == version:
            return layout
    raise CheckpointError(f"no Hugging Face layout for RWKV-{version} models yet (rwkvkit writes: {', '.join(sorted(LAYOUTS))})")


def shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in order, into groups of at most ``max_bytes`` (a bigger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += nbytes
    return groups


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], spec: Any, max_shard_bytes: int) -> list[str]:
    """Write BlinkDL-named ``tensors`` of a model of ``spec`` (its architecture's spec) as an HF folder
    (``folder`` must exist and be empty); returns the names of the files written."""
    from safetensors.torch import save_file

    layout = layout_for(spec.version)
    named = layout.mapping.from_blink(tensors)
    dtype = next(iter(named.values())).dtype
    (folder / CONFIG).write_text(json.dumps(layout.mapping.config(spec, dtype), indent=2) + "\n", encoding="utf-8")
    groups = shards(named, max_shard_bytes)
    meta = {"format": "pt"}  # what transformers' from_pretrained expects of a safetensors file
    if len(groups) == 1:
        save_file(own_tensors(groups[0]), str(folder / SINGLE), metadata=meta)
        return [CONFIG, SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_file(own_tensors(group), str(folder / name), metadata=meta)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in named.values())},
        "weight_map": {key: name for name, group in zip(names, groups) for key in group},
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [CONFIG, INDEX, *names]


def own_tensors(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no memory (safetensors refuses views of one buffer, and a
    tied head is the embedding's own tensor)."""
    seen: set[int] = set()
    out = {}
    for key, t in group.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.contiguous() if ptr not in seen and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
    return out


def folder_tokenizer(folder: Path) -> Path | None:
    """The tokenizer file a model folder ships, if rwkvkit can read one (tokenizer.json first)."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def world_vocab_file(path: Path) -> Path:
    """A World vocabulary file the ``rwkv_world`` tokenizer reads (``<id> <literal> <length>``
    lines): ``path`` itself, or for an HF folder's ``vocab.txt`` (transformers-style
    ``Rwkv5Tokenizer``: line i is token id i as a Python bytes literal, line 0 a placeholder for
    id 0, the end of text) the same tokens rewritten that way, once per content, in rwkvkit's cache."""
    if path.name != HF_WORLD_VOCAB:
        return path
    from rwkvkit.native import cache_dir, write_atomically

    try:
        data = path.read_bytes()
        lines = data.decode("utf-8").split("\n")
    except (OSError, UnicodeError) as exc:
        raise TokenizerError(f"cannot read vocab file {path}: {exc}") from None
    target = cache_dir() / "vocab" / f"hf-world-{hashlib.sha256(data).hexdigest()[:16]}.txt"
    if target.is_file():
        return target
    out = []
    for token_id, line in enumerate(lines):
        if token_id == 0 or not line:
            continue
        try:
            token = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            token = None
        token = token.encode("utf-8") if isinstance(token, str) else token
        if not isinstance(token, bytes) or not token:
            raise TokenizerError(f"{path}:{token_id + 1}: expected a Python bytes literal per line (an RWKV World vocab.txt), got {line!r:.80}")
        out.append(f"{token_id} {token!r} {len(token)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda tmp: tmp.write_text("\n".join(out) + "\n", encoding="utf-8"))
    return target


def describe(folder: Path) -> str:
    """One line on what a model folder holds (for ``rwkvkit info``)."""
    files = weight_files(folder)
    tokenizer = folder_tokenizer(folder)
    return (
        f"Hugging Face folder, model_type {read_config(folder).get('model_type')}, "
        f"{len(files)} safetensors file{'s' if len(files) > 1 else ''}, tokenizer {tokenizer.name if tokenizer else 'none'}"
    )
