"""One pluggy plugin manager that fills a name -> factory table per plugin kind.

(Named ``registry`` rather than ``plugins`` because the ``plugins/`` folder installs as the
``rwkvkit.plugins`` package of built-in plugins.)

Built-ins are plain modules registered exactly like third-party ones; entry points (group
``rwkvkit``) are loaded once, lazily, each guarded so a broken distribution yields one warning
naming it instead of breaking rwkvkit.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rwkvkit import hookspecs
from rwkvkit.errors import PluginError

BUILTIN_MODULES = ("rwkvkit.plugins.torch_backend",)
KINDS = ("backends", "tokenizers", "samplers", "callbacks")


class Registry:
    """Name tables for each plugin kind, filled on first use."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._tables: dict[str, dict[str, tuple[Any, str]]] | None = None

    def _load_plugins(self) -> None:
        for module_name in BUILTIN_MODULES:
            self.pm.register(importlib.import_module(module_name), name=module_name)
        for ep in entry_points(group=hookspecs.PROJECT):
            if self.pm.has_plugin(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a third-party plugin must never break rwkvkit
                dist = ep.dist.name if ep.dist else ep.value
                warnings.warn(f"rwkvkit plugin {ep.name!r} from {dist} failed to load: {exc!r}", stacklevel=2)

    def _tables_filled(self) -> dict[str, dict[str, tuple[Any, str]]]:
        if self._tables is None:
            self._load_plugins()
            tables: dict[str, dict[str, tuple[Any, str]]] = {kind: {} for kind in KINDS}
            for kind in KINDS:
                hook = getattr(self.pm.hook, f"register_{kind}")
                for impl in hook.get_hookimpls():
                    impl.function(register=self._registrar(tables[kind], kind, impl.plugin_name))
            self._tables = tables
        return self._tables

    @staticmethod
    def _registrar(table: dict[str, tuple[Any, str]], kind: str, plugin: str):
        def register(factory: Any, name: str | None = None) -> None:
            key = name or getattr(factory, "name", None)
            if not key:
                raise PluginError(f"plugin {plugin!r} registered a {kind[:-1]} without a name")
            if key in table:
                raise PluginError(f"{kind[:-1]} name {key!r} is registered twice: by {table[key][1]!r} and by {plugin!r}")
            table[key] = (factory, plugin)

        return register

    def get(self, kind: str, name: str) -> Any:
        table = self._tables_filled()[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind[:-1]} {name!r}; available: {known}")
        return table[name][0]

    def names(self, kind: str) -> list[str]:
        return sorted(self._tables_filled()[kind])


registry = Registry()
