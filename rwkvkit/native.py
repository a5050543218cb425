"""Small C++ kernels from ``kernels/``, compiled on first use and called through ctypes.

A plain C ABI needs no Python or torch headers, so a build takes about a second. Builds go to the
user cache (never at import time: a compiler may be slow or missing), keyed by a hash of the
source, flags and platform, and are written atomically so concurrent first uses are safe.
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
from importlib import resources
from pathlib import Path


def cache_dir() -> Path:
    """``$RWKVKIT_CACHE``, else ``$XDG_CACHE_HOME/rwkvkit``, else ``~/.cache/rwkvkit``."""
    root = os.environ.get("RWKVKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkvkit"
    return Path(root)


@functools.cache
def load_library(kernels: str | tuple[str, ...], flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (once) and load ``kernels/<name>`` (several sources form one library, compiled as one
    translation unit); OSError says why when that is impossible."""
    names = (kernels,) if isinstance(kernels, str) else kernels
    source = b"\n".join(resources.files("rwkvkit.kernels").joinpath(name).read_bytes() for name in names)
    digest = hashlib.sha256(source + repr(flags).encode() + _host_signature().encode()).hexdigest()[:16]
    path = cache_dir() / f"{Path(names[0]).stem}-{digest}.so"
    if not path.exists():
        _compile(source, path, flags)
    return ctypes.CDLL(str(path))


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
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [*compiler, "-O2", "-std=c++17", "-shared", "-fPIC", *flags, "-x", "c++", "-", "-o", str(partial)]
    result = subprocess.run(command, input=source, capture_output=True)
    if result.returncode:
        raise OSError(f"{shlex.join(command)} failed: {result.stderr.decode(errors='replace').strip()[-1000:]}")
    os.replace(partial, target)  # atomic, so a concurrent first use never loads a half-written file
