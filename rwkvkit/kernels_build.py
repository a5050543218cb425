"""Lazy JIT build of the CUDA kernels in ``kernels/`` (``torch.ops.rwkvkit.wkv7``, ``.matvec``, ...).

Built with ``torch.utils.cpp_extension.load`` on first use (when the ``cuda`` backend is first
considered for a CUDA placement, or by ``rwkvkit build-kernels``), never at import time, into the
rwkvkit cache (``$RWKVKIT_CACHE``, else ``$XDG_CACHE_HOME/rwkvkit``), one folder per torch and
CUDA version; later processes only load the library. Where the toolchain is missing, the error
says what to install, and backend ``auto`` uses the ``torch`` backend instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.native import cache_dir

NAME = "rwkvkit_cuda"
SOURCES = ("rwkvkit_ops.cpp", "wkv7.cu", "matvec.cu", "decode.cu")
FALLBACK = "backend 'torch' runs the same strategies without custom kernels (RWKV(..., backend='torch'))"


class KernelBuildError(RwkvkitError):
    """The CUDA kernels cannot be built or loaded here; the message says why and what to do."""


def build_dir() -> Path:
    return cache_dir() / "torch_extensions" / f"{NAME}-torch{torch.__version__}-cuda{torch.version.cuda}"


def toolchain_problem() -> str | None:
    """Why the kernels cannot be built here, checked without building; None if they can."""
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA, so it cannot build CUDA kernels; {FALLBACK}"
    from torch.utils import cpp_extension

    home = Path(cpp_extension.CUDA_HOME or "/nonexistent")
    if not (home / "bin" / "nvcc").is_file():
        return f"nvcc (the CUDA compiler) not found: install the CUDA {torch.version.cuda} toolkit and set CUDA_HOME; {FALLBACK}"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"CUDA headers not found under {home}/include: set CUDA_HOME to the toolkit's root (the folder holding bin/nvcc and include/); {FALLBACK}"
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        return f"no C++ compiler found ({compiler!r}): install g++ or set CXX; {FALLBACK}"
    if not cpp_extension.is_ninja_available():
        return f"ninja not found (torch's extension builder needs it): pip install ninja; {FALLBACK}"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return "no CUDA device here to read the GPU architecture from: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0' for A100 and H100)"
    return None


@functools.cache
def build(verbose: bool = False) -> Path:
    """Build the kernels if needed and load them into this process; returns the build folder.

    The first build takes about a minute (progress goes to stderr); ``torch`` rebuilds by itself
    when a source changes. Raises KernelBuildError when the toolchain is missing or the build fails.
    """
    problem = toolchain_problem()
    if problem:
        raise KernelBuildError(problem)
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    kernels = resources.files("rwkvkit.kernels")
    sources = [Path(str(kernels.joinpath(name))) for name in SOURCES]
    built = [lib.stat().st_mtime for lib in directory.glob(f"{NAME}*.so")]
    stale = not built or max(src.stat().st_mtime for src in sources) > max(built)
    if stale:
        print(f"rwkvkit: building CUDA kernels into {directory} (about a minute) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(
            NAME,
            [str(src) for src in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(directory),
            verbose=verbose,
            is_python_module=False,
        )
    except Exception as exc:  # compiler errors, a broken toolchain, a full disk: all end up here
        raise KernelBuildError(f"building the CUDA kernels in {directory} failed: {str(exc)[-3000:]}\n{FALLBACK}") from exc
    if stale:
        print(f"rwkvkit: CUDA kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return directory


@functools.cache
def build_error() -> str | None:
    """Build/load once per process: None when ``torch.ops.rwkvkit`` is ready, else the reason."""
    try:
        build()
    except KernelBuildError as exc:
        if toolchain_problem() is None:  # a toolchain that is there but fails deserves a warning
            warnings.warn(f"rwkvkit: {exc}", stacklevel=2)
        return str(exc)
    return None


def ops() -> Any:
    """``torch.ops.rwkvkit`` with the kernels loaded; raises KernelBuildError when impossible."""
    problem = build_error()
    if problem:
        raise KernelBuildError(problem)
    return torch.ops.rwkvkit
