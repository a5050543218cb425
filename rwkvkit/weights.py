"""Weight dataclasses: each field names its checkpoint key and :class:`~rwkvkit.backend.Role`, so
an architecture declares its weights once and loading, streaming and quantizing follow from it."""

from __future__ import annotations

from dataclasses import field, fields, replace
from typing import Any, Callable

from rwkvkit.backend import Role

Fetch = Callable[..., Any]  # (key, role, optional[, transform]) -> prepared weight or None
Transform = tuple[str, Callable[[Any], Any]]


def weight(key: str, role: Role, optional: bool = False, transform: Transform | None = None) -> Any:
    """A weight field read from checkpoint key ``<prefix><key>``; ``transform`` is a load-time
    ``(name, rows -> rows)`` applied to the stored rows before the backend prepares them (it must
    treat every row alone, and its name say what it does: prepared weights are cached by it)."""
    return field(metadata={"key": key, "role": role, "optional": optional, "transform": transform})


def derived(role: Role) -> Any:
    """A weight the architecture makes itself from checkpoint tensors (e.g. one slice of a packed
    LoRA factor, read through :meth:`rwkvkit.architecture.Loader.source`); None until it does."""
    return field(default=None, metadata={"role": role, "derived": True})


def group(key: str, cls: type) -> Any:
    """A nested weights dataclass read from keys ``<prefix><key>...``."""
    return field(metadata={"key": key, "group": cls})


def load_weights(cls: type, prefix: str, fetch: Fetch) -> Any:
    """Build a weights dataclass from checkpoint keys; ``fetch(key, role, optional)`` returns the
    prepared tensor (or None for a missing optional key)."""
    values = {}
    for f in fields(cls):
        meta = f.metadata
        if meta.get("derived"):
            continue
        if "role" in meta:
            extra = (meta["transform"],) if meta.get("transform") else ()
            values[f.name] = fetch(prefix + meta["key"], meta["role"], meta["optional"], *extra)
        elif "group" in meta:
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
        elif f.metadata.get("role") is role and value is not None:
            values[f.name] = fn(value)
    return replace(weights, **values)
