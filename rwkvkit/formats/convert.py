"""``rwkvkit convert SRC DST``: a model between ``.pth``, ``.safetensors`` and Hugging Face folders.

The source is read and validated like any model (so a damaged or foreign file is refused with the
loader's message); the result is written next to its destination, read back with the reader of
its format, and compared tensor by tensor (a content digest of names, dtypes, shapes and bytes)
with what was meant to be written. The loader is the model's only input, so equal tensors load to
equal logits. Only then does the result take its place: a destination that exists is replaced only
with ``force``, and never half-written.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rwkvkit.checkpoint import expected_shapes, load_checkpoint, validate
from rwkvkit.errors import CheckpointError, RwkvkitError
from rwkvkit.formats import hf
from rwkvkit.formats.files import content_digest
from rwkvkit.formats.lora import Lora, merge_loras
from rwkvkit.formats.tuned_state import split_time_states
from rwkvkit.native import write_atomically

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILE_KINDS = {".pth": "pth", ".safetensors": "safetensors", ".st": "safetensors"}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")


class ConvertError(RwkvkitError):
    """A conversion cannot start (bad destination) or its result did not read back identically."""


@dataclass(frozen=True)
class Converted:
    path: Path
    kind: str  # pth, safetensors or hf
    files: list[str]
    digest: str  # of every tensor written, as the loader reads them back


def output_kind(dst: Path) -> str:
    """``pth``, ``safetensors`` (by suffix) or ``hf``: a folder, named without a suffix, existing,
    or named after a model size (``rwkv7-0.1B``: a "suffix" that starts with a digit is none)."""
    if dst.is_dir() or not dst.suffix or dst.suffix[1:2].isdigit():
        return "hf"
    if dst.suffix in FILE_KINDS:
        return FILE_KINDS[dst.suffix]
    raise ConvertError(
        f"{dst}: unknown destination format {dst.suffix!r}; expected a .pth or .safetensors file, or a folder for a Hugging Face"
        " folder (a name without a suffix, or a folder created first)"
    )


def convert(
    src: str | Path, dst: str | Path, dtype: str | None = None, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, loras: Sequence[Lora] = ()
) -> Converted:
    """Write the model at ``src`` (anything ``RWKV()`` loads) to ``dst``, with ``loras`` merged in
    (in float32, before any cast) and optionally cast to ``dtype`` (fp32, fp16 or bf16); verified
    before it replaces anything (see the module doc)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if max_shard_bytes < 1:
        raise ConvertError(f"max shard size {max_shard_bytes}: expected a positive number of bytes")
    checkpoint = merge_loras(load_checkpoint(src), loras)
    dst = Path(dst).expanduser().absolute()
    kind = output_kind(dst)
    _check_destination(dst, kind, checkpoint.path, force)
    shapes = expected_shapes(checkpoint.spec)  # vectors as real files hold them ([1, 1, C]), whatever the source had
    tensors = {k: t.reshape(shapes[k]).to(DTYPES[dtype] if dtype else t.dtype) for k, t in checkpoint.tensors.items()}
    tensors |= {k: t.to(DTYPES[dtype]) if dtype else t for k, t in checkpoint.tuned_state.items()}  # a merged state stays merged
    if kind == "hf":
        layout = hf.layout_for(checkpoint.spec.version)
        if checkpoint.tuned_state and not getattr(layout.mapping, "TUNED_STATE", False):
            raise ConvertError(f"{checkpoint.path} carries a tuned initial state (time_state), which the {layout.model_type} Hugging Face layout has no place for; write a .pth or .safetensors file")
        tensors = {k: t for k, t in tensors.items() if k not in layout.mapping.NOT_WRITTEN}
    expected = content_digest(tensors)
    if kind == "hf":
        tokenizer = hf.folder_tokenizer(checkpoint.path) if checkpoint.path.is_dir() else None
        files = _write_folder(dst, tensors, checkpoint.spec, max_shard_bytes, expected, tokenizer)
    else:
        write_atomically(dst, lambda tmp: _write_file(tmp, kind, tensors, expected))
        files = [dst.name]
    return Converted(dst, kind, files, expected)


def _check_destination(dst: Path, kind: str, src: Path, force: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ConvertError(f"{dst} is the source itself; write the result somewhere else")
    if not dst.exists() and not dst.is_symlink():
        if not dst.parent.is_dir():
            raise ConvertError(f"{dst}: folder {dst.parent} does not exist")
        return
    if kind == "hf" and _is_empty_folder(dst):
        return
    if not force:
        raise ConvertError(f"{dst} already exists; pass --force to replace it")
    if kind == "hf" and not dst.is_dir():
        raise ConvertError(f"{dst} exists and is not a folder; a Hugging Face model is written as a folder")
    if kind != "hf" and dst.is_dir():
        raise ConvertError(f"{dst} is a folder; give a .pth or .safetensors file name")


def _verify(tensors: dict[str, torch.Tensor], expected: str, where: Path) -> None:
    """The read-back tensors must be a valid model with exactly the digest of what was written."""
    try:
        validate(split_time_states(tensors)[0])
    except CheckpointError as exc:
        raise ConvertError(f"{where}: the written model does not read back as a valid one ({exc}); nothing was replaced") from None
    if content_digest(tensors) != expected:
        raise ConvertError(f"{where}: the written model reads back with different tensors (disk full or failing?); nothing was replaced")


def _write_file(tmp: Path, kind: str, tensors: dict[str, torch.Tensor], expected: str) -> None:
    if kind == "safetensors":
        from safetensors.torch import load_file, save_file

        save_file(hf.own_tensors(tensors), str(tmp), metadata={"format": "pt"})
        _usual_permissions(tmp)
        _verify(load_file(str(tmp)), expected, tmp)
    else:
        torch.save(tensors, tmp)
        _verify(torch.load(tmp, map_location="cpu", mmap=zipfile.is_zipfile(tmp), weights_only=True), expected, tmp)


def _write_folder(dst: Path, tensors: dict[str, torch.Tensor], spec, max_shard_bytes: int, expected: str, tokenizer: Path | None) -> list[str]:
    """Write and verify a folder beside ``dst``, then move it (or, into an existing folder, its
    files, dropping the old weight files they replace: other files there are kept)."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        files = hf.write_folder(tmp, tensors, spec, max_shard_bytes)
        for name in files:
            _usual_permissions(tmp / name)
        _verify(hf.read_folder(tmp), expected, tmp)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
            files.append(tokenizer.name)
        if not dst.exists() or _is_empty_folder(dst):
            os.replace(tmp, dst)  # a rename: onto an empty folder too
            return files
        stale = [p for p in dst.iterdir() if p.name not in files and _is_weight_file(p.name)]
        for name in files:
            os.replace(tmp / name, dst / name)
        for path in stale:
            path.unlink()
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _usual_permissions(path: Path) -> None:
    """A new file's usual mode (0666 less the umask): safetensors writes its files owner-only,
    and a converted model is meant to be shared like any other file."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _is_weight_file(name: str) -> bool:
    return name in (hf.SINGLE, hf.INDEX) or (name.startswith("model-") and name.endswith(".safetensors"))


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("BIKMG")
    unit = text.strip().upper()[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConvertError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise ConvertError(f"--max-shard-size {text!r}: expected a positive size")
    return int(value)
