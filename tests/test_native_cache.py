"""The native build cache (rwkvkit/native/__init__.py): a damaged, foreign or unrecorded library in the cache
is rebuilt before anything loads it. Each load runs in a fresh subprocess, so a crash (SIGBUS from
a truncated library) fails the test instead of killing pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkvkit import native

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")

# Logits of the cpu backend (native kernels: prefill, then one decoded token) against the torch
# backend's (no native code); a fallback to the torch ops would warn, and the warning is an error.
SCRIPT = """
import sys, warnings
warnings.simplefilter("error", RuntimeWarning)
import torch
from rwkvkit import RWKV
from rwkvkit.native.cpu import library
assert library() is not None
def run(backend):
    model = RWKV(sys.argv[1], "cpu fp32", backend=backend)
    out, state = model.forward([1, 2, 3, 4, 5], None)
    return torch.stack([out, model.forward([6], state)[0]])
ref = run("torch")
torch.testing.assert_close(run("auto"), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
print("ok")
"""


def run_model(model: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RWKVKIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(model)], env=env, capture_output=True, text=True, timeout=600)


def cpu_library(cache: Path) -> Path:
    (path,) = cache.glob("cpu_rwkv7-*.so")
    return path


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, model_paths) -> Path:
    cache = tmp_path_factory.mktemp("native-cache")
    proc = run_model(model_paths["tiny"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache


def truncate(fraction: float):
    def damage(lib: Path, tmp_path: Path) -> None:
        data = lib.read_bytes()
        lib.write_bytes(data[: int(len(data) * fraction)])

    return damage


def foreign(lib: Path, tmp_path: Path) -> None:
    """Another library under our file name: it loads, but has none of our symbols."""
    source = tmp_path / "foreign.c"
    source.write_text("int not_rwkvkit(void) { return 1; }\n")
    subprocess.run([shutil.which("c++"), "-shared", "-fPIC", "-x", "c", str(source), "-o", str(lib)], check=True)


def drop_record(lib: Path, tmp_path: Path) -> None:
    native._record(lib).unlink()


def garble_record(lib: Path, tmp_path: Path) -> None:
    native._record(lib).write_text("not a record")


@pytest.mark.parametrize(
    "damage",
    [truncate(0.5), truncate(0.9), foreign, drop_record, garble_record],
    ids=["truncated-50%", "truncated-90%", "foreign-library", "record-missing", "record-garbled"],
)
def test_a_cached_library_that_does_not_verify_is_rebuilt(built_cache, model_paths, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    lib = cpu_library(cache)
    damage(lib, tmp_path)
    before = lib.stat().st_ino

    proc = run_model(model_paths["tiny"], cache)

    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-3000:]}"
    assert lib.stat().st_ino != before  # replaced by a fresh build
    assert native._verified(lib)
    assert lib.stat().st_size == cpu_library(built_cache).stat().st_size


def test_a_verified_library_is_loaded_as_is(built_cache, model_paths, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    before = cpu_library(cache).stat().st_ino

    assert run_model(model_paths["tiny"], cache).returncode == 0
    assert cpu_library(cache).stat().st_ino == before


@pytest.fixture
def fresh_load_library(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path))
    native.load_library.cache_clear()
    yield tmp_path
    native.load_library.cache_clear()


def test_a_new_build_removes_builds_of_the_same_kernel_unused_for_a_month(fresh_load_library):
    cache = fresh_load_library
    old, recent, other = (cache / name for name in ("rwkv_world_tokenizer-0123456789abcdef.so", "rwkv_world_tokenizer-fedcba9876543210.so", "cpu_rwkv7-0123456789abcdef.so"))
    for path in (old, recent, other):
        path.write_bytes(b"stale build")
        native._record(path).write_text("11 0\n")
    month_ago = time.time() - native.STALE_AFTER_S - 60
    for path in (old, native._record(old), other):
        os.utime(path, (month_ago, month_ago))

    lib = native.load_library("rwkv_world_tokenizer.cpp")

    assert lib.rwkv_trie_new  # the real library
    assert not old.exists() and not native._record(old).exists()
    assert recent.exists() and other.exists()  # in use lately / another kernel
    assert [p.name for p in cache.glob("*.tmp")] == []
