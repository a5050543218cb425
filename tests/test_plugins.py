"""The plugin registry and its hooks: registration, clashes, broken plugins, allow/block lists."""

from __future__ import annotations

import inspect
import re
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV, hookspecs
from rwkvkit.backend import Backend
from rwkvkit.cli import main
from rwkvkit.errors import PluginError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import Callback, Sampler, Tokenizer
from rwkvkit.registry import KINDS, Registry, registry

README = Path(__file__).resolve().parents[1] / "README.md"


class EchoTokenizer(Tokenizer):
    vocab_size = 256

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        return bytes(ids)


class FirstSampler(Sampler):
    def sample(self, logits, ctx):
        return 0


class NoopBackend(Backend):
    name = "noop"

    def linear(self, x, weight):
        return x

    def wkv(self, kv, r, decay, k, v, kk, a):
        return r, kv


def constraint_factory(source, tokenizer):
    """A constraint kind's factory (tests/test_constraints.py exercises real ones)."""
    raise NotImplementedError


def make_plugin():
    plugin = types.SimpleNamespace()

    @hookimpl
    def register_backends(register):
        register(NoopBackend)

    @hookimpl
    def register_tokenizers(register):
        register(EchoTokenizer, name="echo")

    @hookimpl
    def register_samplers(register):
        register(FirstSampler, name="first")

    @hookimpl
    def register_callbacks(register):
        register(Callback, name="nothing")

    @hookimpl
    def register_constraints(register):
        register(constraint_factory, name="anything")

    for fn in (register_backends, register_tokenizers, register_samplers, register_callbacks, register_constraints):
        setattr(plugin, fn.__name__, fn)
    return plugin


@pytest.fixture
def test_plugin():
    registry.add(make_plugin(), "test-plugin", "tests", "0")
    yield
    registry.remove("test-plugin")


@pytest.mark.parametrize(
    "kind, name, cls",
    [("backends", "noop", NoopBackend), ("tokenizers", "echo", EchoTokenizer), ("samplers", "first", FirstSampler), ("callbacks", "nothing", Callback), ("constraints", "anything", constraint_factory)],
)
def test_every_hook_registers(test_plugin, kind, name, cls):
    assert registry.get(kind, name) is cls
    assert name in registry.names(kind)


def test_unregistering_removes_the_names(test_plugin):
    registry.remove("test-plugin")
    with pytest.raises(PluginError, match="unknown sampler 'first'"):
        registry.get("samplers", "first")
    registry.add(make_plugin(), "test-plugin", "tests", "0")  # for the fixture's teardown


def test_duplicate_names_name_both_plugins():
    reg = Registry()
    clash = types.SimpleNamespace(register_samplers=hookimpl(lambda register: register(FirstSampler, name="greedy")))
    reg.add(clash, "clashing-plugin")
    with pytest.raises(PluginError, match="sampler name 'greedy' is registered twice: by plugin '.*' and by plugin '.*'") as info:
        reg.names("samplers")
    assert "clashing-plugin" in str(info.value) and "rwkvkit.plugins.samplers" in str(info.value)


def fake_entry_points(*eps):
    return lambda group: [ep for ep in eps if ep.group == group]


def test_broken_entry_point_warns_and_the_rest_works(monkeypatch):
    broken = EntryPoint(name="broken", value="no_such_module_for_rwkvkit", group="rwkvkit")
    monkeypatch.setattr("rwkvkit.registry.entry_points", fake_entry_points(broken))
    reg = Registry()
    with pytest.warns(UserWarning, match="rwkvkit plugin 'broken' from no_such_module_for_rwkvkit failed to load"):
        names = reg.names("samplers")
    assert "nucleus" in names


def test_plugin_failing_inside_its_hook_warns():
    reg = Registry()

    def explode(register):
        raise RuntimeError("boom")

    reg.add(types.SimpleNamespace(register_samplers=hookimpl(explode)), "exploding")
    with pytest.warns(UserWarning, match="'exploding' failed in register_samplers.*boom"):
        assert "greedy" in reg.names("samplers")


@pytest.mark.parametrize("env, loaded", [({}, {"a", "b"}), ({"RWKVKIT_PLUGINS": "a"}, {"a"}), ({"RWKVKIT_PLUGINS": ""}, set()), ({"RWKVKIT_BLOCK_PLUGINS": "a"}, {"b"})])
def test_allow_and_block_lists(monkeypatch, tmp_path, env, loaded):
    for name in "ab":
        (tmp_path / f"plugin_{name}.py").write_text(
            "from rwkvkit.hookspecs import hookimpl\n"
            "from rwkvkit.plugins.samplers import GreedySampler\n"
            f"@hookimpl\ndef register_samplers(register):\n    register(GreedySampler, name='greedy_{name}')\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name=n, value=f"plugin_{n}", group="rwkvkit") for n in "ab"]
    monkeypatch.setattr("rwkvkit.registry.entry_points", fake_entry_points(*eps))
    for key in ("RWKVKIT_PLUGINS", "RWKVKIT_BLOCK_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reg = Registry()
    assert {n.removeprefix("greedy_") for n in reg.names("samplers") if n.startswith("greedy_")} == loaded


def test_plugins_command(test_plugin, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "test-plugin (tests 0)" in out and "samplers: first" in out and "rwkvkit.plugins.samplers" in out


def test_every_hook_is_documented():
    """Each hookspec has a docstring and a section in the README naming it (datasette's check)."""
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert sorted(specs) == sorted(f"register_{kind}" for kind in KINDS)
    readme = README.read_text()
    for name in specs:
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert re.search(rf"^#+ .*`{name}\(register\)`", readme, re.M), f"README has no section for {name}"


class EagerBackend(NoopBackend):
    """A third-party backend that ranks itself above the built-ins where it can run."""

    name = "eager"
    priority = 100

    @classmethod
    def unavailable_reason(cls, placement):
        return None if placement.dtype == torch.float16 else "fp16 only"


def test_auto_ranks_backends_by_declared_priority(model_paths):
    """backend='auto' is not a fixed list: a plugin's backend wins where it says it can run, and
    the built-ins keep their order elsewhere (cpu before the torch fallback)."""
    plugin = types.SimpleNamespace(register_backends=hookimpl(lambda register: register(EagerBackend)))
    registry.add(plugin, "eager-plugin", "tests", "0")
    try:
        assert type(RWKV(model_paths["tiny"], "cpu fp16").stages[0].ops) is EagerBackend
        assert type(RWKV(model_paths["tiny"], "cpu fp32").stages[0].ops).name == "cpu"
    finally:
        registry.remove("eager-plugin")
    assert type(RWKV(model_paths["tiny"], "cpu fp16").stages[0].ops).name == "torch"


def test_core_modules_do_not_import_built_in_plugins():
    """Core asks the registry for built-ins (as for any plugin); importing it loads none of them."""
    import subprocess
    import sys

    code = (
        "import sys, rwkvkit, rwkvkit.compat, rwkvkit.run, rwkvkit.generation, rwkvkit.model, rwkvkit.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('rwkvkit.plugins.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
