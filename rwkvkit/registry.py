"""One pluggy plugin manager that fills a name -> factory table per plugin kind.

(Named ``registry`` rather than ``plugins`` because the ``plugins/`` folder installs as the
``rwkvkit.plugins`` package of built-in plugins.)

Built-ins are plain modules registered exactly like third-party ones. Entry points (group
``rwkvkit``) are loaded once, lazily, each guarded so a broken distribution yields one warning
naming it instead of breaking rwkvkit. Environment variables, read when plugins first load:

- ``RWKVKIT_PLUGINS=a,b``: load only these entry-point plugins (empty: none);
- ``RWKVKIT_BLOCK_PLUGINS=c``: never load these.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rwkvkit import hookspecs
from rwkvkit.errors import PluginError

BUILTIN_MODULES = (
    "rwkvkit.plugins.torch_backend",
    "rwkvkit.plugins.cuda_backend",
    "rwkvkit.plugins.cpu_backend",
    "rwkvkit.plugins.int8_backend",
    "rwkvkit.plugins.samplers",
    "rwkvkit.plugins.callbacks",
    "rwkvkit.plugins.rwkv_world",
    "rwkvkit.plugins.hf_tokenizer",
    "rwkvkit.plugins.constraints",
    "rwkvkit.plugins.architectures",
)
KINDS = ("backends", "tokenizers", "samplers", "callbacks", "constraints", "architectures")
ALLOW_ENV, BLOCK_ENV = "RWKVKIT_PLUGINS", "RWKVKIT_BLOCK_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    registers: dict[str, list[str]] = field(default_factory=dict)


def _names(env: str) -> set[str] | None:
    value = os.environ.get(env)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


class Registry:
    """Name tables for each plugin kind, filled on first use."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._tables: dict[str, dict[str, tuple[Any, str]]] | None = None
        self._loaded = False

    def _load_plugins(self) -> None:
        from rwkvkit import __version__

        self._loaded = True
        for module_name in BUILTIN_MODULES:
            self.add(importlib.import_module(module_name), module_name, "rwkvkit (built-in)", __version__)
        allow, block = _names(ALLOW_ENV), _names(BLOCK_ENV) or set()
        for ep in entry_points(group=hookspecs.PROJECT):
            if (allow is not None and ep.name not in allow) or ep.name in block or self.pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist else ep.value
            try:
                self.add(ep.load(), ep.name, dist, ep.dist.version if ep.dist else "?")
            except Exception as exc:  # a third-party plugin must never break rwkvkit
                warnings.warn(f"rwkvkit plugin {ep.name!r} from {dist} failed to load and is skipped: {exc!r}", stacklevel=3)

    def add(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin object (a module or any object with hook implementations)."""
        self.pm.register(plugin, name=name)
        self._infos[name] = PluginInfo(name, distribution or name, version)
        self._tables = None

    def remove(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._infos.pop(name, None)
        self._tables = None

    def _tables_filled(self) -> dict[str, dict[str, tuple[Any, str]]]:
        if not self._loaded:
            self._load_plugins()
        if self._tables is None:
            tables: dict[str, dict[str, tuple[Any, str]]] = {kind: {} for kind in KINDS}
            for info in self._infos.values():
                info.registers = {}
            for kind in KINDS:
                for impl in getattr(self.pm.hook, f"register_{kind}").get_hookimpls():
                    try:
                        impl.function(register=self._registrar(tables[kind], kind, impl.plugin_name))
                    except PluginError:
                        raise
                    except Exception as exc:
                        warnings.warn(f"rwkvkit plugin {impl.plugin_name!r} failed in register_{kind} and is skipped: {exc!r}", stacklevel=3)
            self._tables = tables
        return self._tables

    def _registrar(self, table: dict[str, tuple[Any, str]], kind: str, plugin: str):
        def register(factory: Any, name: str | None = None) -> None:
            key = name or getattr(factory, "name", None)
            if not key:
                raise PluginError(f"plugin {plugin!r} registered a {kind[:-1]} without a name")
            if key in table:
                raise PluginError(f"{kind[:-1]} name {key!r} is registered twice: by plugin {table[key][1]!r} and by plugin {plugin!r}")
            table[key] = (factory, plugin)
            self._infos[plugin].registers.setdefault(kind, []).append(key)

        return register

    def get(self, kind: str, name: str) -> Any:
        table = self._tables_filled()[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind[:-1]} {name!r}; available: {known}")
        return table[name][0]

    def names(self, kind: str) -> list[str]:
        return sorted(self._tables_filled()[kind])

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution, version and what it registered."""
        self._tables_filled()
        return list(self._infos.values())


registry = Registry()
