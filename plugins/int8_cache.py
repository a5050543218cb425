"""The quantizing CPU backends' disk cache (``int8`` and ``int4``): one safetensors file per model and stage.

``<cache>/<backend>/<checkpoint stem>-<first>-<stop>-<digest>.safetensors`` (``<cache>`` is
:func:`rwkvkit.native.cache_dir`) (``<backend>``: ``int8`` or ``int4``) holds the codes and scales of every quantized weight one stage
of a load prepared (layers ``first..stop-1``, plus the embedding on the first stage and the head on the
last), as ``<key>.q`` / ``<key>.scale`` (the key of a derived weight names its derivation too:
the embedding with ``ln0`` folded in at a given epsilon). The digest is of the checkpoint's identity: its resolved
path, size and modification time (of every file, for a model folder), and
:meth:`Checkpoint.fingerprint` (its spec, merged adapters and small tensors).
So a hit reads no matrix of the checkpoint at all, and a changed file gets a new entry. Entries do
not depend on the activation dtype: ``cpu fp32i8`` and ``cpu bf16i8`` share them.

Each weight read from an entry is checked against the checkpoint (shape, dtypes, finite
non-negative scales, the format the backend asked for) and quantized again when it does not fit: the kernels index the codes by their
own shape, so a damaged entry must never be trusted. An entry is written atomically
(:func:`rwkvkit.native.write_atomically`) once the load has succeeded, and only when something
in it changed. Entries are evicted least recently used first once the folder exceeds
``$RWKVKIT_INT8_CACHE_MB`` (default 4096, for each backend's folder; the entry in use is always kept); files of the
per-matrix layout used before (``<32 hex digits>.safetensors``) are removed, never read.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

from rwkvkit.checkpoint import Checkpoint, WeightSource
from rwkvkit.errors import RwkvkitError
from rwkvkit.native import cache_dir, touch, write_atomically
from rwkvkit.quant import GROUP, Quantized, QuantWeight, quantize_source

CACHE_VERSIONS = {"int8": "int8-per-row-v2", "int4": f"int4-group{GROUP}-v1"}  # per folder: a new version, new entries
LIMIT_ENV, DEFAULT_LIMIT_MB = "RWKVKIT_INT8_CACHE_MB", 4096
_OLD_LAYOUT = re.compile(r"[0-9a-f]{32}\.safetensors")


class StageCache:
    """The quantized weights of one stage of one model load by the backend ``folder`` names: read
    from its entry where they fit, quantized otherwise; :meth:`save` writes the entry back when it changed."""

    def __init__(self, checkpoint: Checkpoint, layers: range, folder: str = "int8") -> None:
        self.limit = limit_bytes()  # a bad setting fails the load before any work
        self.folder, self.version = folder, CACHE_VERSIONS[folder]
        self.path = entry_path(checkpoint, layers, folder)
        self.stored = _read(self.path)
        self.weights: dict[str, Quantized] = {}
        self.changed = False

    def get(self, source: WeightSource, fmt: type[QuantWeight]) -> QuantWeight:
        """``source`` quantized to ``fmt``: the stored codes when they fit it, else :func:`quantize_source`."""
        key = source.cache_key
        q, scale = self.stored.pop(f"{key}.q", None), self.stored.pop(f"{key}.scale", None)
        weight = None if q is None or scale is None else fmt.stored(q, scale, source.shape)
        if weight is None:
            weight, self.changed = quantize_source(source, fmt.quantize), True
        self.weights[key] = weight
        return weight

    def save(self) -> None:
        """Write the entry if a weight was quantized or it held tensors nobody asked for; mark it
        used; evict old entries beyond the size limit."""
        from safetensors.torch import save_file

        if self.changed or self.stored:
            tensors = {f"{key}.{part}": getattr(w, part) for key, w in self.weights.items() for part in ("q", "scale")}
            try:
                write_atomically(self.path, lambda tmp: save_file(tensors, str(tmp), metadata={"version": self.version}))
            except OSError as exc:
                reason = exc.strerror or exc
                warnings.warn(f"{self.folder}: cannot write the quantization cache in {self.path.parent} ({reason}); quantizing again on every load", RuntimeWarning, stacklevel=4)
                return
        else:
            touch(self.path)
        evict(self.path, self.limit)


def entry_path(checkpoint: Checkpoint, layers: range, folder: str = "int8") -> Path:
    """The entry of ``layers`` of ``checkpoint`` (see the module docstring for the identity)."""
    path = checkpoint.path.resolve()
    identity = f"{CACHE_VERSIONS[folder]}|{path}|{_file_identity(path)}|{checkpoint.fingerprint()}|{layers.start}|{layers.stop}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / folder / f"{path.stem[:64]}-{layers.start}-{layers.stop}-{digest}.safetensors"


def _file_identity(path: Path) -> str:
    """Size and modification time of a checkpoint file; of each file in a model folder (a shard
    rewritten in place does not change the folder's own time)."""
    if not path.is_dir():
        stat = path.stat()
        return f"{stat.st_size}|{stat.st_mtime_ns}"
    return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(path.iterdir()) if f.is_file())


def _read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the entry, memory-mapped rather than copied: the page cache can map its
    large folios with 2 MB pages, and the int8 kernels decode ~10% faster from those than from
    anonymous memory (measured on this machine). Entries are only ever replaced by a rename, so a
    mapping never sees its file change. Empty when the entry is missing or unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # whatever the damage, the entry is rebuilt
        return {}


def limit_bytes() -> int:
    """``$RWKVKIT_INT8_CACHE_MB`` in bytes (default :data:`DEFAULT_LIMIT_MB`)."""
    value = os.environ.get(LIMIT_ENV, "").strip() or str(DEFAULT_LIMIT_MB)
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise RwkvkitError(f"{LIMIT_ENV}={value!r}: expected a size in megabytes (a number >= 0)")
    return int(megabytes * 2**20)


def evict(keep: Path, limit: int) -> None:
    """Remove the least recently used entries until the folder's entries total at most ``limit``
    bytes (``keep`` stays, even alone over it), and every file of the old per-matrix layout. A
    process that has mapped an entry keeps reading it: the file lives on until it is unmapped."""
    entries = []
    for path in keep.parent.glob("*.safetensors"):
        try:
            if _OLD_LAYOUT.fullmatch(path.name):
                path.unlink()
            elif path != keep:
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        except OSError:  # removed meanwhile by another process, or a read-only cache
            pass
    total = sum(size for _, size, _ in entries) + (keep.stat().st_size if keep.exists() else 0)
    for _, size, path in sorted(entries):  # oldest first
        if total <= limit:
            break
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a read-only cache: nothing to evict from
            return
        total -= size
