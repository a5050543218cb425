"""Small C++ kernels from ``kernels/``, compiled on first use and called through ctypes (the CPU
backends' ops: :mod:`rwkvkit.native.cpu`).

A plain C ABI needs no Python or torch headers, so a build takes a few seconds. Builds go to the
user cache (never at import time: a compiler may be slow or missing), keyed by a hash of the
source, flags and platform. A build is written atomically, then its size and sha256 go to a
sidecar record (also atomically); a later process loads a cached library only when it matches its
record, and rebuilds it otherwise, because ``dlopen`` of a truncated library kills the process
with SIGBUS and a foreign one lacks our symbols.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Callable

STALE_AFTER_S = 30 * 86400  # other builds of a kernel unused this long are removed by a new build


def cache_dir() -> Path:
    """``$RWKVKIT_CACHE``, else ``$XDG_CACHE_HOME/rwkvkit``, else ``~/.cache/rwkvkit``."""
    root = os.environ.get("RWKVKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkvkit"
    return Path(root)


@functools.cache
def load_library(kernels: str | tuple[str, ...], flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (once) and load ``kernels/<name>`` (several sources form one library, compiled as one
    translation unit in the order given: a header goes before the sources that use it, and the
    library is named after the first ``.cpp``); OSError says why when that is impossible."""
    names = (kernels,) if isinstance(kernels, str) else kernels
    source = b"\n".join(resources.files("rwkvkit.kernels").joinpath(name).read_bytes() for name in names)
    digest = hashlib.sha256(source + repr(flags).encode() + _host_signature().encode()).hexdigest()[:16]
    stem = next(Path(name).stem for name in names if not name.endswith(".h"))
    path = cache_dir() / f"{stem}-{digest}.so"
    if not _verified(path):
        _compile(source, path, flags)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # our own build, yet unloadable (e.g. a system library it linked changed)
        _compile(source, path, flags)
        lib = ctypes.CDLL(str(path))
    touch(path)
    return lib


def _record(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _verified(path: Path) -> bool:
    """Whether ``path`` is the library its record describes (checked before any ``dlopen``)."""
    try:
        return _record(path).read_text().strip() == _fingerprint(path)
    except OSError:  # no library or no record
        return False


def _host_signature() -> str:
    """Platform plus the CPU's feature flags: a ``-march=native`` build must not be reused on a
    machine (sharing this cache) whose CPU lacks them."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return f"{sys.platform}-{platform.machine()}-{flags}"


def _compile(source: bytes, target: Path, flags: tuple[str, ...]) -> None:
    compiler = shlex.split(os.environ.get("CXX") or shutil.which("c++") or "")
    if not compiler:
        raise OSError("no C++ compiler found: install g++ or clang++, or set CXX")

    def build(partial: Path) -> None:
        command = [*compiler, "-O2", "-std=c++17", "-shared", "-fPIC", *flags, "-x", "c++", "-", "-o", str(partial)]
        result = subprocess.run(command, input=source, capture_output=True)
        if result.returncode:
            raise OSError(f"{shlex.join(command)} failed: {result.stderr.decode(errors='replace').strip()[-1000:]}")

    write_atomically(target, build)
    fingerprint = _fingerprint(target)
    write_atomically(_record(target), lambda tmp: tmp.write_text(fingerprint + "\n"))  # only now does it verify
    _remove_stale_builds(target)


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a fresh file next to ``target``, then move it onto ``target`` in one step, so
    no reader ever sees a half-written file (same file system: ``os.replace`` is atomic; a random
    name: concurrent writers never share one). Nothing is left behind if ``write`` fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")  # created by ``write``: usual permissions
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Marks a cached file as in use (its modification time: old builds are removed by
    :func:`_remove_stale_builds`, old int8 entries evicted first)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache is fine to load from
        pass


def _remove_stale_builds(target: Path) -> None:
    """Every source change makes a new build: drop the other builds of this kernel (and their
    records) that nobody loaded for :data:`STALE_AFTER_S`. A process still using one keeps its copy."""
    stem = target.name.rsplit("-", 1)[0]
    for other in target.parent.glob(f"{stem}-{'[0-9a-f]' * 16}.so"):
        try:
            if other != target and time.time() - other.stat().st_mtime > STALE_AFTER_S:
                other.unlink()
                _record(other).unlink(missing_ok=True)
        except OSError:  # removed meanwhile by another process
            pass
